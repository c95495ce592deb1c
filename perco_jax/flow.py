"""Rectified flow as SD3 uses it: the sampling schedule and Euler sampler, and the training side.

Convention (diffusers / SD3): x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the
velocity v = noise - x0 at timestep t = 1000 * sigma, and sampling integrates from sigma = 1
(noise) to sigma = 0 (data).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- sampling

def shift_sigmas(sigmas, shift: float):
    """SD3's timestep shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000):
    """(sigmas [num_steps + 1], timesteps [num_steps]) as FlowMatchEulerDiscreteScheduler.set_timesteps.

    Equal to diffusers' values: the end point sigma_min is the *shifted* 1/num_train_timesteps
    (computed in float32 at scheduler construction) and the linspace between the ends is shifted
    again (in float64) — diffusers shifts the lower end twice. A final sigma of 0 is appended.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    n = num_train_timesteps
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    train = (np.float32(shift) * train / (np.float32(1) + np.float32(shift - 1) * train)).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    sigmas = shift_sigmas(sigmas, shift).astype(np.float32)
    timesteps = (sigmas * np.float32(n)).astype(np.float32)
    return np.append(sigmas, np.float32(0)).astype(np.float32), timesteps


def euler_sample(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array,
                 sigmas: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1] with Euler steps (in float32).

    velocity_fn(x [B, ...], t [B]) -> v [B, ...]; noise [B, ...]; sigmas [S + 1]; timesteps [S].
    Runs as one `lax.scan`, so the whole sampler compiles once.
    """
    b = noise.shape[0]

    def step(x, inp):
        sigma, sigma_next, t = inp
        v = velocity_fn(x, jnp.full((b,), t, jnp.float32))
        return (x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)), None

    x, _ = jax.lax.scan(step, noise.astype(jnp.float32), (sigmas[:-1], sigmas[1:], timesteps))
    return x


def guided(velocity_fn: Callable, guidance: float) -> Callable:
    """Classifier-free guidance: wraps velocity_fn(x2 [2B], t2 [2B]) whose batch is (uncond, cond)
    into v(x [B], t [B]) = v_u + guidance * (v_c - v_u)."""
    def fn(x, t):
        v = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
        v_u, v_c = jnp.split(v, 2)
        return v_u + guidance * (v_c - v_u)
    return fn


# ----------------------------------------------------------------------------- training

def interpolate(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_sigma = (1 - sigma) x0 + sigma noise; sigma [B] broadcast over the other axes."""
    s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


def resolution_shift(height: int, width: int, base_pixels: int = 256 * 256) -> float:
    """SD3's resolution-dependent shift sqrt(pixels / base_pixels) (1.0 at 256^2, 2.0 at 512^2)."""
    return math.sqrt(height * width / base_pixels)


def sample_sigmas(rng: jax.Array, batch: int, *, scheme: str = "logit_normal", mean: float = 0.0,
                  std: float = 1.0, shift: float = 1.0) -> jax.Array:
    """Training sigmas [B] in (0, 1): logit-normal (SD3's default) or uniform, then shifted."""
    if scheme == "logit_normal":
        sigma = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
    elif scheme == "uniform":
        sigma = jax.random.uniform(rng, (batch,), minval=1e-5, maxval=1.0)
    else:
        raise ValueError(f"unknown sigma sampling scheme {scheme!r} (logit_normal or uniform)")
    return shift_sigmas(sigma, shift)


def loss_weight(sigma: jax.Array, scheme: str = "none") -> jax.Array:
    """Per-example loss weights as diffusers' compute_loss_weighting_for_sd3."""
    if scheme == "none":
        return jnp.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return sigma ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    raise ValueError(f"unknown loss weighting {scheme!r} (none, sigma_sqrt or cosmap)")


def flow_matching_loss(pred: jax.Array, x0: jax.Array, noise: jax.Array, sigma: jax.Array,
                       weighting: str = "none") -> jax.Array:
    """Mean over the batch of weight(sigma) * mean-squared error to the velocity target."""
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - velocity_target(x0, noise)),
                   axis=tuple(range(1, x0.ndim)))
    return jnp.mean(loss_weight(sigma, weighting) * err)
