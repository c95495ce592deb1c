"""Perception and semantics measures of the built-in synthetic scenes, and the equal-bits baseline.

The synthetic data set (`perco_jax.data.synthetic`) is drawn from a known palette, which gives
simple measures of what FID and mIoU measure on photos (the codec itself never sees the palette):

  colours_present   share of the shape colours named in the caption that appear in the
                    reconstruction: at least 6 pixels (at 32x32; scaled by area) within 40/255 of
                    that colour (max over the channels)
  realism           share of pixels within 40/255 of some palette colour (COLOURS | BACKGROUNDS):
                    a drawn scene is flat colours, so off-palette pixels are artefacts (blur, noise,
                    block edges); anti-aliased edges keep originals just under 1
  background_right  1 if the most common palette colour of the reconstruction (pixels assigned to
                    their nearest palette colour when within the tolerance) is the scene's background

`thumbnail_baseline` spends the bits of the uniformly coded indices on pixels instead: a g x g
thumbnail (box filter), each channel quantised to floor(K ** (1/3)) levels (so at most log2 K bits a
pixel), upsampled bicubic. A codec that does not beat it at equal index bits is not doing its job.
"""
from __future__ import annotations

import math

import numpy as np

from perco_jax.data.synthetic import BACKGROUNDS, COLOURS, Scene
from perco_jax.images import resize

TOLERANCE = 40 / 255
MIN_PIXELS_AT_32 = 6
SCENE_METRICS = ("colours_present", "realism", "background_right")
PALETTE = np.unique(np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), np.float32) / 255.0, axis=0)


def colour_distance(image: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Max-over-channels distance [H, W, N] of image [H, W, 3] to colours [N, 3]."""
    return np.abs(image[:, :, None, :] - colours[None, None]).max(axis=-1)


def scene_metrics(image: np.ndarray, scene: Scene) -> dict:
    """The measures above for one reconstruction image [H, W, 3] in [0, 1] of `scene`."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"scene metrics take an [H, W, 3] image, got shape {image.shape}")
    h, w = image.shape[:2]
    min_pixels = MIN_PIXELS_AT_32 * h * w / 32 ** 2
    named = sorted({s.colour for s in scene.shapes})
    targets = np.array([COLOURS[c] for c in named], np.float32) / 255.0
    hits = (colour_distance(image, targets) <= TOLERANCE).sum(axis=(0, 1))
    d = colour_distance(image, PALETTE)
    near = d.min(axis=-1) <= TOLERANCE
    counts = np.bincount(d.argmin(axis=-1)[near], minlength=len(PALETTE))
    background = np.array(BACKGROUNDS[scene.background], np.float32) / 255.0
    top = PALETTE[int(counts.argmax())] if near.any() else None
    return {"colours_present": float(np.mean(hits >= min_pixels)),
            "realism": float(near.mean()),
            "background_right": float(top is not None and np.allclose(top, background))}


def thumbnail_levels(codebook_size: int) -> int:
    """Quantisation levels per channel of the thumbnail: the most L with L^3 <= K (K >= 8, so L >= 2)."""
    if int(codebook_size) != codebook_size or codebook_size < 8:
        raise ValueError(f"the thumbnail needs a codebook of at least 8 codes (2 levels in each of 3 channels), "
                         f"got {codebook_size}")
    levels = int(math.floor(codebook_size ** (1 / 3)))
    while (levels + 1) ** 3 <= codebook_size:  # (guard the float cube root)
        levels += 1
    while levels ** 3 > codebook_size:
        levels -= 1
    return levels


def thumbnail_baseline(image: np.ndarray, grid_side: int, codebook_size: int) -> np.ndarray:
    """image [H, W, 3] in [0, 1] -> the equal-bits thumbnail reconstruction [H, W, 3] (see module doc).

    H and W must be multiples of grid_side.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"the thumbnail takes an [H, W, 3] image, got shape {image.shape}")
    if int(grid_side) != grid_side or grid_side < 1:
        raise ValueError(f"grid_side must be a positive whole number, got {grid_side}")
    h, w, _ = image.shape
    if h % grid_side or w % grid_side:
        raise ValueError(f"image {h}x{w} is not a multiple of the grid {grid_side}")
    thumb = image.reshape(grid_side, h // grid_side, grid_side, w // grid_side, 3).mean(axis=(1, 3))
    levels = thumbnail_levels(codebook_size) - 1
    thumb = np.round(thumb * levels) / levels
    return resize(thumb, h, w)
