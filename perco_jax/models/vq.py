"""Vector quantiser with an l2-normalised EMA codebook (PerCo / ViT-VQGAN style).

Shapes (N = number of positions = prod of the batch dims, d = code_dim):
  z        [B, ..., D_in]   hyper-encoder features
  x        [B, ..., d]      x = l2_normalise(proj_in(z)), float32
  codes    [B, ..., d]      unit-norm codebook vectors, straight-through to x
  indices  [B, ...]         int32 in [0, K)

Variables:
  "params"  proj_in/{kernel [D_in, d] ("embed", None), bias [d] (None,)}
  "vq"      embed_sum [K, d] (None, None) and cluster_size [K] (None,), float32; not trained by
            gradients. The codebook is `l2_normalise(embed_sum)` (dividing by cluster_size first,
            as non-cosine EMA VQs do, would not change the direction, so cluster_size only serves
            dead-code detection).

Assignment: index = argmax_k <x, c_k> (cosine similarity of unit vectors; ties -> lowest k).

EMA update (only when train=True, the "vq" collection is mutable and not during `init`), with
n_k = #{i : index_i = k} and s_k = sum_{i : index_i = k} x_i over the batch (x without gradient):
  cluster_size_k <- decay * cluster_size_k + (1 - decay) * n_k
  embed_sum_k    <- decay * embed_sum_k    + (1 - decay) * s_k
Dead-code restart, right after: a code is dead when its updated
  cluster_size_k < restart_threshold * mean_j(cluster_size_j)
(restart_threshold = 0 disables restarts). Each dead code k is replaced by a batch vector x_{p(k)},
p a random permutation of the N positions from rng stream "vq" (drawn with replacement if N < K):
  embed_sum_k <- m * x_{p(k)},  cluster_size_k <- m,  m = mean_j(cluster_size_j) (after the EMA),
i.e. it restarts as an average-usage code pointing at that vector. The outputs of the step
(codes, indices, ...) use the codebook from *before* the update.

Initialisation: embed_sum = K random unit vectors (rng "params"), cluster_size = 1.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.layers import dense

Dtype = Any
VQ_COLLECTION = "vq"


def l2_normalise(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """x / max(||x||_2, eps) over the last axis (torch F.normalize semantics), float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _init_embed_sum(rng: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return l2_normalise(jax.random.normal(rng, shape, jnp.float32))


class VectorQuantizer(nn.Module):
    """`__call__(z, train)` -> dict(codes, indices, loss, perplexity, usage); `lookup(indices)` -> codes.

    Fields: codebook_size K (>= 2), code_dim d, decay (EMA, in [0, 1]; 1 freezes the codebook),
    eps (norm floor), commitment_cost (weight of the commitment loss, 0 = off as in PerCo),
    restart_threshold (dead-code rule, see the module docstring), dtype (compute dtype of proj_in;
    normalisation, similarities, codes and the codebook are float32).
    """
    codebook_size: int
    code_dim: int
    decay: float = 0.99
    eps: float = 1e-5
    commitment_cost: float = 0.0
    restart_threshold: float = 0.03
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.codebook_size < 2:
            raise ValueError(f"VectorQuantizer: codebook_size must be >= 2, got {self.codebook_size}")
        if self.code_dim < 1:
            raise ValueError(f"VectorQuantizer: code_dim must be >= 1, got {self.code_dim}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1], got {self.decay}")
        if self.restart_threshold < 0 or self.commitment_cost < 0 or self.eps <= 0:
            raise ValueError("VectorQuantizer: need restart_threshold >= 0, commitment_cost >= 0 and eps > 0, got "
                             f"{self.restart_threshold}, {self.commitment_cost}, {self.eps}")
        super().__post_init__()

    def setup(self):
        k, d = self.codebook_size, self.code_dim
        self.proj_in = dense(d, ("embed", None), name="proj_in", dtype=self.dtype)
        self.embed_sum = self.variable(
            VQ_COLLECTION, "embed_sum",
            nn.with_logical_partitioning(lambda: _init_embed_sum(self.make_rng("params"), (k, d)), (None, None)))
        self.cluster_size = self.variable(
            VQ_COLLECTION, "cluster_size",
            nn.with_logical_partitioning(lambda: jnp.ones((k,), jnp.float32), (None,)))

    def codebook(self) -> jax.Array:
        """The unit-norm codebook [K, d] float32."""
        return l2_normalise(self.embed_sum.value, self.eps)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices [B, ...] int -> codes [B, ..., d] float32 (unit-norm codebook vectors)."""
        return jnp.take(self.codebook(), indices.astype(jnp.int32), axis=0)

    def __call__(self, z: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """z [B, ..., D_in] -> dict(
             codes [B, ..., d] float32: forward = codebook vector, gradient = that of x (straight-through),
             indices [B, ...] int32,
             loss () float32: commitment_cost * mean over positions of ||x - sg(code)||^2 (0 if cost is 0),
             perplexity () float32: exp(entropy of the batch's code histogram), in [1, min(N, K)],
             usage () float32: fraction of the K codes used at least once in the batch, in (0, 1]).
        """
        k = self.codebook_size
        batch_shape = z.shape[:-1]
        x = l2_normalise(self.proj_in(z.astype(self.dtype)), self.eps)           # [B, ..., d]
        codebook = self.codebook()                                               # [K, d]
        flat = x.reshape(-1, self.code_dim)                                      # [N, d]
        sim = jnp.einsum("nd,kd->nk", jax.lax.stop_gradient(flat), codebook,
                         precision=jax.lax.Precision.HIGHEST)                    # [N, K]
        idx = jnp.argmax(sim, axis=-1).astype(jnp.int32)                         # [N]
        quant = jnp.take(codebook, idx, axis=0).reshape(x.shape)
        codes = quant + (x - jax.lax.stop_gradient(x))   # forward exactly quant, gradient that of x

        if self.commitment_cost:
            loss = self.commitment_cost * jnp.mean(jnp.sum(jnp.square(x - jax.lax.stop_gradient(quant)), axis=-1))
        else:
            loss = jnp.zeros((), jnp.float32)
        onehot = jax.nn.one_hot(idx, k, dtype=jnp.float32)                      # [N, K]
        counts = jnp.sum(onehot, axis=0)                                         # [K]
        probs = counts / flat.shape[0]
        perplexity = jnp.exp(-jnp.sum(jax.scipy.special.xlogy(probs, probs)))
        usage = jnp.mean((counts > 0).astype(jnp.float32))

        if train and self.is_mutable_collection(VQ_COLLECTION) and not self.is_initializing():
            self._update(jax.lax.stop_gradient(flat), onehot, counts)
        return dict(codes=codes, indices=idx.reshape(batch_shape), loss=loss, perplexity=perplexity, usage=usage)

    def _update(self, flat: jax.Array, onehot: jax.Array, counts: jax.Array) -> None:
        """EMA update then dead-code restart (formulas in the module docstring)."""
        sums = jnp.einsum("nk,nd->kd", onehot, flat, precision=jax.lax.Precision.HIGHEST)   # [K, d]
        cluster = self.decay * self.cluster_size.value + (1.0 - self.decay) * counts
        embed = self.decay * self.embed_sum.value + (1.0 - self.decay) * sums
        if self.restart_threshold > 0:
            n, k = flat.shape[0], self.codebook_size
            if not self.has_rng(VQ_COLLECTION):
                raise ValueError("VectorQuantizer: training with a mutable 'vq' collection restarts dead codes "
                                 "and needs rngs={'vq': key} (or restart_threshold=0)")
            pick = jax.random.choice(self.make_rng(VQ_COLLECTION), n, (k,), replace=n < k)
            mean = jnp.mean(cluster)
            dead = cluster < self.restart_threshold * mean                    # [K]
            embed = jnp.where(dead[:, None], mean * flat[pick], embed)
            cluster = jnp.where(dead, mean, cluster)
        self.cluster_size.value = cluster
        self.embed_sum.value = embed
