"""FID and KID: InceptionV3 pool3 features in JAX, statistics in float64 numpy.

  extract = InceptionFeatures.load("pt_inception-2015-12-05-6726825d.pth")
  feats = extract(images)               # images [B, H, W, 3] in [0, 1] (or uint8) -> [B, 2048] float32
  fid_kid(feats_real, feats_fake)       # -> {"fid", "kid", "kid_std"}

The network is pytorch-fid's (the 2015-12-05 TF graph; `perco_jax.models.inception`), with its
input handling: every image is resized to 299x299 bilinearly and mapped to [-1, 1]. Batches are
cut into chunks of a fixed size (the last one padded), so one compilation serves any batch size.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from perco_jax.eval.metrics import feature_statistics, frechet_distance, kid
from perco_jax.models.inception import FEATURES, InceptionV3

DEFAULT_CHUNK = 50         # pytorch-fid's default batch size
RANGE_TOLERANCE = 0.1      # float images may overshoot [0, 1] this much (resampling ringing) before
                           # they are taken for another convention ([-1, 1], [0, 255])


def _as_unit_floats(images) -> np.ndarray:
    """[B, H, W, 3] float in [0, 1] or uint8 in [0, 255] -> float32 in [0, 1]; clear errors otherwise."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"Inception features need RGB image batches [B, H, W, 3], got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"Inception features need float images in [0, 1] or uint8 images, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and (x.min() < -RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE):
        raise ValueError(f"Inception features need images in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]")
    return x


class InceptionFeatures:
    """Callable: images [B, H, W, 3] (float in [0, 1] or uint8) -> pool3 features [B, 2048] float32 numpy.

    The batch is run through a jitted apply in chunks of `chunk_size` images (the last chunk padded
    with zeros and its padding dropped), so each image size compiles once. Convolutions run at
    `precision` ("highest": full float32, also on GPUs/TPUs that would otherwise use TF32/bf16
    passes), so features do not depend on the accelerator.
    """

    def __init__(self, model: InceptionV3, variables: Mapping, chunk_size: int = DEFAULT_CHUNK,
                 precision: str = "highest"):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.model, self.variables = model, variables
        self.chunk_size, self.precision = chunk_size, precision
        self._traced: set[tuple[int, ...]] = set()

        def apply(v, x):
            self._traced.add(tuple(x.shape))  # runs once per compilation
            return model.apply(v, x)

        self._apply = jax.jit(apply)

    @classmethod
    def load(cls, path: str | os.PathLike, variant: str = "fid", chunk_size: int = DEFAULT_CHUNK,
             precision: str = "highest", **model_kwargs) -> "InceptionFeatures":
        """From a local checkpoint: pytorch-fid's `pt_inception-2015-12-05-*.pth` (or a .safetensors
        of it); `variant="torchvision"` for torchvision's `inception_v3_google-*.pth`."""
        from perco_jax.convert.inception import load_inception

        model, variables = load_inception(path, variant, **model_kwargs)
        return cls(model, variables, chunk_size=chunk_size, precision=precision)

    def __call__(self, images) -> np.ndarray:
        x = _as_unit_floats(images)
        n = x.shape[0]
        out = []
        with jax.default_matmul_precision(self.precision):
            for start in range(0, n, self.chunk_size):
                chunk = x[start:start + self.chunk_size]
                pad = self.chunk_size - chunk.shape[0]
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
                out.append(self._apply(self.variables, jnp.asarray(chunk))[:self.chunk_size - pad])
        if not out:
            return np.zeros((0, FEATURES), np.float32)
        return np.asarray(jnp.concatenate(out), np.float32)

    def over(self, batches: Iterable, progress: bool = False, total: int | None = None) -> np.ndarray:
        """Features of every image of an iterable of batches, concatenated: [N, 2048]."""
        from tqdm.auto import tqdm

        feats = [self(b) for b in tqdm(batches, desc="inception features", unit="batch", total=total,
                                       disable=not progress)]
        return np.concatenate(feats) if feats else np.zeros((0, FEATURES), np.float32)

    def compiled_shapes(self) -> set[tuple[int, ...]]:
        """The chunk shapes the jitted apply was compiled for (one per image size)."""
        return set(self._traced)


def fid_kid(features_real, features_fake, kid_subsets: int = 100, kid_subset_size: int = 1000,
            seed: int = 0) -> dict[str, float]:
    """FID and KID between two feature sets [N1, D], [N2, D] (e.g. real and reconstructed images).

    FID: `frechet_distance` of the two `feature_statistics` (float64). KID: `kid` with the cubic
    polynomial kernel, `kid_subsets` subsets of min(kid_subset_size, N1, N2) rows (clean-fid /
    torch-fidelity use 100 x 1000). Returns {"fid", "kid", "kid_std"}.
    """
    real = np.asarray(features_real, np.float64)
    fake = np.asarray(features_fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"fid_kid: feature matrices [N, D] of one width expected, got {real.shape} and {fake.shape}")
    fid = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    kid_mean, kid_std = kid(real, fake, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return {"fid": fid, "kid": kid_mean, "kid_std": kid_std}
