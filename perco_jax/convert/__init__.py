"""PyTorch checkpoints (diffusers folders, original single files, HF text encoders) <-> Flax params.

Key maps live here and only here.
"""
from perco_jax.convert.common import ConversionError
from perco_jax.convert.pipeline import convert_to_folder
from perco_jax.convert.single_file_vae import load_single_file_vae
from perco_jax.convert.text_encoders import load_clip, load_t5, save_clip, save_t5
from perco_jax.convert.transformer import load_transformer, save_transformer
from perco_jax.convert.vae import load_vae, save_vae

__all__ = ["ConversionError", "convert_to_folder", "load_single_file_vae",
           "load_clip", "load_t5", "save_clip", "save_t5", "load_transformer", "save_transformer",
           "load_vae", "save_vae"]
