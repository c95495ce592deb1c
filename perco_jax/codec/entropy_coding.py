"""Entropy coding of VQ index grids with the masked entropy model, group by group.

A schedule (`perco_jax.schedules`) splits the H x W grid into groups 0..S-1. Group s is range
coded under the probabilities the model predicts with mask = groups >= s, i.e. from the indices of
groups 0..s-1 only; the decoder recovers the grid in the same order, filling in each decoded group
before predicting the next. Within a group, positions are taken in row-major order.

The coding tables come from one of two models, passed as `model` to every function here:
  - the float `EntropyModel`, as `apply_fn(indices [B, H, W] int32, mask [B, H, W] bool,
    context: the caption input [B, L, C] / [B, L] | None) -> logits [B, H, W, K] float32`, the
    caller's jitted model function (see `make_apply_fn`); its probabilities are quantised by
    `range_coding.quantize_counts`.
    Bitstream versions <= 3. Subject to the determinism rule below.
  - the integer entropy model (`perco_jax.models.integer_entropy_model`), as `IntegerTables`:
    integer arithmetic from the integer inputs (caption token ids, or an int8 context) to the
    tables, so the tables are bit-identical on any machine, XLA flag, batch size or device
    layout; the determinism rule and batch_size do not apply (batch_size=None is fine on both
    sides). Bitstream version 4.

DETERMINISM RULE (float model only).
The range decoder only works if it builds bit-identical coding tables to the
encoder's, so the encoder must compute every group's probabilities exactly as the decoder will:
for each step s, one call of the SAME jitted function with the SAME shapes (the same batch B, the
full H x W grid, the same context) and the mask of that step (groups >= s). Never compute all
groups' probabilities with one forward pass (or a stacked batch of masks) at encode time: a
different shape compiles to a different program whose float results may differ in the last bit,
and a single differing bit can change a quantised table and derail the decoder. What is
guaranteed equal on both sides:
  - the model input: the model replaces every masked position by its mask token, so the values
    at not-yet-decoded positions (true indices at the encoder, zeros at the decoder) are
    ignored exactly;
  - the other batch entries: attention and every other layer act per example, so the entries
    of a batch are independent: with the batch shape fixed, padding it with zero grids (or
    changing the other images) leaves an image's probabilities bit-identical (tested). The batch
    SIZE is part of the shape, though: the same image in a batch of 2 and of 4 gets probabilities
    that can differ in the last bit (observed on CPU). Hence `batch_size`: encoder and decoder
    run the model on chunks of exactly batch_size images (the last chunk zero-padded), so each
    payload depends only on its own image and decodes alone or with any other payloads as long
    as both sides use the same batch_size (None = the whole batch, i.e. the same B);
  - the softmax: one jitted function on the full logits array, then an exact gather.
Encoder and decoder must run on the same backend and software versions (see
`codec/range_coding.py`). Uniform coding needs no model: see `range_coding.encode_uniform`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perco_jax.codec import range_coding
from perco_jax.models import integer_entropy_model as iem

ApplyFn = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


class IntegerTables:
    """The integer entropy model `qm` as a source of coding tables:
    tables(indices [B, H, W], mask [B, H, W], context, rows=None) -> counts [B, H, W, K] int64
    (each row sums to 2^range_coding.PRECISION), or with rows (raster positions [R]) only those
    rows' [B, R, K], for less work. context: caption token ids [B, L] int for a model that
    reads them (exact end to end), or [B, L, C] int8 values (`iem.quantize_context`) or the float
    context, which is quantised here, for a context model; None for an unconditional model.
    reference=True runs the NumPy int64 reference instead of the jitted JAX path (same tables);
    bf16: the JAX path's operand choice (`iem.make_jax_counts`; same tables)."""

    def __init__(self, qm: iem.IntegerEntropyModel, reference: bool = False, bf16: Optional[bool] = None):
        if qm.config["precision"] != range_coding.PRECISION:
            raise ValueError(f"integer model tables sum to 2^{qm.config['precision']}, the range coder "
                             f"needs 2^{range_coding.PRECISION}")
        self.model = qm
        self._counts = (lambda x, m, c, r: iem.reference_counts(qm, x, m, c, r)) if reference \
            else iem.make_jax_counts(qm, bf16)

    def __call__(self, indices, mask, context=None, rows=None) -> np.ndarray:
        """counts [B, H, W, K], or with rows (raster positions [R]) those rows' [B, R, K]."""
        if context is not None and self.model.config["context_dim"] \
                and not np.issubdtype(np.asarray(context).dtype, np.integer):
            context = iem.quantize_context(context, self.model)
        return np.asarray(self._counts(indices, mask, context, rows), np.int64)


Model = ApplyFn | IntegerTables


def make_apply_fn(model, params) -> ApplyFn:
    """The jitted apply_fn(indices, mask, context) -> logits of an `EntropyModel` and its params."""
    @jax.jit
    def apply_fn(indices, mask, context=None):
        return model.apply(params, indices, mask, context)
    return apply_fn


@jax.jit
def _softmax(logits: jax.Array) -> jax.Array:
    """Probabilities [B, H, W, K] float32 from logits [B, H, W, K] (one program per shape)."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _check_groups(groups, grid: tuple[int, int]) -> np.ndarray:
    g = np.asarray(groups)
    if g.shape != tuple(grid) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"groups must be an integer array of the grid's shape {tuple(grid)}, "
                         f"got {g.dtype} {g.shape}")
    if g.size and (g.min() < 0 or (np.bincount(g.ravel()) == 0).any()):
        raise ValueError("groups must number the positions 0..S-1 with no group empty (use schedules.get_schedule)")
    return g.astype(np.int32)


def _positions(groups: np.ndarray, step: int) -> np.ndarray:
    """Raster (row-major) positions [n_s] of group `step`."""
    return np.flatnonzero(groups.ravel() == step)


def _check_indices(indices) -> np.ndarray:
    x = np.asarray(indices)
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"indices must be an integer array [B, H, W], got {x.dtype} {x.shape}")
    return x.astype(np.int32)


def group_probabilities(apply_fn: ApplyFn, indices, groups, step: int,
                        context=None) -> np.ndarray:
    """Probabilities [B, n_s, K] float32 of the positions of group `step` (row-major order).

    indices [B, H, W] int (only the positions of groups < step matter), groups [H, W] int; the
    model runs once on the full grid with mask = groups >= step.
    """
    x = _check_indices(indices)
    g = _check_groups(groups, x.shape[1:])
    mask = np.broadcast_to(g >= step, x.shape)
    logits = apply_fn(jnp.asarray(x), jnp.asarray(mask), context)
    if logits.ndim != 4 or logits.shape[:3] != x.shape:
        raise ValueError(f"apply_fn returned logits of shape {logits.shape}, expected {x.shape + ('K',)}")
    probs = np.asarray(_softmax(logits))
    return probs.reshape(x.shape[0], -1, probs.shape[-1])[:, _positions(g, step)]


def group_tables(model: Model, indices, groups, step: int, context=None) -> np.ndarray:
    """Integer coding tables [B, n_s, K] int64 of the positions of group `step` (row-major order),
    as the range coder uses them: the integer model's, or the float model's probabilities
    (`group_probabilities`) quantised by `range_coding.quantize_counts`."""
    if not isinstance(model, IntegerTables):
        p = group_probabilities(model, indices, groups, step, context)
        return range_coding.quantize_counts(p.reshape(-1, p.shape[-1])).reshape(p.shape)
    x = _check_indices(indices)
    g = _check_groups(groups, x.shape[1:])
    # (the group's rows only: the model's last block and head skip the others)
    return model(x, np.broadcast_to(g >= step, x.shape), context, rows=_positions(g, step))


def _groups_of(model, x, g, context):
    """Yields (positions [n_s], tables [B, n_s, K]) for every step, as the decoder will see them."""
    for step in range(int(g.max()) + 1):
        yield _positions(g, step), group_tables(model, x, g, step, context)


def _chunks(n: int, batch_size: Optional[int]):
    """Slices of 0..n in chunks of batch_size (all of it when None)."""
    if batch_size is None:
        yield slice(0, n)
        return
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    for start in range(0, n, int(batch_size)):
        yield slice(start, min(start + int(batch_size), n))


def pad_batch(a, size: Optional[int]):
    """a [n, ...] zero-padded along axis 0 to size (unchanged when None or a is None)."""
    if a is None or size is None or a.shape[0] == size:
        return a
    xp = jnp if isinstance(a, jax.Array) else np
    return xp.concatenate([a, xp.zeros((size - a.shape[0],) + tuple(a.shape[1:]), a.dtype)])


def _check_context(context, b: int):
    if context is not None and (context.ndim < 1 or context.shape[0] != b):
        raise ValueError(f"context must have the batch size {b} first, got shape {context.shape}")
    return context


def _coded_groups(model: Model, indices, groups, context, batch_size: Optional[int]):
    """Yields, per image of indices [B, H, W] in order, (symbols per group: S arrays [n_s], tables
    per group: S arrays [n_s, K]), as the decoder will see them (batching: see encode_indices)."""
    x = _check_indices(indices)
    g = _check_groups(groups, x.shape[1:])
    context = _check_context(context, x.shape[0])
    for sl in _chunks(x.shape[0], batch_size):
        b = sl.stop - sl.start
        xs = pad_batch(x[sl], batch_size)
        cs = None if context is None else pad_batch(context[sl], batch_size)
        flat = xs.reshape(xs.shape[0], -1)
        symbols = [[] for _ in range(b)]
        tables = [[] for _ in range(b)]
        for pos, t in _groups_of(model, xs, g, cs):
            if flat.size and (flat.min() < 0 or flat.max() >= t.shape[-1]):
                raise ValueError(f"indices must be in [0, {t.shape[-1]}), got range "
                                 f"[{flat.min()}, {flat.max()}]")
            for i in range(b):
                symbols[i].append(flat[i, pos])
                tables[i].append(t[i])
        yield from zip(symbols, tables)


def encode_indices(model: Model, indices, groups, context=None,
                   batch_size: Optional[int] = None) -> list[bytes]:
    """One range-coded payload per image of indices [B, H, W] int in [0, K), under groups [H, W].

    Runs the model once per group with that step's mask, on the whole batch (batch_size=None) or
    on chunks of batch_size images, the last one padded with zero grids (and zero context). With
    the float model (see the determinism rule above) the decoder must use the same batch shape:
    the same B when batch_size is None, else the same batch_size (then any subset of the payloads
    decodes); with `IntegerTables` any batching decodes any payload.
    """
    return [range_coding.encode_counts(s, t) for s, t in _coded_groups(model, indices, groups, context, batch_size)]


def encode_prefixes(model: Model, indices, groups, context=None,
                    batch_size: Optional[int] = None) -> list[list[bytes]]:
    """Per image of indices [B, H, W], the payloads [S + 1] of its prefixes: entry k decodes groups
    0..k-1 (`decode_indices` with sent = k), entry S is `encode_indices`' payload, byte for byte,
    and entry k < S is cut from it (`range_coding.encode_layers`)."""
    return [range_coding.encode_layers(s, t) for s, t in _coded_groups(model, indices, groups, context, batch_size)]


def cut_prefixes(model: Model, payloads: Sequence[bytes], indices, groups, context=None,
                 batch_size: Optional[int] = None, sent: Optional[Sequence[int]] = None) -> list[list[bytes]]:
    """Per payload (of indices [B, H, W], as `decode_indices` returns them), its prefixes [sent + 1]:
    entry k decodes groups 0..k-1, cut from the payload's own bytes (`range_coding.prefix_cuts`),
    the same bytes `encode_prefixes` gives for k. sent [B]: the groups each payload holds (default all)."""
    s = int(np.max(groups)) + 1
    sent = [s] * len(payloads) if sent is None else [int(k) for k in sent]
    return [range_coding.prefix_cuts(p, sym[:k], tab[:k])
            for p, k, (sym, tab) in zip(payloads, sent, _coded_groups(model, indices, groups, context, batch_size))]


def predict(counts, temperature: float = 0.0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Indices [n] int32 the entropy model predicts from coding tables counts [n, K]: the most
    probable (temperature 0; the first on ties), or drawn from p ∝ counts^(1 / temperature) with
    `rng` (Gumbel-max, float64: the same draws on any machine for the same rng state)."""
    c = np.asarray(counts, np.int64)
    if temperature == 0:
        return np.argmax(c, axis=-1).astype(np.int32)
    if not temperature > 0 or rng is None:
        raise ValueError(f"fill temperature {temperature!r}: 0 (argmax) or > 0 with a random generator")
    return np.argmax(np.log(c) / float(temperature) + rng.gumbel(size=c.shape), axis=-1).astype(np.int32)


def decode_indices(model: Model, payloads: Sequence[bytes], grid: tuple[int, int], groups,
                   context=None, batch_size: Optional[int] = None, sent: Optional[Sequence[int]] = None,
                   fill_temperature: float = 0.0, fill_seeds: Optional[Sequence] = None) -> np.ndarray:
    """Inverse of encode_indices: indices [B, H, W] int32 from B payloads (B = len(payloads)).

    Needs the batch shape of the encoder (see encode_indices) and each image's context; raises
    `errors.CodingError` on data that cannot be decoded. sent [B]: how many groups each payload
    holds (`encode_prefixes`; default all). The groups not sent are filled in schedule order, each
    from the model's tables given the groups before it (sent or filled): `predict` at
    fill_temperature, image i drawing from np.random.default_rng(fill_seeds[i]) (default its
    position in the batch). Every group costs one model pass, decoded or filled: a prefix decodes
    in the time of a full payload.
    """
    h, w = (int(v) for v in grid)
    g = _check_groups(groups, (h, w))
    n = len(payloads)
    context = _check_context(context, n)
    sent = np.full(n, int(g.max()) + 1) if sent is None else np.asarray(sent, np.int64)
    if sent.shape != (n,):
        raise ValueError(f"sent must give one group count per payload ({n}), got shape {sent.shape}")
    seeds = list(range(n)) if fill_seeds is None else list(fill_seeds)
    out = np.zeros((n, h, w), np.int32)
    for sl in _chunks(n, batch_size):
        b = sl.stop - sl.start
        decoders = [range_coding.Decoder(p) for p in payloads[sl]]
        rngs = [np.random.default_rng(seeds[i]) if fill_temperature else None for i in range(sl.start, sl.stop)]
        x = np.zeros((batch_size or b, h * w), np.int32)
        cs = None if context is None else pad_batch(context[sl], batch_size)
        for step in range(int(g.max()) + 1):
            pos = _positions(g, step)
            t = group_tables(model, x.reshape(-1, h, w), g, step, cs)
            for i in range(b):
                x[i, pos] = (decoders[i].decode_counts(t[i]) if step < sent[sl.start + i]
                             else predict(t[i], fill_temperature, rngs[i]))
        out[sl] = x[:b].reshape(b, h, w)
    return out


def rate_bits(model: Model, indices, groups, context=None,
              batch_size: Optional[int] = None) -> np.ndarray:
    """Cross-entropy [B] float64 in bits of each image's indices [B, H, W] under the schedule.

    Uses the same quantised coding tables as the range coder (and the same batching as
    encode_indices), so a payload is this long plus the coder's few bytes of overhead.
    """
    x = _check_indices(indices)
    g = _check_groups(groups, x.shape[1:])
    context = _check_context(context, x.shape[0])
    bits = np.zeros(x.shape[0], np.float64)
    for sl in _chunks(x.shape[0], batch_size):
        b = sl.stop - sl.start
        xs = pad_batch(x[sl], batch_size)
        cs = None if context is None else pad_batch(context[sl], batch_size)
        flat = xs.reshape(xs.shape[0], -1)
        for pos, t in _groups_of(model, xs, g, cs):
            for i in range(b):
                bits[sl.start + i] += range_coding.count_bits(flat[i, pos], t[i])
    return bits
