"""Stable Diffusion 3.5 medium (MMDiT-X: QK RMS-norm, dual attention in the first 13 blocks)."""
from perco_jax.configs import common


def get_config():
    return common.base("sd35_medium", common.mmdit(
        num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
        qk_norm="rms_norm", dual_attention_layers=tuple(range(13))))
