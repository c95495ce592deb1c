"""Entropy model (masked transformer over the index grid) and group-wise range coding with it."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
import pytest

from perco_jax.codec import entropy_coding as ec
from perco_jax.models.entropy_model import EntropyModel, masked_loss_bits, training_mask
from perco_jax.schedules import get_schedule

K = 16


def _model(**kw):
    cfg = dict(codebook_size=K, width=32, depth=2, num_heads=2, mlp_ratio=2, max_grid=16)
    cfg.update(kw)
    return EntropyModel(**cfg)


def _grids(rng, b, h, w, k=K):
    return rng.integers(0, k, (b, h, w)).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    """Random params of the unconditional _model() (any grid up to 16 x 16)."""
    x = jnp.zeros((1, 8, 8), jnp.int32)
    return jax.jit(_model().init)(jax.random.key(0), x, jnp.ones(x.shape, bool))


@pytest.fixture(scope="module")
def coder(params):
    """(model, jitted apply_fn) with random weights, unconditional."""
    model = _model()
    return model, ec.make_apply_fn(model, params)


@pytest.fixture(scope="module")
def cond():
    """(model, params) of a conditional model (context_dim=6)."""
    model = _model(context_dim=6)
    x = jnp.zeros((2, 4, 4), jnp.int32)
    return model, jax.jit(model.init)(jax.random.key(1), x, jnp.ones(x.shape, bool), jnp.ones((2, 3, 6)))


def test_shapes_and_logical_axes(cond):
    model, variables = cond
    x = jnp.zeros((2, 5, 7), jnp.int32)
    ctx = jnp.ones((2, 3, 6))
    logits = jax.jit(model.apply)(variables, x, jnp.ones(x.shape, bool), ctx)
    assert logits.shape == (2, 5, 7, K) and logits.dtype == jnp.float32
    # every parameter carries logical axes
    boxed = jax.tree_util.tree_leaves(variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert boxed and all(isinstance(v, nn.Partitioned) for v in boxed)
    params = variables["params"]
    assert params["token_embed"]["embedding"].value.shape == (K + 1, 32)
    assert params["token_embed"]["embedding"].names == ("vocab", "embed")
    assert params["row_embed"]["embedding"].names == (None, "embed")
    # the context changes the prediction; a missing or unexpected context is an error
    other = jax.jit(model.apply)(variables, x, jnp.ones(x.shape, bool), -ctx)
    assert not np.allclose(logits, other)
    with pytest.raises(ValueError, match="conditional"):
        model.apply(variables, x, jnp.ones(x.shape, bool))
    with pytest.raises(ValueError, match="max_grid"):
        model.apply(variables, jnp.zeros((1, 17, 4), jnp.int32), jnp.ones((1, 17, 4), bool), ctx[:1])


def test_masked_inputs_are_ignored(coder):
    _, f = coder
    rng = np.random.default_rng(0)
    x = _grids(rng, 2, 8, 8)
    mask = rng.random((2, 8, 8)) < 0.5
    y = np.where(mask, _grids(rng, 2, 8, 8), x)  # different values only where masked
    a, b = np.asarray(f(x, mask, None)), np.asarray(f(y, mask, None))
    np.testing.assert_array_equal(a, b)
    z = np.where(mask, x, _grids(rng, 2, 8, 8))  # a known position changed: the logits change
    assert not np.array_equal(a, np.asarray(f(z, mask, None)))


@pytest.mark.parametrize("h,w", [(4, 4), (8, 8), (6, 10)])
def test_any_grid_size(params, h, w):
    model = _model()  # one set of params for every grid size
    xs = jnp.asarray(_grids(np.random.default_rng(h * w), 2, h, w))
    mask = jnp.zeros((2, h, w), bool).at[:, 0, 0].set(True)
    logits = jax.jit(model.apply)(params, xs, mask)
    assert logits.shape == (2, h, w, K) and np.isfinite(np.asarray(logits)).all()
    # positions differ: a fully masked grid gets different logits at different positions
    full = jax.jit(model.apply)(params, xs, jnp.ones((2, h, w), bool))
    assert not np.allclose(full[0, 0, 0], full[0, h - 1, w - 1])
    assert not np.allclose(full[0, 0, 1], full[0, 1, 0])


def test_training_mask():
    groups = jnp.asarray(get_schedule("qlds", 8, 8, steps=4))
    mask, loss_mask = jax.jit(training_mask, static_argnums=2)(jax.random.key(3), groups, 64)
    assert mask.shape == loss_mask.shape == (64, 8, 8) and mask.dtype == jnp.bool_
    mask, loss_mask = np.asarray(mask), np.asarray(loss_mask)
    assert not (loss_mask & ~mask).any()  # the loss positions are among the masked ones
    steps = set()
    for m, lm in zip(mask, loss_mask):
        s = int(np.asarray(groups)[lm].min())  # the step of this example
        steps.add(s)
        np.testing.assert_array_equal(lm, np.asarray(groups) == s)
        np.testing.assert_array_equal(m, np.asarray(groups) >= s)
        if s == 0:
            assert m.all()
    assert steps == {0, 1, 2, 3}
    # loss: uniform logits cost log2 K bits; positions outside the loss mask do not count
    logits = jnp.zeros((2, 3, 3, K)).at[:, 0, 0, 5].set(100.0)
    targets = jnp.full((2, 3, 3), 5)
    lm = jnp.ones((2, 3, 3), bool).at[:, 0, 0].set(False)
    assert float(masked_loss_bits(logits, targets, lm)) == pytest.approx(math.log2(K), rel=1e-6)
    assert float(masked_loss_bits(logits, targets, ~lm)) == pytest.approx(0.0, abs=1e-6)


def _toy_batch(rng, b, h=8, w=8, stay=0.9):
    """Grids whose indices mostly repeat their left neighbour; new values from a skewed marginal."""
    marginal = 0.7 ** np.arange(K)
    marginal /= marginal.sum()
    fresh = rng.choice(K, size=(b, h, w), p=marginal)
    keep = rng.random((b, h, w)) < stay
    x = fresh.copy()
    for j in range(1, w):
        x[:, :, j] = np.where(keep[:, :, j], x[:, :, j - 1], fresh[:, :, j])
    return x.astype(np.int32)


def test_training_learns_spatial_structure(params):
    model = _model()  # from random init
    groups = jnp.asarray(get_schedule("checkerboard", 8, 8))
    opt = optax.adam(5e-3)
    state = opt.init(params)

    def loss_fn(p, x, mask, lm):
        return masked_loss_bits(model.apply(p, x, mask), x, lm)

    def step(carry, batch):
        p, s = carry
        x, rng = batch
        mask, lm = training_mask(rng, groups, x.shape[0])
        loss, g = jax.value_and_grad(loss_fn)(p, x, mask, lm)
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), loss

    steps, batch = 300, 16  # one scan: no per-step dispatch on the shared CPU
    data = _toy_batch(np.random.default_rng(0), steps * batch).reshape(steps, batch, 8, 8)
    keys = jax.random.split(jax.random.key(1), steps)
    (params, _), losses = jax.jit(lambda c, b: jax.lax.scan(step, c, b))((params, state), (data, keys))
    assert np.isfinite(np.asarray(losses)).all()
    test = jnp.asarray(_toy_batch(np.random.default_rng(1), 256))
    # the rate of the schedule: group 0 with nothing known, group 1 seeing both neighbours
    per_group, eval_fn = [], jax.jit(loss_fn)
    for s in range(2):
        mask = jnp.broadcast_to(groups >= s, test.shape)
        per_group.append(float(eval_fn(params, test, mask, jnp.broadcast_to(groups == s, test.shape))))
    assert np.mean(per_group) < 0.5 * math.log2(K), per_group  # 4 bits/index untrained
    assert per_group[1] < 0.25 * math.log2(K), per_group       # learned the left/right structure


SCHEDULES = [("checkerboard", None), ("qlds", 4), ("implicit_var", None), ("random", 5)]


@pytest.mark.parametrize("name,steps", SCHEDULES)
@pytest.mark.parametrize("b", [1, 3])
def test_round_trip_and_rate(coder, name, steps, b):
    _, f = coder
    groups = get_schedule(name, 8, 8, steps=steps, seed=3)
    x = _grids(np.random.default_rng(b), b, 8, 8)
    payloads = ec.encode_indices(f, x, groups)
    assert len(payloads) == b and all(isinstance(p, bytes) for p in payloads)
    np.testing.assert_array_equal(ec.decode_indices(f, payloads, (8, 8), groups), x)
    bits = ec.rate_bits(f, x, groups)
    assert bits.shape == (b,)
    for p, r in zip(payloads, bits):
        assert abs(len(p) - r / 8) <= 0.01 * r / 8 + 8, (len(p), r / 8)


def test_group_probabilities(coder):
    _, f = coder
    groups = get_schedule("qlds", 8, 8, steps=4)
    x = _grids(np.random.default_rng(0), 2, 8, 8)
    for s in range(4):
        p = ec.group_probabilities(f, x, groups, s, None)
        n = int((groups == s).sum())
        assert p.shape == (2, n, K) and p.dtype == np.float32
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
        logits = np.asarray(f(x, np.broadcast_to(groups >= s, x.shape), None))
        rows, cols = np.nonzero(groups == s)  # row-major order
        np.testing.assert_allclose(p, jax.nn.softmax(logits[:, rows, cols]), rtol=1e-5, atol=1e-7)


def test_batch_padding_invariance(coder):
    _, f = coder
    groups = get_schedule("checkerboard", 8, 8)
    x = _grids(np.random.default_rng(5), 4, 8, 8)
    padded = x.copy()
    padded[2:] = 0
    for s in range(2):
        a = ec.group_probabilities(f, x, groups, s, None)
        b = ec.group_probabilities(f, padded, groups, s, None)
        np.testing.assert_array_equal(a[:2], b[:2])  # bit-identical
    # with a fixed batch_size each payload depends on its own image only
    full = ec.encode_indices(f, x[:3], groups, batch_size=2)
    alone = ec.encode_indices(f, x[2:3], groups, batch_size=2)
    assert alone[0] == full[2]
    np.testing.assert_array_equal(ec.decode_indices(f, full[2:], (8, 8), groups, batch_size=2), x[2:3])
    np.testing.assert_array_equal(ec.decode_indices(f, full, (8, 8), groups, batch_size=2), x[:3])


def test_conditional_round_trip(cond):
    model, params = cond
    ctx = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6)), jnp.float32)
    f = ec.make_apply_fn(model, params)
    groups = get_schedule("quincunx", 4, 4)
    x = _grids(np.random.default_rng(1), 2, 4, 4)
    payloads = ec.encode_indices(f, x, groups, ctx)
    np.testing.assert_array_equal(ec.decode_indices(f, payloads, (4, 4), groups, ctx), x)


def test_errors(coder):
    _, f = coder
    groups = get_schedule("checkerboard", 8, 8)
    with pytest.raises(ValueError, match="indices must be in"):
        ec.encode_indices(f, np.full((1, 8, 8), K, np.int32), groups)
    with pytest.raises(ValueError, match="groups"):
        ec.encode_indices(f, np.zeros((1, 8, 8), np.int32), get_schedule("checkerboard", 4, 4))
    with pytest.raises(ValueError, match="batch_size"):
        ec.encode_indices(f, np.zeros((1, 8, 8), np.int32), groups, batch_size=0)


def test_training_mask_over_several_schedules_matches_one_schedule_step_each():
    stack = np.stack([get_schedule("checkerboard", 4, 4), get_schedule("qlds", 4, 4, 8),
                      get_schedule("implicit_var", 4, 4)])
    mask, loss_mask = training_mask(jax.random.key(3), stack, 600)
    mask, loss_mask = np.asarray(mask), np.asarray(loss_mask)
    seen = set()
    for m, l in zip(mask, loss_mask):
        hits = [(j, s) for j, g in enumerate(stack) for s in range(g.max() + 1)
                if np.array_equal(m, g >= s) and np.array_equal(l, g == s)]
        assert hits, "each example's masks are one (schedule, step) of the stack"
        seen.update(hits)
    # every (schedule, step) pair is drawn (600 draws over 2 + 8 + 3 pairs)
    assert len(seen) == sum(int(g.max()) + 1 for g in stack)


def test_caption_tokens_input():
    """caption_vocab: token ids [B, L] through the model's own tables (any L <= max_caption); they
    change the prediction, round-trip through the coder, and the config builds it from the T5
    tokenizer's vocabulary (entropy_model.caption_input="tokens")."""
    from perco_jax import build
    from perco_jax.config import load_config

    model = _model(caption_vocab=10, max_caption=5)
    x = _grids(np.random.default_rng(2), 2, 4, 4)
    tokens = jnp.asarray([[1, 2, 3], [4, 0, 0]], jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(4), x, jnp.ones(x.shape, bool), tokens)
    params = variables["params"]
    assert params["caption_embed"]["embedding"].value.shape == (10, 32)
    assert params["caption_pos"]["embedding"].value.shape == (5, 32)
    logits = jax.jit(model.apply)(variables, x, jnp.ones(x.shape, bool), tokens)
    assert not np.allclose(logits, model.apply(variables, x, jnp.ones(x.shape, bool), tokens[::-1]))
    f = ec.make_apply_fn(model, variables)
    groups = get_schedule("quincunx", 4, 4)
    payloads = ec.encode_indices(f, x, groups, tokens)
    np.testing.assert_array_equal(ec.decode_indices(f, payloads, (4, 4), groups, tokens), x)
    with pytest.raises(ValueError, match="caption token ids"):
        model.apply(variables, x, jnp.ones(x.shape, bool), jnp.zeros((2, 6), jnp.int32))  # longer than max_caption

    config = load_config("tiny", ["entropy_model.caption_input=tokens"])
    em = build.build_entropy_model(config)
    assert (em.caption_vocab, em.max_caption, em.context_dim) == (config.t5.vocab_size,
                                                                  config.text.max_sequence_length, 0)
    config.entropy_model.caption_input = "context"
    em = build.build_entropy_model(config)
    assert (em.caption_vocab, em.context_dim) == (0, config.mmdit.joint_attention_dim)
    config.entropy_model.caption_input = "bytes"
    with pytest.raises(build.ConfigError, match="caption_input"):
        build.validate(config)
    config = load_config("tiny", ["entropy_model.caption_input=tokens", "stage=2", "stage1_workdir=x",
                                  "text.cache=True"])
    with pytest.raises(build.ConfigError, match="token ids"):
        build.validate(config)
