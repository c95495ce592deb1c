"""PerCo's hyper-encoder: the VAE latent -> a coarse grid of features for the vector quantiser.

    latent [B, h, h, C]
      -> conv_in 3x3                                   [B, h, h, width]
      -> num_stages x (depth ResnetBlocks, stride-2 3x3 conv)   side halves per stage
      -> mid block (ResnetBlock, self-attention, ResnetBlock)   [B, g, g, width]
      -> GroupNorm, SiLU, conv_out 1x1                 [B, g, g, out_channels]

with g = grid_side and num_stages = log2(h / g) (0 when h == g). The residual and attention
blocks are the SD VAE's (`perco_jax.models.vae.ResnetBlock` / `MidBlock`), so every parameter
carries the same logical axes as the VAE's.
"""
from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.layers import conv
from perco_jax.models.vae import MidBlock, ResnetBlock, group_norm

Dtype = Any


def num_stages(latent_side: int, grid_side: int) -> int:
    """Number of stride-2 stages taking a latent side to `grid_side`: log2(latent_side / grid_side).

    Raises ValueError unless both are positive integers and latent_side = grid_side * 2**n, n >= 0.
    """
    latent_side, grid_side = _positive_int("latent side", latent_side), _positive_int("grid_side", grid_side)
    ratio, rem = divmod(latent_side, grid_side)
    if rem or ratio & (ratio - 1):
        raise ValueError(f"latent side {latent_side} is not grid_side {grid_side} times a power of two")
    return ratio.bit_length() - 1


def _positive_int(name: str, v: Any) -> int:
    try:
        ok = not isinstance(v, bool) and operator.index(v) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return operator.index(v)


class HyperEncoder(nn.Module):
    """Latent [B, h, h, C] -> features [B, grid_side, grid_side, out_channels] (in `dtype`).

    Fields: grid_side (output side g), width (channels of every block), depth (ResnetBlocks per
    stride-2 stage), out_channels, num_groups (GroupNorm groups; must divide width), attention
    (one single-head self-attention in the mid block), remat (each ResnetBlock of the stages is
    rematerialised: training keeps only its input for the backward pass), dtype (compute dtype;
    params are float32).
    The number of stages is taken from the input's static shape (see `num_stages`).
    """
    grid_side: int
    width: int = 128
    depth: int = 1
    out_channels: int = 64
    num_groups: int = 32
    attention: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        _positive_int("HyperEncoder grid_side", self.grid_side)
        if self.width < 1 or self.num_groups < 1 or self.width % self.num_groups:
            raise ValueError(f"HyperEncoder: num_groups={self.num_groups} must divide width={self.width}")
        if self.depth < 0 or self.out_channels < 1:
            raise ValueError(f"HyperEncoder: need depth >= 0 and out_channels >= 1, got depth={self.depth}, "
                             f"out_channels={self.out_channels}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"HyperEncoder expects a latent [B, h, w, C], got shape {tuple(x.shape)}")
        h, w = x.shape[1], x.shape[2]
        if h != w:
            raise ValueError(f"HyperEncoder needs a square latent, got {h}x{w}")
        stages = num_stages(h, self.grid_side)
        dt, c, g = self.dtype, self.width, self.num_groups
        x = conv(c, (3, 3), padding=((1, 1), (1, 1)), name="conv_in", dtype=dt)(x.astype(dt))
        # rematerialised, a block's backward recomputes its forward from its input: at 1024^2 XLA:TPU
        # otherwise keeps float32, halo-tiled copies of its GroupNorm and SiLU outputs (docs/training.md)
        block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        for s in range(stages):
            for j in range(self.depth):
                x = block(c, g, dt, name=f"down_{s}_resnets_{j}")(x)
            # Downsample2D semantics (as the VAE): one zero row/column at the bottom/right.
            x = conv(c, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), name=f"down_{s}_downsample", dtype=dt)(x)
        x = MidBlock(g, self.attention, dt, name="mid_block")(x)
        x = nn.silu(group_norm(g, name="norm_out", dtype=dt)(x))
        return conv(self.out_channels, (1, 1), padding="VALID", name="conv_out", dtype=dt)(x)
