"""PyTorch checkpoints (diffusers folders, original single files, HF text encoders) <-> Flax params.

Key maps live here and only here.
"""
from perco_jax.convert.common import ConversionError
from perco_jax.convert.transformer import load_transformer, save_transformer

__all__ = ["ConversionError", "load_transformer", "save_transformer"]
