"""Small building blocks shared by every network: dense/conv layers with logical axes, norms.

Every parameter carries logical-axis names (`nn.with_logical_partitioning`) so that sharding
is a rule table in `parallel.py`, never a rewrite of a model. Axis names used across models:

  embed     the model width (residual stream)      heads   attention projections (heads*head_dim)
  mlp       feed-forward hidden width              vocab   token embeddings
  conv_in   convolution input channels             conv_out convolution output channels
  norm      norm scale/bias vectors                None    small axes that are never sharded
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
default_kernel_init = nn.initializers.lecun_normal()


def dense(features: int, axes: tuple[str | None, str | None], *, name: str, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, use_bias: bool = True,
          kernel_init: Callable = default_kernel_init) -> nn.Dense:
    """`nn.Dense` whose kernel [in, out] is annotated with `axes` and bias [out] with `axes[1]`."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def conv(features: int, kernel_size: Sequence[int], *, name: str, strides: Sequence[int] = (1, 1),
         padding: Any = "SAME", dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         use_bias: bool = True, kernel_init: Callable = default_kernel_init) -> nn.Conv:
    """NHWC `nn.Conv` with kernel [kh, kw, in, out] annotated (None, None, conv_in, conv_out)."""
    return nn.Conv(
        features, tuple(kernel_size), strides=tuple(strides), padding=padding, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def layer_norm(*, name: str | None = None, eps: float = 1e-6, affine: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """LayerNorm over the last axis; statistics always in float32."""
    return nn.LayerNorm(
        epsilon=eps, use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned scale [D] (diffusers/T5 semantics, float32 stats)."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)
