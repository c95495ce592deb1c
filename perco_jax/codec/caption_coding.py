"""Lossless coding of captions under a static model of English text (caption coding id 2).

A caption is coded as its UTF-8 bytes followed by an END symbol (alphabet: 256 bytes + END),
each symbol range coded (constriction, through perco_jax.codec.range_coding's fixed-point tables)
under a character context model whose counts are built deterministically from a small English
corpus shipped with the package (`caption_corpus.txt`, caption-like sentences written for
perco-jax). Every byte value keeps a nonzero probability, so any Unicode string (emoji, CJK,
combining marks, control characters) round-trips exactly; English captions cost about 2 bits
per character against 8 for plain UTF-8 (DEFLATE cannot do much on 50-200 bytes).

The model: interpolated Kneser-Ney over byte contexts of order 0..ORDER (the previous ORDER
symbols; the start of a caption is padded with a BOS marker). The highest order uses the raw
corpus counts, the lower ones continuation counts (in how many distinct one-longer contexts a
symbol was seen); each order subtracts DISCOUNT from its counts and hands the freed mass, plus
BETA, to the next lower order, which ends in the uniform distribution over the 257 symbols:

    p_k(s | c) = (max(n_k(c, s) - D, 0) + (D * T_k(c) + BETA) * p_{k-1}(s | c')) / (N_k(c) + BETA)

(n: counts, N: their sum, T: number of distinct symbols seen in c, c': c without its oldest
symbol; a context never seen keeps p_{k-1}). The probability of the most likely symbol is then
capped at P_MAX (the excess spread over the others in proportion), so every symbol costs at
least -log2(P_MAX) bits; that bounds how many symbols a canonical coding of L bytes can hold, and
the decoder refuses to run past that bound (see `max_symbols`).

Determinism: the rows are computed with elementwise IEEE float64 operations only (no sums, no
transcendental functions) from integer counts, in one fixed order shared by encoder and decoder,
and are then quantised by `range_coding.quantize_probabilities` (exact integer arithmetic), so
both sides build bit-identical coding tables on every platform. The model is a pure function of
the corpus file, whose SHA-256 is pinned below: editing the corpus (or ORDER, DISCOUNT, BETA,
P_MAX) would change the code of every caption, so it needs a new caption coding id instead.

Strict decoding: `decode` stops at END; it raises CodingError (a BitstreamError) when the data
decodes to more symbols than MAX_CAPTION_BYTES + 1 or than `max_symbols(len(data))`, or when the
decoded caption does not encode back to exactly the given bytes (the coding is canonical: every
caption has one coded form, so corrupted data is nearly always detected even without the
container's CRC32). It never loops beyond those bounds.
"""
from __future__ import annotations

import functools
import hashlib
from importlib import resources

import constriction
import numpy as np

from perco_jax.codec.errors import CodingError
from perco_jax.codec.range_coding import (bytes_to_words, model_family, quantize_probabilities, trim_tail,
                                          words_to_bytes)

# The longest caption a bitstream holds, in decoded UTF-8 bytes, under any caption coding (the
# container checks it too); SD3's encoders read a few hundred tokens at most.
MAX_CAPTION_BYTES = 1 << 16

CORPUS_FILE = "caption_corpus.txt"
CORPUS_SHA256 = "5a9ec5e9ca7bc9ca6526ac7e0d246da2766c5ae726ddd00630780addd82f0635"

ORDER = 5                  # context length in bytes (tuned by cross-validation on the corpus)
DISCOUNT = 0.75            # absolute discount of every count (exact in binary)
BETA = 1.0                 # extra escape mass of every seen context
P_MAX = 1.0 - 2.0 ** -4    # cap on any one symbol's probability (exact in binary)
END = 256                  # end-of-caption symbol
K = 257                    # alphabet: bytes 0..255 and END
BOS = 256                  # context padding before the first byte (END never is a context)

# Every symbol costs >= -log2(P_MAX + 257 / 2^20) > 0.0926 bits after quantisation, i.e. fewer
# than 8 / 0.0926 = 86.4 symbols per byte. A sealed constriction queue holds at most 64 bits more
# than its words, and trimming drops at most 8 bytes, so a canonical coding of L bytes has
# fewer than 87 * (L + 24) symbols.
_SYMBOLS_PER_BYTE = 87
_SLACK_BYTES = 24
_CHUNK = 1024              # symbols per constriction call when the tables are known
_CACHE_ROWS = 1 << 14      # coding-table rows (float64) kept per model (about 32 MiB at most)


def max_symbols(coded_bytes: int) -> int:
    """The most symbols (bytes + END) a canonical coding of `coded_bytes` bytes can hold."""
    return min(MAX_CAPTION_BYTES + 1, _SYMBOLS_PER_BYTE * (coded_bytes + _SLACK_BYTES))


# ----------------------------------------------------------------------------- the model

class EnglishModel:
    """The static context model: `table(context)` is the quantised coding row of a context.

    Built from corpus lines (bytes, one caption each); use `model()` for the packaged one.
    """

    def __init__(self, lines: list[bytes]):
        top: dict[tuple, dict[int, int]] = {}
        for line in lines:
            hist = (BOS,) * ORDER
            for s in list(line) + [END]:
                counts = top.setdefault(hist, {})
                counts[s] = counts.get(s, 0) + 1
                hist = hist[1:] + (s,)
        levels = [top]
        # continuation counts: in how many distinct (k+1)-contexts ending in c was s seen
        for _ in range(ORDER):
            lower: dict[tuple, dict[int, int]] = {}
            for ctx, counts in levels[-1].items():
                dst = lower.setdefault(ctx[1:], {})
                for s in counts:
                    dst[s] = dst.get(s, 0) + 1
            levels.append(lower)
        levels.reverse()  # levels[k]: contexts of length k
        # per context: symbols (sorted), discounted counts / (N + BETA), back-off weight
        self._levels = []
        for level in levels:
            packed = {}
            for ctx, counts in level.items():
                syms = np.array(sorted(counts), np.int64)
                n = np.array([counts[s] for s in sorted(counts)], np.float64)
                total = float(sum(counts.values()))   # integers: exact
                denom = total + BETA
                packed[ctx] = (syms, (n - DISCOUNT) / denom, (DISCOUNT * len(syms) + BETA) / denom)
            self._levels.append(packed)
        self._cache: dict[tuple, np.ndarray] = {}
        self._coders: dict[tuple, object] = {}

    def probabilities(self, context: tuple) -> np.ndarray:
        """Float64 probabilities [K] of the next symbol after `context` (ORDER symbols)."""
        p = np.full(K, 1.0 / K)
        for k in range(ORDER + 1):
            entry = self._levels[k].get(context[ORDER - k:])
            if entry is None:
                continue  # unseen context: keep the lower order (no mass to redistribute)
            syms, mass, backoff = entry
            p = p * backoff
            p[syms] += mass
        top = int(np.argmax(p))
        p_top = float(p[top])
        if p_top > P_MAX:
            p = p * ((1.0 - P_MAX) / (1.0 - p_top))
            p[top] = P_MAX
        return p

    def table(self, context: tuple) -> np.ndarray:
        """The quantised coding row [1, K] float64 (c / 2^20 with integers 1 <= c < 2^20 summing to
        2^20, exactly), constriction's input as it is (cached: the coders read it per symbol)."""
        row = self._cache.get(context)
        if row is None:
            if len(self._cache) >= _CACHE_ROWS:
                self._cache.clear()
            row = quantize_probabilities(self.probabilities(context)[None])
            self._cache[context] = row
        return row

    def coder(self, context: tuple):
        """constriction's model of `table(context)` (the same quantisation as `model_family()` given
        the row), built once per context: the decoder reads one symbol at a time, and passing the
        row each time cost 13x the decode loop's time."""
        coder = self._coders.get(context)
        if coder is None:
            if len(self._coders) >= _CACHE_ROWS:
                self._coders.clear()
            coder = constriction.stream.model.Categorical(self.table(context)[0], perfect=False)
            self._coders[context] = coder
        return coder

    def plan(self, symbols: np.ndarray) -> "_Plan":
        """The coding rows of a caption's symbols: each distinct context's row once, and indices."""
        plan = _Plan(self)
        for s in symbols.tolist():
            plan.push(s)
        return plan

    def bits(self, raw: bytes) -> float:
        """Ideal code length in bits of the bytes `raw` (+ END) under the quantised model."""
        s = _symbols(raw)
        return float(-np.log2(self.plan(s).tables()[np.arange(len(s)), s]).sum())


class _Plan:
    """Coding rows of a symbol sequence as it grows: distinct rows [u, K] + row index per symbol.

    Keeps memory at one row per distinct context (not per symbol) and lets the encoder check
    its trimmed output, and the decoder its canonical form, without recomputing rows.
    """

    def __init__(self, model: EnglishModel):
        self._model = model
        self._ids: dict[tuple, int] = {}
        self._rows: list[np.ndarray] = []
        self._index: list[int] = []
        self.context = (BOS,) * ORDER

    def current(self) -> np.ndarray:
        """The coding row [1, K] float64 of the next symbol (after the symbols pushed so far)."""
        j = self._ids.get(self.context)
        if j is None:
            j = self._ids[self.context] = len(self._rows)
            self._rows.append(self._model.table(self.context))
        return self._rows[j]

    def push(self, symbol: int) -> None:
        self.current()
        self._index.append(self._ids[self.context])
        self.context = self.context[1:] + (symbol,)

    def tables(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Float64 coding rows [stop - start, K] of the pushed symbols start..stop-1."""
        picked = [self._rows[j] for j in self._index[start:stop]]
        return np.concatenate(picked) if picked else np.zeros((0, K))


def read_corpus() -> bytes:
    """The packaged corpus, checked against CORPUS_SHA256 (RuntimeError if it differs)."""
    data = resources.files("perco_jax.codec").joinpath(CORPUS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise RuntimeError(
            f"perco_jax/codec/{CORPUS_FILE} has SHA-256 {digest}, expected {CORPUS_SHA256}: the caption "
            f"model must be built from the exact corpus the captions were coded with (reinstall perco-jax)")
    return data


def corpus_lines(data: bytes) -> list[bytes]:
    """The corpus's captions: non-empty lines, without line ends."""
    return [line.rstrip(b"\r") for line in data.split(b"\n") if line.strip()]


@functools.lru_cache(maxsize=1)
def model() -> EnglishModel:
    """The packaged model (built once per process from the corpus, about 0.5 s)."""
    return EnglishModel(corpus_lines(read_corpus()))


# ----------------------------------------------------------------------------- coding

def _symbols(raw: bytes) -> np.ndarray:
    return np.append(np.frombuffer(raw, np.uint8).astype(np.int32), np.int32(END))


def _chunks(symbols: np.ndarray, plan: _Plan):
    """(symbols, coding rows) in chunks of _CHUNK (rows materialised one chunk at a time)."""
    for i in range(0, len(symbols), _CHUNK):
        yield symbols[i:i + _CHUNK], plan.tables(i, i + _CHUNK)


def _decodes_to(data: bytes, symbols: np.ndarray, plan: _Plan) -> bool:
    """Whether data decodes to `symbols` under their known coding rows."""
    try:
        dec = constriction.stream.queue.RangeDecoder(bytes_to_words(data))
        family = model_family()
        for syms, tables in _chunks(symbols, plan):
            if not np.array_equal(dec.decode(family, tables), syms):
                return False
    except Exception:  # constriction's own exception types are not part of its API
        return False
    return True


def _encode(symbols: np.ndarray, plan: _Plan, trim: bool = True) -> bytes:
    enc = constriction.stream.queue.RangeEncoder()
    family = model_family()
    for syms, tables in _chunks(symbols, plan):
        enc.encode(syms, family, tables)
    data = words_to_bytes(enc.get_compressed())
    if not trim:
        return data
    return trim_tail(data, lambda d: _decodes_to(d, symbols, plan))


def encode(raw: bytes, trim: bool = True) -> bytes:
    """The coded form of the UTF-8 bytes `raw` (at most MAX_CAPTION_BYTES; any bytes work)."""
    raw = bytes(raw)
    if len(raw) > MAX_CAPTION_BYTES:
        raise ValueError(f"caption is {len(raw)} bytes, at most {MAX_CAPTION_BYTES} allowed")
    symbols = _symbols(raw)
    return _encode(symbols, model().plan(symbols), trim)


def decode(data: bytes) -> bytes:
    """The caption bytes coded in `data`; CodingError if data is not the coding of a caption."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    limit = max_symbols(len(data))
    english = model()
    context = (BOS,) * ORDER
    out = bytearray()
    try:
        dec = constriction.stream.queue.RangeDecoder(bytes_to_words(data))
        while True:
            if len(out) >= limit:
                raise CodingError(f"corrupted caption ({len(data)} coded bytes decode to more than "
                                  f"{limit - 1} bytes without an end)")
            s = int(dec.decode(english.coder(context)))
            if s == END:
                break
            out.append(s)
            context = context[1:] + (s,)
    except CodingError:
        raise
    except Exception as e:  # e.g. constriction's AssertionError on data invalid for the model
        raise CodingError(f"corrupted caption (invalid range-coded data: {e})") from e
    symbols = _symbols(bytes(out))
    if _encode(symbols, english.plan(symbols)) != data:
        raise CodingError("corrupted caption (the coded bytes are not the coding of any caption)")
    return bytes(out)


def encode_text(caption: str) -> bytes:
    """The coded form of a caption string (UTF-8; ValueError if it cannot be encoded)."""
    return encode(caption.encode("utf-8"))


def decode_text(data: bytes) -> str:
    """Inverse of encode_text; CodingError on corrupted data or invalid UTF-8."""
    raw = decode(data)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CodingError(f"corrupted caption (invalid UTF-8: {e})") from e
