"""Images in and out: one place for reading, checking, resizing and writing them.

Wherever an image goes in (compress, the captioner and its cache key, evaluate and its metrics)
it may be:
  - a file: any format and mode PIL reads, converted by PIL's convert("RGB") (grey, palette and
    CMYK become RGB; an alpha channel is dropped, as PIL does);
  - a PIL image: the same conversion;
  - an array [H, W], [H, W, 1] or [H, W, 3] of uint8, or of floats in [0, 1]; grey is repeated to
    RGB. An RGBA array [H, W, 4] is refused: what its transparent pixels should look like is the
    caller's choice (composite it over a background, or drop the alpha with image[..., :3]).
Anything else (other shapes or dtypes, floats outside [0, 1] or not finite) is one ValueError.
Resizing is bicubic everywhere: `resize` (JAX, antialiased when shrinking) for float images and
`resize_rgb8` (PIL, on 8-bit pixels, as clean-fid and the CLIP processor resize) for 8-bit ones.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def read_rgb8(path: str | os.PathLike) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB (any PIL mode converted); ValueError naming an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as [H, W, 3] float32 RGB in [0, 1] (8-bit values k / 255)."""
    return read_rgb8(path).astype(np.float32) / 255.0


def _rgb(image) -> np.ndarray:
    """[H, W, 3] RGB of any accepted image (see the module doc), uint8 or float as given."""
    if isinstance(image, (str, os.PathLike)):
        return read_rgb8(image)
    if not isinstance(image, np.ndarray) and hasattr(image, "convert"):  # a PIL image
        return np.asarray(image.convert("RGB"), np.uint8)
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3) or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"image must be [H, W, 3] RGB or [H, W] / [H, W, 1] grey, got shape {x.shape}"
                         + (" (an RGBA array: composite it, or drop the alpha with image[..., :3])"
                            if x.ndim == 3 and x.shape[-1] == 4 else ""))
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {x.dtype}")
        if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
            raise ValueError("float images must have finite values in [0, 1]")
    return np.broadcast_to(x, x.shape[:2] + (3,))


def to_rgb8(image) -> np.ndarray:
    """Any accepted image as [H, W, 3] uint8 RGB (floats rounded to the nearest 8-bit value)."""
    x = _rgb(image)
    if x.dtype != np.uint8:
        x = np.round(x.astype(np.float64) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(x)


def to_rgb_float(image) -> np.ndarray:
    """Any accepted image as [H, W, 3] float32 RGB in [0, 1] (uint8 k -> k / 255; floats kept)."""
    x = _rgb(image)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else np.array(x, np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] float in [0, 1] -> [height, width, C] float32: bicubic, antialiased when shrinking
    (JAX), clipped back to [0, 1] (bicubic overshoots at edges)."""
    import jax

    x = np.asarray(image, np.float32)
    if x.shape[:2] == (height, width):
        return x
    return np.clip(np.asarray(jax.image.resize(x, (height, width, x.shape[-1]), "bicubic", antialias=True)), 0.0, 1.0)


def resize_rgb8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [height, width, 3] uint8, PIL bicubic (the resize of clean-fid, PerCo (SD)'s
    COCO protocol and the CLIP image processor)."""
    from PIL import Image

    x = np.asarray(image, np.uint8)
    if x.shape[:2] == (height, width):
        return x
    return np.asarray(Image.fromarray(x).resize((width, height), Image.BICUBIC), np.uint8)


def save_image(image: np.ndarray, path: str | Path) -> None:
    """Write an HWC float image in [0, 1] as 8-bit (PNG / JPEG by the file's extension)."""
    from PIL import Image

    arr = np.asarray(image, np.float32)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected an HWC image with 1 or 3 channels, got shape {arr.shape}")
    arr = np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(str(path))
