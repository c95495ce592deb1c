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


# Rate of z_l with uniform coding: grid_side^2 * log2(codebook_size) bits per image.
BITRATE_PRESETS = {
    "8x8_k256": dict(grid_side=8, codebook_size=256),       # 0.00195 bpp at 512^2
    "16x16_k256": dict(grid_side=16, codebook_size=256),    # 0.0078 bpp
    "16x16_k1024": dict(grid_side=16, codebook_size=1024),  # 0.0098 bpp
    "32x32_k1024": dict(grid_side=32, codebook_size=1024),  # 0.039 bpp
    "64x64_k1024": dict(grid_side=64, codebook_size=1024),  # 0.156 bpp
    "tiny_4x4_k64": dict(grid_side=4, codebook_size=64),    # the tiny config's: 0.094 bpp at 32^2
}


def codec(preset: str = "16x16_k1024", code_dim: int = 16) -> ml_collections.ConfigDict:
    """z_l's shape and how `compress` sends it.

    schedule: a schedule spec (perco_jax.schedules.parse_spec: "qlds:8", "checkerboard", ...,
    or "uniform" for fixed-length coding). coding_batch_size: how many images a `Codec` runs at a
    time (the last batch padded): the image encoder, the decoder and the text context of
    entropy_model.caption_input "context". A float entropy model (version-3 streams) runs on
    batches of exactly this many at compress and at decompress, so that both build bit-identical
    coding tables (see perco_jax/codec/entropy_coding.py); an integer one (version 4) builds the
    same tables on any batch. The fingerprint covers it: streams of a codec with another value
    are refused.
    """
    if preset not in BITRATE_PRESETS:
        raise ValueError(f"unknown bitrate preset {preset!r}; known: {sorted(BITRATE_PRESETS)}")
    return ml_collections.ConfigDict(dict(preset=preset, code_dim=code_dim, schedule="qlds:8",
                                          coding_batch_size=8, **BITRATE_PRESETS[preset]))


# The masks stage 2 trains on: every schedule compress may be asked to use (see training_mask).
TRAINING_SCHEDULES = ("checkerboard", "checkerboard4", "quincunx", "qlds:4", "qlds:8", "qlds:12",
                      "implicit_var", "random:8", "cosine:8")


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

    # ---- the codec
    config.image_size = 512
    # "sd3_vae", "patch" (a small learned autoencoder that stage 0 trains: tiny configs) or
    # "space_to_depth" (parameter-free pixel unshuffle)
    config.autoencoder = "sd3_vae"
    config.space_to_depth_factor = 8
    config.patch_autoencoder = ml_collections.ConfigDict(dict(factor=4, latent_channels=4, width=128, depth=2))
    config.autoencoder_workdir = ""         # autoencoder=patch: the stage-0 run whose autoencoder stages 1-2 use
    # images per device the frozen autoencoder encodes at a time in a training step (stages 1-3; a
    # lax.map over the rest: parallel.map_batch_chunks); 0 = the device's whole batch at once. Its
    # full-resolution feature maps are the step's peak at large batches (SD3's VAE at 512^2: 3 maps of
    # 64 MiB an image), so a pod recipe bounds them
    config.autoencoder_chunk = 0
    config.pretrained = ""                  # a `perco-jax convert` weights folder; "" = random init
    config.codec = codec()
    config.hyper_encoder = ml_collections.ConfigDict(dict(
        width=256, depth=2, out_channels=64, num_groups=32, attention=True, remat=False))
    config.vq = ml_collections.ConfigDict(dict(decay=0.99, commitment_cost=0.0, restart_threshold=0.03))
    # cache: precompute each distinct caption's embeddings once (text_cache.py) instead of running
    # the frozen encoders in every step; embeddings: a folder `perco-jax embed-text` wrote
    # (text_store.py, array_record), read instead (no text encoder is built)
    # clip_max_length: CLIP's token length in the prompt encoding (SD3: 77)
    config.text = ml_collections.ConfigDict(dict(max_sequence_length=256, clip_max_length=77, caption_dropout=0.1,
                                                 cache=False, embeddings=""))

    # ---- the entropy model of the indices (MaskGIT-like; conditional = sees the caption, which the
    # decoder has before it decodes the indices). caption_input: "tokens" = the caption's T5 token
    # ids through the entropy model's own embedding (trained in stage 2; integers end to end, so
    # streams decode bit-exactly on any machine) or "context" = SD3's float text context (exact
    # only where the float text encoders agree to the last bit). See docs/bitstream.md.
    config.entropy_model = ml_collections.ConfigDict(dict(width=512, depth=8, num_heads=8, mlp_ratio=4,
                                                          conditional=True, caption_input="tokens"))

    # ---- which stage `train` runs: 0 = the learned autoencoder (autoencoder=patch),
    # 1 = MM-DiT + hyper-encoder + VQ (flow matching),
    # 2 = the entropy model on the indices of the frozen stage-1 run in `stage1_workdir`,
    # 3 = few-step decoding: the decoder of the stage-1 run in `stage1_workdir` fine-tuned
    config.stage = 1
    config.stage1_workdir = ""
    # stage 0's and stage 2's own optimisation settings (the other training fields are shared)
    config.stage0 = ml_collections.ConfigDict(dict(
        num_train_steps=20_000, batch_size=64, learning_rate=2e-3, warmup_steps=100, ema_decay=0.999,
        latent_noise=0.05, latent_l2=1e-3, stats_decay=0.99, loss_detail=0.0))
    config.stage2 = ml_collections.ConfigDict(dict(
        num_train_steps=50_000, batch_size=256, learning_rate=3e-4, warmup_steps=1000, ema_decay=0.999,
        schedules=TRAINING_SCHEDULES))
    # stage 3, few-step decoding (train/stage3.py): the stage-1 MM-DiT of the run in stage1_workdir,
    # given a zero-initialised step-size input, is fine-tuned to decode in `steps` sampler steps
    # (the encoder, VQ and entropy model are untouched: the bitstream does not change).
    # method "shortcut" (Frans et al. 2024): flow matching at d -> 0 plus self-consistency (one step
    #   of 2d = two of d) on `bootstrap_fraction` of each batch, for d = 1, 1/2, ..., 2^-levels, the
    #   caption's guidance (`guidance`) folded into the finest targets; no teacher sampling.
    # method "reflow" (Liu et al. 2023): `couplings` (noise, latent) pairs drawn once by the guided
    #   teacher sampler (sample.steps, `guidance`), 2-rectified flow on their straight lines for the first
    #   `reflow_fraction` of the steps, then distillation to each of `steps` steps. coupling_sampler
    #   "ode": the pairs are the guided Euler ODE's from unit noise (2-rectified flow as published);
    #   "decoder": the codec's own sampler (sample.stochastic, sample.temperature), from the starting
    #   noise it scales, so that with reflow_fraction 0 the student distils the pictures the default
    #   decoder draws (Luhman & Luhman 2021), stochastic steps included, which no ODE-following student can.
    config.stage3 = ml_collections.ConfigDict(dict(
        method="shortcut", num_train_steps=20_000, batch_size=256, learning_rate=1e-5, warmup_steps=500,
        ema_decay=0.999, steps=(1, 2, 4), levels=7, bootstrap_fraction=0.25, couplings=50_000,
        reflow_fraction=0.5, guidance=3.0, coupling_sampler="ode"))
    # stage3.guidance: the guidance scale the few-step decoder learns (one pass per step: it cannot
    # be changed at decode time); here the teacher's sample.guidance (a config without the field uses
    # that too). One step draws a smoother picture than the guided sampler: on the tiny codec a
    # somewhat higher scale than the teacher's kept the 1-step colours (configs/tiny.py).

    # ---- stage-1 training (field names follow Flax's examples)
    config.num_train_steps = 100_000
    config.batch_size = 256
    config.learning_rate = 1e-4
    config.warmup_steps = 1000
    config.lr_schedule = "cosine"           # or "constant"
    config.weight_decay = 0.01
    config.grad_clip = 1.0
    config.grad_accum_steps = 1
    config.ema_decay = 0.9999               # 0 disables the EMA
    config.trainable = "all"                # "all" | "attention_mlp" | "frozen" (MM-DiT frozen)
    config.sigma_sampling = ml_collections.ConfigDict(dict(scheme="logit_normal", mean=0.0, std=1.0,
                                                           resolution_shift=True))
    config.loss_weighting = "none"
    # flow.detail_weight's strength: > 0 weights the flow loss towards latent positions that differ
    # from the image's mean latent (small objects); 0 = SD3's plain loss
    config.loss_detail = 0.0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.data = ml_collections.ConfigDict(dict(source="coco", image_size=512, folder="", captions="",
                                                 tfds_data_dir="", seed=0))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.sharding_rules = []              # [[logical, mesh_axis], ...]; [] = parallel.DEFAULT_RULES
    # frozen text encoders / VAE: "sharded" by the same rules (T5-XXL is 4.7B parameters) or
    # "replicated" (a full copy per device: no gathers in their forward passes)
    config.frozen_placement = "sharded"
    # the teacher sampler: `steps` guided steps; stochastic=True re-noises the predicted data at every
    # step (diffusers' FlowMatchEulerDiscreteScheduler stochastic_sampling) instead of SD3's Euler ODE;
    # temperature scales the sampler's noise (starting noise and fresh draws; 1 = as trained)
    # batch_size: images the decoder (sampler + autoencoder) runs at once, the last chunk padded (images
    # differ from another batch size's by float rounding only; the bitstream does not depend on it)
    config.sample = ml_collections.ConfigDict(dict(steps=28, guidance=3.0, stochastic=False, temperature=1.0,
                                                   batch_size=8))
    return config
