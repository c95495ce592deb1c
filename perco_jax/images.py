"""Image files <-> float arrays: one place for reading, writing and checking images."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def save_image(image: np.ndarray, path: str | Path) -> None:
    """Write an HWC float image in [0, 1] as 8-bit (PNG / JPEG by the file's extension)."""
    from PIL import Image

    arr = np.asarray(image, np.float32)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected an HWC image with 1 or 3 channels, got shape {arr.shape}")
    arr = np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(str(path))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as HWC float32 RGB in [0, 1]; other modes (L, RGBA, P, CMYK) are
    converted to RGB; an unreadable file raises ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(im, np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e
