"""SD3's variational autoencoder (diffusers `AutoencoderKL` semantics) and a parameter-free
space-to-depth autoencoder for tiny configs.

Layout is NHWC throughout, f = 2 ** (len(block_out_channels) - 1) (8 for SD3):
  images   [B, H, W, in_channels]           in [-1, 1]
  moments  mean, logvar [B, H/f, W/f, latent_channels]   raw, before scaling
  latents  scaled for the flow model by `scale_latents`, undone by `unscale_latents`

Both autoencoders expose `encode(images) -> (mean, logvar)`, `decode(z_raw) -> images`,
`scaling_factor`, `shift_factor`, `latent_channels` and `downsample_factor`, so either can sit in
front of the MM-DiT. Use `model.apply(variables, x, method=model.encode)` (or `.decode`); `init`
(through `__call__`, encode then decode) creates every parameter.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.attention import attention, attention_implementation
from perco_jax.models.layers import conv, dense

Dtype = Any
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp
EPS = 1e-6  # every GroupNorm of the SD VAE


# ----------------------------------------------------------------------------- latent helpers

def latents_from_moments(mean: jax.Array, logvar: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """A sample mean + exp(logvar / 2) * N(0, 1) if `rng` is given, else the mean (both raw)."""
    if rng is None:
        return mean
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps).astype(mean.dtype)


def scale_latents(z: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
    """Raw VAE latents -> the flow model's latent space: (z - shift) * scale (SD3 pipelines)."""
    return (z - shift_factor) * scaling_factor


def unscale_latents(z: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
    """Inverse of `scale_latents`: z / scale + shift, as StableDiffusion3Pipeline before decoding."""
    return z / scaling_factor + shift_factor


# ----------------------------------------------------------------------------- building blocks

def group_norm(groups: int, *, name: str, dtype: Dtype) -> nn.GroupNorm:
    """GroupNorm over channel groups (contiguous, as torch), float32 statistics, eps 1e-6."""
    return nn.GroupNorm(
        num_groups=groups, epsilon=EPS, dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv(silu(gn(conv(silu(gn(x))))))."""
    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(group_norm(self.groups, name="norm1", dtype=self.dtype)(x))
        h = conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv1", dtype=self.dtype)(h)
        h = nn.silu(group_norm(self.groups, name="norm2", dtype=self.dtype)(h))
        h = conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:  # a 1x1 projection only where the width changes
            x = conv(self.out_channels, (1, 1), padding="VALID", name="conv_shortcut", dtype=self.dtype)(x)
        return x + h


class MidAttention(nn.Module):
    """The mid block's single-head self-attention over all H*W positions (head_dim = channels),
    with its own GroupNorm and a residual connection; softmax in float32 (upcast_softmax).

    Through `models.attention`: on TPU the splash kernel, so the [B, HW, HW] float32 logits (1 GiB
    an image at 1024^2) are never stored; on GPUs and CPUs XLA's attention (head_dim 512 is beyond
    cuDNN's fused kernel). `attention_impl` forces one (None: automatic)."""
    groups: int
    dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.groups, name="group_norm", dtype=self.dtype)(x).reshape(b, h * w, c)
        q, k, v = (dense(c, ("embed", "heads"), name=n, dtype=self.dtype)(y) for n in ("to_q", "to_k", "to_v"))
        # XLA's path keeps its own einsums: the same rounding as before, so a model using this block
        # (the hyper-encoder too) trains exactly as it did (the tiny demo's colours moved 0.906 -> 0.891)
        one_head = jax.ShapeDtypeStruct((b, h * w, 1, c), q.dtype)
        if attention_implementation(self.attention_impl, one_head) == "xla":
            logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(c))
            o = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
        else:  # one head: [B, HW, 1, C]
            o = attention(q[:, :, None, :], k[:, :, None, :], v[:, :, None, :],
                          implementation=self.attention_impl).reshape(b, h * w, c)
        o = dense(c, ("heads", "embed"), name="to_out", dtype=self.dtype)(o)
        return x + o.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D: resnet, (attention), resnet at the lowest resolution."""
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = MidAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    """Images [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent_channels] (mean then logvar)."""
    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, chans = self.dtype, tuple(self.block_out_channels)
        x = conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in", dtype=dt)(x.astype(dt))
        for i, c in enumerate(chans):
            for j in range(self.layers_per_block):
                x = ResnetBlock(c, self.groups, dt, name=f"down_blocks_{i}_resnets_{j}")(x)
            if i < len(chans) - 1:
                # Downsample2D with padding=0: pad one zero row/column at the bottom/right only.
                x = conv(c, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                         name=f"down_blocks_{i}_downsample", dtype=dt)(x)
        x = MidBlock(self.groups, self.mid_block_add_attention, dt, name="mid_block")(x)
        x = nn.silu(group_norm(self.groups, name="conv_norm_out", dtype=dt)(x))
        return conv(2 * self.latent_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", dtype=dt)(x)


class Decoder(nn.Module):
    """Latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        dt, chans = self.dtype, tuple(reversed(self.block_out_channels))
        x = conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in", dtype=dt)(z.astype(dt))
        x = MidBlock(self.groups, self.mid_block_add_attention, dt, name="mid_block")(x)
        for i, c in enumerate(chans):
            for j in range(self.layers_per_block + 1):  # the decoder has one resnet more per block
                x = ResnetBlock(c, self.groups, dt, name=f"up_blocks_{i}_resnets_{j}")(x)
            if i < len(chans) - 1:  # Upsample2D: nearest x2, then a 3x3 conv
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
                x = conv(c, (3, 3), padding=((1, 1), (1, 1)), name=f"up_blocks_{i}_upsample", dtype=dt)(x)
        x = nn.silu(group_norm(self.groups, name="conv_norm_out", dtype=dt)(x))
        return conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", dtype=dt)(x)


# ----------------------------------------------------------------------------- autoencoders

class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` (DownEncoderBlock2D / UpDecoderBlock2D, SiLU); defaults are SD3's.
    `dtype` is the compute dtype; params are float32; outputs are float32."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, (1, 1), padding="VALID", name="quant_conv",
                                   dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, (1, 1), padding="VALID", name="post_quant_conv",
                                        dtype=self.dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, in] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, C] float32, logvar clamped
        to [-30, 20] as diffusers' `latent_dist.logvar`. H and W must be multiples of f."""
        _check_divisible(images.shape, self.downsample_factor)
        h = self.encoder(images)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Raw (unscaled) latents [B, h, w, C] -> images [B, h*f, w*f, out] float32 (about [-1, 1])."""
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (used by `init` to create every parameter)."""
        return self.decode(self.encode(images)[0])


class SpaceToDepthAutoencoder(nn.Module):
    """Parameter-free stand-in for the VAE in tiny configs: encode = pixel-unshuffle by `factor`,
    decode = its exact inverse. Latent channels are ordered (c, i, j) as torch's pixel_unshuffle.

    encode: images [B, H, W, C] -> (mean [B, H/f, W/f, C*f*f], logvar filled with -30, a point mass
    at diffusers' clamp floor, so a sample equals the mean up to ~3e-7).
    """
    factor: int = 8
    channels: int = 3
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return self.factor

    @property
    def latent_channels(self) -> int:
        return self.channels * self.factor ** 2

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_divisible(images.shape, self.factor)
        b, h, w, c = images.shape
        f = self.factor
        z = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // f, w // f, c * f * f)
        return z, jnp.full_like(z, LOGVAR_MIN)

    def decode(self, z: jax.Array) -> jax.Array:
        b, h, w, cff = z.shape
        f = self.factor
        if cff % (f * f):
            raise ValueError(f"latent channels {cff} are not a multiple of factor^2 = {f * f}")
        c = cff // (f * f)
        return z.reshape(b, h, w, c, f, f).transpose(0, 1, 4, 2, 5, 3).reshape(b, h * f, w * f, c)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])


def _check_divisible(shape: Sequence[int], f: int) -> None:
    if len(shape) != 4:
        raise ValueError(f"expected images [B, H, W, C], got shape {tuple(shape)}")
    if shape[1] % f or shape[2] % f:
        raise ValueError(f"image size {shape[1]}x{shape[2]} is not a multiple of the autoencoder's "
                         f"downsampling factor {f}")


def vae_from_config(cfg, **overrides) -> AutoencoderKL:
    """Build an AutoencoderKL from an ml_collections / dict config of the module's fields."""
    kw = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    kw.update(overrides)
    kw["block_out_channels"] = tuple(kw.get("block_out_channels", AutoencoderKL.block_out_channels))
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = jnp.dtype(kw["dtype"])
    return AutoencoderKL(**kw)
