"""Image-quality and distribution metrics.

Pixel metrics (JAX, jit-able; shapes are static so size checks happen at trace time):

  psnr(a, b)          [B, H, W, C] x2 in [0, max_value]  -> [B] dB (inf for identical images)
  image_psnr(a, b)    [H, W, C] x2                       -> dB (float): psnr of one pair
  ms_ssim(a, b)       [B, H, W, C] x2 in [0, data_range] -> [B]; the 5-scale MS-SSIM of Wang et al.
                      (2003) with the conventions of `pytorch_msssim.ms_ssim` (see `ms_ssim`)

Distribution metrics (float64 numpy / scipy, as pytorch-fid, clean-fid and torch-fidelity compute
them; the features come from a network such as InceptionV3, outside this module):

  feature_statistics(features [N, D])             -> (mu [D], sigma [D, D])
  frechet_distance(mu1, sigma1, mu2, sigma2)      -> FID (float)
  kid(features1 [N1, D], features2 [N2, D], ...)  -> (mean, std) of the unbiased MMD^2 over subsets
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# MS-SSIM constants (Wang, Simoncelli & Bovik 2003), the defaults of every common implementation.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(a, b, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: the two batches differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 4:
        raise ValueError(f"{what}: expected NHWC batches [B, H, W, C], got shape {a.shape}")


def _float(x) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize >= 4 else x.astype(jnp.float32)


# ----------------------------------------------------------------------------- PSNR

def psnr(a: jax.Array, b: jax.Array, max_value: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB: 10 log10(max_value^2 / MSE) with the MSE over H, W and C.

    a, b: [B, H, W, C] floats in [0, max_value]. Returns [B] (inf where the images are equal).
    """
    _check_pair(a, b, "psnr")
    a, b = _float(a), _float(b)
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return 10.0 * jnp.log10(max_value ** 2 / mse)


def image_psnr(a, b, max_value: float = 1.0) -> float:
    """PSNR in dB of one pair of images [H, W, C] in [0, max_value] (`psnr` of a batch of one)."""
    return float(psnr(jnp.asarray(a)[None], jnp.asarray(b)[None], max_value)[0])


# ----------------------------------------------------------------------------- MS-SSIM

def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian [size] centred on size // 2, computed in float64.

    MS-SSIM is ill-conditioned in flat regions (E[x^2] - E[x]^2 with a window whose sum is not
    exactly 1 leaves a variance of order 1e-8 against C2 = 9e-4), so a window rounded differently
    (e.g. pytorch_msssim's float32 one) moves results by up to about 1e-5.
    """
    coords = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: jax.Array, window: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of [B, H, W, C] along H then W: -> [B, H-k+1, W-k+1, C]."""
    k = len(window)
    for axis in (1, 2):
        n = x.shape[axis] - k + 1
        x = sum(float(w) * jax.lax.slice_in_dim(x, i, i + n, axis=axis) for i, w in enumerate(window))
    return x


def _ssim_and_cs(x: jax.Array, y: jax.Array, window: np.ndarray, data_range: float):
    """Mean SSIM and contrast-structure terms per image and channel: two [B, C] arrays."""
    c1 = (SSIM_K[0] * data_range) ** 2
    c2 = (SSIM_K[1] * data_range) ** 2
    moments = _blur(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), window)
    mu_x, mu_y, xx, yy, xy = jnp.split(moments, 5, axis=-1)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs_map
    return ssim_map.mean(axis=(1, 2)), cs_map.mean(axis=(1, 2))


def _downsample(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2; an odd side is first zero-padded by one on both ends and the
    zeros count in the average (torch `avg_pool2d(kernel_size=2, padding=side % 2)`)."""
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (h % 2, h % 2), (w % 2, w % 2), (0, 0)))
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    return x[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, c).mean(axis=(2, 4))


def ms_ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0,
            weights: Sequence[float] = MS_SSIM_WEIGHTS) -> jax.Array:
    """Multi-scale SSIM per image: a, b [B, H, W, C] floats in [0, data_range] -> [B].

    Gaussian window 11 / sigma 1.5 ('valid' filtering), K = (0.01, 0.03), the five scale weights
    (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) and 2x average pooling between scales. As in
    `pytorch_msssim.ms_ssim`: each scale's contrast-structure term (and the last scale's SSIM) is
    clipped at 0 and computed per channel; the weighted product is averaged over the channels.
    Both sides must exceed (11 - 1) * 2^4 = 160 pixels so the coarsest scale still fits the window.
    Jitted (one compilation per image shape); it may also be called inside a jitted function.
    """
    _check_pair(a, b, "ms_ssim")
    weights = tuple(float(w) for w in weights)
    min_side = (SSIM_WINDOW - 1) * 2 ** (len(weights) - 1)
    if min(a.shape[1], a.shape[2]) <= min_side:
        raise ValueError(f"ms_ssim: images of {a.shape[1]}x{a.shape[2]} are too small for {len(weights)} scales: "
                         f"both sides must be larger than {min_side} pixels")
    return _ms_ssim(a, b, float(data_range), weights)


@functools.partial(jax.jit, static_argnames=("data_range", "weights"))
def _ms_ssim(a: jax.Array, b: jax.Array, data_range: float, weights: tuple[float, ...]) -> jax.Array:
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA)
    x, y = _float(a), _float(b)
    terms = []
    for level in range(len(weights)):
        ssim, cs = _ssim_and_cs(x, y, window, data_range)
        if level < len(weights) - 1:
            terms.append(jax.nn.relu(cs))
            x, y = _downsample(x), _downsample(y)
    terms.append(jax.nn.relu(ssim))
    w = jnp.asarray(weights, terms[0].dtype)[:, None, None]
    return jnp.prod(jnp.stack(terms) ** w, axis=0).mean(axis=-1)


# ----------------------------------------------------------------------------- FID

def _features(x, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{what}: expected a feature matrix [N >= 2, D], got shape {x.shape}")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, N - 1) of features [N, D], in float64."""
    f = _features(features, "feature_statistics")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))

    computed as pytorch-fid / clean-fid do: if the square root is not finite, `eps` is added to
    both diagonals and it is taken again; an imaginary part that is numerical noise (diagonal
    within 1e-3 of 0) is dropped, a larger one raises ValueError.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm(sigma1 sigma2) has an imaginary part of {imag:.3g}; "
                             "the covariances are badly conditioned (too few samples for the feature size?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------- KID

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """(gamma <x_i, y_j> + coef0)^degree for x [N, D], y [M, D] -> [N, M]; gamma defaults to 1 / D."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel) -> float:
    """The MMD^2 estimate of KID for two samples of equal size m: the within-sample kernel means
    leave out the diagonal (/ m(m-1)), the cross term keeps it (/ m^2), as clean-fid and
    torch-fidelity ("unbiased") compute it."""
    m = x.shape[0]
    kxx, kyy = polynomial_kernel(x, x, **kernel), polynomial_kernel(y, y, **kernel)
    kxy = polynomial_kernel(x, y, **kernel)
    within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
    return float(within / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kid(features1, features2, num_subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of `mmd2_unbiased` over `num_subsets` random subsets.

    features1 [N1, D], features2 [N2, D]. Each subset draws m = min(subset_size, N1, N2) rows
    without replacement from features1 and then from features2, with numpy's
    RandomState(seed); the std is the population std over subsets (ddof 0), as torch-fidelity.
    """
    f1, f2 = _features(features1, "kid"), _features(features2, "kid")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kid: feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"kid: num_subsets must be at least 1, got {num_subsets}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(f"kid: subset_size must be at least 2, got {subset_size}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(num_subsets)
    for s in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        mmds[s] = mmd2_unbiased(x, y, degree=degree, gamma=gamma, coef0=coef0)
    return float(mmds.mean()), float(mmds.std())
