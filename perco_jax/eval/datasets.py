"""Evaluation sets: a data spec -> a `Dataset` of items, each image prepared by the set's protocol,
and each item's caption found as `compress` finds it.

Data specs (images: .jpg .jpeg .png .gif .bmp .webp .jxl, read as 8-bit RGB):

  kodak:DIR         the images of DIR (sorted), at their native size (768x512 / 512x768) unless
                    `size` is given (`size=512`: Kodak at 512x512)
  folder:DIR        the same for any folder
  coco30k:FILELIST  a text file of image paths, one per line (relative to the file's folder; blank
                    lines and `#` lines skipped): PerCo (SD)'s MS-COCO 30k protocol, every image
                    resized to 512x512 (PIL bicubic) unless `size` says otherwise

  synthetic:N[:SEED]  N built-in scenes (perco_jax.data.synthetic): synthetic_scene(i, SEED) for
                    i < N, drawn at the codec's image size unless `size` is given, captioned with
                    their own captions; nothing is read from disk. SEED defaults to SYNTHETIC_SEED
                    (1000003), which neither training (config.data.seed + {0, 1, 2} * 2**32 for its
                    train / validation / test splits) nor the tests draw. The reconstruction gets
                    the scene metrics of perco_jax.eval.scenes and is set against the equal-bits
                    thumbnail baseline (perco_jax.eval.evaluate).

`center_crop=True` first crops the largest centred square (then resizes when a size applies).
Captions, from the sources `compress` has (`captions`, `caption_cache`, `captioner`, `text_mode`):
  1. the data's own: a captions.jsonl / captions.csv (perco_jax.data.folder's formats) beside the
     images (DIR, the file list's folder or each image's folder), or the file `captions` names
     (paths relative to it), matched by path, then by file name; a synthetic scene's own caption.
     captions="none" (--captions none) uses none of them;
  2. else `captions.captioner.resolve_caption`, as compress calls it (both through
     `captions.captioner.caption_prompts`): the caption cache (JSONL, keyed by the
     image file's pixels, so compress and evaluate share one), then the captioner (BLIP-2 or
     Molmo-style, greedy, caption_tokens), whose captions are added to the cache (by default
     OUT/caption_cache.jsonl, so a resumed run does not caption again);
  3. else none: the image is coded with the empty caption, and evaluate prints one line saying how
     many were (`--text-mode none` codes every image without one, on purpose).
Each image's source (file, scene, cache, captioner, none) is in per_image.csv (caption_source),
run.json (caption_sources) and summary.json (`captions`: counts, per image, the note).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from perco_jax.data.folder import DEFAULT_CAPTION_FILES, IMAGE_SUFFIXES
from perco_jax.images import read_rgb8, resize_rgb8

DATA_KINDS = ("kodak", "folder", "coco30k", "synthetic")
# synthetic:N without a seed: scenes no training run or test draws (the training pipeline's synthetic
# splits use seeds config.data.seed + {0, 1, 2} * 2**32, i.e. 0, 2**32 and 2**33 by default; tests use
# small seeds); a prime well away from both
SYNTHETIC_SEED = 1_000_003
COCO30K_SIZE = 512
# where an image's caption came from: a captions file, the synthetic scene's own caption, the caption
# cache (no captioner given), the captioner (or its entry in the cache), or none (coded without one)
CAPTION_SOURCES = ("file", "scene", "cache", "captioner", "none")


@dataclasses.dataclass(frozen=True)
class Item:
    name: str       # unique within the set: the file stem (or its relative path when stems collide)
    path: Optional[Path]   # None for a synthetic scene
    caption: str
    scene: Optional[object] = None  # the perco_jax.data.synthetic.Scene of a synthetic item
    caption_source: str = ""  # CAPTION_SOURCES; "" = not resolved yet (parse_data: no captions-file entry)


@dataclasses.dataclass
class Dataset:
    """An evaluation set: its items and the protocol that prepares each image."""
    spec: str
    kind: str                   # kodak | folder | coco30k | synthetic
    items: list
    size: Optional[int] = None  # resize to size x size (PIL bicubic); None = native size (synthetic: drawn at it)
    center_crop: bool = False

    def load(self, item: Item) -> np.ndarray:
        """The image as evaluated: [H, W, 3] float32 in [0, 1] (8-bit values)."""
        if item.scene is not None:
            from perco_jax.data.synthetic import render_scene

            if self.size is None:
                raise ValueError("a synthetic scene needs a size to be drawn at (evaluate uses the codec's image size)")
            return render_scene(item.scene, self.size)
        return preprocess(read_rgb8(item.path), self.size, self.center_crop)

    def protocol(self) -> dict:
        return {"size": self.size, "center_crop": self.center_crop}


def preprocess(image: np.ndarray, size: Optional[int] = None, center_crop: bool = False) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H', W', 3] in [0, 1]: optional centre square crop, then an optional
    PIL bicubic resize to size x size (the clean-fid / PerCo (SD) resize), kept at 8-bit values."""
    x = np.asarray(image, np.uint8)
    if center_crop:
        h, w = x.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[top:top + s, left:left + s]
    if size is not None:
        x = resize_rgb8(x, size, size)
    return x.astype(np.float32) / 255.0


def data_protocol(ds: Dataset) -> str:
    """The protocol id of an evaluated set, as in published.csv's `protocol` column: coco30k-512
    (PerCo's MS-COCO 30k at 512x512), kodak-full (Kodak at its native size), else KIND-SIZE|full[-crop]
    (which no published row has; name a published protocol with evaluate(published_protocol=...))."""
    size = "full" if ds.size is None else str(ds.size)
    return f"{ds.kind}-{size}" + ("-crop" if ds.center_crop else "")


def _caption_table(files: Sequence[Path]) -> tuple[dict, dict]:
    """({resolved path: caption}, {file name: caption}) from those captions files that exist (paths in
    a file are relative to its folder); the first file that names an image wins."""
    from perco_jax.data.folder import read_captions

    by_path, by_name = {}, {}
    seen = set()
    for f in files:
        f = Path(f).resolve()
        if f in seen or not f.is_file():
            continue
        seen.add(f)
        for rel, caption in read_captions(f):
            p = Path(rel) if Path(rel).is_absolute() else f.parent / rel
            by_path.setdefault(str(p.resolve()), caption)
            by_name.setdefault(Path(rel).name, caption)
    return by_path, by_name


def _names(paths: Sequence[Path], root: Path) -> list[str]:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    out = []
    for p in paths:
        try:
            rel = p.relative_to(root)
        except ValueError:
            rel = Path(*p.parts[1:]) if p.is_absolute() else p
        out.append("__".join(rel.with_suffix("").parts))
    if len(set(out)) != len(out):
        dup = next(n for n in out if out.count(n) > 1)
        raise ValueError(f"two images would share the result name {dup!r}; list each image once")
    return out


def _synthetic_data(spec: str, where: str, size: Optional[int], own_captions: bool) -> Dataset:
    """synthetic:N[:SEED]: scenes synthetic_scene(i, SEED) for i < N, captioned with their captions."""
    from perco_jax.data.synthetic import synthetic_scene

    n, _, seed = where.partition(":")
    try:
        n, seed = int(n), int(seed) if seed else SYNTHETIC_SEED
    except ValueError:
        raise ValueError(f"data spec {spec!r}: synthetic:N[:SEED] takes whole numbers") from None
    if n < 1 or seed < 0:
        raise ValueError(f"data spec {spec!r}: synthetic:N[:SEED] needs N >= 1 scenes and SEED >= 0")
    if size is not None and int(size) < 8:
        raise ValueError(f"synthetic scenes are drawn at 8 pixels a side or more, got size {size}")
    width = max(5, len(str(n - 1)))
    items = []
    for i in range(n):
        scene = synthetic_scene(i, seed)
        items.append(Item(f"scene_{i:0{width}d}", None, scene.caption if own_captions else "", scene,
                          "scene" if own_captions else ""))
    return Dataset(spec=f"synthetic:{n}:{seed}", kind="synthetic", items=items,
                   size=None if size is None else int(size))


def parse_data(spec: str, *, size: Optional[int] = None, center_crop: bool = False,
               captions: str | os.PathLike | None = None) -> Dataset:
    """A Dataset from `kodak:DIR`, `folder:DIR`, `coco30k:FILELIST` or `synthetic:N[:SEED]` (see the
    module doc). A synthetic set without `size` is drawn at the codec's image size by `evaluate`.

    captions: None = the captions files beside the images (the scenes' own captions for synthetic
    data); a path = that captions file (.jsonl / .csv) instead; "none" = no captions from the data
    (images get theirs from the caption cache or captioner in `evaluate`, else none)."""
    kind, sep, where = str(spec).partition(":")
    if not sep or kind not in DATA_KINDS or not where:
        raise ValueError(f"data spec {spec!r} must be one of kodak:DIR, folder:DIR, coco30k:FILELIST, "
                         "synthetic:N[:SEED]")
    if size is not None and int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    no_captions = captions is not None and str(captions) == "none"
    if captions is not None and not no_captions and not Path(captions).expanduser().is_file():
        raise FileNotFoundError(f"captions file {captions} does not exist (give a .jsonl / .csv file, or 'none')")
    if kind == "synthetic":
        if captions is not None and not no_captions:
            raise ValueError("synthetic scenes have their own captions: captions takes only 'none' (to drop them)")
        return _synthetic_data(spec, where, size, own_captions=not no_captions)
    loc = Path(where).expanduser()
    if kind == "coco30k":
        if not loc.is_file():
            raise FileNotFoundError(f"coco30k file list {loc} does not exist (a text file of image paths)")
        root = loc.parent
        paths = []
        for lineno, line in enumerate(loc.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            paths.append(p if p.is_absolute() else root / p)
        if not paths:
            raise ValueError(f"coco30k file list {loc} lists no images")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"image file {missing[0]}{more}, listed in {loc}, does not exist")
        size = COCO30K_SIZE if size is None else size
    else:
        if not loc.is_dir():
            raise FileNotFoundError(f"image folder {loc} does not exist")
        root = loc
        paths = sorted(p for p in loc.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {loc}")
    if no_captions:
        files = []
    elif captions is not None:
        files = [Path(captions).expanduser()]
    else:
        dirs = [root] + sorted({p.parent for p in paths} - {root})
        files = [d / f for d in dirs for f in DEFAULT_CAPTION_FILES]
    by_path, by_name = _caption_table(files)
    items = []
    for n, p in zip(_names(paths, root), paths):
        caption = by_path.get(str(p.resolve()), by_name.get(p.name))
        items.append(Item(n, p, caption or "", caption_source="" if caption is None else "file"))
    return Dataset(spec=f"{kind}:{where}", kind=kind, items=items, size=None if size is None else int(size),
                   center_crop=bool(center_crop))


# ----------------------------------------------------------------------------- captions

def resolve_captions(ds: Dataset, codec, *, text_mode: str, captioner, cache, caption_tokens: int,
                     trust_remote_code: bool, progress: bool) -> Dataset:
    """Every item's caption and caption_source, as `compress` finds them
    (`captions.captioner.caption_prompts`): the data's own caption (captions file, scene), else the
    caption cache, then the captioner (which adds to the cache), else none; then the text mode (none:
    no caption at all)."""
    from functools import partial

    from perco_jax.captions.captioner import caption_prompts

    items = ds.items
    # the image as compress sees it: its file (the cache key is the file's pixels), or the scene
    images = [it.path if it.path is not None else partial(ds.load, it) for it in items]
    prompts = caption_prompts(images, text_mode=text_mode, tokenizers=codec.prompt_encoder.tokenizers,
                              captions=[it.caption if it.caption_source else None for it in items],
                              captioner=captioner, cache=cache, max_new_tokens=caption_tokens,
                              trust_remote_code=trust_remote_code, missing_ok=True, progress=progress)
    return dataclasses.replace(ds, items=[
        dataclasses.replace(it, caption=text, caption_source=it.caption_source if source == "given" else source)
        for it, (text, source) in zip(items, prompts)])


def caption_record(ds: Dataset, text_mode: str, identity: dict) -> dict:
    """summary.json's `captions` block: the caption sources, per image and counted, and a note (one
    line) when images were coded without a caption."""
    per = {it.name: it.caption_source for it in ds.items}
    counts = {s: n for s in CAPTION_SOURCES if (n := sum(v == s for v in per.values()))}
    n, without = len(ds.items), [it for it in ds.items if not it.caption]
    note = None
    if without and text_mode.strip().lower() == "none":
        note = f"all {n} images were coded without a caption (--text-mode none)"
    elif without:
        reasons = []
        none = sum(it.caption_source == "none" for it in without)
        if none:
            looked = "captions file, caption cache or captioner" if identity["captions_file"] != "none" else \
                "caption cache or captioner"
            reasons.append(f"{none} found none in the {looked} given (give --captioner DIR, --caption-cache FILE or "
                           "--captions FILE)")
        if len(without) > none:
            reasons.append(f"{len(without) - none} have an empty caption"
                           + (f" after --text-mode {text_mode}" if text_mode != "full" else ""))
        examples = ", ".join(it.name for it in without[:3]) + (", ..." if len(without) > 3 else "")
        note = f"{len(without)} of {n} images were coded without a caption ({examples}): " + "; ".join(reasons)
    return {"sources": counts, "without_caption": len(without), "note": note, "text_mode": text_mode,
            "captions_file": identity["captions_file"], "captioner": identity["captioner"],
            "caption_cache": identity["caption_cache"], "per_image": per}
