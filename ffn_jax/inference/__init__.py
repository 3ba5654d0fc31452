"""FFN inference: seed policies, face-max movement, the batched canvas, and the CLI runner.

``canvas.Canvas`` floods segments (host numpy) around one jitted batched prediction
(``predict.Predictor``); ``runner.run(config, workdir)`` is what ``infer.py`` calls.
"""
