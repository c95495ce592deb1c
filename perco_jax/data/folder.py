"""An image folder with a captions file.

Captions file formats (chosen by the file's extension):

- JSON Lines (`.jsonl`, `.ndjson`): one object per line, e.g. `{"file": "a.jpg", "caption": "..."}`;
  the image key may be `file`, `image` or `path`, the caption key `caption` or `text`. Blank lines
  are skipped.
- CSV (`.csv`): a header row naming the columns (`file`/`image`/`path` and `caption`/`text`), then
  one row per image.

File names are relative to the image folder (absolute paths are kept as they are).

Images must be JPEG, PNG, GIF (first frame), BMP, WebP or JPEG XL (what tf.data decodes natively;
`folder_examples` rejects other extensions up front, naming the file). Image policy
(`decode_resize_tf`, shared with the TFDS pipeline): decoded to RGB (greyscale is repeated, alpha
dropped, 16-bit reduced to 8-bit), resized with an antialiased bicubic filter so that its *shorter*
side equals `size` (aspect ratio kept), then centre-cropped to `size` x `size`; float32 HWC in [0, 1].

Images are decoded in the tf.data graph rather than with PIL in a `tf.numpy_function`: Python
callbacks on tf.data's threads can deadlock against the interpreter (when an iterator is dropped
mid-stream, or at exit). PIL (`perco_jax.images.load_image`) is used to name the bad file when
decoding fails.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from perco_jax.images import load_image

FILE_KEYS = ("file", "image", "path")
CAPTION_KEYS = ("caption", "text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
DEFAULT_CAPTION_FILES = ("captions.jsonl", "captions.csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".jxl")


def _pick(record: dict, keys: tuple[str, ...], what: str, where: str):
    for k in keys:
        if k in record:
            return record[k]
    raise ValueError(f"{where}: no {what} field (expected one of {', '.join(keys)}; found {sorted(record)})")


def _record(record, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object like {{\"file\": ..., \"caption\": ...}}, got {record!r}")
    file = _pick(record, FILE_KEYS, "image file", where)
    caption = _pick(record, CAPTION_KEYS, "caption", where)
    if not isinstance(file, str) or not file.strip():
        raise ValueError(f"{where}: the image file must be a non-empty string, got {file!r}")
    if not isinstance(caption, str):
        raise ValueError(f"{where}: the caption must be a string, got {caption!r}")
    return file.strip(), caption


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """Read a captions file (JSONL or CSV, see the module doc) as [(relative_file, caption), ...].

    Raises FileNotFoundError when the file is missing, and ValueError naming the file and line for
    a malformed line, and for an unknown format or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    suffix = path.suffix.lower()
    out: list[tuple[str, str]] = []
    if suffix in JSONL_SUFFIXES:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                out.append(_record(record, where))
    elif suffix in CSV_SUFFIXES:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not any(k in header for k in FILE_KEYS) or not any(k in header for k in CAPTION_KEYS):
                raise ValueError(f"{path}, line 1: the CSV header must name an image column ({', '.join(FILE_KEYS)}) "
                                 f"and a caption column ({', '.join(CAPTION_KEYS)}); got {header}")
            reader.fieldnames = header
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                if None in row or any(v is None for v in row.values()):
                    raise ValueError(f"{where}: expected {len(header)} columns ({', '.join(header)})")
                out.append(_record(row, where))
    else:
        raise ValueError(f"unknown captions format for {path}: use JSON Lines ({', '.join(JSONL_SUFFIXES)}) "
                         f"or CSV ({', '.join(CSV_SUFFIXES)})")
    if not out:
        raise ValueError(f"captions file {path} lists no images")
    return out


def find_captions_file(folder: str | Path, captions: str | Path = "") -> Path:
    """The captions file of an image folder: `captions` as given (or relative to `folder`), or the
    folder's captions.jsonl / captions.csv when `captions` is empty."""
    folder = Path(folder) if str(folder) else None
    if str(captions):
        p = Path(captions)
        if not p.is_file() and folder is not None and not p.is_absolute() and (folder / p).is_file():
            p = folder / p
        if not p.is_file():
            raise FileNotFoundError(f"captions file {captions} does not exist"
                                    + (f" (nor in {folder})" if folder is not None else ""))
        return p
    if folder is None:
        raise ValueError("the image folder source needs data.folder (the images) and/or data.captions "
                         "(a .jsonl or .csv captions file)")
    for name in DEFAULT_CAPTION_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no captions file given and none of {', '.join(DEFAULT_CAPTION_FILES)} in {folder}")


def folder_examples(folder: str | Path, captions: str | Path = "", *, check_files: bool = True
                    ) -> list[tuple[str, str]]:
    """[(image path, caption), ...] of an image folder, with the image paths resolved against the
    folder (the captions file's folder when `folder` is empty). With `check_files`, a listed image
    that does not exist raises FileNotFoundError naming it (and how many others are missing)."""
    captions_path = find_captions_file(folder, captions)
    root = Path(folder) if str(folder) else captions_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    out = [(str(root / f), c) for f, c in read_captions(captions_path)]
    if check_files:
        missing = [p for p, _ in out if not Path(p).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"image file {missing[0]}{more}, listed in {captions_path}, does not exist")
    for p, _ in out:
        if Path(p).suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"image file {p}, listed in {captions_path}, is not in a supported format "
                             f"({', '.join(IMAGE_SUFFIXES)}); convert it, e.g. to PNG or JPEG")
    return out


def resize_center_crop_tf(image, size: int):
    """tf: decoded uint8 HWC image -> float32 [size, size, 3] in [0, 1]: resized (bicubic, antialiased)
    so that the shorter side is `size`, then centre-cropped. The one resize policy of all pipelines."""
    import tensorflow as tf

    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = size / tf.minimum(h, w)
    nh = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
    nw = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
    x = tf.image.resize(tf.cast(image, tf.float32) / 255.0, tf.stack([nh, nw]), method="bicubic", antialias=True)
    x = tf.image.crop_to_bounding_box(x, (nh - size) // 2, (nw - size) // 2, size, size)
    return tf.clip_by_value(tf.reshape(x, [size, size, 3]), 0.0, 1.0)


def decode_resize_tf(contents, size: int):
    """tf: encoded image bytes (JPEG, PNG, GIF, BMP, WebP, JPEG XL) -> float32 [size, size, 3] in [0, 1]."""
    import tensorflow as tf

    return resize_center_crop_tf(tf.io.decode_image(contents, channels=3, expand_animations=False), size)


def first_unreadable(paths) -> tuple[str, str] | None:
    """(path, reason) of the first of `paths` that cannot be read as an image, or None (used to name
    the culprit when the tf.data decoder fails)."""
    for p in paths:
        try:
            load_image(p)
        except (ValueError, OSError) as e:
            return str(p), str(e)
    return None
