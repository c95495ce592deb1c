"""CLIP text transformer with projection, with the semantics of transformers'
`CLIPTextModelWithProjection` (SD3's CLIP-L/14 and OpenCLIP bigG/14 text encoders).

  input_ids          [B, L] int, L <= max_position_embeddings
  hidden_states      tuple of num_hidden_layers + 1 arrays [B, L, hidden_size]: the embeddings, then
                     each layer's output (before the final layer norm), as `output_hidden_states=True`
  last_hidden_state  [B, L, hidden_size]   the last layer's output after the final layer norm
  pooler_output      [B, hidden_size]      last_hidden_state at the EOS position of each row
  text_embeds        [B, projection_dim]   text_projection(pooler_output), no bias

Field names and defaults are transformers' `CLIPTextConfig`'s. Attention is causal (pre-LN blocks);
an optional padding mask can be added on top, as transformers does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.layers import dense, layer_norm

Dtype = Any

# transformers' ACT2FN names -> jax functions (the ones CLIP and T5 checkpoints use).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The jax function for a transformers activation name; ValueError names the supported ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def embed_init(axes: tuple[Optional[str], Optional[str]]):
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


class CLIPAttention(nn.Module):
    """Multi-head self-attention, scale 1/sqrt(head_dim), causal (text) or not (vision).
    x [B, L, D] -> [B, L, D]. `mask` (optional) [B, L] bool/int, true/1 for keys that may be attended to.
    """
    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        b, n, d = x.shape
        shape = (b, n, self.num_heads, d // self.num_heads)
        q, k, v = (dense(d, ("embed", "heads"), name=f"{p}_proj", dtype=self.dtype)(x).reshape(shape)
                   for p in ("q", "k", "v"))
        if mask is not None:
            mask = mask.astype(bool)[:, None, None, :]
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
        return dense(d, ("heads", "embed"), name="out_proj", dtype=self.dtype)(o.reshape(b, n, d))


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x))). x [B, L, D] -> [B, L, D]."""
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        h = activation(self.hidden_act)(h)
        return dense(self.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)). x [B, L, D] -> [B, L, D]."""
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        def ln(name):
            return layer_norm(name=name, eps=self.layer_norm_eps, affine=True, dtype=self.dtype)

        x = x + CLIPAttention(self.hidden_size, self.num_attention_heads, dtype=self.dtype, causal=self.causal,
                              name="self_attn")(ln("layer_norm1")(x), mask)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, dtype=self.dtype,
                           name="mlp")(ln("layer_norm2")(x))


# The CLIPTextEncoder fields a transformers CLIPTextConfig (and this project's config sections) set.
CLIP_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")


class CLIPTextEncoder(nn.Module):
    """transformers' `CLIPTextModelWithProjection`; defaults are `CLIPTextConfig`'s.

    Params: token_embedding, position_embedding, layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj,
    layer_norm2, mlp/{fc1, fc2}}, final_layer_norm, text_projection (kernel only).
    """
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> dict:
        """input_ids [B, L] (attention_mask [B, L] optional) -> dict with `hidden_states` (tuple of
        num_hidden_layers + 1 [B, L, D]), `last_hidden_state` [B, L, D], `pooler_output` [B, D],
        `text_embeds` [B, projection_dim]."""
        b, n = input_ids.shape
        if n > self.max_position_embeddings:
            raise ValueError(f"sequence length {n} exceeds max_position_embeddings={self.max_position_embeddings}")
        tok = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding",
                       embedding_init=embed_init(("vocab", "embed")))
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype, name="position_embedding",
                       embedding_init=embed_init((None, "embed")))
        x = tok(input_ids) + pos(jnp.arange(n))[None]
        hidden_states = [x]
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_attention_heads, self.hidden_act,
                                 self.layer_norm_eps, dtype=self.dtype, name=f"layers_{i}")(x, attention_mask)
            hidden_states.append(x)
        last = layer_norm(name="final_layer_norm", eps=self.layer_norm_eps, affine=True, dtype=self.dtype)(x)
        pooled = last[jnp.arange(b), self.eos_index(input_ids)]
        text_embeds = dense(self.projection_dim, ("embed", None), name="text_projection", dtype=self.dtype,
                            use_bias=False)(pooled)
        return {"hidden_states": tuple(hidden_states), "last_hidden_state": last, "pooler_output": pooled,
                "text_embeds": text_embeds}

    def eos_index(self, input_ids: jax.Array) -> jax.Array:
        """[B] position pooled for each row, as transformers picks it: with the legacy
        eos_token_id == 2, the argmax of the ids (EOS has the highest id in CLIP's vocabulary);
        otherwise the first position equal to eos_token_id (0 if a row has none)."""
        if self.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)

    def sd3_outputs(self, input_ids: jax.Array, clip_skip: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
        """What SD3 takes from a CLIP encoder: (hidden_states[-(clip_skip or 0) - 2] [B, L, D],
        text_embeds [B, projection_dim]), as diffusers' `_get_clip_prompt_embeds`."""
        out = self(input_ids)
        return out["hidden_states"][-((clip_skip or 0) + 2)], out["text_embeds"]


class CLIPVisionEncoder(nn.Module):
    """transformers' `CLIPVisionModelWithProjection` (the image tower of a CLIP model, for the CLIP
    score); defaults are `CLIPVisionConfig`'s.

      pixel_values  [B, image_size, image_size, 3], normalised as the CLIP image processor does
      -> image_embeds [B, projection_dim]: visual_projection(post_layernorm(class token))

    Params: patch_embedding (conv, no bias), class_embedding [D], position_embedding, pre_layrnorm
    (transformers' spelling), layers_{i} (non-causal `CLIPEncoderLayer`s), post_layernorm,
    visual_projection (kernel only).
    """
    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP vision input must be {self.image_size}x{self.image_size}, got {h}x{w}")
        p, d = self.patch_size, self.hidden_size
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    name="patch_embedding")(pixel_values.astype(self.dtype)).reshape(b, -1, d)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (d,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        pos = nn.Embed(x.shape[1], d, dtype=self.dtype, name="position_embedding",
                       embedding_init=embed_init((None, "embed")))
        x = x + pos(jnp.arange(x.shape[1]))[None]
        x = layer_norm(name="pre_layrnorm", eps=self.layer_norm_eps, affine=True, dtype=self.dtype)(x)
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(d, self.intermediate_size, self.num_attention_heads, self.hidden_act,
                                 self.layer_norm_eps, dtype=self.dtype, causal=False, name=f"layers_{i}")(x)
        pooled = layer_norm(name="post_layernorm", eps=self.layer_norm_eps, affine=True, dtype=self.dtype)(x[:, 0])
        return dense(self.projection_dim, ("embed", None), name="visual_projection", dtype=self.dtype,
                     use_bias=False)(pooled).astype(jnp.float32)
