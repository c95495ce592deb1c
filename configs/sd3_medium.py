"""Stable Diffusion 3 medium (2B MM-DiT): the published transformer shapes."""
from perco_jax.configs import common


def get_config():
    return common.base("sd3_medium", common.mmdit(
        num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192))
