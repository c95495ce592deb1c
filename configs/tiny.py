"""Tiny configuration: every code path, runnable in seconds on a laptop CPU (the embedded default)."""
from perco_jax.configs import common


def get_config():
    config = common.base("tiny", common.mmdit(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32,
        qk_norm="rms_norm", dual_attention_layers=(0,)))
    config.dtype = "float32"
    config.remat = False
    return config
