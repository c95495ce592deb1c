"""The entropy model in integer arithmetic: coding tables that are bit-identical on any machine.

The float `EntropyModel` gives probabilities that can differ in the last bit between programs
(another XLA version or flag, batch size, device), and a single differing bit can change a
quantised coding table and derail the range decoder. This module is the same network with every
operation on integers, from the inputs to the coding table itself, so encoder and decoder build
the same tables wherever they run. It is made from a trained float model by calibrated
post-training quantisation (`quantize`), once, at export; the integer model is then stored.

Number format: an integer tensor T stands for the real values T * 2^-e (e its exponent: per
tensor, or per output channel for weights). Every rescaling is a rounding shift, so there is no
multiplier: scales are powers of two.

  weights    int8 (WEIGHT_BITS), exponent per output channel; LayerNorm's affine and attention's
             1/sqrt(head_dim) are folded into the next dense layer in float before quantising
  matmul in  int8 (ACT_BITS) activations, exponent per tensor from calibration maxima
  accumulate int32 (x @ w + bias), then a rounding shift per output channel to the next exponent;
             the JAX path computes a matmul in float32 (full precision) where its partial sums
             provably stay within 2^24, so they are the exact integers (`float_exact_matmuls`),
             with bfloat16 operands where both are integers within 2^8 (`bf16_exact_matmuls`) on
             a device that multiplies bfloat16 natively (`native_bf16_dot`)
  residual  int16 range (RESIDUAL_BITS), one exponent for the whole stream
  LayerNorm  integer mean, variance of the centred row shifted right by a per-row amount so its
             sum of squares fits int32, integer square root (digit by digit), integer division
             (the JAX path: a float32 quotient estimate fixed by the exact remainder, `Ops.div_small`)
  softmax    (attention and the coding table) max-subtracted scores, shifted, looked up in an
             exp table (LUT) stored in the model; attention weights normalised to 2^ATT_BITS
  GELU       a LUT over the GELU_BITS-bit input (the tanh approximation, as flax's nn.gelu)
  tables     counts = 1 + floor(e * (2^P - K) / sum(e)) from the output softmax LUT values e,
             the remainder to the most probable symbol: each row sums to exactly 2^P, every
             count >= 1 (the float path's rule, `range_coding.quantize_probabilities`)

Every intermediate provably fits int32: `check_bounds` derives static bounds from the stored
integers (the weights' largest magnitudes, the clamps, the LUT values, the token count) and
refuses a model that could overflow; `quantize` calls it. The JAX path (`jax_counts`, jitted, any
batch, int32, exact under any matmul precision or device layout) and the NumPy int64 reference
(`reference_counts`, the tests' oracle) run the same integer program; they differ in width (no
overflow means they agree) and in how the table's product e * (2^P - K) is divided (int64 at
once in NumPy, base-16 long division in int32 in JAX).

Inputs: indices [B, H, W] int in [0, K), mask [B, H, W] bool (True = unknown), and the caption:
  - caption tokens [B, L] int in [0, V) (a model with caption_vocab V): looked up in the stored
    integer tables (caption embedding + position), so the tables are an integer function of the
    caption's token ids and bit-exact on any machine, end to end;
  - or a context [B, L, C] int8 (`quantize_context` of the float context of a model with
    context_dim C): the context itself (the SD3 text encoders' output) is computed in float, so
    tables are bit-exact only given the same int8 context, i.e. where the float encoders agree
    (see docs/bitstream.md);
  - None when unconditional.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

WEIGHT_BITS = 8       # signed weights: |w| <= 127
ACT_BITS = 8          # signed matmul inputs: |x| <= 127
RESIDUAL_BITS = 16    # the residual stream: |x| <= 2^15 - 1
GELU_BITS = 10        # the GELU LUT's input (fc1's output): 1024 entries
ATT_BITS = 12         # attention weights: integers in [0, 2^12] summing to about 2^12
ATT_LUT = 1 << 10     # attention exp LUT entries
ATT_ONE = 1 << 15     # the attention exp LUT's value at 0
OUT_LUT = 1 << 12     # output exp LUT entries
LOGIT_BITS = 24       # logits clamp: |l| <= 2^23 - 1
LN_SUM_BITS = 31      # LayerNorm: sum of squares < 2^31
MAX_SHIFT = 30
INT32_MAX = (1 << 31) - 1
FLOAT_EXACT = 1 << 24  # float32 holds every integer of magnitude <= 2^24 exactly
BF16_EXACT = 1 << 8    # bfloat16 (8 significant bits) holds every integer of magnitude <= 2^8 exactly


def amax(bits: int) -> int:
    """The largest magnitude of a signed `bits`-bit integer kept symmetric: 2^(bits-1) - 1."""
    return (1 << (bits - 1)) - 1


def _exponent(maxabs: float, bits: int) -> int:
    """The largest e with maxabs * 2^e <= 2^(bits-1) - 1 (0 for an all-zero tensor)."""
    if not maxabs > 0:
        return 0
    return int(math.floor(math.log2(amax(bits) / float(maxabs))))


def _quant(x, e, bits: int) -> np.ndarray:
    """round(x * 2^e) clipped to `bits` signed bits, int64 (e scalar or broadcast per channel)."""
    a = amax(bits)
    return np.clip(np.rint(np.asarray(x, np.float64) * np.exp2(e)), -a, a).astype(np.int64)


def _ln_bits(d: int) -> int:
    """Bits of the shifted centred row in LayerNorm: d * (2^b)^2 < 2^LN_SUM_BITS."""
    return (LN_SUM_BITS - 1 - (d - 1).bit_length()) // 2


@dataclasses.dataclass(frozen=True)
class IntegerEntropyModel:
    """An integer entropy model: `config` (static ints, JSON) and `arrays` (name -> int64 array).

    config: codebook_size K, width D, depth, num_heads, mlp_ratio, max_grid, context_dim,
    caption_vocab (only in models that read caption tokens), max_context (the longest context /
    caption sequence L it is checked for), precision P (the tables sum to 2^P), context_exp (the
    context's exponent), ln_frac (per LayerNorm: its output's exponent),
    att_shift (per block: score shift before the exp LUT), out_shift (logit shift before the exp
    LUT). arrays: dense layers as <name>.w [in, out], <name>.b [out], <name>.s [out] (the rounding
    shift after the accumulation), embeddings tok/row/col (and cap_tok [V, D] / cap_pos [L, D] of
    the caption tokens; residual units), the LUTs.
    """
    config: dict
    arrays: dict

    @property
    def caption_vocab(self) -> int:
        """V of a model that reads caption token ids [B, L] in [0, V); 0 for a context / none."""
        return int(self.config.get("caption_vocab", 0))

    @property
    def num_ln(self) -> int:
        return 2 * self.config["depth"] + 1

    def digest(self) -> str:
        """sha256 hex of the config and every array (names, dtypes as int64, shapes, values)."""
        h = hashlib.sha256(repr(sorted(self.config.items())).encode())
        for name in sorted(self.arrays):
            a = np.ascontiguousarray(self.arrays[name], np.int64)
            h.update(name.encode() + str(a.shape).encode() + a.tobytes())
        return h.hexdigest()

    def to_tree(self) -> dict:
        """{name: array} for storage, each in the narrowest of int8 / int16 / int32 that holds it
        (every value fits int32, see check_bounds; a T5-vocabulary caption table fits int16)."""
        return {k: np.asarray(v, _narrowest(v)) for k, v in self.arrays.items()}

    @classmethod
    def from_tree(cls, config: dict, tree: dict) -> "IntegerEntropyModel":
        """Inverse of to_tree (config as saved); checks the bounds again."""
        config = {k: (list(v) if isinstance(v, (list, tuple)) else int(v)) for k, v in dict(config).items()}
        model = cls(config, {k: np.asarray(v, np.int64) for k, v in tree.items()})
        check_bounds(model)
        return model


def _narrowest(a) -> type:
    a = np.asarray(a)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    return next(t for t in (np.int8, np.int16, np.int32) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)


# ----------------------------------------------------------------------------- post-training quantisation

def _unboxed(params) -> dict:
    p = nn.meta.unbox(params)
    p = p.get("params", p)
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)


def _layer_norm_normalised(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the last axis (the float model's statistics, eps 1e-6)."""
    x = np.asarray(x, np.float64)
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-6)


def _gelu(x: np.ndarray) -> np.ndarray:
    """flax's nn.gelu (approximate=True), float64."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _capture(model, params, indices, mask, context) -> dict:
    """{path: float64 array} of every submodule's output (flax capture_intermediates)."""
    run = jax.jit(lambda p, x, m, c: model.apply(p, x, m, c, capture_intermediates=True, mutable=["intermediates"]))
    _, state = run(params, indices, mask, context)
    flat = {}
    for path, v in jax.tree_util.tree_leaves_with_path(state["intermediates"]):
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path[:-1])
        flat[key] = np.asarray(v, np.float64)
    return flat


def _dense(kernel, bias, e_in: int, e_out: int, in_scale=None, extra_bias=None) -> dict:
    """The integer dense layer of y = (x * in_scale) @ kernel + bias (+ extra_bias) for an input
    of exponent e_in and an output of exponent e_out: w (per-output-channel exponents), b, s."""
    w = np.asarray(kernel, np.float64)
    b = np.asarray(bias, np.float64)
    if in_scale is not None:
        b = b + np.asarray(extra_bias, np.float64) @ w
        w = w * np.asarray(in_scale, np.float64)[:, None]
    e_w = np.array([_exponent(m, WEIGHT_BITS) for m in np.abs(w).max(0)], np.int64)
    e_w = np.minimum(e_w, MAX_SHIFT + e_out - e_in)  # (tiny channels: no shift beyond MAX_SHIFT)
    s = e_in + e_w - e_out
    return {"w": _quant(w, e_w[None], WEIGHT_BITS), "b": np.rint(b * np.exp2(e_in + e_w)).astype(np.int64),
            "s": s}


def _exp_lut(n: int, one: int, unit_exp: int, shift: int) -> np.ndarray:
    """LUT [n] of round(one * exp(-d * 2^-unit_exp)) at the centre of each bin of d >> shift."""
    centre = (np.arange(n, dtype=np.float64) * 2.0 ** shift + (2.0 ** shift - 1) / 2.0)
    return np.rint(one * np.exp(-centre * 2.0 ** -unit_exp)).astype(np.int64)


def _lut_shift(n: int, one: int, unit_exp: int) -> int:
    """The smallest shift r with which n LUT bins of 2^r score units reach exp(-x) < 0.5 / one."""
    span = math.log(2.0 * one) * 2.0 ** unit_exp  # score units until the LUT value rounds to 0
    return max(0, int(math.ceil(math.log2(span / n))) if span > n else 0)


def output_one(codebook_size: int) -> int:
    """The output exp LUT's value at 0: the largest power of two <= 2^16 with K * one <= 2^26
    (so the table's long division stays in int32)."""
    return 1 << min(16, 26 - (codebook_size - 1).bit_length())


def quantize(model, params, indices, mask, context=None, *, precision: int = 20,
             max_context: Optional[int] = None) -> IntegerEntropyModel:
    """The integer model of a float `EntropyModel` and its params, calibrated on a batch.

    indices [N, H, W] int, mask [N, H, W] bool, context the model's caption input (float
    [N, L, C], caption token ids [N, L] int, or None): calibration inputs like those the model
    codes (training images' indices and captions under the masks of the coding steps); every
    activation's exponent comes from its largest magnitude on them (the calibration max, with the
    clamps for what goes beyond); the caption token tables are bounded over all their rows.
    precision: the tables' P (the range coder's). max_context: the longest context the model must
    take (default: L; caption tokens: always the model's max_caption). Runs the float model
    once; NumPy float64 for the rest. Raises ValueError if the model cannot be bounded in int32.
    """
    p = _unboxed(params)
    d, depth, heads = model.width, model.depth, model.num_heads
    hd = d // heads
    caption_vocab = getattr(model, "caption_vocab", 0)
    ctx_dtype = jnp.int32 if caption_vocab else jnp.float32
    act = _capture(model, params, jnp.asarray(indices, jnp.int32), jnp.asarray(mask, bool),
                   None if context is None else jnp.asarray(context, ctx_dtype))
    out = {}
    cfg = dict(codebook_size=model.codebook_size, width=d, depth=depth, num_heads=heads,
               mlp_ratio=model.mlp_ratio, max_grid=model.max_grid, context_dim=model.context_dim,
               precision=int(precision), ln_frac=[], att_shift=[])

    # the residual stream: embeddings, context tokens, every block's two sums
    res = [np.abs(act["token_embed/__call__"]).max() + np.abs(p["row_embed"]["embedding"]).max()
           + np.abs(p["col_embed"]["embedding"]).max()]
    xs = []  # LayerNorm inputs, in order
    x_in = None
    if model.context_dim:
        ctx = np.asarray(context, np.float64)
        cfg["context_exp"] = _exponent(np.abs(ctx).max(), ACT_BITS)
        res.append(np.abs(act["context_proj/__call__"]).max())
        cfg["max_context"] = int(max_context or ctx.shape[1])
    elif caption_vocab:
        # every caption token may come: bound the whole tables, not the calibration's tokens
        cfg["caption_vocab"], cfg["context_exp"] = int(caption_vocab), 0
        cfg["max_context"] = int(model.max_caption)
        res.append(np.abs(p["caption_embed"]["embedding"]).max() + np.abs(p["caption_pos"]["embedding"]).max())
    else:
        cfg["context_exp"], cfg["max_context"] = 0, 0
    for i in range(depth):
        blk = f"blocks_{i}"
        x_out = act[f"{blk}/__call__"]
        x_mid = x_out - act[f"{blk}/fc2/__call__"]
        x_in = x_mid - act[f"{blk}/attn/__call__"]
        xs += [x_in, x_mid]
        res += [np.abs(x_in).max(), np.abs(x_mid).max(), np.abs(x_out).max()]
    xs.append(x_out[:, -act["ln_out/__call__"].shape[1]:])
    e_r = _exponent(max(res), RESIDUAL_BITS)
    cfg["residual_exp"] = e_r

    ln = [_exponent(np.abs(_layer_norm_normalised(x)).max(), ACT_BITS) for x in xs]
    b_ln = _ln_bits(d)
    cfg["ln_frac"] = [min(f, LN_SUM_BITS - 1 - b_ln) for f in ln]

    out["tok"] = _quant(p["token_embed"]["embedding"], e_r, 32)
    out["row"] = _quant(p["row_embed"]["embedding"], e_r, 32)
    out["col"] = _quant(p["col_embed"]["embedding"], e_r, 32)
    if model.context_dim:
        for k, v in _dense(p["context_proj"]["kernel"], p["context_proj"]["bias"], cfg["context_exp"], e_r).items():
            out[f"ctx.{k}"] = v
    if caption_vocab:
        out["cap_tok"] = _quant(p["caption_embed"]["embedding"], e_r, 32)
        out["cap_pos"] = _quant(p["caption_pos"]["embedding"], e_r, 32)
    for i in range(depth):
        blk, bp = f"blocks_{i}", p[f"blocks_{i}"]
        f1, f2 = cfg["ln_frac"][2 * i], cfg["ln_frac"][2 * i + 1]
        ln1, ln2 = bp["ln1"], bp["ln2"]
        for name, scale in (("query", 1.0 / math.sqrt(hd)), ("key", 1.0), ("value", 1.0)):
            y = act[f"{blk}/attn/{name}/__call__"] * scale
            e = _exponent(np.abs(y).max(), ACT_BITS)
            cfg[f"{blk}.{name}_exp"] = e
            lay = _dense(bp["attn"][name]["kernel"] * scale, bp["attn"][name]["bias"] * scale, f1, e,
                         in_scale=ln1["scale"], extra_bias=ln1["bias"])
            for k, v in lay.items():
                out[f"{blk}.{name}.{k}"] = v
        e_s = cfg[f"{blk}.query_exp"] + cfg[f"{blk}.key_exp"]
        r = _lut_shift(ATT_LUT, ATT_ONE, e_s)
        cfg["att_shift"].append(r)
        out[f"{blk}.att_lut"] = _exp_lut(ATT_LUT, ATT_ONE, e_s, r)
        # the attention output is a convex combination of value rows: the value exponent holds it
        for k, v in _dense(bp["attn"]["out"]["kernel"], bp["attn"]["out"]["bias"], cfg[f"{blk}.value_exp"], e_r).items():
            out[f"{blk}.out.{k}"] = v
        h = act[f"{blk}/fc1/__call__"]
        e_f = _exponent(np.abs(h).max(), GELU_BITS)
        g_in = np.arange(-(1 << (GELU_BITS - 1)), 1 << (GELU_BITS - 1), dtype=np.float64) * 2.0 ** -e_f
        e_g = _exponent(np.abs(_gelu(g_in)).max(), ACT_BITS)
        out[f"{blk}.gelu_lut"] = _quant(_gelu(g_in), e_g, ACT_BITS)
        for k, v in _dense(bp["fc1"]["kernel"], bp["fc1"]["bias"], f2, e_f, in_scale=ln2["scale"],
                           extra_bias=ln2["bias"]).items():
            out[f"{blk}.fc1.{k}"] = v
        for k, v in _dense(bp["fc2"]["kernel"], bp["fc2"]["bias"], e_g, e_r).items():
            out[f"{blk}.fc2.{k}"] = v
    logits = act["head/__call__"]
    e_l = _exponent(np.abs(logits).max(), LOGIT_BITS - 1)  # headroom: d = max - l stays < 2^23
    cfg["logit_exp"] = e_l
    lo = p["ln_out"]
    for k, v in _dense(p["head"]["kernel"], p["head"]["bias"], cfg["ln_frac"][-1], e_l, in_scale=lo["scale"],
                       extra_bias=lo["bias"]).items():
        out[f"head.{k}"] = v
    one = output_one(model.codebook_size)
    cfg["out_shift"] = _lut_shift(OUT_LUT, one, e_l)
    out["out_lut"] = _exp_lut(OUT_LUT, one, e_l, cfg["out_shift"])
    qm = IntegerEntropyModel(cfg, out)
    check_bounds(qm)
    return qm


def quantize_context(context, qm: IntegerEntropyModel) -> Optional[np.ndarray]:
    """The int8 context [B, L, C] (int32 array) of a float context [B, L, C] (None passes through):
    round-half-even of context * 2^context_exp, clipped; exact IEEE operations only."""
    if context is None:
        return None
    c = np.asarray(context, np.float32).astype(np.float64)
    return _quant(c, qm.config["context_exp"], ACT_BITS).astype(np.int32)


# ----------------------------------------------------------------------------- static bounds

def check_bounds(qm: IntegerEntropyModel) -> None:
    """ValueError unless every intermediate of the model fits int32 for any input.

    Bounds are worst cases from the stored integers: |x @ w + b| <= sum_i |x|max * |w_ic| + |b_c|
    with |x|max the input's clamp, plus the rounding term 2^(s-1), or the left shift's factor;
    attention over at most max_grid^2 + max_context tokens; the output table's long division.
    """
    c, a = qm.config, qm.arrays
    problems = []

    def need(value: int, what: str):
        if value > INT32_MAX:
            problems.append(f"{what}: bound {value} >= 2^31")

    def dense(name: str, in_max: int):
        w, b = np.abs(a[f"{name}.w"]), np.abs(a[f"{name}.b"])  # int64: far from overflowing here
        acc = (w * in_max).sum(axis=0) + b
        need(int(acc.max()), f"{name} accumulator")
        shifted = [int(v) + (1 << (int(t) - 1)) if t > 0 else int(v) << int(-t) for v, t in zip(acc, a[f"{name}.s"])]
        need(max(shifted), f"{name} rescaling")
        if np.abs(a[f"{name}.s"]).max() > MAX_SHIFT:
            problems.append(f"{name}: shift beyond {MAX_SHIFT}")

    r = amax(RESIDUAL_BITS)
    x8 = amax(ACT_BITS)
    n_tok = c["max_grid"] ** 2 + c["max_context"]
    d, hd = c["width"], c["width"] // c["num_heads"]
    need(int(np.abs(a["tok"]).max() + np.abs(a["row"]).max() + np.abs(a["col"]).max()), "embedding sum")
    if c["context_dim"]:
        dense("ctx", x8)
    if qm.caption_vocab:
        need(int(np.abs(a["cap_tok"]).max() + np.abs(a["cap_pos"]).max()), "caption embedding sum")
    b_ln = _ln_bits(d)
    need(d * r, "LayerNorm sum")
    need(d * (1 << (2 * b_ln)), "LayerNorm sum of squares")
    for f in c["ln_frac"]:  # (Ops.div_small: |numerator| + 2 * std, std <= 2^b_ln)
        need(((1 << b_ln) << f) + 3 * (1 << b_ln), "LayerNorm division")
    for i in range(c["depth"]):
        blk = f"blocks_{i}"
        for name in ("query", "key", "value"):
            dense(f"{blk}.{name}", x8)
        need(2 * hd * x8 * x8, f"{blk} attention scores (and their differences)")
        need(n_tok * ATT_ONE, f"{blk} softmax sum")
        need(ATT_ONE << ATT_BITS, f"{blk} softmax numerator")
        need((ATT_ONE << ATT_BITS) + 3 * n_tok * ATT_ONE, f"{blk} softmax division")  # (Ops.div_small)
        need(n_tok * (1 << ATT_BITS) * x8 + (1 << (ATT_BITS - 1)), f"{blk} attention output")
        dense(f"{blk}.out", x8)
        need(2 * r, f"{blk} residual sum")
        dense(f"{blk}.fc1", x8)
        dense(f"{blk}.fc2", x8)
    dense("head", x8)
    need(2 * amax(LOGIT_BITS), "logit differences")
    one = int(a["out_lut"].max())
    total = 1 << c["precision"]
    need(c["codebook_size"] * one * 16 + one * 15, "table long division")
    if not (1 <= one and c["codebook_size"] * 2 <= total):
        problems.append("output LUT / precision cannot give every symbol a count >= 1")
    if problems:
        raise ValueError("integer entropy model may overflow int32: " + "; ".join(problems))


def float_exact_matmuls(qm: IntegerEntropyModel) -> frozenset:
    """Names of the matmuls every partial sum of which provably stays within FLOAT_EXACT in
    magnitude for any input: the dense layers ("blocks_0.query", ..., "head", "ctx") whose
    sum_i |x|max |w_ic| fits, and each block's attention scores ("blocks_i.scores": head_dim terms
    of at most 127^2) and weighted values ("blocks_i.attend": weights >= 0 summing to at most
    2^ATT_BITS + n_tok / 2 after rounding, times |v| <= 127). The JAX path runs these in float32."""
    c, a = qm.config, qm.arrays
    x8 = amax(ACT_BITS)
    n_tok = c["max_grid"] ** 2 + c["max_context"]
    hd = c["width"] // c["num_heads"]
    bounds = {k[:-2]: int((np.abs(np.asarray(v, np.int64)) * x8).sum(axis=0).max())
              for k, v in a.items() if k.endswith(".w")}
    for i in range(c["depth"]):
        bounds[f"blocks_{i}.scores"] = hd * x8 * x8
        bounds[f"blocks_{i}.attend"] = x8 * ((1 << ATT_BITS) + n_tok // 2 + 1)
    return frozenset(k for k, b in bounds.items() if b <= FLOAT_EXACT)


def bf16_exact_matmuls(qm: IntegerEntropyModel) -> frozenset:
    """Of `float_exact_matmuls`, those whose operands are integers within BF16_EXACT in magnitude:
    the dense layers whose stored weights are (their inputs are clamped to ACT_BITS or, for fc2,
    GELU LUT values) and the attention scores (int8 queries and keys), but not the weighted values
    (weights up to 2^ATT_BITS). The JAX path feeds these to the matmul as bfloat16 with float32
    accumulation: the same exact integers, about 1.6x faster on a CPU with bf16 dot products."""
    def fits(v) -> bool:
        return int(np.abs(np.asarray(v, np.int64)).max(initial=0)) <= BF16_EXACT

    a = qm.arrays
    # every matmul input is clamped to amax(ACT_BITS) = 127 but fc2's, the GELU LUT's values
    lut_ok = {k[:-len(".gelu_lut")] + ".fc2": fits(v) for k, v in a.items() if k.endswith(".gelu_lut")}
    dense = {k[:-2] for k, v in a.items() if k.endswith(".w") and fits(v) and lut_ok.get(k[:-2], True)}
    scores = {f"blocks_{i}.scores" for i in range(qm.config["depth"])}
    return float_exact_matmuls(qm) & (dense | scores)


# ----------------------------------------------------------------------------- the integer program

class Ops:
    """The array operations of one backend: NumPy int64 (the reference) or jax.numpy int32.

    `float_matmuls`: names of the matmuls (see `float_exact_matmuls`) that the JAX path runs in
    float32 at full precision: each of their partial sums is an integer within FLOAT_EXACT, so the
    result is the integer one in any summation order, on any device, and the model runs about twice
    as fast on a CPU as with XLA's int32 matmuls."""

    def __init__(self, xp, dtype, float_matmuls: frozenset = frozenset(), bf16_matmuls: frozenset = frozenset()):
        self.xp, self.dtype = xp, dtype
        self.float_matmuls, self.bf16_matmuls = frozenset(float_matmuls), frozenset(bf16_matmuls) & frozenset(float_matmuls)

    def _key(self):
        return self.xp.__name__, str(self.dtype), self.float_matmuls, self.bf16_matmuls

    def __eq__(self, other):  # (a static argument of the jitted path: equal ops share its programs)
        return isinstance(other, Ops) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def arr(self, a):
        return self.xp.asarray(a, self.dtype)

    def operand(self, a):
        """A stored array as this backend computes with it: as self.dtype, but a JAX float array
        as it is (a float_matmuls weight that `make_jax_counts` converted once, not on every call)."""
        if self.xp is not np and jnp.issubdtype(getattr(a, "dtype", np.int64), jnp.floating):
            return a
        return self.arr(a)

    def _float(self, spec, x, y, name: str):
        """A float_matmuls product: operands in bfloat16 (bf16_matmuls) or float32, accumulated in
        float32 at full precision; the exact integers back."""
        t = jnp.bfloat16 if name in self.bf16_matmuls else jnp.float32
        return jnp.einsum(spec, x.astype(t), y.astype(t), precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32).astype(self.dtype)

    def matmul(self, x, w, name: str = ""):
        if self.xp is np:
            return x @ w
        if name in self.float_matmuls:
            return self._float("...i,io->...o", x, w, name)
        return jnp.matmul(x, w, preferred_element_type=self.dtype)

    def einsum(self, spec, x, y, name: str = ""):
        if self.xp is np:
            return np.einsum(spec, x, y)
        if name in self.float_matmuls:
            return self._float(spec, x, y, name)
        return jnp.einsum(spec, x, y, preferred_element_type=self.dtype)

    def div_small(self, num, den, qmax: int):
        """floor(num / den) elementwise for den > 0 where that quotient is within [-qmax - 1, qmax + 1],
        and a value beyond +-qmax with the quotient's sign elsewhere (the callers clamp to +-qmax);
        needs |num| + 2 * den < 2^31 (`check_bounds`: the products and remainders stay within it).
        NumPy: exact floor division. JAX: XLA's integer division is scalar code on a CPU (about 1 ms per LayerNorm of the tiny model on
        32 images, 10x this); instead a float32 estimate (three roundings, or a division a few ulps
        off on an accelerator: relative error < 2^-20, so under 1 for quotients within 2^14 and the
        floor is off by at most one), clipped to +-(qmax + 1), then fixed by the exact remainder."""
        if self.xp is np:
            return num // den
        q = jnp.floor(num.astype(jnp.float32) / den.astype(jnp.float32))
        q = jnp.clip(q, -(qmax + 1), qmax + 1).astype(self.dtype)
        r = num - q * den
        return q - (r < 0).astype(self.dtype) + (r >= den).astype(self.dtype)

    def muldiv(self, e, t: int, s):
        """floor(e * t / s) for 0 <= e, 0 < s, e * 16 + s * 16 < 2^31, 0 <= t < 2^(4 * 5)."""
        if self.xp is np:
            return e * t // s
        q = jnp.zeros_like(e)
        r = jnp.zeros_like(e)
        for k in range(4, -1, -1):  # long division over t's base-16 digits, all in int32
            r = r * 16 + e * ((t >> (4 * k)) & 15)
            q = q * 16 + r // s
            r = r % s
        return q


def rshift(x, s, o: Ops):
    """round(x * 2^-s) (half up) for integer shifts s (per channel; s < 0 shifts left)."""
    xp = o.xp
    left = xp.maximum(-s, 0)
    right = xp.maximum(s, 0)
    return ((x << left) + ((o.arr(1) << right) >> 1)) >> right


def _clamp(x, bits: int, o: Ops):
    a = amax(bits)
    return o.xp.clip(x, -a, a)


def isqrt(v, o: Ops, bits: int):
    """floor(sqrt(v)) of 0 <= v < 2^bits (bits even), digit by digit in integers."""
    xp = o.xp
    res = xp.zeros_like(v)
    bit = o.arr(1 << (bits - 2))
    for _ in range(bits // 2):
        take = v >= res + bit
        v = xp.where(take, v - (res + bit), v)
        res = xp.where(take, (res >> 1) + bit, res >> 1)
        bit = bit >> 2
    return res


def bit_length(m, o: Ops):
    """Bit length of 0 <= m < 2^31 (elementwise)."""
    xp = o.xp
    powers = o.arr([1 << k for k in range(31)])
    return xp.sum((m[..., None] >= powers).astype(o.dtype), axis=-1, dtype=o.dtype)


def _layer_norm(x, frac: int, o: Ops):
    """Integer LayerNorm (no affine: folded into the next layer) of x [..., D] (|x| < 2^15),
    output clamped to ACT_BITS with exponent `frac`."""
    xp = o.xp
    d = x.shape[-1]
    b = _ln_bits(d)
    mean = (xp.sum(x, axis=-1, keepdims=True, dtype=o.dtype) + d // 2) // d
    c = x - mean
    t = xp.maximum(bit_length(xp.max(xp.abs(c), axis=-1, keepdims=True), o) - b, 0)
    cs = c >> t
    var = xp.sum(cs * cs, axis=-1, keepdims=True, dtype=o.dtype) // d
    std = xp.maximum(isqrt(var, o, 2 * b), 1)
    return _clamp(o.div_small((cs << frac) + (std >> 1), std, amax(ACT_BITS)), ACT_BITS, o)


def _apply_dense(x, a, name: str, o: Ops):
    return rshift(o.matmul(x, a[f"{name}.w"], name) + a[f"{name}.b"], a[f"{name}.s"], o)


def _exp_lookup(d, lut, shift: int, o: Ops):
    """lut[min(d >> shift, len - 1)] for d >= 0."""
    idx = o.xp.minimum(d >> shift, lut.shape[0] - 1)
    return o.xp.take(lut, idx)


def integer_logits(qm: IntegerEntropyModel, indices, mask, context, o: Ops, rows=None):
    """logits [B, H, W, K] (exponent config["logit_exp"]) of the integer program on backend `o`;
    with rows (int [R], raster positions of the grid) only theirs, [B, R, K]: the last block and the
    head run on those rows alone (every op there is per row: the same integers, for less work)."""
    c = qm.config
    xp = o.xp
    a = {k: o.operand(v) for k, v in qm.arrays.items()}
    b, h, w = indices.shape
    d, heads = c["width"], c["num_heads"]
    hd = d // heads
    tokens = xp.where(mask, c["codebook_size"], indices.astype(o.dtype))
    x = (xp.take(a["tok"], tokens, axis=0) + a["row"][:h][None, :, None, :]
         + a["col"][:w][None, None, :, :]).reshape(b, h * w, d)
    x = _clamp(x, RESIDUAL_BITS, o)
    n_ctx = 0
    ctx = None
    if c["context_dim"]:
        ctx = _clamp(_apply_dense(o.arr(context), a, "ctx", o), RESIDUAL_BITS, o)
    elif c.get("caption_vocab", 0):
        ctx = _clamp(xp.take(a["cap_tok"], context, axis=0) + a["cap_pos"][:context.shape[1]][None],
                     RESIDUAL_BITS, o)
    if ctx is not None:
        n_ctx = ctx.shape[1]
        x = xp.concatenate([ctx, x], axis=1)
    n = x.shape[1]
    for i in range(c["depth"]):
        blk = f"blocks_{i}"
        # the last block's caption rows (and grid rows not asked for) reach no logit: only the rows
        # asked for query and go on (every op is per row: the same integers; the golden streams hold)
        y = _layer_norm(x, c["ln_frac"][2 * i], o)
        k, v = (_clamp(_apply_dense(y, a, f"{blk}.{name}", o), ACT_BITS, o).reshape(b, n, heads, hd)
                for name in ("key", "value"))
        if i == c["depth"] - 1:
            x, y = _grid_rows(x, n_ctx, rows, o), _grid_rows(y, n_ctx, rows, o)
        m = x.shape[1]  # the rows that query
        q = _clamp(_apply_dense(y, a, f"{blk}.query", o), ACT_BITS, o).reshape(b, m, heads, hd)
        s = o.einsum("bqhd,bkhd->bhqk", q, k, f"{blk}.scores")
        e = _exp_lookup(xp.max(s, axis=-1, keepdims=True) - s, a[f"{blk}.att_lut"], c["att_shift"][i], o)
        tot = xp.sum(e, axis=-1, keepdims=True, dtype=o.dtype)
        pr = o.div_small((e << ATT_BITS) + (tot >> 1), tot, 1 << ATT_BITS)  # (e <= tot: within 2^ATT_BITS)
        att = o.einsum("bhqk,bkhd->bqhd", pr, v, f"{blk}.attend")
        att = rshift(att, o.arr(ATT_BITS), o).reshape(b, m, d)  # back to the value exponent
        x = _clamp(x + _apply_dense(_clamp(att, ACT_BITS, o), a, f"{blk}.out", o), RESIDUAL_BITS, o)
        y = _layer_norm(x, c["ln_frac"][2 * i + 1], o)
        f = _clamp(_apply_dense(y, a, f"{blk}.fc1", o), GELU_BITS, o)
        g = xp.take(a[f"{blk}.gelu_lut"], f + (1 << (GELU_BITS - 1)))
        x = _clamp(x + _apply_dense(g, a, f"{blk}.fc2", o), RESIDUAL_BITS, o)
    x = x if c["depth"] else _grid_rows(x, n_ctx, rows, o)  # [B, h * w or R, D]
    y = _layer_norm(x, c["ln_frac"][-1], o)
    logits = _clamp(_apply_dense(y, a, "head", o), LOGIT_BITS, o)
    return logits.reshape(((b, h, w) if rows is None else (b, -1)) + (c["codebook_size"],))


def _grid_rows(x, n_ctx: int, rows, o: Ops):
    """x [B, n_ctx + h * w, D] -> the grid's rows [B, h * w, D], or those of `rows` [B, R, D]."""
    return x[:, n_ctx:] if rows is None else o.xp.take(x, n_ctx + rows, axis=1)


def integer_counts(qm: IntegerEntropyModel, logits, o: Ops):
    """Coding tables [..., K] (integers >= 1 summing to 2^precision) of integer logits [..., K]."""
    xp = o.xp
    k = qm.config["codebook_size"]
    total = 1 << qm.config["precision"]
    e = _exp_lookup(xp.max(logits, axis=-1, keepdims=True) - logits, o.arr(qm.arrays["out_lut"]),
                    qm.config["out_shift"], o)
    s = xp.sum(e, axis=-1, keepdims=True, dtype=o.dtype)
    counts = 1 + o.muldiv(e, total - k, s)
    rest = total - xp.sum(counts, axis=-1, keepdims=True, dtype=o.dtype)
    top = xp.argmax(e, axis=-1)[..., None]
    return counts + rest * (xp.arange(k)[None] == top).astype(o.dtype)


NUMPY_OPS = Ops(np, np.int64)   # the reference: int64, so an int32 overflow of the JAX path would show
JAX_OPS = Ops(jnp, jnp.int32)   # the jitted path


def _check_inputs(qm: IntegerEntropyModel, indices, mask, context):
    c = qm.config
    x = np.asarray(indices)
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"indices must be an integer array [B, H, W], got {x.dtype} {x.shape}")
    if max(x.shape[1:]) > c["max_grid"]:
        raise ValueError(f"index grid {x.shape[1]}x{x.shape[2]} exceeds the model's max_grid={c['max_grid']}")
    if c["context_dim"]:
        if context is None or not np.issubdtype(np.asarray(context).dtype, np.integer) or np.ndim(context) != 3 or np.shape(context)[0] != x.shape[0] \
                or np.shape(context)[2] != c["context_dim"] or np.shape(context)[1] > c["max_context"]:
            raise ValueError(f"this integer model needs an int8 context [{x.shape[0]}, L <= {c['max_context']}, "
                             f"{c['context_dim']}] (quantize_context), got "
                             f"{None if context is None else np.shape(context)}")
    elif qm.caption_vocab:
        t = None if context is None else np.asarray(context)
        if t is None or not np.issubdtype(t.dtype, np.integer) or t.ndim != 2 or t.shape[0] != x.shape[0] \
                or t.shape[1] > c["max_context"] or (t.size and (t.min() < 0 or t.max() >= qm.caption_vocab)):
            raise ValueError(f"this integer model needs caption token ids [{x.shape[0]}, L <= {c['max_context']}] "
                             f"in [0, {qm.caption_vocab}), got "
                             f"{None if t is None else (t.dtype, t.shape, t.min() if t.size else None, t.max() if t.size else None)}")
    elif context is not None:
        raise ValueError("this integer model is unconditional but a context was given")


def _check_rows(indices, rows) -> Optional[np.ndarray]:
    if rows is None:
        return None
    r = np.asarray(rows)
    cells = int(np.prod(np.shape(indices)[1:]))
    if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer) or (r.size and (r.min() < 0 or r.max() >= cells)):
        raise ValueError(f"rows must be raster positions [R] in [0, {cells}), got {r.dtype} {r.shape}")
    return r.astype(np.int32)


def reference_counts(qm: IntegerEntropyModel, indices, mask, context=None, rows=None) -> np.ndarray:
    """Coding tables [B, H, W, K] int64 of the NumPy int64 reference (the oracle); with rows
    (raster positions [R]) those rows' tables [B, R, K]."""
    _check_inputs(qm, indices, mask, context)
    rows = _check_rows(indices, rows)
    x = np.asarray(indices, np.int64)
    m = np.broadcast_to(np.asarray(mask, bool), x.shape)
    ctx = None if context is None else np.asarray(context, np.int64)
    return integer_counts(qm, integer_logits(qm, x, m, ctx, NUMPY_OPS, rows), NUMPY_OPS)


def native_bf16_dot() -> bool:
    """Whether JAX's default device multiplies bfloat16 natively: TPUs and GPUs do; a CPU only with
    AVX512-BF16 or AMX (without, XLA widens bfloat16 to float32 and the conversions cost more than
    they save: 20-22 ms against 28-34 ms per pass of the tiny model on 32 images, measured)."""
    if jax.default_backend() != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.partial(jax.jit, static_argnames=("config", "ops"))
def _jax_counts(arrays, indices, mask, context, rows, *, config: tuple, ops: Ops):
    """The jitted program of `make_jax_counts`; config (hashable items) and ops static, so every
    model of one configuration (a codec loaded twice, a test's copies) shares its compiled programs."""
    m = IntegerEntropyModel(dict(config), arrays)
    x = jnp.asarray(indices, jnp.int32)
    return integer_counts(m, integer_logits(m, x, jnp.broadcast_to(mask, x.shape), context, ops, rows), ops)


def make_jax_counts(qm: IntegerEntropyModel, bf16: Optional[bool] = None):
    """The jitted JAX path: counts(indices [B, H, W], mask [B, H, W], context [B, L, C] int8 |
    caption tokens [B, L] | None, rows=None) -> coding tables [B, H, W, K] int32, or with rows
    (raster positions [R]) those rows' [B, R, K]. Any batch size or sharding: every operation is
    exact. bf16: bfloat16 operands for `bf16_exact_matmuls` (default `native_bf16_dot()`); the
    tables are the same integers either way."""
    floats = float_exact_matmuls(qm)
    halves = bf16_exact_matmuls(qm) if (native_bf16_dot() if bf16 is None else bf16) else frozenset()
    ops = Ops(jnp, jnp.int32, floats, halves)

    def stored(name: str, v):
        layer = name[:-2] if name.endswith(".w") else None
        dtype = jnp.bfloat16 if layer in halves else jnp.float32 if layer in floats else jnp.int32
        return jnp.asarray(np.asarray(v, np.int32), dtype)  # (check_bounds: they fit in int32)

    # on the device once, float weights already converted: numpy arguments would be copied on every
    # call (about 3 ms of a 20 ms pass on 2 CPU cores) and int32 weights converted (about 1.3 ms)
    arrays = {k: stored(k, v) for k, v in qm.arrays.items()}
    config = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in qm.config.items()))

    def counts(indices, mask, context=None, rows=None):
        _check_inputs(qm, indices, mask, context)
        rows = _check_rows(indices, rows)
        # rows padded (repeated; none: one zero) to a power of two: one program per size bucket
        padded = None if rows is None else jnp.asarray(np.resize(rows, 1 << max(len(rows) - 1, 0).bit_length()))
        out = _jax_counts(arrays, indices, jnp.asarray(mask, bool),
                          None if context is None else jnp.asarray(context, jnp.int32), padded,
                          config=config, ops=ops)
        return out if rows is None else out[:, :len(rows)]

    return counts
