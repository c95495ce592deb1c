"""From a run config to networks: validation, the autoencoder, the PerCo model, the text path.

Every config error is caught here, at start, with a message naming the field.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from perco_jax import schedules
from perco_jax.models.entropy_model import EntropyModel
from perco_jax.models.hyper_encoder import HyperEncoder, num_stages
from perco_jax.models.mmdit import mmdit_from_config
from perco_jax.models.perco import PerCo
from perco_jax.models.patch_autoencoder import PatchAutoencoder
from perco_jax.models.vae import AutoencoderKL, SpaceToDepthAutoencoder
from perco_jax.models.vq import VectorQuantizer

AUTOENCODERS = ("sd3_vae", "space_to_depth", "patch")
TRAINABLE = ("all", "attention_mlp", "frozen")
FROZEN_PLACEMENTS = ("sharded", "replicated")  # config.frozen_placement: frozen networks split like the model, or whole


class ConfigError(ValueError):
    """A run config value is out of range or inconsistent with another."""


def autoencoder_chunk(config) -> int:
    """config.autoencoder_chunk: images per device the frozen autoencoder encodes at a time in a
    training step (0 = all; a config saved before the field existed reads 0)."""
    return int(config.get("autoencoder_chunk", 0))


def latent_geometry(config) -> tuple[int, int]:
    """(latent side, latent channels) of a config's images."""
    if config.autoencoder == "space_to_depth":
        f = config.space_to_depth_factor
        return config.image_size // f, 3 * f * f
    if config.autoencoder == "sd3_vae":
        f = 2 ** (len(config.vae.block_out_channels) - 1)
        return config.image_size // f, config.vae.latent_channels
    if config.autoencoder == "patch":
        return config.image_size // config.patch_autoencoder.factor, config.patch_autoencoder.latent_channels
    raise ConfigError(f"autoencoder={config.autoencoder!r}: choose one of {AUTOENCODERS}")


def uniform_index_bits(cells: int, codebook_size: int) -> float:
    """Bits of `cells` indices of a K-entry codebook coded uniformly: cells * log2 K."""
    return cells * math.log2(codebook_size)


def bits_per_pixel(config) -> float:
    """Rate of z_l under uniform coding (grid^2 * log2 K bits) per pixel of the image."""
    g = config.codec.grid_side
    return uniform_index_bits(g * g, config.codec.codebook_size) / config.image_size ** 2


def validate(config) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    side, channels = latent_geometry(config)
    f = config.image_size // side
    need(config.image_size % f == 0 and side > 0,
         f"image_size={config.image_size} is not a multiple of the autoencoder factor {f}")
    need(autoencoder_chunk(config) >= 0,
         f"autoencoder_chunk={autoencoder_chunk(config)}: images per device per encoder pass, >= 0 (0 = all)")
    need(config.codec.codebook_size >= 2, f"codec.codebook_size={config.codec.codebook_size}: need K >= 2")
    need(config.codec.code_dim >= 1, f"codec.code_dim={config.codec.code_dim}: need >= 1")
    g = config.codec.grid_side
    need(g >= 1 and side % g == 0,
         f"codec.grid_side={g} does not divide the latent side {side} (image_size {config.image_size})")
    try:
        num_stages(side, g)
    except ValueError as e:
        raise ConfigError(f"codec.grid_side={g}: {e}") from e
    need(config.mmdit.in_channels == channels,
         f"mmdit.in_channels={config.mmdit.in_channels} but the {config.autoencoder} latents have {channels}")
    need(side % config.mmdit.patch_size == 0,
         f"latent side {side} is not a multiple of mmdit.patch_size={config.mmdit.patch_size}")
    need(config.trainable in TRAINABLE, f"trainable={config.trainable!r}: choose one of {TRAINABLE}")
    need(config.lr_schedule in ("cosine", "constant"), f"lr_schedule={config.lr_schedule!r}: cosine or constant")
    need(config.batch_size >= 1 and config.batch_size % jax.process_count() == 0,
         f"batch_size={config.batch_size} must be a positive multiple of the process count {jax.process_count()}")
    need(config.grad_accum_steps >= 1, "grad_accum_steps must be >= 1")
    need(0 <= config.ema_decay < 1, f"ema_decay={config.ema_decay}: need 0 <= decay < 1")
    need(0 <= config.text.caption_dropout <= 1, "text.caption_dropout must be in [0, 1]")
    need(isinstance(config.sample.stochastic, bool), f"sample.stochastic={config.sample.stochastic!r}: True or False")
    for key, value, zero in (("loss_detail", config.loss_detail, "the plain loss"),
                             ("stage0.loss_detail", config.stage0.loss_detail, "the plain loss"),
                             ("sample.temperature", config.sample.temperature,
                              "no noise; 1 = the trained distribution")):
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
             f"{key}={value!r}: a number >= 0 (0 = {zero})")
    need(config.dtype in ("float32", "bfloat16", "float16"), f"dtype={config.dtype!r}")
    n_clip = clip_max_length(config)
    need(2 <= n_clip <= min(config.clip_l.max_position_embeddings, config.clip_g.max_position_embeddings),
         f"text.clip_max_length={n_clip}: need 2 <= length <= the CLIP encoders' max_position_embeddings")
    need(not (config.text.cache and config.text.embeddings),
         "text.cache and text.embeddings both set: choose one source of precomputed text embeddings")
    need(config.frozen_placement in FROZEN_PLACEMENTS,
         f"frozen_placement={config.frozen_placement!r}: one of {FROZEN_PLACEMENTS}")
    need(config.stage in (0, 1, 2, 3),
         f"stage={config.stage!r}: 0 (autoencoder), 1 (codec), 2 (entropy model) or 3 (few-step decoder)")
    need(config.stage != 0 or config.autoencoder == "patch",
         f"stage=0 trains the learned autoencoder: set autoencoder=patch (it is {config.autoencoder!r})")
    pa = config.patch_autoencoder
    need(min(pa.factor, pa.latent_channels, pa.width, pa.depth) >= 1,
         f"patch_autoencoder: factor, latent_channels, width and depth must be >= 1, got {pa.to_dict()}")
    s0 = config.stage0
    need(s0.batch_size >= 1 and s0.batch_size % jax.process_count() == 0,
         f"stage0.batch_size={s0.batch_size} must be a positive multiple of the process count")
    need(0 <= s0.ema_decay < 1 and 0 <= s0.stats_decay < 1, "stage0.ema_decay and stage0.stats_decay: need 0 <= decay < 1")
    need(s0.latent_noise >= 0 and s0.latent_l2 >= 0, "stage0.latent_noise and stage0.latent_l2 must be >= 0")
    need(config.stage != 2 or config.stage1_workdir,
         "stage=2 trains the entropy model on a finished stage-1 run: set stage1_workdir=DIR")
    need(config.stage != 3 or config.stage1_workdir,
         "stage=3 fine-tunes the decoder of a finished stage-1 run: set stage1_workdir=DIR")
    if config.get("stage3") is not None:
        validate_stage3(config)
    em = config.entropy_model
    need(em.width >= 1 and em.depth >= 1 and em.num_heads >= 1 and em.width % em.num_heads == 0,
         f"entropy_model: width={em.width} must be a positive multiple of num_heads={em.num_heads}, depth >= 1")
    need(not em.conditional or caption_input(config) in CAPTION_INPUTS,
         f"entropy_model.caption_input={caption_input(config)!r}: one of {CAPTION_INPUTS}")
    need(config.stage != 2 or caption_input(config) != "tokens" or text_encoders_in_step(config),
         "stage 2 with entropy_model.caption_input='tokens' trains on the captions' token ids: set "
         "text.cache=False and text.embeddings='' (precomputed embeddings hold no token ids)")
    for key, value in (("codec.coding_batch_size", config.codec.coding_batch_size),
                       ("sample.batch_size", config.sample.batch_size)):
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{key}={value!r}: need an integer >= 1")
    for spec in (config.codec.schedule, *config.stage2.schedules):
        try:
            schedules.parse_spec(spec)
        except ValueError as e:
            raise ConfigError(f"codec.schedule / stage2.schedules: {e}") from e
    need(len(config.stage2.schedules) >= 1 and schedules.UNIFORM not in config.stage2.schedules,
         "stage2.schedules: list at least one masking schedule ('uniform' needs no training)")
    need(config.stage2.batch_size >= 1 and config.stage2.batch_size % jax.process_count() == 0,
         f"stage2.batch_size={config.stage2.batch_size} must be a positive multiple of the process count")
    need(0 <= config.stage2.ema_decay < 1, f"stage2.ema_decay={config.stage2.ema_decay}: need 0 <= decay < 1")


STAGE3_METHODS = ("shortcut", "reflow")
COUPLING_SAMPLERS = ("ode", "decoder")  # stage3.coupling_sampler (train/stage3.make_couplings)


def validate_stage3(config) -> None:
    """ConfigError for a config.stage3 section the few-step stage cannot train."""
    s3 = config.stage3
    if s3.method not in STAGE3_METHODS:
        raise ConfigError(f"stage3.method={s3.method!r}: choose one of {STAGE3_METHODS}")
    if s3.coupling_sampler not in COUPLING_SAMPLERS:
        raise ConfigError(f"stage3.coupling_sampler={s3.coupling_sampler!r}: choose one of {COUPLING_SAMPLERS}")
    steps = tuple(s3.steps)
    if not steps or any(int(k) != k or k < 1 for k in steps):
        raise ConfigError(f"stage3.steps={steps}: list the sampler step counts (integers >= 1) to train")
    if s3.method == "shortcut" and any(k & (k - 1) or k > 2 ** s3.levels for k in steps):
        raise ConfigError(f"stage3.steps={steps}: a shortcut model serves powers of two up to 2^levels = "
                          f"{2 ** s3.levels}")
    if not (s3.levels >= 0 and 0 <= s3.bootstrap_fraction <= 1 and 0 <= s3.reflow_fraction <= 1):
        raise ConfigError("stage3: need levels >= 0 and bootstrap_fraction, reflow_fraction in [0, 1]")
    if s3.batch_size < 1 or s3.batch_size % jax.process_count() or s3.couplings < s3.batch_size:
        raise ConfigError(f"stage3.batch_size={s3.batch_size} must be a positive multiple of the process count "
                          f"and at most stage3.couplings={s3.couplings}")
    if not 0 <= s3.ema_decay < 1:
        raise ConfigError(f"stage3.ema_decay={s3.ema_decay}: need 0 <= decay < 1")
    guidance = config.stage3.guidance
    if guidance is not None and not guidance >= 0:
        raise ConfigError(f"stage3.guidance={guidance}: a guidance scale is >= 0 (1 = the conditional model alone)")


STAGE_FIELDS = ("num_train_steps", "batch_size", "learning_rate", "warmup_steps", "ema_decay")


# Sections that define a codec's indices: stage 2 must train on a stage-1 run with the same ones,
# and the bitstream's fingerprint covers them.
CODEC_SECTIONS = ("image_size", "autoencoder", "space_to_depth_factor", "vae", "patch_autoencoder",
                  "autoencoder_workdir", "mmdit", "codec",
                  "hyper_encoder", "vq", "clip_l", "clip_g", "t5", "text", "pretrained", "dtype", "seed")
_SCHEDULE_ONLY = ("schedule", "coding_batch_size")  # codec fields stage 1 does not depend on


def codec_identity(config: dict) -> dict:
    """The CODEC_SECTIONS of a config dict (codec without its schedule-only fields), JSON-normalised so
    that tuples and lists compare equal."""
    out = {k: config.get(k) for k in CODEC_SECTIONS}
    if isinstance(out["codec"], dict):
        out["codec"] = {k: v for k, v in out["codec"].items() if k not in _SCHEDULE_ONLY}
    return json.loads(json.dumps(out, default=list))


def stage_config(config):
    """The config a stage trains with: for stages 0, 2 and 3, the top-level optimisation fields
    replaced by config.stage0's / stage2's / stage3's (so one optimiser / loop serves every stage)."""
    if config.stage == 1:
        return config
    out = config.copy_and_resolve_references()
    own = {0: config.stage0, 2: config.stage2, 3: config.get("stage3")}[config.stage]
    for k in STAGE_FIELDS:
        out[k] = own[k]
    return out


CAPTION_INPUTS = ("tokens", "context")  # config.entropy_model.caption_input


def caption_input(config) -> Optional[str]:
    """What the entropy model reads of the caption: "tokens" (the T5 tokenizer's ids [B, L] through
    its own learned embedding: integers end to end, so bit-exact tables on any machine), "context"
    (SD3's float text context [B, L, D]: exact only where the float text encoders agree), or None
    (entropy_model.conditional False)."""
    if not config.entropy_model.conditional:
        return None
    return config.entropy_model.caption_input


def build_entropy_model(config) -> EntropyModel:
    """The MIM entropy model over the codec's grid, reading the caption as `caption_input` says:
    T5 token ids [B, text.max_sequence_length] in [0, t5.vocab_size), the SD3 text context
    [B, L, mmdit.joint_attention_dim], or nothing."""
    em = config.entropy_model
    caption = caption_input(config)
    tokens = caption == "tokens"
    return EntropyModel(codebook_size=config.codec.codebook_size, width=em.width, depth=em.depth,
                        num_heads=em.num_heads, mlp_ratio=em.mlp_ratio, max_grid=config.codec.grid_side,
                        context_dim=config.mmdit.joint_attention_dim if caption == "context" else 0,
                        caption_vocab=config.t5.vocab_size if tokens else 0,
                        max_caption=config.text.max_sequence_length if tokens else 0,
                        dtype=jnp.dtype(config.dtype))


def training_schedules(config) -> jnp.ndarray:
    """groups [M, g, g] int32 of config.stage2.schedules on the codec's grid."""
    g = config.codec.grid_side
    return jnp.asarray(np.stack([schedules.from_spec(s, g, g) for s in config.stage2.schedules]))


def build_autoencoder(config):
    if config.autoencoder == "space_to_depth":
        return SpaceToDepthAutoencoder(factor=config.space_to_depth_factor)
    if config.autoencoder == "patch":
        return PatchAutoencoder(**config.patch_autoencoder.to_dict(), dtype=jnp.dtype(config.dtype))
    kw = config.vae.to_dict()
    kw["block_out_channels"] = tuple(kw["block_out_channels"])
    return AutoencoderKL(**kw, dtype=jnp.dtype(config.dtype))


def build_perco(config) -> PerCo:
    validate(config)
    dt = jnp.dtype(config.dtype)
    mmdit = mmdit_from_config(config.mmdit, extra_in_channels=config.codec.code_dim, dtype=dt,
                              remat=bool(config.remat))
    he = HyperEncoder(grid_side=config.codec.grid_side, **config.hyper_encoder.to_dict(), dtype=dt)
    vq = VectorQuantizer(codebook_size=config.codec.codebook_size, code_dim=config.codec.code_dim,
                         **config.vq.to_dict())
    return PerCo(mmdit=mmdit, hyper_encoder=he, vq=vq)


def text_modules(config) -> tuple:
    """(CLIP-L, CLIP-G, T5) encoder modules from the config's clip_l / clip_g / t5 sections."""
    from perco_jax.models.clip import CLIP_FIELDS, CLIPTextEncoder
    from perco_jax.models.t5 import T5Encoder

    return (CLIPTextEncoder(**{k: config.clip_l[k] for k in CLIP_FIELDS}),
            CLIPTextEncoder(**{k: config.clip_g[k] for k in CLIP_FIELDS}), T5Encoder(**config.t5.to_dict()))


def build_text(config, workdir: str | Path):
    """(PromptEncoder, {"text_encoder": ..., "text_encoder_2": ..., "text_encoder_3": ...} params).

    From `config.pretrained` (a converted SD3 weights folder) when set; otherwise small random
    encoders from the config's clip_l / clip_g / t5 sections, with the built-in tiny tokenizers
    written under `workdir/tokenizers` (deterministic from config.seed).
    """
    from perco_jax.text.prompt import PromptEncoder

    if config.pretrained:  # (only the text components are read)
        from perco_jax.sd3 import load_prompt_encoder

        encoder, params = load_prompt_encoder(config.pretrained, compute_dtype=jnp.dtype(config.dtype))
        if encoder is None:
            raise ConfigError(f"pretrained={config.pretrained} has no text encoders / tokenizers")
        encoder.clip_max_length = clip_max_length(config)
        return encoder, params

    from perco_jax.text.tiny_tokenizers import save_tokenizers

    tok = Path(workdir) / "tokenizers"
    if not (tok / "tokenizer_3").exists():  # the last one save_tokenizers writes
        save_tokenizers(tok)
    clip_l, clip_g, t5 = text_modules(config)
    keys = jax.random.split(jax.random.PRNGKey(config.seed + 1), 3)
    ids = jnp.zeros((1, 8), jnp.int32)
    # (jitted: one compiled program instead of op-by-op dispatch, seconds faster per build)
    params = {name: nn.meta.unbox(jax.jit(m.init)(k, ids))["params"]
              for name, m, k in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), (clip_l, clip_g, t5), keys)}
    encoder = PromptEncoder.from_folder(tok, clip_l, clip_g, t5, joint_attention_dim=config.mmdit.joint_attention_dim,
                                        clip_max_length=clip_max_length(config))
    return encoder, params


def text_encoders_built(config) -> bool:
    """Whether a training run builds the frozen text encoders: not when it reads embeddings that
    `perco-jax embed-text` precomputed (config.text.embeddings)."""
    return not config.text.embeddings


def text_encoders_in_step(config) -> bool:
    """Whether the frozen text encoders run inside the training step: not with precomputed
    embeddings, whether cached in the loop (config.text.cache) or read from a store."""
    return text_encoders_built(config) and not config.text.cache


def clip_max_length(config) -> int:
    """CLIP token length of the prompt encoding: config.text.clip_max_length, SD3's 77 but for the
    tiny config's character-level CLIP tokenizers (a short CLIP part keeps the MM-DiT's joint
    sequence short, the word-level T5 part carries the caption)."""
    return int(config.text.clip_max_length)
