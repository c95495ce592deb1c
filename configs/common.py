"""Fields shared by every config; each preset module fills in the network shapes.

Sections use the field names of the reference implementations' config.json files, so a section
is also what `perco-jax convert` writes and reads: `mmdit` (diffusers SD3Transformer2DModel, plus
`extra_in_channels`), `vae` (diffusers AutoencoderKL), `clip_l` / `clip_g` (transformers
CLIPTextConfig), `t5` (transformers T5Config).
"""
import ml_collections


def mmdit(**shape) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        sample_size=128, patch_size=2, in_channels=16, extra_in_channels=0, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, dual_attention_layers=(), qk_norm="",  # "" = none, or "rms_norm"
    ))
    cfg.update(shape)
    return cfg


def sd3_vae(**shape) -> ml_collections.ConfigDict:
    """SD3's 16-channel AutoencoderKL (the same in SD3 and SD3.5)."""
    cfg = ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609, mid_block_add_attention=True))
    cfg.update(shape)
    return cfg


def clip(**shape) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        eos_token_id=2))
    cfg.update(shape)
    return cfg


def t5(**shape) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu"))
    cfg.update(shape)
    return cfg


CLIP_L = dict()  # OpenAI CLIP ViT-L/14 text tower: the defaults above
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, hidden_act="gelu")  # OpenCLIP ViT-bigG/14 text tower


def base(name: str, mmdit_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = name
    config.mmdit = mmdit_cfg
    config.vae = sd3_vae()
    config.clip_l = clip(**CLIP_L)
    config.clip_g = clip(**CLIP_G)
    config.t5 = t5()
    config.scheduler_shift = 3.0
    # Compute dtype of the networks ("float32" for parity, "bfloat16" for training on accelerators).
    config.dtype = "bfloat16"
    config.remat = True
    config.seed = 0
    return config
