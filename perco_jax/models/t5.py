"""T5 encoder with the semantics of transformers' `T5EncoderModel` (SD3's T5-XXL text encoder).

  input_ids          [B, L] int
  attention_mask     [B, L] optional (1 = attend); SD3 passes none
  output             [B, L, d_model]   last_hidden_state (after the final RMS norm)

T5 specifics: RMS layer norms (no mean subtraction, no bias, float32 statistics); attention logits
are not scaled by 1/sqrt(d_kv); a learned relative position bias [num_buckets, num_heads] lives in
the first block only and is shared by every block; the feed-forward is `wo(act(wi(x)))` ("relu") or
`wo(act(wi_0(x)) * wi_1(x))` ("gated-gelu", gelu_new = tanh approximation, T5 v1.1 / XXL).

Float32 care: the residual stream is kept in float32 and `wo` runs in float32 whatever `dtype`
is (transformers keeps `wo` in float32 for half-precision T5, which makes its residual float32);
the position bias and the softmax are float32. Field names and defaults are transformers' `T5Config`'s.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from perco_jax.models.clip import activation, embed_init
from perco_jax.models.layers import RMSNorm, dense

Dtype = Any


def relative_position_bucket(query_length: int, key_length: int, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """[query_length, key_length] int32 bucket of (key - query), bidirectional, as T5 computes it
    (half the buckets for each sign; exact buckets up to num_buckets // 4, then log-spaced up to
    max_distance). Static numpy, evaluated in float32 like the reference."""
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)
    large = max_exact + (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class T5Attention(nn.Module):
    """Unscaled self-attention plus an additive position bias.

    x [B, L, D], bias [1, H, L, L] float32 or None, mask [B, L] or None -> (out [B, L, D], bias).
    With `has_relative_attention_bias` (the first block) and no bias given, the bias is computed
    from this layer's table `relative_attention_bias` [num_buckets, H] and returned for reuse.
    """
    num_heads: int
    d_kv: int
    has_relative_attention_bias: bool = False
    num_buckets: int = 32
    max_distance: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
        b, n, d = x.shape
        inner = self.num_heads * self.d_kv
        q, k, v = (dense(inner, ("embed", "heads"), name=p, dtype=self.dtype, use_bias=False)(x)
                   .reshape(b, n, self.num_heads, self.d_kv) for p in ("q", "k", "v"))
        if bias is None:
            if self.has_relative_attention_bias:
                table = nn.Embed(self.num_buckets, self.num_heads, name="relative_attention_bias",
                                 embedding_init=embed_init((None, None)))
                buckets = relative_position_bucket(n, n, self.num_buckets, self.max_distance)
                bias = jnp.transpose(table(jnp.asarray(buckets)).astype(jnp.float32), (2, 0, 1))[None]
            else:
                bias = jnp.zeros((1, self.num_heads, n, n), jnp.float32)
        if mask is not None:
            mask = mask.astype(bool)[:, None, None, :]
        o = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0)
        out = dense(d, ("heads", "embed"), name="o", dtype=self.dtype, use_bias=False)(o.reshape(b, n, inner))
        return out, bias


class T5FeedForward(nn.Module):
    """"relu"-style `wo(act(wi(x)))` or "gated-*" `wo(act(wi_0(x)) * wi_1(x))`; `wo` in float32.
    x [B, L, D] -> [B, L, D] float32."""
    d_model: int
    d_ff: int
    feed_forward_proj: str = "relu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        parts = self.feed_forward_proj.split("-")
        gated = parts[0] == "gated"
        act = activation("gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1])

        def wi(name):
            return dense(self.d_ff, ("embed", "mlp"), name=name, dtype=self.dtype, use_bias=False)(x)

        h = act(wi("wi_0")) * wi("wi_1") if gated else act(wi("wi"))
        return dense(self.d_model, ("mlp", "embed"), name="wo", dtype=jnp.float32, use_bias=False)(
            h.astype(jnp.float32))


class T5LayerSelfAttention(nn.Module):
    """x + SelfAttention(layer_norm(x)). x [B, L, D] float32 -> ([B, L, D] float32, bias)."""
    num_heads: int
    d_kv: int
    has_relative_attention_bias: bool
    num_buckets: int
    max_distance: int
    layer_norm_epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias=None, mask=None):
        h = RMSNorm(eps=self.layer_norm_epsilon, dtype=self.dtype, name="layer_norm")(x)
        h, bias = T5Attention(self.num_heads, self.d_kv, self.has_relative_attention_bias, self.num_buckets,
                              self.max_distance, dtype=self.dtype, name="SelfAttention")(h, bias, mask)
        return x + h.astype(jnp.float32), bias


class T5LayerFF(nn.Module):
    """x + DenseReluDense(layer_norm(x)). x [B, L, D] float32 -> [B, L, D] float32."""
    d_model: int
    d_ff: int
    feed_forward_proj: str
    layer_norm_epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = RMSNorm(eps=self.layer_norm_epsilon, dtype=self.dtype, name="layer_norm")(x)
        return x + T5FeedForward(self.d_model, self.d_ff, self.feed_forward_proj, dtype=self.dtype,
                                 name="DenseReluDense")(h)


class T5Encoder(nn.Module):
    """transformers' `T5EncoderModel`; defaults are `T5Config`'s.

    Params: shared (embedding), block_{i}_layer_0/{layer_norm, SelfAttention/{q,k,v,o}}
    (+ SelfAttention/relative_attention_bias in block_0), block_{i}_layer_1/{layer_norm,
    DenseReluDense/{wi | wi_0, wi_1}, wo}, final_layer_norm.
    """
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """input_ids [B, L] (attention_mask [B, L] optional) -> last_hidden_state [B, L, d_model]."""
        x = nn.Embed(self.vocab_size, self.d_model, name="shared",
                     embedding_init=embed_init(("vocab", "embed")))(input_ids).astype(jnp.float32)
        bias = None
        for i in range(self.num_layers):
            x, bias = T5LayerSelfAttention(self.num_heads, self.d_kv, i == 0, self.relative_attention_num_buckets,
                                           self.relative_attention_max_distance, self.layer_norm_epsilon,
                                           dtype=self.dtype, name=f"block_{i}_layer_0")(x, bias, attention_mask)
            x = T5LayerFF(self.d_model, self.d_ff, self.feed_forward_proj, self.layer_norm_epsilon, dtype=self.dtype,
                          name=f"block_{i}_layer_1")(x)
        return RMSNorm(eps=self.layer_norm_epsilon, dtype=self.dtype, name="final_layer_norm")(x)
