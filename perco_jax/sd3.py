"""SD3 text-to-image in JAX: a converted weights folder -> images (the backbone the codec decodes with).

Semantics are those of diffusers' `StableDiffusion3Pipeline`: prompts encoded by `text.PromptEncoder`,
noise of shape [B, H/f, W/f, C] (or the caller's latents), the flow-matching Euler schedule with the
scheduler's shift, classifier-free guidance with the batch ordered (negative, positive), latents
un-scaled with the VAE's scaling/shift factors, decoded and mapped to [0, 1].
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
from perco_jax.models.mmdit import MMDiT
from perco_jax.models.vae import unscale_latents


@dataclasses.dataclass(eq=False)
class SD3Pipeline:
    transformer: MMDiT
    vae: Any                    # AutoencoderKL or SpaceToDepthAutoencoder
    prompt_encoder: Any         # text.PromptEncoder, or None when only embeddings are passed
    params: dict                # {"transformer": ..., "vae": ..., "text_encoder": ..., ...}
    shift: float = 3.0

    @classmethod
    def load(cls, folder: str | Path, dtype=jnp.float32, compute_dtype=None) -> "SD3Pipeline":
        """From a weights folder written by `perco-jax convert` (see `perco_jax.checkpoint`)."""
        from perco_jax.convert.pipeline import load_pipeline_components

        return load_pipeline_components(folder, dtype=dtype, compute_dtype=compute_dtype)

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
