"""LPIPS (Zhang et al. 2018, the `lpips` package's v0.1 metric) in Flax.

  LPIPS(net)(x0, x1): x0, x1 [B, H, W, 3] NHWC in [-1, 1] -> [B] distances

The inputs are shifted / scaled per channel (the package's ScalingLayer), run through a feature
trunk, and at each of its five taps the features [B, h, w, C] are normalised to unit length over
C, their squared difference is weighted per channel by a linear head (a bias-free 1x1 conv
C -> 1) and averaged over space; the five averages are summed.

Trunks are torchvision's `alexnet().features` / `vgg16().features` up to their last ReLU, with
parameters named after torchvision's indices (`features_3` is `features.3`):

  alex  taps relu1..relu5      channels 64, 192, 384, 256, 256
  vgg   taps relu1_2..relu5_3  channels 64, 128, 256, 512, 512
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.layers import conv

# The lpips package's ScalingLayer: (x - SHIFT) / SCALE maps [-1, 1] to ImageNet-normalised input.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


class Conv(NamedTuple):
    index: int      # position in torchvision's `features` Sequential
    features: int
    kernel: int
    stride: int
    padding: int


# Each trunk: five stages, each ending at a tap; an int is a max-pool of that window (stride 2,
# no padding), a Conv is followed by a ReLU.
TRUNKS = {
    "alex": (
        (Conv(0, 64, 11, 4, 2),),
        (3, Conv(3, 192, 5, 1, 2)),
        (3, Conv(6, 384, 3, 1, 1)),
        (Conv(8, 256, 3, 1, 1),),
        (Conv(10, 256, 3, 1, 1),),
    ),
    "vgg": (
        (Conv(0, 64, 3, 1, 1), Conv(2, 64, 3, 1, 1)),
        (2, Conv(5, 128, 3, 1, 1), Conv(7, 128, 3, 1, 1)),
        (2, Conv(10, 256, 3, 1, 1), Conv(12, 256, 3, 1, 1), Conv(14, 256, 3, 1, 1)),
        (2, Conv(17, 512, 3, 1, 1), Conv(19, 512, 3, 1, 1), Conv(21, 512, 3, 1, 1)),
        (2, Conv(24, 512, 3, 1, 1), Conv(26, 512, 3, 1, 1), Conv(28, 512, 3, 1, 1)),
    ),
}


def tap_channels(net: str) -> tuple[int, ...]:
    """Channels of the five taps of a trunk."""
    return tuple([layer for layer in stage if isinstance(layer, Conv)][-1].features for stage in TRUNKS[net])


class FeatureTrunk(nn.Module):
    """A torchvision feature trunk: [B, H, W, 3] (ImageNet-normalised) -> five taps [B, h_i, w_i, C_i]."""
    net: str = "alex"

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if self.net not in TRUNKS:
            raise ValueError(f"unknown LPIPS trunk {self.net!r}; expected one of {sorted(TRUNKS)}")
        taps = []
        for stage in TRUNKS[self.net]:
            for layer in stage:
                if isinstance(layer, int):
                    x = nn.max_pool(x, (layer, layer), strides=(2, 2), padding="VALID")
                else:
                    p = layer.padding
                    x = conv(layer.features, (layer.kernel, layer.kernel), strides=(layer.stride, layer.stride),
                             padding=((p, p), (p, p)), name=f"features_{layer.index}")(x)
                    x = nn.relu(x)
            taps.append(x)
        return taps


def _unit(x: jax.Array) -> jax.Array:
    """lpips.normalize_tensor: divide by the channel l2 norm (+ 1e-10)."""
    return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS distance: x0, x1 [B, H, W, 3] in [-1, 1] -> [B]. Params: `trunk`, `lin0`..`lin4`."""
    net: str = "alex"

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two [B, H, W, 3] batches of one shape, got {x0.shape} and {x1.shape}")
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        x = (jnp.concatenate([x0, x1]).astype(jnp.float32) - shift) / scale
        taps = FeatureTrunk(self.net, name="trunk")(x)
        total = jnp.zeros((x0.shape[0],), jnp.float32)
        for i, f in enumerate(taps):
            f0, f1 = jnp.split(f, 2)
            d = jnp.square(_unit(f0) - _unit(f1))
            total = total + conv(1, (1, 1), use_bias=False, name=f"lin{i}")(d).mean(axis=(1, 2, 3))
        return total
