"""Model FLOPs (perco_jax/train/flops.py): the jaxpr counter against closed forms, the MM-DiT formula
against the counter (tiny with every block variant, and SD3-medium's real shapes, traced
abstractly), and a training step's count against 3 x the trained forward + the frozen forwards
(stage 1, and stage 3's shortcut and reflow steps with their targets and couplings by hand)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from perco_jax import build
from perco_jax.train import flops
from perco_jax.config import load_config
from perco_jax.models.mmdit import mmdit_from_config

sds = jax.ShapeDtypeStruct


def test_matmuls_and_einsums():
    a, b = sds((3, 4), jnp.float32), sds((4, 5), jnp.float32)
    assert flops.count_flops(jnp.matmul, a, b) == 2 * 3 * 4 * 5
    q, k = sds((2, 7, 3, 8), jnp.float32), sds((2, 9, 3, 8), jnp.float32)  # [B, T, heads, head_dim]
    assert flops.count_flops(lambda q, k: jnp.einsum("bthd,bshd->bhts", q, k), q, k) == 2 * 2 * 3 * 7 * 9 * 8
    # elementwise work is not counted
    assert flops.count_flops(lambda x: jnp.tanh(x) * 2 + x, a) == 0


@pytest.mark.parametrize("groups", [1, 4])
def test_convolutions(groups):
    x = sds((2, 10, 12, 8), jnp.float32)
    conv = nn.Conv(16, (3, 3), strides=(2, 2), padding="SAME", feature_group_count=groups)
    params = jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
    # output 2 x 5 x 6 x 16, each element (8 / groups) x 3 x 3 multiply-adds
    assert flops.count_flops(conv.apply, params, x) == 2 * (2 * 5 * 6 * 16) * (8 // groups) * 9
    # its gradient is two convolutions as costly, the input's one over the stride-dilated cotangent
    # (whose inserted zeros are not multiply-adds)
    grad = jax.grad(lambda p, x: conv.apply(p, x).sum(), argnums=(0, 1))
    assert flops.count_flops(grad, params, x) == 3 * flops.count_flops(conv.apply, params, x)


def test_gradient_of_a_matmul_is_three_matmuls():
    w, x = sds((4, 5), jnp.float32), sds((3, 4), jnp.float32)
    fwd = flops.count_flops(lambda w, x: (x @ w).sum(), w, x)
    # d/dw only: the input's cotangent is never formed
    assert flops.count_flops(jax.grad(lambda w, x: (x @ w).sum()), w, x) == 2 * fwd
    assert flops.count_flops(jax.grad(lambda w, x: (x @ w).sum(), argnums=(0, 1)), w, x) == 3 * fwd


def test_control_flow():
    w = sds((4, 4), jnp.float32)
    one = 2 * 4 * 4 * 4

    def scanned(w):
        return jax.lax.scan(lambda c, _: (c @ w, None), jnp.eye(4), None, length=5)[0]

    assert flops.count_flops(scanned, w) == 5 * one
    assert flops.count_flops(lambda w, p: jax.lax.cond(p, lambda: w @ w @ w, lambda: w), w, sds((), bool)) == 2 * one
    assert flops.count_flops(jax.jit(jax.checkpoint(lambda w: w @ w)), w) == one
    with pytest.raises(ValueError, match="while loop"):
        flops.count_flops(lambda w: jax.lax.fori_loop(0, jnp.int32(3) + 0 * w.sum().astype(jnp.int32),
                                                      lambda i, c: c @ w, w), w)


def _mmdit_count(model, batch, h, w, m):
    args = model.dummy_inputs(batch, h, w, context_len=m)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"])
    return flops.count_flops(lambda p, *a: model.apply({"params": p}, *a), params, *args)


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm",
                                             extra_in_channels=3),
                                dict(step_conditioning=True)])
def test_mmdit_formula_equals_the_traced_forward(kw):
    model = mmdit_from_config(load_config("tiny", []).mmdit, **kw)
    assert flops.mmdit_forward_flops(model, 2, 8, 12, 5) == _mmdit_count(model, 2, 8, 12, 5)


def test_sd3_medium_forward_at_512():
    """SD3-medium at 512^2: 64^2 latent -> 1024 image tokens, 77 + 256 context tokens."""
    config = load_config("sd3_medium", [])
    model = mmdit_from_config(config.mmdit)
    formula = flops.mmdit_forward_flops(model, 1, 64, 64, 333)
    assert formula == _mmdit_count(model, 1, 64, 64, 333)
    # linear layers: 2 x (their kernel params) x the tokens they see (24 D^2 per token per block,
    # the last block 12 D^2 per context token less) + attention 4 T^2 D: about 2.1 TFLOPs
    d, t = 1536, 1024 + 333
    approx = 24 * (24 * d * d * t + 4 * t * t * d)
    assert abs(formula - approx) / approx < 0.02


def test_step_is_three_trained_forwards_plus_the_frozen_ones():
    s = flops.step_flops(load_config("tiny", []), batch=4)
    assert s.batch == 4 and s.per_example == s.step / 4
    assert s.text_forward > 0 and 0 < s.autoencoder_forward < 0.25 * s.mmdit_forward  # tiny: the patch encoder
    s2d = flops.step_flops(load_config("tiny", ["autoencoder=space_to_depth", "space_to_depth_factor=4", "mmdit.in_channels=48",
                                              "mmdit.out_channels=48"]), batch=4)
    assert s2d.autoencoder_forward == 0  # parameter-free
    # + hyper-encoder (about a quarter of the MM-DiT's at tiny size: width 64, two blocks) and VQ
    assert 0 < s.mmdit_forward < s.trained_forward < 1.3 * s.mmdit_forward
    # backward = 2 x forward, except the cotangents of the network's inputs, which are not needed
    expected = 3 * s.trained_forward + s.autoencoder_forward + s.text_forward
    assert 0.97 * expected < s.step <= expected
    cached = flops.step_flops(load_config("tiny", ["text.cache=True"]), batch=4)
    assert cached.text_forward == 0 and cached.step == s.step - s.text_forward
    stored = flops.step_flops(load_config("tiny", ["text.embeddings=/some/embed-text/output"]), batch=4)
    assert stored.text_forward == 0 and stored.step == cached.step  # a run reading a store encodes nothing
    # VAE chunks change no FLOP, even a chunk that divides each device's share but not the batch
    chunked = flops.step_flops(load_config("tiny", ["text.cache=True", "autoencoder_chunk=3"]), batch=4)
    assert chunked.step == cached.step
    np.testing.assert_equal(s.as_dict()["per_example"], s.per_example)


def test_stage3_steps_by_hand():
    """tiny's stage 3 as shortcut models and as reflow: batch 16, bootstrap_fraction 0.5, 20 teacher
    steps, 512 couplings."""
    config = load_config("tiny", ["stage3.method=shortcut"])
    s1 = flops.step_flops(config, batch=16)
    sc = flops.step_flops(config, stage=3)
    assert sc.stage == 3 and sc.batch == int(config.stage3.batch_size) == 16
    side, _ = build.latent_geometry(config)
    ctx = build.clip_max_length(config) + config.text.max_sequence_length
    teacher = build.build_perco(config).mmdit
    student = teacher.clone(step_conditioning=True)
    assert flops.mmdit_forward_flops(student, 16, side, side, ctx) == sc.mmdit_forward == sc.trained_forward
    d = teacher.inner_dim  # the step embedder: Dense(256 -> D), SiLU, Dense(D -> D) per example
    assert sc.mmdit_forward - flops.mmdit_forward_flops(teacher, 16, side, side, ctx) == 16 * 2 * (256 + d) * d
    # the targets: two half steps, each on the (empty prompt, caption) pair of the 8 bootstrap examples
    assert sc.target_forward == 2 * flops.mmdit_forward_flops(student, 2 * 8, side, side, ctx)
    assert sc.autoencoder_forward == s1.autoencoder_forward > 0 and sc.text_forward == 2 * s1.text_forward > 0
    assert 0 < sc.encoder_forward < s1.trained_forward - s1.mmdit_forward  # forward only: no VQ losses
    expected = (3 * sc.trained_forward + sc.target_forward + sc.autoencoder_forward + sc.encoder_forward
                + sc.text_forward)
    assert 0.97 * expected < sc.step <= expected and sc.couplings == 0

    rf = flops.step_flops(load_config("tiny", ["stage3.method=reflow"]), stage=3)
    assert rf.trained_forward == sc.trained_forward and rf.target_forward == rf.autoencoder_forward == 0
    expected = 3 * rf.trained_forward + rf.encoder_forward + rf.text_forward  # (the codes' lookup is a gather)
    assert 0.97 * expected < rf.step <= expected
    # 512 couplings, 16 at a time: 20 guided teacher steps of 2 x 16 passes + the images' coding
    draw = 20 * flops.mmdit_forward_flops(teacher, 32, side, side, ctx) + sc.autoencoder_forward + sc.encoder_forward
    assert rf.couplings == 32 * (draw + sc.text_forward)
    with pytest.raises(ValueError, match="stage 2"):
        flops.step_flops(config, stage=2)
