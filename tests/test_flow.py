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
