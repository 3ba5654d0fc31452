"""Training: pure step (step.py), train state (state.py), the loop with its side effects (loop.py)."""
