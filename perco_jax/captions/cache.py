"""The caption cache: captions made once per image and read back on later runs.

- `image_key(image)`: the SHA-256 (hex) of an image's 8-bit RGB pixels and size, so that the same
  picture gets the same key whether it comes from a PNG, a re-saved PNG or an array (HWC uint8 /
  float in [0, 1], grey [H, W] made RGB, a path or a PIL image: `images.to_rgb8`).
- `CaptionCache(path)`: a JSONL file of {"key", "caption", "captioner"} lines, appended as captions
  are made and read back on the next run, so a data set is captioned once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from perco_jax.images import to_rgb8

logger = logging.getLogger(__name__)


def image_key(image) -> str:
    """SHA-256 (hex) of an image's 8-bit RGB pixels and size: the caption cache's key."""
    rgb = to_rgb8(image)
    h = hashlib.sha256(b"perco-jax rgb8 %dx%d\n" % (rgb.shape[0], rgb.shape[1]))
    h.update(rgb.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the cache

class CaptionCache:
    """Captions by image key, kept in a JSONL file (one {"key", "caption", "captioner"} a line).

    Entries are appended (and flushed) as they are added; opening the cache reads the file
    back. A later line for the same (key, captioner) wins. Lines that cannot be read (e.g. a
    line cut short by a crash) are skipped with a warning.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries: dict[tuple[str, str], str] = {}
        self._latest: dict[str, tuple[str, str]] = {}   # key -> (captioner, caption), last written
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        entry = json.loads(line)
                        key, caption, captioner = entry["key"], entry["caption"], entry.get("captioner", "")
                        if not (isinstance(key, str) and isinstance(caption, str) and isinstance(captioner, str)):
                            raise TypeError("key, caption and captioner must be strings")
                    except (ValueError, KeyError, TypeError) as e:
                        logger.warning("%s line %d: skipped (%s)", self.path, n, e)
                        continue
                    self._remember(key, caption, captioner)

    def _remember(self, key: str, caption: str, captioner: str) -> None:
        self._entries[(key, captioner)] = caption
        self._latest[key] = (captioner, caption)

    def get(self, key: str, captioner: str | None = None) -> str | None:
        """The cached caption of `key` by `captioner` (None: by any captioner, the last one
        written), or None."""
        if captioner is None:
            hit = self._latest.get(key)
            return None if hit is None else hit[1]
        return self._entries.get((key, captioner))

    def put(self, key: str, caption: str, captioner: str = "") -> None:
        """Adds (and appends to the file) the caption of `key` made by `captioner`."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        line = json.dumps({"key": key, "caption": caption, "captioner": captioner}, ensure_ascii=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # start on a new line even after a line cut short by a crash
                f.seek(f.tell() - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode("utf-8") + b"\n")
        self._remember(key, caption, captioner)

    def __len__(self) -> int:
        return len(self._latest)

    def __contains__(self, key: str) -> bool:
        return key in self._latest
