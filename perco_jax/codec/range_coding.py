"""Range coding of index groups under model probabilities (a thin layer over `constriction`).

The masked entropy model sends the index grid group by group: the probabilities of group s come
from a network run on groups 0..s-1, so the decoder can only compute them after decoding those.
`encode_groups` codes all groups into one range-coder queue; `Decoder.decode` is called once
per group, in the same order, with that group's probabilities.

Determinism (why encoder and decoder build bit-identical coding tables):
  1. Both sides call `quantize_probabilities` on the same float32 probabilities (the entropy model
     run on the same already-sent indices). It uses only exact operations: float32 -> float64
     conversion, multiplication by a power of two, floor, clipping, then int64 arithmetic
     (integer division, sums, argmax). Its result, integer counts c / 2^PRECISION summing to
     exactly 1 with every c >= 1, is therefore a pure function of the input bits, on any
     platform and numpy version.
  2. Those float64 values are handed to constriction's `Categorical(perfect=False)`, whose
     quantisation to its own 24-bit fixed point is a fixed, deterministic sequence of IEEE
     operations on its input ("encoder and decoder have to use the same setting for
     `perfect`"; with perfect=False the `lazy` flag changes run time only, not the model). It
     also sees only dyadic numbers with <= PRECISION significant bits summing to exactly 1,
     which keeps its rescaling free of ties decided by the last bit. `perfect=True` would
     instead run an optimisation loop, slow for large alphabets, for a gain in rate that is
     hardly measurable (constriction's docs recommend perfect=False).
  Hence equal float32 inputs give equal coding tables. What this cannot fix is the entropy
  model itself producing different float32 values on the two sides (e.g. different hardware or
  XLA versions); quantising to 2^-PRECISION makes that rare but not impossible, so encoder and
  decoder should run the entropy model on the same backend. A decoded mismatch shows up as
  garbage indices, not as a crash.
  The integer entropy model (perco_jax.models.integer_entropy_model) hands over integer counts
  directly (`encode_counts`, `Decoder.decode_counts`): step 2 alone, so its tables are the same
  on every machine.

Errors: malformed or corrupted data raises `CodingError` (a `BitstreamError`); constriction's
own exceptions (e.g. an AssertionError on data invalid for the model) are converted. A range decoder
fed garbage usually decodes garbage without complaint; the container's CRC32 catches that.
Programming errors (wrong shapes, symbols out of range at the encoder) raise ValueError.
"""
from __future__ import annotations

from typing import Callable, Sequence

import constriction
import numpy as np

from perco_jax.codec.errors import CodingError

# Fixed-point precision of the probability tables: every symbol gets >= 2^-PRECISION, so no
# index costs much more than PRECISION bits; with K = 1024 the floors take 0.1% of the mass.
PRECISION = 20
_TOTAL = 1 << PRECISION
# Floors take at most half of the mass (and constriction's 24-bit tables hold K <= 2^24 symbols).
MAX_ALPHABET = 1 << (PRECISION - 1)
_PROBE_BITS = 30  # float -> integer resolution before renormalisation (exact in float64)
_MAX_TRIM = 8     # trailing bytes the encoder tries to drop (see trim_tail)


def model_family():
    """constriction's categorical model family that codes one probability row [K] per symbol.

    perfect=False: the deterministic fast quantisation (see the module docstring)."""
    return constriction.stream.model.Categorical(perfect=False)


def quantize_counts(probs) -> np.ndarray:
    """Integer coding table [N, K] int64 from probabilities [N, K]: counts c >= 1 per row with
    sum(c) == 2^PRECISION.

    Rows need not sum to one (they are renormalised); entries must be finite and >= 0 (values
    above 1 are clipped to 1). c = 1 + floor(q * (2^P - K) / sum(q)) with q = floor(p * 2^30),
    the rounding remainder going to the most probable symbol (the first one on ties). A row of all
    zeros becomes uniform.
    """
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be [N, K], got shape {p.shape}")
    n, k = p.shape
    if not 2 <= k <= MAX_ALPHABET:
        raise ValueError(f"alphabet size K must be in [2, {MAX_ALPHABET}], got {k}")
    p = p.astype(np.float64)  # exact for float16 / float32 inputs
    if n and not (np.isfinite(p).all() and (p >= 0).all()):
        raise ValueError("probabilities must be finite and non-negative")
    q = np.floor(np.minimum(p, 1.0) * float(1 << _PROBE_BITS)).astype(np.int64)
    row_sum = q.sum(axis=1, keepdims=True)
    zero = row_sum[:, 0] == 0
    q[zero] = 1
    row_sum[zero] = k
    counts = 1 + (q * (_TOTAL - k)) // row_sum      # <= 2^30 * 2^20: fits int64
    rest = _TOTAL - counts.sum(axis=1)              # in [0, K): floor losses
    counts[np.arange(n), np.argmax(q, axis=1)] += rest
    return counts


def quantize_probabilities(probs) -> np.ndarray:
    """Exactly normalised fixed-point coding table [N, K] float64 from probabilities [N, K]:
    `quantize_counts(probs) / 2^PRECISION`."""
    return quantize_counts(probs).astype(np.float64) / _TOTAL


def check_counts(counts) -> np.ndarray:
    """An integer coding table [N, K] (every count >= 1, each row summing to exactly
    2^PRECISION) as int64; ValueError for anything else."""
    c = np.asarray(counts)
    if c.ndim != 2 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"a coding table must be integer counts [N, K], got {c.dtype} {c.shape}")
    if not 2 <= c.shape[1] <= MAX_ALPHABET:
        raise ValueError(f"alphabet size K must be in [2, {MAX_ALPHABET}], got {c.shape[1]}")
    c = c.astype(np.int64)
    if c.size and (c.min() < 1 or (c.sum(axis=1) != _TOTAL).any()):
        raise ValueError(f"coding table rows must be counts >= 1 summing to 2^{PRECISION}")
    return c


def _table(counts: np.ndarray) -> np.ndarray:
    """constriction's probabilities [N, K] float64 of counts (exact dyadic numbers)."""
    return counts.astype(np.float64) / _TOTAL


def cross_entropy_bits(symbols, probs) -> float:
    """sum(-log2 table[symbol]) in bits under the quantised table of probs [N, K]; symbols [N]."""
    return count_bits(symbols, quantize_counts(probs))


def count_bits(symbols, counts) -> float:
    """sum(-log2(counts[symbol] / 2^PRECISION)) in bits; symbols [N], counts [N, K]."""
    c = check_counts(counts)
    s = np.asarray(symbols, np.int64)
    return float(-np.log2(_table(c[np.arange(len(s)), s][:, None])).sum())


def _check_group(symbols, probs) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(symbols)
    p = np.asarray(probs)
    if s.ndim != 1 or p.ndim != 2 or p.shape[0] != s.shape[0]:
        raise ValueError(f"a group needs symbols [n] and probabilities [n, K]; got {s.shape} and {p.shape}")
    if not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"symbols must be integers, got {s.dtype}")
    if s.size and (s.min() < 0 or s.max() >= p.shape[1]):
        raise ValueError(f"symbols must be in [0, {p.shape[1]}), got range [{s.min()}, {s.max()}]")
    return s.astype(np.int32), p


def words_to_bytes(words: np.ndarray) -> bytes:
    """A constriction queue's compressed words [n] uint32 as 4n bytes."""
    return words.astype(">u4").tobytes()  # big-endian: the last bytes are the least significant


def bytes_to_words(data: bytes) -> np.ndarray:
    """Inverse of words_to_bytes: words [ceil(len / 4)] uint32 (a trimmed tail reads as zeros)."""
    pad = (-len(data)) % 4  # the encoder may drop trailing bytes; they read back as zeros
    return np.frombuffer(bytes(data) + b"\0" * pad, dtype=">u4").astype(np.uint32)


def _decodes_to(data: bytes, groups: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """Whether data decodes to the symbols of groups [(symbols [n], table [n, K])]."""
    try:
        dec = Decoder(data)
        return all(np.array_equal(dec._decode_table(t), s) for s, t in groups)
    except CodingError:
        return False


def trim_tail(data: bytes, decodes: Callable[[bytes], bool]) -> bytes:
    """The shortest of data with its last 0.._MAX_TRIM bytes dropped for which decodes(...) holds.

    The decoder reads missing bytes as zeros. The sealed coder's tail only has to point inside
    the final coding interval, so the prefix rounded *up* (prefix + 1 when the dropped bytes are
    not all zero) often still does: about one byte saved per stream, a few percent of a payload
    of a few dozen bytes. Each candidate is checked by decoding it, so the result is exact.
    """
    best = data
    for cut in range(1, min(_MAX_TRIM, len(data)) + 1):
        prefix, dropped = data[:-cut], data[-cut:]
        if any(dropped):
            value = int.from_bytes(prefix, "big") + 1
            if value >> (8 * len(prefix)):
                break
            prefix = value.to_bytes(len(prefix), "big")
        if not decodes(prefix):
            break
        best = prefix
    return best


def encode_groups(symbols_per_group: Sequence, probs_per_group: Sequence, trim: bool = True) -> bytes:
    """Range codes groups of symbols, each under its own probabilities, into one byte string.

    symbols_per_group: list of int arrays [n_i]; probs_per_group: list of float arrays [n_i, K_i]
    (the same float32 values the decoder will compute), quantised by `quantize_counts`.
    """
    if len(symbols_per_group) != len(probs_per_group):
        raise ValueError(f"{len(symbols_per_group)} symbol groups but {len(probs_per_group)} probability groups")
    groups = [_check_group(s, p) for s, p in zip(symbols_per_group, probs_per_group)]
    return encode_counts([s for s, _ in groups], [quantize_counts(p) for _, p in groups], trim)


def encode_counts(symbols_per_group: Sequence, counts_per_group: Sequence, trim: bool = True) -> bytes:
    """Range codes groups of symbols, each under its own integer coding table, into one byte string.

    symbols_per_group: list of int arrays [n_i]; counts_per_group: list of integer tables [n_i, K_i]
    (`check_counts`). Empty groups are allowed. trim=True drops the trailing bytes the decoder
    does not need (verified by decoding).
    """
    if len(symbols_per_group) != len(counts_per_group):
        raise ValueError(f"{len(symbols_per_group)} symbol groups but {len(counts_per_group)} tables")
    groups = [(_check_group(s, c)[0], _table(check_counts(c))) for s, c in zip(symbols_per_group, counts_per_group)]
    enc = constriction.stream.queue.RangeEncoder()
    family = model_family()
    for s, table in groups:
        if s.size:
            enc.encode(s, family, table)
    data = words_to_bytes(enc.get_compressed())
    return trim_tail(data, lambda d: _decodes_to(d, groups)) if trim else data


def _first_true(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The smallest n in [lo, hi] with ok(n), for ok false below some n and true from it on
    (ok(hi) must hold)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def prefix_cuts(data: bytes, symbols_per_group: Sequence, counts_per_group: Sequence) -> list[bytes]:
    """The prefixes [S + 1] of a payload `data` that decodes S groups (symbols [n_s], integer tables
    [n_s, K] each, as `encode_counts`): entry k is the shortest data[:n] from which `Decoder` decodes
    groups 0..k-1 exactly (k = 0: b""; k = S: data itself).

    Why a bisection finds it: the decoder reads a payload as a number v in [0, 1), missing bytes as
    zeros, and decodes the first k groups right exactly while v lies in their coding interval
    [lo, hi), which holds data's own value V. data[:n] reads as v_n <= V, rising with n: once
    v_n >= lo it stays there. The interval after group k-1 holds V, so a prefix about one byte longer
    than those groups' information already points inside it, and the groups need no flush between
    them. A prefix is cut from the bytes alone: the prefixes of data[:n] are data's own, so cutting a
    cut gives the cut of the whole. Each cut is checked by decoding it.
    """
    groups = [(_check_group(s, c)[0], _table(check_counts(c))) for s, c in zip(symbols_per_group, counts_per_group)]
    if not _decodes_to(data, groups):
        raise ValueError("the payload does not decode to the groups given")
    out = [b""]
    for k in range(1, len(groups)):
        # (a payload that decodes k groups decodes the first k - 1: no cut is shorter than the last)
        out.append(data[:_first_true(len(out[-1]), len(data), lambda n: _decodes_to(data[:n], groups[:k]))])
    return out + [data] if groups else out


def encode_layers(symbols_per_group: Sequence, counts_per_group: Sequence) -> list[bytes]:
    """Payloads [S + 1] of S groups of symbols (as `encode_counts`): entry S is `encode_counts`'
    payload, byte for byte (full streams cost nothing extra), and entry k < S its prefix that
    decodes the first k groups (`prefix_cuts`)."""
    return prefix_cuts(encode_counts(symbols_per_group, counts_per_group), symbols_per_group, counts_per_group)


class Decoder:
    """Decodes what `encode_groups` wrote, one group at a time.

    dec = Decoder(data); then for each group, in order: symbols [n] = dec.decode(probs [n, K]).
    Data left after the last group is not detected here (range coders cannot tell where their
    data ends); the container's CRC32 covers the payload.
    """

    def __init__(self, data: bytes):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        self._size = len(data)
        try:
            self._dec = constriction.stream.queue.RangeDecoder(bytes_to_words(bytes(data)))
        except Exception as e:  # constriction's own exception types are not part of its API
            raise CodingError(f"invalid entropy-coded payload: {e}") from e

    def decode(self, probs) -> np.ndarray:
        """Symbols [n] int32 of the next group, given its probabilities [n, K]."""
        return self._decode_table(quantize_probabilities(probs))

    def decode_counts(self, counts) -> np.ndarray:
        """Symbols [n] int32 of the next group, given its integer coding table [n, K]."""
        return self._decode_table(_table(check_counts(counts)))

    def _decode_table(self, table: np.ndarray) -> np.ndarray:
        if table.shape[0] == 0:
            return np.zeros(0, np.int32)
        try:
            out = self._dec.decode(model_family(), table)
        except Exception as e:  # e.g. AssertionError "compressed data that is invalid"
            raise CodingError(f"corrupted entropy-coded payload ({self._size} bytes): {e}") from e
        return np.asarray(out, np.int32)


# ----------------------------------------------------------------------------- uniform coding

def uniform_bits(k: int) -> int:
    """Bits per index of uniform coding: ceil(log2 K), exactly (integer arithmetic)."""
    if int(k) != k or k < 2:
        raise ValueError(f"codebook size K must be an integer >= 2, got {k}")
    return (int(k) - 1).bit_length()


def encode_uniform(symbols, k: int) -> bytes:
    """Packs indices [N] in [0, K) at ceil(log2 K) bits each, MSB first: ceil(N * bits / 8) bytes.

    For power-of-two K this is exactly log2 K bits per index. For other K each index still takes
    ceil(log2 K) bits (under one bit of waste per index, against exact mixed-radix packing) and
    the decoder rejects the unused codes >= K as corruption. Padding bits of the last byte are 0.
    """
    bits = uniform_bits(k)
    s = np.asarray(symbols)
    if s.ndim != 1 or (s.size and not np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"symbols must be a 1-D integer array, got {s.dtype} {s.shape}")
    if s.size and (s.min() < 0 or s.max() >= k):
        raise ValueError(f"symbols must be in [0, {k}), got range [{s.min()}, {s.max()}]")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bit_array = ((s.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_array.ravel()).tobytes()


def decode_uniform(data: bytes, n: int, k: int) -> np.ndarray:
    """Inverse of encode_uniform: indices [n] int32; CodingError on wrong length or bad codes."""
    bits = uniform_bits(k)
    expected = (n * bits + 7) // 8
    if len(data) != expected:
        raise CodingError(f"uniform-coded payload of {n} indices x {bits} bits should be "
                          f"{expected} bytes, got {len(data)}")
    all_bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8))
    if all_bits[n * bits:].any():
        raise CodingError("corrupted uniform-coded payload (non-zero padding bits)")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    values = (all_bits[:n * bits].reshape(n, bits).astype(np.int64) << shifts).sum(axis=1)
    if values.size and values.max() >= k:
        raise CodingError(f"corrupted uniform-coded payload (index {values.max()} >= K = {k})")
    return values.astype(np.int32)
