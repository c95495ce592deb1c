"""Stage 3, few-step decoding: the step-size input, the shortcut and reflow objectives, the few-step
sampler, and (slow) the tiny codec's student against the teacher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perco_jax import build, flow
from perco_jax.config import load_config
from perco_jax.models.mmdit import MMDiT
from perco_jax.models.perco import with_step_conditioning

SMALL = dict(sample_size=8, patch_size=2, in_channels=4, extra_in_channels=2, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
             out_channels=4, pos_embed_max_size=8)


def _inputs(b=3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((b, 4, 4, 6)), jnp.float32), jnp.asarray(rng.uniform(0, 1000, b), jnp.float32),
            jnp.asarray(rng.standard_normal((b, 5, 12)), jnp.float32), jnp.asarray(rng.standard_normal((b, 6)), jnp.float32))


def test_zero_initialised_step_embedding_leaves_outputs_unchanged():
    """The teacher's weights + a fresh step embedder give the teacher's velocity for every d."""
    teacher, student = MMDiT(**SMALL), MMDiT(**SMALL, step_conditioning=True)
    x, t, ctx, pooled = _inputs()
    tp = teacher.init(jax.random.PRNGKey(0), x, t, ctx, pooled)["params"]
    sp = student.init(jax.random.PRNGKey(1), x, t, ctx, pooled)["params"]
    assert set(sp) - set(tp) == {"step_embedder_1", "step_embedder_2"}
    sp = dict(sp, **tp)
    want = teacher.apply({"params": tp}, x, t, ctx, pooled)
    for d in (0.0, 0.25, 1.0):
        got = student.apply({"params": sp}, x, t, ctx, pooled, jnp.full((3,), d))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # ... and the step input is live: a trained (non-zero) embedder makes d matter
    sp["step_embedder_2"] = jax.tree_util.tree_map(lambda a: a + 0.1, sp["step_embedder_2"])
    a, b = (student.apply({"params": sp}, x, t, ctx, pooled, jnp.full((3,), d)) for d in (0.0, 1.0))
    assert float(jnp.abs(a - b).max()) > 1e-3
    with pytest.raises(ValueError, match="step_conditioning"):
        teacher.apply({"params": tp}, x, t, ctx, pooled, jnp.zeros((3,)))


def test_perco_student_is_the_perco_model_with_a_step_input():
    config = load_config("tiny")
    model = build.build_perco(config)
    student = with_step_conditioning(model)
    assert student.mmdit.step_conditioning and not model.mmdit.step_conditioning
    assert student.hyper_encoder == model.hyper_encoder and student.vq == model.vq


def _toy_velocity(a):
    """A toy step-conditioned velocity field v(x, t, d) (non-linear in x, depends on t and d)."""
    def v(x, t, d):
        return jnp.tanh(x * a) - (t / 1000.0)[:, None, None, None] * x + d[:, None, None, None] * x ** 2
    return v


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_two_step_target_is_the_mean_of_two_steps(shift):
    """One step of 2d along the target lands where two steps of d land; with shift 1 the target is
    the plain mean of the two velocities."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 2, 2, 3)), jnp.float32)
    v = _toy_velocity(jnp.asarray(rng.standard_normal((2, 2, 3)), jnp.float32))
    u, d = jnp.array([1.0, 0.75, 0.5, 0.25]), jnp.array([0.125, 0.125, 0.0625, 0.125])
    target = flow.two_step_target(v, x, u, d, shift)

    def s(uu):
        return flow.shift_sigmas(uu, shift)[:, None, None, None]

    v1 = v(x, s(u)[:, 0, 0, 0] * 1000, d)
    x1 = x + (s(u - d) - s(u)) * v1
    v2 = v(x1, s(u - d)[:, 0, 0, 0] * 1000, d)
    x2 = x1 + (s(u - 2 * d) - s(u - d)) * v2
    np.testing.assert_allclose(x + (s(u - 2 * d) - s(u)) * target, x2, rtol=1e-5, atol=1e-5)
    if shift == 1.0:
        np.testing.assert_allclose(target, (v1 + v2) / 2, rtol=1e-5, atol=1e-6)
    else:  # the spans differ: not the plain mean
        assert float(jnp.abs(target - (v1 + v2) / 2).max()) > 1e-3


def test_shortcut_steps_lie_on_the_sampler_grid():
    d, u = flow.shortcut_steps(jax.random.PRNGKey(0), 4096, 3)
    d, u = np.asarray(d), np.asarray(u)
    assert set(np.round(1 / d).astype(int)) == {1, 2, 4, 8}
    np.testing.assert_allclose(np.round((1 - u) / d), (1 - u) / d, atol=1e-5)  # u = 1 - m d
    assert (u - d >= -1e-6).all() and (u <= 1).all()  # a step of d from u stays in [0, 1]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_n_step_sampler_calls_the_model_n_times(n):
    calls = []
    a = jnp.ones((2, 2, 3)) * 0.5
    v = _toy_velocity(a)

    def counted(x, t, d):
        jax.debug.callback(lambda tt, dd: calls.append((np.asarray(tt)[0], np.asarray(dd)[0])), t, d)
        return v(x, t, d)

    noise = jnp.ones((2, 2, 2, 3))
    out = flow.few_step_sample(counted, noise, n, shift=3.0)
    jax.block_until_ready(out)
    assert len(calls) == n
    sigmas = flow.uniform_sigmas(n, 3.0)
    np.testing.assert_allclose([c[0] for c in calls], sigmas[:-1] * 1000, rtol=1e-6)
    np.testing.assert_allclose([c[1] for c in calls], [1 / n] * n)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    # the same Euler steps by hand
    x = noise
    for i in range(n):
        x = x + (sigmas[i + 1] - sigmas[i]) * v(x, jnp.full((2,), sigmas[i] * 1000), jnp.full((2,), 1 / n))
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)


def test_straightness_is_zero_for_straight_paths_only():
    noise = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 2, 1)), jnp.float32)
    sigmas, timesteps = flow.sigma_schedule(8, 3.0)
    const = flow.straightness(lambda x, t: jnp.ones_like(x) * 0.3, noise, jnp.asarray(sigmas), jnp.asarray(timesteps))
    np.testing.assert_allclose(const, 0.0, atol=1e-10)
    curved = flow.straightness(lambda x, t: jnp.ones_like(x) * (t / 1000.0)[:, None, None, None], noise,
                               jnp.asarray(sigmas), jnp.asarray(timesteps))
    assert (np.asarray(curved) > 1e-3).all()
