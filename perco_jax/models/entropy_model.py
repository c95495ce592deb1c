"""Masked (MaskGIT-like) bidirectional transformer over the VQ index grid: the entropy model.

The index grid is sent group by group (a schedule from `perco_jax.schedules`); for the group sent
at step s the model sees the indices of groups 0..s-1 and a mask token everywhere else, and
predicts a distribution over the K codebook entries at every position. Only the predictions at
the positions of group s are used for coding (`perco_jax.codec.entropy_coding`).

Shapes:
  indices [B, H, W] int32 in [0, K)   (values at masked positions are ignored)
  mask    [B, H, W] bool              True = not yet known (replaced by the mask token)
  context the caption, prepended as L extra tokens, one of
          [B, L, context_dim] float   a caption embedding (SD3's text context; context_dim > 0)
          [B, L] int in [0, V)        caption token ids (caption_vocab V > 0), embedded here by a
                                      learned table + a learned position table of max_caption rows
          None                        unconditional (both 0)
  logits  [B, H, W, K] float32

Positions are learned 2D embeddings: a row table and a column table of `max_grid` entries each,
added, so any grid with H, W <= max_grid works with the same parameters.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.attention import attention, attention_implementation
from perco_jax.models.layers import dense, layer_norm

Dtype = Any
_EMBED_INIT = nn.initializers.normal(stddev=0.02)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention: x [B, N, D] -> [B, N, D] (no masking)."""
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        head_dim = d // self.num_heads

        def proj(name):
            return dense(d, ("embed", "heads"), name=name, dtype=self.dtype)(x).reshape(
                b, n, self.num_heads, head_dim)

        q, k, v = proj("query"), proj("key"), proj("value")
        # Never splash: the sequences are short (g^2 + caption tokens), and the float coding
        # tables must not change with the implementation (cuDNN on GPUs, else XLA, as before).
        o = attention(q, k, v, implementation=attention_implementation(None, q, allow_splash=False))
        return dense(d, ("heads", "embed"), name="out", dtype=self.dtype)(o.reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU; x [B, N, D]."""
    num_heads: int
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = x + SelfAttention(self.num_heads, dtype=self.dtype, name="attn")(
            layer_norm(name="ln1", affine=True, dtype=self.dtype)(x))
        h = layer_norm(name="ln2", affine=True, dtype=self.dtype)(x)
        h = dense(self.mlp_ratio * d, ("embed", "mlp"), name="fc1", dtype=self.dtype)(h)
        h = dense(d, ("mlp", "embed"), name="fc2", dtype=self.dtype)(nn.gelu(h))
        return x + h


class EntropyModel(nn.Module):
    """Bidirectional transformer predicting index distributions [B, H, W, K] from a masked grid.

    codebook_size K; the token table has K + 1 entries, the last (id K) being the mask token.
    The caption comes in as one of (at most one of context_dim, caption_vocab is nonzero; both 0
    makes the model unconditional, and a `context` passed in is then an error):
      context_dim > 0: context [B, L, context_dim] float, projected to the width;
      caption_vocab > 0: caption token ids [B, L <= max_caption] int, looked up in a learned
        table [caption_vocab, width] plus a learned position table [max_caption, width] (an
        integer input: the integer model's tables then depend on no float network).
    Either way the L caption tokens are prepended to the grid's and take part in every attention
    layer (all grid positions attend to them).
    `dtype` is the compute dtype; params are float32 and the logits always float32.
    """
    codebook_size: int
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    max_grid: int = 64
    context_dim: int = 0
    caption_vocab: int = 0
    max_caption: int = 0
    dtype: Dtype = jnp.float32

    @property
    def mask_token(self) -> int:
        """The token id standing for an unknown index (K)."""
        return self.codebook_size

    @nn.compact
    def __call__(self, indices: jax.Array, mask: jax.Array,
                 context: Optional[jax.Array] = None) -> jax.Array:
        if indices.ndim != 3:
            raise ValueError(f"indices must be [B, H, W], got shape {indices.shape}")
        b, h, w = indices.shape
        if h > self.max_grid or w > self.max_grid:
            raise ValueError(f"index grid {h}x{w} exceeds the entropy model's max_grid={self.max_grid}")
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), indices.shape)
        dt, d = self.dtype, self.width

        tokens = jnp.where(mask, self.mask_token, indices.astype(jnp.int32))
        x = nn.Embed(self.codebook_size + 1, d, dtype=dt, name="token_embed",
                     embedding_init=nn.with_logical_partitioning(_EMBED_INIT, ("vocab", "embed")))(tokens)
        row = nn.Embed(self.max_grid, d, dtype=dt, name="row_embed",
                       embedding_init=nn.with_logical_partitioning(_EMBED_INIT, (None, "embed")))(jnp.arange(h))
        col = nn.Embed(self.max_grid, d, dtype=dt, name="col_embed",
                       embedding_init=nn.with_logical_partitioning(_EMBED_INIT, (None, "embed")))(jnp.arange(w))
        x = (x + row[None, :, None, :] + col[None, None, :, :]).reshape(b, h * w, d)

        if self.context_dim and self.caption_vocab:
            raise ValueError("an entropy model reads a float context (context_dim) or caption tokens "
                             "(caption_vocab), not both")
        n_ctx = 0
        if self.context_dim:
            if context is None:
                raise ValueError(f"this entropy model is conditional (context_dim={self.context_dim}): "
                                 "pass the caption embedding [B, L, context_dim]")
            if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != self.context_dim:
                raise ValueError(f"context must be [{b}, L, {self.context_dim}], got shape {context.shape}")
            c = dense(d, ("joint", "embed"), name="context_proj", dtype=dt)(context.astype(dt))
        elif self.caption_vocab:
            if context is None or context.ndim != 2 or context.shape[0] != b \
                    or not jnp.issubdtype(context.dtype, jnp.integer) or context.shape[1] > self.max_caption:
                raise ValueError(f"this entropy model reads caption token ids [{b}, L <= {self.max_caption}] int, "
                                 f"got {None if context is None else (context.dtype, context.shape)}")
            c = nn.Embed(self.caption_vocab, d, dtype=dt, name="caption_embed",
                         embedding_init=nn.with_logical_partitioning(_EMBED_INIT, ("vocab", "embed")))(context)
            c = c + nn.Embed(self.max_caption, d, dtype=dt, name="caption_pos",
                             embedding_init=nn.with_logical_partitioning(_EMBED_INIT, (None, "embed")))(
                jnp.arange(context.shape[1]))[None]
        elif context is not None:
            raise ValueError("this entropy model is unconditional but a context was given")
        if self.context_dim or self.caption_vocab:
            n_ctx = c.shape[1]
            x = jnp.concatenate([c, x], axis=1)

        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, dtype=dt, name=f"blocks_{i}")(x)
        x = layer_norm(name="ln_out", affine=True, dtype=dt)(x[:, n_ctx:])
        logits = dense(self.codebook_size, ("embed", "vocab"), name="head", dtype=dt)(x)
        return logits.astype(jnp.float32).reshape(b, h, w, self.codebook_size)


# ----------------------------------------------------------------------------- training helpers

def masked_loss_bits(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy in bits (scalar) over the positions where loss_mask is True.

    logits [B, H, W, K], targets [B, H, W] int, loss_mask [B, H, W] bool. The mean is over all
    selected positions of the batch together (0 if none is selected).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    m = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0) / jnp.log(2.0)


def training_mask(rng: jax.Array, groups: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """Random coding steps for training: (mask [B, H, W], loss_mask [B, H, W]) bool.

    groups [H, W] int (a schedule, ids 0..S-1), or [M, H, W] (M schedules: each example first
    draws one uniformly). Each example draws a step s uniformly from 0..S-1 of its schedule and
    gets mask = groups >= s (the current and later groups are unknown, exactly what the coder sees
    at step s) and loss_mask = groups == s (the positions coded at step s).

    Why the loss covers group s only: those are the positions whose probabilities are actually
    used for coding under this mask, so the loss is the rate of that group's indices. Later
    groups are predicted with less context than they will have when coded, so including them
    would train for a harder task than the real one. With s uniform, the expected sum of the
    per-position losses is (1/S) x the image's total rate, so `masked_loss_bits` (sum / count)
    estimates the bits per index of the whole schedule.
    """
    groups = jnp.asarray(groups, jnp.int32)
    if groups.ndim == 3:
        k_sched, rng = jax.random.split(rng)
        groups = groups[jax.random.randint(k_sched, (batch,), 0, groups.shape[0])]
        num_steps = jnp.max(groups, axis=(1, 2)) + 1
        s = jnp.floor(jax.random.uniform(rng, (batch,)) * num_steps).astype(jnp.int32)[:, None, None]
        return groups >= s, groups == s
    num_steps = jnp.max(groups) + 1
    s = jax.random.randint(rng, (batch,), 0, num_steps)[:, None, None]
    return groups[None] >= s, groups[None] == s
