"""Rectified flow: schedule values equal diffusers', Euler + CFG equal the scheduler loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from perco_jax import flow


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_sigma_schedule_equals_diffusers(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    sigmas, timesteps = flow.sigma_schedule(steps, shift)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())


def test_euler_with_guidance_equals_scheduler_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    a = rng.standard_normal((4, 4, 3)).astype(np.float32)

    def velocity(z, t):  # a toy "model" whose two CFG branches differ
        half = z.shape[0] // 2
        bias = np.concatenate([np.zeros(half), np.ones(half)]).astype(np.float32)
        return z * a - (t / 1000.0)[:, None, None, None] + bias[:, None, None, None]

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    ref = torch.from_numpy(x)
    for t in sched.timesteps:
        v = torch.from_numpy(np.asarray(velocity(np.concatenate([ref.numpy()] * 2), np.full(4, t.item(), np.float32))))
        v_u, v_c = v.chunk(2)
        ref = sched.step(v_u + 4.5 * (v_c - v_u), t, ref).prev_sample

    sigmas, timesteps = flow.sigma_schedule(6, 3.0)
    fn = jax.jit(lambda z: flow.euler_sample(flow.guided(lambda zz, tt: velocity_jax(zz, tt, a), 4.5),
                                             z, sigmas, timesteps))
    np.testing.assert_allclose(np.asarray(fn(x)), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_stochastic_steps_equal_diffusers_stochastic_sampling():
    """flow.stochastic_step is FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).step, given
    the fresh noise the scheduler draws (replayed from the same torch generator)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    a = rng.standard_normal((4, 4, 3)).astype(np.float32)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    sched.set_timesteps(5)
    gen, replay = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ref, ours = torch.from_numpy(x), jnp.asarray(x)
    sigmas, timesteps = flow.sigma_schedule(5, 3.0)
    for i, t in enumerate(sched.timesteps):
        v = velocity(ref.numpy(), np.full(2, t.item(), np.float32), a)
        ref = sched.step(torch.from_numpy(v), t, ref, generator=gen).prev_sample
        fresh = torch.randn(x.shape, generator=replay).numpy()
        ours = flow.stochastic_step(ours, velocity(np.asarray(ours), np.full(2, timesteps[i], np.float32), a),
                                    sigmas[i], sigmas[i + 1], fresh)
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_stochastic_sample_draws_per_image_and_ends_on_the_data():
    """Exact velocity of a point mass x0 (v = (x - x0) / sigma): every step predicts x0, so the
    sampler lands on it whatever the fresh noise; with a model that is not exact, an image's result
    depends on its key alone, not on the batch it is decoded in, and differs from the Euler ODE."""
    x0 = jnp.linspace(-1, 1, 2 * 16 * 3).reshape(2, 4, 4, 3)
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    sigmas, timesteps = (jnp.asarray(v) for v in flow.sigma_schedule(6, 1.0))
    exact = lambda x, t: (x - x0) / (t / 1000.0)[:, None, None, None]  # noqa: E731
    np.testing.assert_allclose(flow.stochastic_sample(exact, noise, keys, sigmas, timesteps), x0, atol=1e-5)
    blurred = lambda x, t: x - 0.5 * x0[0]  # noqa: E731  (not the flow of any data: each step errs)
    both = flow.stochastic_sample(blurred, noise, keys, sigmas, timesteps)
    alone = flow.stochastic_sample(blurred, noise[1:], keys[1:], sigmas, timesteps)
    np.testing.assert_allclose(both[1:], alone, rtol=1e-6, atol=1e-6)
    other = flow.stochastic_sample(blurred, noise, keys[::-1], sigmas, timesteps)
    assert float(jnp.abs(other - both).max()) > 0.1
    assert float(jnp.abs(flow.euler_sample(blurred, noise, sigmas, timesteps) - both).max()) > 0.1


def test_stochastic_sample_temperature_scales_the_fresh_draws():
    """temperature T scales every fresh draw (the caller scales the starting noise): the sampler
    equals the step-by-step loop with T * fresh; at T = 0 no key matters and an exact model still
    lands on its data."""
    x0 = jnp.linspace(-1, 1, 2 * 16 * 3).reshape(2, 4, 4, 3)
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    sigmas, timesteps = (jnp.asarray(v) for v in flow.sigma_schedule(6, 1.0))
    blurred = lambda x, t: x - 0.5 * x0[0]  # noqa: E731
    x = 0.3 * noise
    for i in range(6):
        fresh = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), x.shape[1:]))(keys)
        x = flow.stochastic_step(x, blurred(x, timesteps[i:i + 1]), sigmas[i], sigmas[i + 1], 0.3 * fresh)
    np.testing.assert_allclose(flow.stochastic_sample(blurred, 0.3 * noise, keys, sigmas, timesteps, 0.3), x,
                               rtol=1e-5, atol=1e-5)
    cold = flow.stochastic_sample(blurred, 0 * noise, keys, sigmas, timesteps, 0.0)
    np.testing.assert_allclose(flow.stochastic_sample(blurred, 0 * noise, keys[::-1], sigmas, timesteps, 0.0), cold)
    assert float(jnp.abs(cold - flow.stochastic_sample(blurred, noise, keys, sigmas, timesteps)).max()) > 0.1
    exact = lambda x, t: (x - x0) / (t / 1000.0)[:, None, None, None]  # noqa: E731
    np.testing.assert_allclose(flow.stochastic_sample(exact, 0 * noise, keys, sigmas, timesteps, 0.0), x0, atol=1e-5)


def velocity(z, t, a):
    return z * a - (t / 1000.0)[:, None, None, None]


def velocity_jax(z, t, a):
    half = z.shape[0] // 2
    bias = jnp.concatenate([jnp.zeros(half), jnp.ones(half)])
    return z * a - (t / 1000.0)[:, None, None, None] + bias[:, None, None, None]


def test_training_side():
    x0, noise = jnp.ones((3, 2, 2, 1)), jnp.zeros((3, 2, 2, 1))
    sigma = jnp.array([0.0, 0.25, 1.0])
    xt = flow.interpolate(x0, noise, sigma)
    np.testing.assert_allclose(xt[:, 0, 0, 0], [1.0, 0.75, 0.0])
    # the exact velocity gives zero loss, and x_t + (0 - sigma) v recovers x0
    v = flow.velocity_target(x0, noise)
    assert float(flow.flow_matching_loss(v, x0, noise, sigma + 0.1, "cosmap")) == 0.0
    np.testing.assert_allclose(xt - sigma[:, None, None, None] * v, x0, atol=1e-6)
    s = flow.sample_sigmas(jax.random.PRNGKey(0), 4096, shift=3.0)
    assert float(s.min()) > 0 and float(s.max()) < 1
    # shift > 1 moves mass to high noise: median of shifted logit-normal = shift(0.5) = 0.75
    assert abs(float(jnp.median(s)) - 0.75) < 0.02
    assert flow.resolution_shift(512, 512) == 2.0
    with pytest.raises(ValueError, match="weighting"):
        flow.loss_weight(s, "bogus")
    with pytest.raises(ValueError, match="num_steps"):
        flow.sigma_schedule(0)


def test_detail_weight_favours_the_positions_that_differ_from_the_image():
    """A latent of one bright position on a flat background: the weights average to 1 per image,
    the bright position gets (1 + s d) / (1 + s) with d its share of the image's contrast, a flat
    image weighs every position 1, and the loss with detail 0 is the plain loss."""
    x0 = jnp.zeros((2, 4, 4, 3)).at[0, 1, 2].set(jnp.array([2.0, -1.0, 0.5]))
    w = flow.detail_weight(x0, 0.5)
    assert w.shape == (2, 4, 4, 1)
    np.testing.assert_allclose(jnp.mean(w, axis=(1, 2, 3)), [1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(w[1], 1.0, rtol=1e-6)  # flat: no contrast, no preference
    # one position of 16 off the mean: d = 15 there and 1/15 elsewhere (distances 15^2/16^2 vs 1/16^2)
    d = np.full((4, 4), 1 / 15.0)
    d[1, 2] = 15.0
    np.testing.assert_allclose(w[0, ..., 0], (1 + 0.5 * d) / 1.5, rtol=1e-4)
    # the same error costs more on the bright position than on the background
    noise = jnp.zeros_like(x0)
    v = flow.velocity_target(x0, noise)
    sigma = jnp.array([0.5, 0.5])
    at_detail = v.at[0, 1, 2, 0].add(1.0)
    at_flat = v.at[0, 3, 0, 0].add(1.0)
    loss = lambda p, s: float(flow.flow_matching_loss(p[:1], x0[:1], noise[:1], sigma[:1], detail=s))  # noqa: E731
    assert loss(at_detail, 0.5) > 5 * loss(at_flat, 0.5)
    assert loss(at_detail, 0.0) == loss(at_flat, 0.0)
    np.testing.assert_allclose(loss(at_flat, 0.0), 1.0 / 48, rtol=1e-6)
