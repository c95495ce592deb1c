"""Stable Diffusion 3.5 large (8B MM-DiT with QK RMS-norm)."""
from perco_jax.configs import common


def get_config():
    return common.base("sd35_large", common.mmdit(
        num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
        qk_norm="rms_norm"))
