"""The integer entropy model: golden streams, bit-exact JAX path, table invariants, bounds, PTQ.

Golden data (tests/data/integer_entropy, made by the NumPy int64 reference; regenerate with
`python -m tests.integer_golden`), for a model reading an int8 context and one reading caption
tokens: the JAX path must reproduce its payloads and table hashes byte for byte under every
setting here, and in a subprocess with other XLA flags and 8 devices. A codec whose entropy model
reads caption tokens writes the same streams whatever its float text encoders compute.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perco_jax import schedules
from perco_jax.codec import bitstream as bs
from perco_jax.codec import entropy_coding as ec
from perco_jax.codec import range_coding as rc
from perco_jax.codec.errors import BitstreamError
from perco_jax.models import integer_entropy_model as iem
from perco_jax.models.entropy_model import EntropyModel
from tests import integer_golden as golden

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qm():
    return golden.load("context")[0]


@pytest.fixture(scope="module")
def expected():
    return golden.load("context")[1]


@pytest.fixture(scope="module", params=golden.KINDS)
def stored(request):
    """(integer model, golden streams) of each caption input."""
    return golden.load(request.param)


def test_reference_reproduces_the_golden_streams(stored):
    qm, expected = stored
    assert golden.reproduces(qm, expected, ec.IntegerTables(qm, reference=True)) == []


@pytest.mark.parametrize("batch,bf16", [(1, None), (8, False), (8, True)])
def test_jax_path_reproduces_the_golden_streams(stored, batch, bf16):
    """Float32 operands (a CPU without native bfloat16) or bfloat16 ones (accelerators): the same."""
    qm, expected = stored
    assert golden.reproduces(qm, expected, ec.IntegerTables(qm, bf16=bf16), batch=batch, specs=golden.SPECS[:2]) == []


def test_rows_are_those_of_the_full_tables(stored):
    """counts(..., rows) is the full grid's tables at those raster positions (any order, repeats),
    on both paths; the last block and the head only run on them. Bad rows: one ValueError."""
    qm = stored[0]
    rng = np.random.default_rng(5)
    x = rng.integers(0, golden.K, (3, golden.GRID, golden.GRID)).astype(np.int32)
    mask = rng.random(x.shape) < 0.5
    ctx = golden.caption_inputs(rng, golden.kind_of(qm), 3, length=2)
    full = iem.reference_counts(qm, x, mask, ctx).reshape(3, -1, golden.K)
    rows = np.array([7, 0, 7, full.shape[1] - 1])
    np.testing.assert_array_equal(iem.reference_counts(qm, x, mask, ctx, rows), full[:, rows])
    jax_counts = iem.make_jax_counts(qm)
    for r in (rows, rows[:3], rows[:1], rows[:0]):  # (3 rows run padded to 4, and are cut back)
        np.testing.assert_array_equal(np.asarray(jax_counts(x, mask, ctx, r)), full[:, r])
    np.testing.assert_array_equal(np.asarray(jax_counts(x, mask, ctx)).reshape(full.shape), full)
    for bad in (np.array([full.shape[1]]), np.array([-1]), np.array([[0]]), np.array([0.5])):
        with pytest.raises(ValueError, match="rows must be raster positions"):
            jax_counts(x, mask, ctx, bad)


def test_float_matmuls_only_where_every_partial_sum_is_an_exact_float32_integer(stored):
    """The JAX path runs a matmul in float32 only where its bound is within 2^24: on the golden
    models, all of them (so the golden streams above test that path); a dense layer or attention
    whose bound passes 2^24 stays in int32, where float32 would round (shown on such a sum)."""
    qm, _ = stored
    c = qm.config
    dense = {k[:-2] for k in qm.arrays if k.endswith(".w")}
    attention = {f"blocks_{i}.{kind}" for i in range(c["depth"]) for kind in ("scores", "attend")}
    assert iem.float_exact_matmuls(qm) == dense | attention
    wide = dict(qm.arrays, **{"head.w": np.full((1041, c["codebook_size"]), 127, np.int64)})
    assert "head" not in iem.float_exact_matmuls(dataclasses.replace(qm, arrays=wide))
    long = dataclasses.replace(qm, config=dict(c, max_context=1 << 18))
    attend = {n for n in attention if n.endswith(".attend")}
    assert iem.float_exact_matmuls(long) == dense | attention - attend
    x = jnp.full((1, 1041), 127, jnp.int32)   # x @ w = 1041 * 127^2: odd and > 2^24, not a float32
    w = jnp.full((1041, 1), 127, jnp.int32)
    exact = 1041 * 127 ** 2
    assert int(iem.Ops(jnp, jnp.int32).matmul(x, w, "m")[0, 0]) == exact
    assert int(iem.Ops(jnp, jnp.int32, {"m"}).matmul(x, w, "m")[0, 0]) != exact


def test_bf16_operands_only_where_both_are_exact_bf16_integers(stored):
    """Of the float32 matmuls, the JAX path feeds bfloat16 operands to those whose operands are
    integers within 2^8 (bf16's 8 significant bits): every dense layer (int8 weights, inputs clamped
    to int8 or GELU table values) and the attention scores, not the weighted values (weights up to
    2^12); a dense layer with a stored weight past 2^8 stays float32, where bf16 would round."""
    qm, _ = stored
    dense = {k[:-2] for k in qm.arrays if k.endswith(".w")}
    scores = {f"blocks_{i}.scores" for i in range(qm.config["depth"])}
    assert iem.bf16_exact_matmuls(qm) == dense | scores
    big = np.array(qm.arrays["head.w"], np.int64)
    big[0, 0] = 257
    assert "head" not in iem.bf16_exact_matmuls(dataclasses.replace(qm, arrays=dict(qm.arrays, **{"head.w": big})))
    x, w = jnp.full((1, 1), 257, jnp.int32), jnp.ones((1, 1), jnp.int32)
    assert int(iem.Ops(jnp, jnp.int32, {"m"}).matmul(x, w, "m")[0, 0]) == 257
    assert int(iem.Ops(jnp, jnp.int32, {"m"}, {"m"}).matmul(x, w, "m")[0, 0]) != 257  # (rounds to 256 or 258)


@pytest.mark.slow
def test_jax_path_reproduces_the_golden_streams_under_every_setting():
    """In one subprocess with XLA_FLAGS=--xla_backend_optimization_level=0 and 8 host devices: jit,
    disable_jit, batch 1 and 8, bfloat16 default matmul precision, the batch sharded over 8
    devices, x64 on and off (golden.check_variants)."""
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "tests.integer_golden", "--check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    clean = {k: [] for k in ("jit", "batch 1", "disable_jit", "bfloat16 matmul precision", "8 devices", "x64")}
    assert result == {kind: clean for kind in golden.KINDS}, result


def test_cross_decode(stored):
    """Payloads the NumPy reference encoded decode with the JAX path, and the other way round."""
    qm, expected = stored
    x, ctx = golden.golden_inputs(golden.kind_of(qm))
    jax_tables, ref_tables = ec.IntegerTables(qm), ec.IntegerTables(qm, reference=True)
    for spec in ("qlds:4", "random:5:3"):
        g = schedules.from_spec(spec, golden.GRID, golden.GRID)
        by_reference = [bytes.fromhex(p) for p in expected[spec]["payloads"]]
        np.testing.assert_array_equal(ec.decode_indices(jax_tables, by_reference, x.shape[1:], g, ctx), x)
        by_jax = ec.encode_indices(jax_tables, x[:3], g, ctx[:3])
        np.testing.assert_array_equal(ec.decode_indices(ref_tables, by_jax, x.shape[1:], g, ctx[:3]), x[:3])
        # any batching decodes any payload: three payloads one at a time
        for i in range(3):
            np.testing.assert_array_equal(ec.decode_indices(jax_tables, by_reference[i:i + 1], x.shape[1:], g,
                                                            ctx[i:i + 1]), x[i:i + 1])


def _cdf_ok(counts: np.ndarray) -> None:
    counts = np.asarray(counts, np.int64)
    assert counts.min() >= 1
    assert (counts.sum(-1) == 1 << rc.PRECISION).all()
    cdf = np.cumsum(counts, axis=-1)
    assert (np.diff(cdf, axis=-1) > 0).all() and (cdf[..., -1] == 1 << rc.PRECISION).all()


def test_table_invariants(stored):
    qm = stored[0]
    rng = np.random.default_rng(3)
    x = rng.integers(0, golden.K, (5, 4, 3)).astype(np.int32)
    mask = rng.random(x.shape) < 0.5
    ctx = golden.caption_inputs(rng, golden.kind_of(qm), 5, length=2)
    _cdf_ok(iem.reference_counts(qm, x, mask, ctx))
    _cdf_ok(np.asarray(iem.make_jax_counts(qm)(x, mask, ctx)))
    # extreme logits: flat, one dominant symbol, clamped extremes, both paths
    top = iem.amax(iem.LOGIT_BITS)
    logits = np.array([[0] * golden.K, [top] + [-top] * (golden.K - 1), list(range(golden.K)),
                       [-top] * golden.K], np.int64)
    ref = iem.integer_counts(qm, logits, iem.NUMPY_OPS)
    _cdf_ok(ref)
    assert (ref[0] == ref[0, 0]).sum() >= golden.K - 1  # flat: uniform up to the remainder
    assert ref[1, 0] == (1 << rc.PRECISION) - (golden.K - 1) and (ref[1, 1:] == 1).all()
    got = jax.jit(lambda lg: iem.integer_counts(qm, lg, iem.JAX_OPS))(jnp.asarray(logits, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_long_division_matches_int64():
    rng = np.random.default_rng(0)
    s = rng.integers(1, 1 << 26, 5000)
    e = np.minimum(rng.integers(0, 1 << 16, 5000), s)
    t = (1 << 20) - rng.integers(2, 1 << 10, 5000)
    got = jax.jit(lambda e, s, t: jax.vmap(lambda e, s, t: iem.JAX_OPS.muldiv(e, t, s), in_axes=(0, 0, None))(e, s, t))
    for tv in np.unique(t)[:3]:
        np.testing.assert_array_equal(np.asarray(got(jnp.asarray(e, jnp.int32), jnp.asarray(s, jnp.int32), int(tv))),
                                      e * int(tv) // s)


def test_integer_helpers_match_exact_arithmetic():
    v = np.concatenate([np.arange(0, 5000), np.random.default_rng(1).integers(0, 1 << 24, 5000)])
    np.testing.assert_array_equal(iem.isqrt(v, iem.NUMPY_OPS, 24), np.floor(np.sqrt(v)).astype(np.int64))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: iem.isqrt(v, iem.JAX_OPS, 24))(jnp.asarray(v, jnp.int32))),
                                  np.floor(np.sqrt(v)))
    m = np.array([0, 1, 2, 3, 4, 1023, 1024, (1 << 30) + 5])
    np.testing.assert_array_equal(iem.bit_length(m, iem.NUMPY_OPS), [int(k).bit_length() for k in m])
    x = np.array([-7, -6, -5, 5, 6, 7, 100])
    np.testing.assert_array_equal(iem.rshift(x, np.int64(1), iem.NUMPY_OPS), np.floor(x / 2 + 0.5))
    # div_small: exact floor division within +-(qmax + 1), beyond it past +-qmax with the right sign,
    # at the bounds check_bounds allows (|num| + 2 den < 2^31), at and next to exact multiples
    rng = np.random.default_rng(2)
    qmax = 127
    den = np.concatenate([rng.integers(1, 1 << 11, 20000), rng.integers(1, 1 << 27, 20000), [1, 1, 2, 3, 1 << 20]])
    q = rng.integers(-3 * qmax, 3 * qmax, den.size)
    num = q * den + rng.choice([0, 1, -1, 2], den.size) * rng.integers(0, 2, den.size)
    num = np.clip(num, -(1 << 31) + 1 + 2 * den, (1 << 31) - 1 - 2 * den)
    exact = num // den
    got = np.asarray(jax.jit(lambda n, d: iem.JAX_OPS.div_small(n, d, qmax))(jnp.asarray(num, jnp.int32),
                                                                            jnp.asarray(den, jnp.int32)))
    np.testing.assert_array_equal(iem.NUMPY_OPS.div_small(num, den, qmax), exact)
    inside = np.abs(exact) <= qmax + 1
    np.testing.assert_array_equal(got[inside], exact[inside])
    assert (np.sign(got[~inside]) == np.sign(exact[~inside])).all() and (np.abs(got[~inside]) > qmax).all()
    np.testing.assert_array_equal(iem.rshift(x, np.int64(-3), iem.NUMPY_OPS), x * 8)


def test_overflow_bound(qm):
    iem.check_bounds(qm)  # the golden model fits
    arrays = dict(qm.arrays)
    w = arrays["blocks_0.fc2.w"].copy()
    w[:, 0] = 1 << 20
    with pytest.raises(ValueError, match="blocks_0.fc2 accumulator"):
        iem.check_bounds(dataclasses.replace(qm, arrays={**arrays, "blocks_0.fc2.w": w}))
    with pytest.raises(ValueError, match="softmax sum"):
        iem.check_bounds(dataclasses.replace(qm, config={**qm.config, "max_context": 1 << 16}))
    with pytest.raises(ValueError, match="softmax division"):  # (the sum fits: 2^15 * 30000 < 2^31)
        iem.check_bounds(dataclasses.replace(qm, config={**qm.config, "max_context": 30000}))
    s = arrays["head.s"].copy()
    s[0] = -40
    with pytest.raises(ValueError, match="head"):
        iem.check_bounds(dataclasses.replace(qm, arrays={**arrays, "head.s": s}))
    # the bound is a real bound: the reference's int64 intermediates of the largest inputs stay in int32
    x = np.zeros((2, golden.GRID, golden.GRID), np.int32)
    ctx = np.stack([np.full((golden.L, golden.C), 127), np.full((golden.L, golden.C), -127)]).astype(np.int32)
    logits = iem.integer_logits(qm, x, np.zeros(x.shape, bool), ctx.astype(np.int64), iem.NUMPY_OPS)
    assert np.abs(logits).max() <= iem.amax(iem.LOGIT_BITS)


def test_overflow_bound_of_caption_tokens():
    qm = golden.load("tokens")[0]
    iem.check_bounds(qm)
    tok = qm.arrays["cap_tok"].copy()
    tok[3, 0] = 1 << 31
    with pytest.raises(ValueError, match="caption embedding sum"):
        iem.check_bounds(dataclasses.replace(qm, arrays={**qm.arrays, "cap_tok": tok}))


def test_crc_refuses_a_perturbed_model(qm, expected):
    """A decoder whose integer model differs in one bias decodes other indices; the v4 CRC says so."""
    x, ctx = golden.golden_inputs()
    g = schedules.from_spec("qlds:4", golden.GRID, golden.GRID)
    payload = bytes.fromhex(expected["qlds:4"]["payloads"][0])
    model = bs.Header(version=bs.INTEGER_MODEL_VERSION, fingerprint=b"\x01" * 8, image_height=16, image_width=16,
                      grid_h=golden.GRID, grid_w=golden.GRID, codebook_size=golden.K, schedule="qlds", schedule_steps=4)
    stream = bs.pack(model, "", payload, indices=x[0], model=model)
    assert stream[0] == 0xA4
    arrays = dict(qm.arrays)
    b = arrays["head.b"].copy()
    b[int(x[0, 0, 0])] -= 1 << 22  # the first coded symbol becomes improbable
    other = ec.IntegerTables(dataclasses.replace(qm, arrays={**arrays, "head.b": b}))
    decoded = ec.decode_indices(other, [bs.unpack(stream, indices=None, model=model)[2]], x.shape[1:], g, ctx[:1])
    assert not np.array_equal(decoded[0], x[0])
    with pytest.raises(BitstreamError, match="another integer entropy model"):
        bs.check_crc(stream, decoded[0], model=model)
    bs.check_crc(stream, ec.decode_indices(ec.IntegerTables(qm), [payload], x.shape[1:], g, ctx[:1])[0], model=model)


def test_stored_model_round_trip(stored, tmp_path):
    qm = stored[0]
    golden.save_model(qm, tmp_path / "m.npz")
    again = golden.load_model(tmp_path / "m.npz")
    assert again.digest() == qm.digest() and again.config == qm.config


@pytest.mark.slow
@pytest.mark.parametrize("kind", golden.KINDS)
def test_quantized_model_is_close_to_the_float_model(kind):
    """PTQ of a random conditional model (either caption input): the integer tables cost under
    0.5% over the float probabilities (cross-entropy of samples from the float model)."""
    model = EntropyModel(**golden.FLOAT_MODELS[kind])
    rng = np.random.default_rng(5)
    x = rng.integers(0, golden.K, (32, 4, 4))
    mask = rng.random(x.shape) < rng.random((32, 1, 1))
    ctx = (rng.normal(size=(32, golden.L, golden.C)).astype(np.float32) if kind == "context"
           else golden.caption_inputs(rng, kind, 32))
    params = jax.jit(model.init)(jax.random.key(2), jnp.asarray(x[:1]), jnp.asarray(mask[:1]), jnp.asarray(ctx[:1]))
    q = iem.quantize(model, params, x, mask, ctx)
    p = np.asarray(jax.nn.softmax(model.apply(params, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(ctx))), np.float64)
    counts = iem.reference_counts(q, x, mask, iem.quantize_context(ctx, q) if kind == "context" else ctx)
    entropy = -(p * np.log2(p)).sum(-1).mean()
    cross = -(p * np.log2(counts / 2.0 ** rc.PRECISION)).sum(-1).mean()
    assert entropy <= cross < 1.005 * entropy, (entropy, cross)


def test_errors(qm):
    x = np.zeros((1, 4, 4), np.int32)
    m = np.ones(x.shape, bool)
    with pytest.raises(ValueError, match="int8 context"):
        iem.reference_counts(qm, x, m, None)
    with pytest.raises(ValueError, match="int8 context"):
        iem.reference_counts(qm, x, m, np.zeros((1, 3, golden.C), np.float32))
    with pytest.raises(ValueError, match="max_grid"):
        iem.reference_counts(qm, np.zeros((1, 5, 4), np.int32), True, np.zeros((1, 3, golden.C), np.int32))
    with pytest.raises(ValueError, match="2\\^20"):
        ec.IntegerTables(dataclasses.replace(qm, config={**qm.config, "precision": 16}))
    with pytest.raises(ValueError, match="counts >= 1"):
        rc.encode_counts([np.zeros(1, np.int32)], [np.array([[1 << rc.PRECISION, 0]])])


def test_caption_token_errors():
    qm = golden.load("tokens")[0]
    x = np.zeros((2, 4, 4), np.int32)
    m = np.ones(x.shape, bool)
    iem.reference_counts(qm, x, m, np.full((2, golden.L), golden.V - 1, np.int32))  # the largest id is fine
    for bad in (None, np.zeros((2, 2, golden.C), np.float32), np.zeros((2, 2), np.float32),
                np.full((2, 2), golden.V, np.int32), np.full((2, 2), -1, np.int32),
                np.zeros((2, golden.L + 1), np.int32), np.zeros((3, 2), np.int32)):
        with pytest.raises(ValueError, match="caption token ids"):
            iem.reference_counts(qm, x, m, bad)
    with pytest.raises(ValueError, match="caption token ids"):
        ec.IntegerTables(qm)(x, m, np.zeros((2, 2, golden.C), np.float32))  # (no quantize_context for tokens)
    float_model = EntropyModel(**golden.FLOAT_MODELS["tokens"])
    with pytest.raises(ValueError, match="caption token ids"):
        float_model.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(m), jnp.zeros((2, 2, golden.C)))
    with pytest.raises(ValueError, match="not both"):
        EntropyModel(**golden.FLOAT_MODELS["tokens"], context_dim=golden.C).init(
            jax.random.key(0), jnp.asarray(x), jnp.asarray(m), jnp.zeros((2, 2), jnp.int32))


def _untrained_codec(caption_input: str, folder: Path):
    """A tiny Codec (untrained networks: only its entropy coding is used) whose entropy model reads
    `caption_input`, with its integer model quantised from random calibration inputs, and captions."""
    from perco_jax import build
    from perco_jax.codec.codec import Codec
    from perco_jax.config import load_config

    config = load_config("tiny", [f"entropy_model.caption_input={caption_input}", "entropy_model.width=32",
                                  "entropy_model.depth=1", "entropy_model.num_heads=2"])
    em = build.build_entropy_model(config)
    encoder, text_params = build.build_text(config, folder)
    g, k = config.codec.grid_side, config.codec.codebook_size
    captions = ["a red circle on a blue background", "a small green square", "", "a tiny cat near a tree"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, k, (len(captions), g, g)).astype(np.int32)
    mask = rng.random(x.shape) < rng.random((len(captions), 1, 1))
    codec = Codec(config, {}, None, {}, text_params, encoder, b"\0" * 8)
    ctx = codec.context(captions)
    params = em.init(jax.random.key(1), jnp.asarray(x[:1]), jnp.asarray(mask[:1]), jnp.asarray(ctx[:1]))
    codec = dataclasses.replace(codec, entropy_params=params["params"])
    qm = iem.quantize(em, params, x, mask, ctx, max_context=None if caption_input == "tokens" else ctx.shape[1])
    return codec.with_integer_model(qm), x, captions


@pytest.mark.parametrize("caption_input", ["tokens", "context"])
def test_caption_tokens_make_the_tables_independent_of_the_float_text_encoders(caption_input, tmp_path):
    """Two decoders whose float text encoders differ (every weight moved, far beyond any machine's
    rounding): with caption tokens they build the same tables and decode each other's streams; with
    the float context the tables differ (what the test would see if tokens reached a float net)."""
    codec, x, captions = _untrained_codec(caption_input, tmp_path)
    noise = iter(np.random.default_rng(2).normal(size=1000) * 0.05)
    other = dataclasses.replace(codec, text_params=jax.tree.map(lambda a: a + float(next(noise)), codec.text_params))
    L = codec.config.text.max_sequence_length
    ctx_a, ctx_b = (np.asarray(c.prompt_encoder(c.text_params, captions, L)[0]) for c in (codec, other))
    assert np.abs(ctx_a - ctx_b).max() > 0.01  # the float text encoders really disagree
    groups = schedules.from_spec(codec.config.codec.schedule, *codec.grid)
    steps = range(schedules.num_groups(groups))
    tables_a, tables_b = ([ec.group_tables(c.coding_model()[0], x, groups, s, c.context(captions)) for s in steps]
                          for c in (codec, other))
    same = all(np.array_equal(a, b) for a, b in zip(tables_a, tables_b))
    if caption_input == "context":
        assert not same
        return
    assert same
    payloads = codec.encode_indices(x, captions)
    assert other.encode_indices(x, captions) == payloads
    model, batch = other.coding_model()
    np.testing.assert_array_equal(ec.decode_indices(model, payloads, codec.grid, groups, other.context(captions),
                                                    batch_size=batch), x)


@pytest.mark.parametrize("integer", [True, False])
def test_an_export_from_before_caption_input_decodes_its_streams(integer, tmp_path):
    """A codec folder written before entropy_model.caption_input existed holds an entropy model of
    the SD3 text context, and its config lacks the field: it loads as "context", decodes the
    payloads it wrote byte for byte to the same indices and writes the same ones, with its integer
    model (version 4) or its float one (version 3)."""
    from perco_jax.checkpoint import MANIFEST
    from perco_jax.codec.codec import Codec

    codec, x, captions = _untrained_codec("context", tmp_path / "run")
    codec = codec if integer else codec.with_integer_model(None)
    folder = codec.save(tmp_path / "checkpoint")
    manifest = json.loads((folder / MANIFEST).read_text())
    for section in (manifest["components"]["codec"]["entropy_model"], manifest["components"]["entropy_model"]):
        del section["caption_input"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    old = Codec.load(folder)
    assert old.config.entropy_model.caption_input == "context"
    assert old.fingerprint == codec.fingerprint and old.stream_model.version == codec.stream_model.version
    payloads = codec.encode_indices(x, captions)
    groups = schedules.from_spec(codec.config.codec.schedule, *codec.grid)
    model, batch = old.coding_model()
    np.testing.assert_array_equal(ec.decode_indices(model, payloads, old.grid, groups, old.context(captions),
                                                    batch_size=batch), x)
    assert old.encode_indices(x, captions) == payloads
