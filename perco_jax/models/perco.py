"""The codec's generative model: hyper-encoder + VQ (the local message z_l) conditioning the MM-DiT.

    latent [B, h, w, C] --HyperEncoder--> [B, g, g, E] --VQ--> codes [B, g, g, d], indices [B, g, g]
    codes --nearest upsample x (h/g)--> [B, h, w, d] --concat to x_t--> MM-DiT(extra_in_channels=d)

The MM-DiT's extra input channels start at zero, so a pretrained SD3 is unchanged at step 0.
Variables: "params" {mmdit, hyper_encoder, vq/proj_in} and the VQ's EMA state in collection "vq".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.hyper_encoder import HyperEncoder
from perco_jax.models.mmdit import MMDiT
from perco_jax.models.vq import VectorQuantizer


def upsample_codes(codes: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour upsampling [B, g, g', d] -> [B, height, width, d] (integer factors)."""
    b, g, g2, d = codes.shape
    if height % g or width % g2:
        raise ValueError(f"latent {height}x{width} is not a multiple of the code grid {g}x{g2}")
    return jnp.repeat(jnp.repeat(codes, height // g, axis=1), width // g2, axis=2)


class PerCo(nn.Module):
    """mmdit must have extra_in_channels == vq.code_dim."""
    mmdit: MMDiT
    hyper_encoder: HyperEncoder
    vq: VectorQuantizer

    def setup(self):
        if self.mmdit.extra_in_channels != self.vq.code_dim:
            raise ValueError(f"mmdit.extra_in_channels ({self.mmdit.extra_in_channels}) must equal the VQ "
                             f"code_dim ({self.vq.code_dim})")

    def encode(self, latent: jax.Array, train: bool = False) -> dict:
        """latent [B, h, w, C] -> the VQ's dict (codes [B, g, g, d], indices [B, g, g], loss, ...)."""
        return self.vq(self.hyper_encoder(latent), train=train)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices [B, g, g] -> codes [B, g, g, d] (the decoder's side of z_l)."""
        return self.vq.lookup(indices)

    def velocity(self, x_t, timesteps, codes, context, pooled, step_sizes=None) -> jax.Array:
        """Velocity [B, h, w, C] of the noisy latent x_t [B, h, w, C] given codes [B, g, g, d]
        (step_sizes [B]: the step each prediction is for, with a step-conditioned MM-DiT)."""
        cond = upsample_codes(codes, x_t.shape[1], x_t.shape[2]).astype(x_t.dtype)
        return self.mmdit(jnp.concatenate([x_t, cond], axis=-1), timesteps, context, pooled, step_sizes)

    def __call__(self, latent, x_t, timesteps, context, pooled, train: bool = False):
        """Training forward: (velocity [B, h, w, C], vq dict)."""
        q = self.encode(latent, train=train)
        return self.velocity(x_t, timesteps, q["codes"], context, pooled), q


def with_step_conditioning(model: PerCo) -> PerCo:
    """The few-step decoder's model: `model` whose MM-DiT also takes the step size (its params are
    model's plus the zero-initialised step embedder, see MMDiT.step_conditioning)."""
    return model.clone(mmdit=model.mmdit.clone(step_conditioning=True))
