"""Compiled CPU kernels for ffn_jax (oneDNN through XLA FFI) and the fused conv-block API.

Kept import-light: ``ffn_jax.conv`` imports ``ffn_jax.ops.onednn``, which builds nothing until a
route is used. See ``onednn.py`` (custom calls), ``build.py`` (compile on first use) and
``fused.py`` (conv + bias + residual + ReLU as one call where a route supports it).
"""
