"""InceptionV3 as FID uses it (the 2015-12-05 TensorFlow graph, ported by pytorch-fid), in Flax.

  InceptionV3()(x)                      x [B, H, W, 3] NHWC in [0, 1] -> pool3 features [B, 2048]
  InceptionV3()(x, return_logits=True)  -> (features [B, 2048], logits [B, num_classes])

The input is resized to 299x299 (bilinear, half-pixel centres, no antialiasing: torch's
`F.interpolate(mode="bilinear", align_corners=False)`), mapped to [-1, 1] and run through the
network; the features are the global average of the last block (TF's `pool_3`), the logits its
linear head.

Two variants share the architecture and the parameter names, and differ in pooling and head:

  fid          pytorch-fid's FIDInceptionA/C/E_1/E_2, i.e. the TF graph: the branch-pool average
               pools of the A, C and first E blocks leave the padding out of the average
               (count_include_pad=False) and the last E block max-pools; 1008 logits.
               Weights: pytorch-fid's `pt_inception-2015-12-05-*.pth`.
  torchvision  torchvision's `inception_v3` blocks (padding counted, average pool in both E
               blocks); 1000 logits. Weights: torchvision's `inception_v3_google-*.pth`. Its FID
               is not comparable with published numbers; it is what pytorch-fid computes with
               `use_fid_inception=False`.

Modules and parameters carry torchvision's names (`Conv2d_1a_3x3`, `Mixed_5b/branch1x1`, `fc`),
each `BasicConv2d` a bias-free conv + batch norm (eps 1e-3) + ReLU. Batch norm always uses the
stored running statistics: variables are {"params": conv kernels, norm scales and biases, fc;
"batch_stats": running means and variances}, all float32.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.layers import conv, dense

INPUT_SIZE = 299      # the side the network was trained at; inputs are resized to it
MIN_SIZE = 75         # the smallest side that survives the stride-2 stages (without resizing)
FEATURES = 2048       # pool3 width
BN_EPS = 1e-3         # TF's batch-norm epsilon, kept by every port


class Variant(NamedTuple):
    num_classes: int
    exclude_pad: bool   # average pools leave the zero padding out of the average (TF "SAME" avg pool)
    last_max_pool: bool  # Mixed_7c pools its branch with a max instead of an average


VARIANTS = {
    "fid": Variant(num_classes=1008, exclude_pad=True, last_max_pool=True),
    "torchvision": Variant(num_classes=1000, exclude_pad=False, last_max_pool=False),
}


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> batch norm (running statistics, eps 1e-3) -> ReLU; torch padding semantics."""
    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = conv(self.features, _pair(self.kernel), strides=_pair(self.stride), padding=((ph, ph), (pw, pw)),
                 use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool3(x: jax.Array, exclude_pad: bool) -> jax.Array:
    """3x3 average pool, stride 1, zero padding 1 (counted in the average unless `exclude_pad`)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=not exclude_pad)


def _max_pool3s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""
    pool_features: int
    exclude_pad: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool3(x, self.exclude_pad))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + input channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool3s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (1x7 / 7x1) of `channels_7x7` -> 768 channels."""
    channels_7x7: int
    exclude_pad: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool3(x, self.exclude_pad))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + input channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool3s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches -> 2048 channels. `pool`: "avg" (padding counted or
    not, `exclude_pad`) or "max" (FID's last block: 3x3 max pool, stride 1, padding 1)."""
    pool: str
    exclude_pad: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                              BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool3(x, self.exclude_pad)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C]: torch `F.interpolate(mode="bilinear", align_corners=False)`
    (half-pixel centres, two taps per output pixel, no antialiasing when shrinking)."""
    if x.shape[1:3] == (size, size):
        return x
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=False)


class InceptionV3(nn.Module):
    """x [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] (and logits with `return_logits`).

    `resize_input=False` skips the resize to 299x299 (then both sides must be at least 75);
    `variant` is "fid" (the standard FID network) or "torchvision" (see the module docstring).
    """
    variant: str = "fid"
    resize_input: bool = True
    input_size: int = INPUT_SIZE

    @nn.compact
    def __call__(self, x: jax.Array, return_logits: bool = False):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown InceptionV3 variant {self.variant!r}; expected one of {sorted(VARIANTS)}")
        v = VARIANTS[self.variant]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects RGB images [B, H, W, 3], got shape {x.shape}")
        x = x.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, self.input_size)
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"InceptionV3 needs inputs of at least {MIN_SIZE}x{MIN_SIZE} after resizing "
                             f"(resize_input={self.resize_input}, input_size={self.input_size}), "
                             f"got {x.shape[1]}x{x.shape[2]}")
        x = 2.0 * x - 1.0

        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool3s2(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool3s2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, v.exclude_pad, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, v.exclude_pad, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", v.exclude_pad, name="Mixed_7b")(x)
        x = InceptionE("max" if v.last_max_pool else "avg", v.exclude_pad, name="Mixed_7c")(x)

        features = x.mean(axis=(1, 2))
        # the head is always built (its params exist whichever output is asked for); jit drops it when unused
        logits = dense(v.num_classes, (None, None), name="fc")(features)
        return (features, logits) if return_logits else features
