"""Fields shared by every config; each preset module fills in the network shapes."""
import ml_collections


def mmdit(**shape) -> ml_collections.ConfigDict:
    """An MM-DiT section: diffusers' SD3Transformer2DModel config fields plus our additions."""
    cfg = ml_collections.ConfigDict(dict(
        sample_size=128, patch_size=2, in_channels=16, extra_in_channels=0, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, dual_attention_layers=(), qk_norm="",  # "" = none, or "rms_norm"
    ))
    cfg.update(shape)
    return cfg


def base(name: str, mmdit_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = name
    config.mmdit = mmdit_cfg
    # Compute dtype of the networks ("float32" for parity, "bfloat16" for training on accelerators).
    config.dtype = "bfloat16"
    config.remat = True
    config.seed = 0
    return config
