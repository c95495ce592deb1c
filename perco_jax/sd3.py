"""SD3 text-to-image in JAX: a converted weights folder -> images (the backbone the codec decodes with).

Semantics are those of diffusers' `StableDiffusion3Pipeline`: prompts encoded by `text.PromptEncoder`,
noise of shape [B, H/f, W/f, C] (or the caller's latents), the flow-matching Euler schedule with the
scheduler's shift, classifier-free guidance with the batch ordered (negative, positive), latents
un-scaled with the VAE's scaling/shift factors, decoded and mapped to [0, 1].

Reads the weights folders `perco-jax convert` writes (`convert.pipeline`, format in `checkpoint`);
the converter never imports this module.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perco_jax import flow
from perco_jax.checkpoint import TEXT_ENCODERS, TOKENIZERS, load_weights, read_manifest
from perco_jax.convert.common import ConversionError
from perco_jax.convert.pipeline import DEFAULT_SHIFT
from perco_jax.convert.text_encoders import clip_config_from_hf, t5_config_from_hf
from perco_jax.convert.transformer import config_from_diffusers
from perco_jax.convert.vae import vae_config_from_diffusers
from perco_jax.models.clip import CLIPTextEncoder
from perco_jax.models.mmdit import MMDiT, mmdit_from_config
from perco_jax.models.t5 import T5Encoder
from perco_jax.models.vae import AutoencoderKL, unscale_latents
from perco_jax.text.prompt import PromptEncoder



@dataclasses.dataclass(eq=False)
class SD3Pipeline:
    transformer: MMDiT
    vae: Any                    # AutoencoderKL or SpaceToDepthAutoencoder
    prompt_encoder: Any         # text.PromptEncoder, or None when only embeddings are passed
    params: dict                # {"transformer": ..., "vae": ..., "text_encoder": ..., ...}
    shift: float = DEFAULT_SHIFT

    @classmethod
    def load(cls, folder: str | Path, dtype=jnp.float32, compute_dtype=None) -> "SD3Pipeline":
        """From a weights folder written by `perco-jax convert` (see `perco_jax.checkpoint`); text
        encoders only if the folder has them and their tokenizers."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        for need in ("transformer", "vae"):
            if need not in manifest["components"]:
                raise ConversionError(f"{folder} has no {need}; convert a whole SD3 pipeline (or a single "
                                      "file that bundles the VAE)")
        configs, params = load_weights(folder)
        cd = compute_dtype or dtype
        params = {k: _cast(v, dtype) for k, v in params.items()}
        transformer = mmdit_from_config(config_from_diffusers(configs["transformer"]), dtype=cd)
        vae = AutoencoderKL(**vae_config_from_diffusers(configs["vae"]), dtype=cd)
        encoder = _prompt_encoder(folder, configs, cd, transformer.joint_attention_dim)
        shift = manifest.get("metadata", {}).get("scheduler", {}).get("shift", DEFAULT_SHIFT)
        return cls(transformer, vae, encoder, params, shift=float(shift))

    # ------------------------------------------------------------------ shapes

    @property
    def vae_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def default_size(self) -> int:
        return self.transformer.sample_size * self.vae_factor

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        m = self.vae_factor * self.transformer.patch_size
        if height % m or width % m:
            raise ValueError(f"height and width must be multiples of {m} (VAE factor x patch size), "
                             f"got {height}x{width}")
        return batch, height // self.vae_factor, width // self.vae_factor, self.transformer.in_channels

    # ------------------------------------------------------------------ sampling

    @functools.cached_property
    def _sample_fn(self):
        """(params, noise, context, pooled, guidance, sigmas, timesteps) -> images; one jit per CFG mode."""
        model, vae = self.transformer, self.vae

        def sample(params, noise, context, pooled, guidance, sigmas, timesteps, cfg: bool):
            def velocity(x, t):
                return model.apply({"params": params["transformer"]}, x, t, context, pooled)

            v = flow.guided(velocity, guidance) if cfg else velocity
            latents = flow.euler_sample(v, noise, sigmas, timesteps)
            z = unscale_latents(latents, vae.scaling_factor, vae.shift_factor)
            images = vae.apply({"params": params.get("vae", {})}, z, method=vae.decode)
            return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

        return jax.jit(sample, static_argnames=("cfg",))

    def generate(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 steps: int = 28, guidance: float = 7.0, seed: int = 0, latents: np.ndarray | None = None,
                 height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 256) -> np.ndarray:
        """Images [B, H, W, 3] float32 in [0, 1].

        `latents` is the array one would pass to diffusers as `latents=` (NCHW); otherwise the noise
        is drawn from `seed`. Guidance > 1 enables classifier-free guidance (as diffusers).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.ndim != 4:
                raise ValueError(f"latents must be NCHW [B, C, h, w], got shape {latents.shape}")
            height, width = latents.shape[2] * self.vae_factor, latents.shape[3] * self.vae_factor
        height, width = height or self.default_size, width or self.default_size
        shape = self.latent_shape(len(prompts), height, width)
        if latents is not None:
            noise = jnp.asarray(latents.transpose(0, 2, 3, 1))
            if noise.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}, expected NCHW "
                                 f"{(shape[0], shape[3], shape[1], shape[2])} for {len(prompts)} prompt(s)")
        else:
            noise = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)

        cfg = guidance > 1.0
        context, pooled = self.encode_prompts(prompts, max_sequence_length)
        if cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            n_context, n_pooled = self.encode_prompts(negs, max_sequence_length)
            context, pooled = jnp.concatenate([n_context, context]), jnp.concatenate([n_pooled, pooled])
        sigmas, timesteps = flow.sigma_schedule(steps, self.shift)
        images = self._sample_fn(self.params, noise, context, pooled, jnp.float32(guidance),
                                 jnp.asarray(sigmas), jnp.asarray(timesteps), cfg=cfg)
        return np.asarray(images, np.float32)

    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 256):
        """(context [B, L, joint_dim], pooled [B, pooled_dim]) as diffusers' encode_prompt."""
        if self.prompt_encoder is None:
            raise ValueError("this pipeline has no text encoders; convert a full SD3 pipeline folder")
        return self.prompt_encoder(self.params, list(prompts), max_sequence_length)


# ----------------------------------------------------------------------------- text encoders of a folder

def load_prompt_encoder(folder: str | Path, dtype=jnp.float32, compute_dtype=None):
    """(PromptEncoder, {"text_encoder", "text_encoder_2"[, "text_encoder_3"]: params}) of a weights
    folder, reading only the text components (not the MM-DiT or VAE); (None, {}) without them."""
    folder = Path(folder)
    configs = read_manifest(folder)["components"]
    if "transformer" not in configs:
        raise ConversionError(f"{folder} has no transformer (its joint attention width sets the text context)")
    names = _text_components(folder, configs)
    if not names:
        return None, {}
    joint = int(config_from_diffusers(configs["transformer"])["joint_attention_dim"])
    params = {k: _cast(v, dtype) for k, v in load_weights(folder, names)[1].items()}
    return _prompt_encoder(folder, configs, compute_dtype or dtype, joint), params


def _text_components(folder: Path, names) -> list[str]:
    """The text encoders a folder holds with their tokenizers ([] when CLIP-L / CLIP-G lack them)."""
    clip_l, clip_g, t5 = TEXT_ENCODERS
    tok_l, _, tok_t5 = TOKENIZERS
    if not (clip_l in names and clip_g in names and (folder / tok_l).is_dir()):
        return []
    with_t5 = t5 in names and (folder / tok_t5).is_dir()
    return [clip_l, clip_g] + ([t5] if with_t5 else [])


def _prompt_encoder(folder: Path, configs: dict, compute_dtype, joint_attention_dim: int):
    """The PromptEncoder of a weights folder's text components and tokenizers (None without them)."""
    names = _text_components(folder, configs)
    if not names:
        return None
    clip_l, clip_g = (CLIPTextEncoder(**clip_config_from_hf(configs[n]), dtype=compute_dtype) for n in names[:2])
    t5 = T5Encoder(**t5_config_from_hf(configs[names[2]]), dtype=compute_dtype) if len(names) == 3 else None
    return PromptEncoder.from_folder(folder, clip_l, clip_g, t5, joint_attention_dim=joint_attention_dim)


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)
