"""A small learned autoencoder for tiny configs: SD3's VAE role at toy scale, cheap on a CPU.

    images [B, H, W, 3] in [-1, 1] --pixel-unshuffle by f--> [B, H/f, W/f, 3 f^2]
      --dense, residual 3x3 convs--> latents [B, H/f, W/f, latent_channels]   (encode)
    latents --dense, residual 3x3 convs, dense--> [B, H/f, W/f, 3 f^2] --pixel-shuffle--> images (decode)

Every layer runs at the latent resolution (on a CPU, XLA's convolutions at full resolution with a
handful of channels cost far more than these), and the decoder's 3x3 convolutions let each f x f
block see its neighbours, so edges continue across blocks. It is trained once on the data (stage 0,
`perco_jax.train.stage0`), then frozen, as SD3's VAE is.

The latent statistics are part of the params: stage 0 ends by measuring the per-channel mean and
standard deviation of the encoder's output on training images ("latent_mean", "latent_std"), and
`encode` returns (raw - mean) / std, so the flow model sees unit-variance latents (the role of SD3's
scaling_factor / shift_factor, which are 1 and 0 here). Same interface as the other autoencoders:
`encode(images) -> (mean, logvar)` (a point mass: logvar at diffusers' clamp floor), `decode(z)`,
`scaling_factor`, `shift_factor`, `latent_channels`, `downsample_factor`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.vae import LOGVAR_MIN, SpaceToDepthAutoencoder

Dtype = Any


class PatchAutoencoder(nn.Module):
    factor: int = 4
    latent_channels: int = 4
    width: int = 128
    depth: int = 2               # residual 3x3 convs in the decoder (the encoder has one)
    channels: int = 3
    scaling_factor: float = 1.0  # (the latent statistics live in the params, see the module doc)
    shift_factor: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        conv = lambda name: nn.Conv(self.width, (3, 3), dtype=self.dtype, name=name)  # noqa: E731
        self.pixels = SpaceToDepthAutoencoder(factor=self.factor, channels=self.channels)
        self.enc_in, self.enc_conv, self.enc_out = dense(self.width, "enc_in"), conv("enc_conv"), dense(
            self.latent_channels, "enc_out")
        self.dec_in = dense(self.width, "dec_in")
        self.dec_convs = [conv(f"dec_conv_{i}") for i in range(self.depth)]
        self.dec_mlp, self.dec_out = dense(self.width, "dec_mlp"), dense(self.channels * self.factor ** 2, "dec_out")
        c = self.latent_channels
        self.latent_mean = self.param("latent_mean", nn.initializers.zeros_init(), (c,), jnp.float32)
        self.latent_std = self.param("latent_std", nn.initializers.ones_init(), (c,), jnp.float32)

    @property
    def downsample_factor(self) -> int:
        return self.factor

    def encode_raw(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> raw latents [B, H/f, W/f, latent_channels] float32
        (before the latent statistics are applied)."""
        h = self.pixels.encode(images.astype(self.dtype))[0]
        h = nn.gelu(self.enc_in(h))
        h = h + nn.gelu(self.enc_conv(h))
        return self.enc_out(h).astype(jnp.float32)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3] in [-1, 1] -> (unit-variance latents, logvar at the clamp floor)."""
        z = (self.encode_raw(images) - self.latent_mean) / self.latent_std
        return z, jnp.full_like(z, LOGVAR_MIN)

    def decode_raw(self, z: jax.Array) -> jax.Array:
        """Raw latents [B, h, w, latent_channels] -> images [B, h f, w f, 3] float32 (about [-1, 1])."""
        h = nn.gelu(self.dec_in(z.astype(self.dtype)))
        for conv in self.dec_convs:
            h = h + nn.gelu(conv(h))
        h = self.dec_out(nn.gelu(self.dec_mlp(h)))
        return self.pixels.decode(h).astype(jnp.float32)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents as `encode` returns them [B, h, w, latent_channels] -> images [B, h f, w f, 3]."""
        return self.decode_raw(z * self.latent_std + self.latent_mean)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction of the latent mean (used by `init` to create every parameter)."""
        return self.decode(self.encode(images)[0])
