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
  shape_iou         against the original (`shape_iou`): per shape colour named in the caption, the
                    IoU of the pixels within 40/255 of it in the original and in the reconstruction;
                    the mean over the colours the original shows (None when it shows none of them)

`scene_scores` gives all four (SCENE_SCORES); SCENE_METRICS are the three of the image alone.

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
SCENE_METRICS = ("colours_present", "realism", "background_right")  # of the reconstruction alone
SCENE_SCORES = SCENE_METRICS + ("shape_iou",)  # and against the original: what `scene_scores` gives
PALETTE = np.unique(np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), np.float32) / 255.0, axis=0)


def _rgb(image, what: str) -> np.ndarray:
    """image as float32 [H, W, 3]; any other shape is a ValueError that names `what` the image is for."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what}: need an [H, W, 3] image, got shape {image.shape}")
    return image


def colour_distance(image: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Max-over-channels distance [H, W, N] of image [H, W, 3] to colours [N, 3]."""
    return np.abs(image[:, :, None, :] - colours[None, None]).max(axis=-1)


def _named_colours(scene: Scene) -> np.ndarray:
    """[N, 3] in [0, 1]: the distinct colours of the scene's shapes (the caption names them), sorted by name."""
    return np.array([COLOURS[c] for c in sorted({s.colour for s in scene.shapes})], np.float32).reshape(-1, 3) / 255.0


def scene_metrics(image: np.ndarray, scene: Scene) -> dict:
    """The measures above for one reconstruction image [H, W, 3] in [0, 1] of `scene`."""
    image = _rgb(image, "scene metrics")
    h, w = image.shape[:2]
    min_pixels = MIN_PIXELS_AT_32 * h * w / 32 ** 2
    hits = (colour_distance(image, _named_colours(scene)) <= TOLERANCE).sum(axis=(0, 1))
    d = colour_distance(image, PALETTE)
    near = d.min(axis=-1) <= TOLERANCE
    counts = np.bincount(d.argmin(axis=-1)[near], minlength=len(PALETTE))
    background = np.array(BACKGROUNDS[scene.background], np.float32) / 255.0
    top = PALETTE[int(counts.argmax())] if near.any() else None
    return {"colours_present": float(np.mean(hits >= min_pixels)),
            "realism": float(near.mean()),
            "background_right": float(top is not None and np.allclose(top, background))}


def shape_iou(original: np.ndarray, recon: np.ndarray, scene: Scene) -> float | None:
    """How well recon [H, W, 3] keeps the shapes of original [H, W, 3] (both in [0, 1]) of `scene`:
    for each shape colour named by the scene, the pixels within TOLERANCE of it in each image, A in
    the original and B in the reconstruction, give IoU = |A & B| / |A | B|; the mean over the colours
    of which the original has pixels. None when it has none (nothing to compare)."""
    original, recon = _rgb(original, "shape IoU (original)"), _rgb(recon, "shape IoU (reconstruction)")
    if original.shape != recon.shape:
        raise ValueError(f"shape IoU compares images of one size, got original {original.shape} "
                         f"and reconstruction {recon.shape}")
    targets = _named_colours(scene)
    a = colour_distance(original, targets) <= TOLERANCE  # [H, W, colours]
    b = colour_distance(recon, targets) <= TOLERANCE
    union = (a | b).sum(axis=(0, 1))
    shown = a.any(axis=(0, 1))
    if not shown.any():
        return None
    return float(np.mean((a & b).sum(axis=(0, 1))[shown] / union[shown]))


def scene_scores(original: np.ndarray, recon: np.ndarray, scene: Scene) -> dict:
    """SCENE_SCORES of recon [H, W, 3] against original [H, W, 3] (in [0, 1]) of `scene`:
    `scene_metrics(recon)` and `shape_iou` (which may be None)."""
    return {**scene_metrics(recon, scene), "shape_iou": shape_iou(original, recon, scene)}


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
    image = _rgb(image, "the thumbnail")
    if int(grid_side) != grid_side or grid_side < 1:
        raise ValueError(f"grid_side must be a positive whole number, got {grid_side}")
    h, w, _ = image.shape
    if h % grid_side or w % grid_side:
        raise ValueError(f"image {h}x{w} is not a multiple of the grid {grid_side}")
    thumb = image.reshape(grid_side, h // grid_side, grid_side, w // grid_side, 3).mean(axis=(1, 3))
    levels = thumbnail_levels(codebook_size) - 1
    thumb = np.round(thumb * levels) / levels
    return resize(thumb, h, w)
