"""Rectified flow as SD3 uses it: the sampling schedule, the Euler sampler and its stochastic
variant (`stochastic_sample`: fresh noise at every step, config sample.stochastic), and the training
side (the flow-matching loss, weighted towards detail by `detail_weight`: config loss_detail).

Convention (diffusers / SD3): x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the
velocity v = noise - x0 at timestep t = 1000 * sigma, and sampling integrates from sigma = 1
(noise) to sigma = 0 (data).

Few-step decoding (stage 3) counts steps in the *base time* u in [0, 1] that SD3's shift maps to
sigma = shift(u): a sampler of N equal steps d = 1/N visits u = 1, 1 - d, ..., 0 (`uniform_sigmas`),
so a step-conditioned model's "step d" means the same span of the flow whatever the shift. Shortcut
models (Frans et al. 2024) learn one step of 2d as two steps of d (`two_step_target`); reflow (Liu et
al. 2023) retrains on straight lines between noise and the teacher's samples, and `straightness`
measures how far a flow is from straight.
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


def _integrate(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array, sigmas: jax.Array,
               timesteps: jax.Array, update: Callable) -> jax.Array:
    """The samplers' one `lax.scan` over the steps (sigma, sigma_next, t) in float32:
    x <- update(x, v, sigma, sigma_next, i) with v = velocity_fn(x, t) at step i (uint32, from 0)."""
    b = noise.shape[0]

    def step(carry, inp):
        x, i = carry
        sigma, sigma_next, t = inp
        v = velocity_fn(x, jnp.full((b,), t, jnp.float32)).astype(jnp.float32)
        return (update(x, v, sigma, sigma_next, i), i + 1), None

    (x, _), _ = jax.lax.scan(step, (noise.astype(jnp.float32), jnp.uint32(0)),
                             (sigmas[:-1], sigmas[1:], timesteps))
    return x


def euler_sample(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array,
                 sigmas: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1] with Euler steps (in float32).

    velocity_fn(x [B, ...], t [B]) -> v [B, ...]; noise [B, ...]; sigmas [S + 1]; timesteps [S].
    Runs as one `lax.scan`, so the whole sampler compiles once.
    """
    return _integrate(velocity_fn, noise, sigmas, timesteps,
                      lambda x, v, sigma, sigma_next, i: x + (sigma_next - sigma) * v)


def stochastic_step(x: jax.Array, v: jax.Array, sigma, sigma_next, fresh: jax.Array) -> jax.Array:
    """One step of diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True): the
    predicted data x0 = x - sigma v, noised again with fresh noise to sigma_next,
    (1 - sigma_next) x0 + sigma_next fresh. x, v, fresh [B, ...]."""
    return (1 - sigma_next) * (x - sigma * v) + sigma_next * fresh


def stochastic_sample(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array, keys: jax.Array,
                      sigmas: jax.Array, timesteps: jax.Array, temperature=1.0) -> jax.Array:
    """`euler_sample`'s schedule with `stochastic_step`s: each step re-noises the data predicted so
    far with fresh noise instead of keeping the starting noise, so a step that predicted blurred data
    does not carry its error to the end (on the tiny codec: +0.5 dB PSNR, cleaner shapes, see
    docs/evaluation.md). keys [B, 2] uint32: image j's fresh noise at step i is
    normal(fold_in(keys[j], i + 1)), so an image's draws do not depend on the others in the batch.
    The last step (sigma_next = 0) returns the predicted data, as the Euler step does. temperature
    (a scalar) scales the fresh draws (`noise` comes already scaled)."""
    def update(x, v, sigma, sigma_next, i):
        fresh = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), x.shape[1:], jnp.float32))(keys)
        return stochastic_step(x, v, sigma, sigma_next, temperature * fresh)

    return _integrate(velocity_fn, noise, sigmas, timesteps, update)


def uniform_sigmas(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """sigmas [num_steps + 1] of N equal steps in base time, u = 1, 1 - 1/N, ..., 0, shifted (float32).

    The few-step samplers' grid (unlike `sigma_schedule` it ends exactly at u = 1/N before 0, with
    none of diffusers' double-shifted lower end), so that a step of d = 1/N is one trained span.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift_sigmas(np.linspace(1.0, 0.0, num_steps + 1), shift).astype(np.float32)


def few_step_sample(velocity_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], noise: jax.Array,
                    num_steps: int, shift: float = 1.0) -> jax.Array:
    """N Euler steps of a step-conditioned model on `uniform_sigmas(N, shift)`, each predicting the
    step d = 1/N: velocity_fn(x [B, ...], t [B], d [B]) -> v [B, ...] is called N times."""
    sigmas = uniform_sigmas(num_steps, shift)
    d = jnp.full((noise.shape[0],), 1.0 / num_steps, jnp.float32)
    return euler_sample(lambda x, t: velocity_fn(x, t, d), noise, jnp.asarray(sigmas),
                        jnp.asarray(sigmas[:-1] * 1000.0))


def two_step_target(velocity_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], x: jax.Array,
                    u: jax.Array, d: jax.Array, shift: float = 1.0) -> jax.Array:
    """The shortcut models' self-consistency target [B, ...] for one step of 2d from base time u [B]:
    two steps of d [B] with velocity_fn(x, t = 1000 sigma, d) -> v, averaged so that one step of 2d
    lands where the two land:

        x1 = x + (s(u - d) - s(u)) v1,  x2 = x1 + (s(u - 2d) - s(u - d)) v2,  target = (x2 - x) / (s(u - 2d) - s(u))

    i.e. the mean (v1 + v2) / 2 when shift = 1, weighted by the two sigma spans when it is not.
    """
    def expand(a):
        return a.reshape(a.shape + (1,) * (x.ndim - 1))

    s0, s1, s2 = (shift_sigmas(u - k * d, shift) for k in (0, 1, 2))
    v1 = velocity_fn(x, s0 * 1000.0, d).astype(jnp.float32)
    v2 = velocity_fn(x + expand(s1 - s0) * v1, s1 * 1000.0, d).astype(jnp.float32)
    return (expand(s1 - s0) * v1 + expand(s2 - s1) * v2) / expand(s2 - s0)


def shortcut_steps(rng: jax.Array, batch: int, levels: int) -> tuple[jax.Array, jax.Array]:
    """(d [B], u [B]) for self-consistency examples: step sizes d = 2^-j, j uniform in 0..levels, and
    start times u = 1 - m d on the grid of that step (m uniform in 0..2^j - 1), as a sampler of
    1/d steps visits them."""
    k_level, k_start = jax.random.split(rng)
    j = jax.random.randint(k_level, (batch,), 0, levels + 1)
    n = jnp.left_shift(1, j)
    m = jnp.floor(jax.random.uniform(k_start, (batch,)) * n)
    d = 1.0 / n.astype(jnp.float32)
    return d, 1.0 - m * d


def straightness(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array,
                 sigmas: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Liu et al.'s straightness of a flow [B]: E_t ||(x_end - x_start) / (sigma_end - sigma_start) - v_t||^2
    along the Euler path of velocity_fn from noise (the mean over the steps, weighted by their
    sigma spans, of the squared distance of each velocity from the average one; 0 = a straight
    path, which one step integrates exactly)."""
    b = noise.shape[0]

    def step(x, inp):
        sigma, sigma_next, t = inp
        v = velocity_fn(x, jnp.full((b,), t, jnp.float32)).astype(jnp.float32)
        return x + (sigma_next - sigma) * v, v

    x0 = noise.astype(jnp.float32)
    x1, vs = jax.lax.scan(step, x0, (sigmas[:-1], sigmas[1:], timesteps))
    span = sigmas[-1] - sigmas[0]
    mean_v = (x1 - x0) / span
    w = (sigmas[1:] - sigmas[:-1]) / span  # [S]
    dev = jnp.mean(jnp.square(vs - mean_v[None]), axis=tuple(range(2, vs.ndim)))  # [S, B]
    return jnp.sum(w[:, None] * dev, axis=0)


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


def detail_weight(x0: jax.Array, strength: float) -> jax.Array:
    """Per-position loss weights [B, h, w, 1] of latents (or images) x0 [B, h, w, C] that favour
    detail: (1 + strength * d) / (1 + strength), d = the squared distance of a position's value from
    the image's mean (summed over channels), divided by its mean over the image. Every image's
    weights average to 1, so strength 0 is the plain loss. (Stage 0 weights its pixels with it.)

    Why: a uniform loss gives a small object the share of its few latent positions, and the tiny
    codec learned to leave small shapes faint; on its scenes strength 0.5 raised the caption colours
    drawn from 0.64 to 0.77 (docs/evaluation.md). Nothing here knows what the images show: it is
    the contrast of the latent itself.
    """
    axes = tuple(range(1, x0.ndim - 1))
    x0 = x0.astype(jnp.float32)
    d = jnp.sum(jnp.square(x0 - jnp.mean(x0, axis=axes, keepdims=True)), axis=-1, keepdims=True) + 1e-6
    d = d / jnp.mean(d, axis=axes, keepdims=True)  # (a flat image: d = 1, the plain loss)
    return (1.0 + strength * d) / (1.0 + strength)


def flow_matching_loss(pred: jax.Array, x0: jax.Array, noise: jax.Array, sigma: jax.Array,
                       weighting: str = "none", detail: float = 0.0) -> jax.Array:
    """Mean over the batch of weight(sigma) * mean-squared error to the velocity target, the squared
    errors weighted by `detail_weight(x0, detail)` when detail > 0. pred, x0, noise [B, h, w, C]; sigma [B]."""
    sq = jnp.square(pred.astype(jnp.float32) - velocity_target(x0, noise))
    if detail:
        sq = sq * detail_weight(x0, detail)
    err = jnp.mean(sq, axis=tuple(range(1, x0.ndim)))
    return jnp.mean(loss_weight(sigma, weighting) * err)
