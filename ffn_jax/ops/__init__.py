"""Compiled CPU kernels for ffn_jax: oneDNN through XLA FFI.

Kept import-light: ``ffn_jax.conv`` imports ``ffn_jax.ops.onednn``, which builds nothing until a
route is used. See ``onednn.py`` (custom calls, incl. conv + bias + residual + ReLU fused as
post-ops) and ``build.py`` (compile on first use). Nothing here imports the rest of ffn_jax:
``ffn_jax.conv`` owns the routes (``conv3d_block`` picks the fused kernel where there is one).
"""
