"""The evaluation driver: rate-distortion-perception of a trained codec on an image set.

    evaluate(codec, "kodak:DIR" | "folder:DIR" | "coco30k:FILELIST", out_dir,
             metrics_weights={...}, guidance=None, steps=None, sweep=None) -> summary dict
    perco-jax evaluate --checkpoint W --data SPEC --out DIR [...]     (`add_parser`)

Every image goes through the real bitstream: it is compressed (`Codec.compress_batch`, caption
included), the stream is written to OUT/streams/NAME.perco, and the reconstruction is decoded from
those bytes. bpp = 8 * stream bytes / (H * W) of the evaluated image, split into caption, indices
and container (`rate_split`).

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
                    thumbnail baseline (below).

`center_crop=True` first crops the largest centred square (then resizes when a size applies).
Captions, from the sources `compress` has (`captions`, `caption_cache`, `captioner`, `text_mode`):
  1. the data's own: a captions.jsonl / captions.csv (perco_jax.data.folder's formats) beside the
     images (DIR, the file list's folder or each image's folder), or the file `captions` names
     (paths relative to it), matched by path, then by file name; a synthetic scene's own caption.
     captions="none" (--captions none) uses none of them;
  2. else `captioning.resolve_caption`, as compress calls it: the caption cache (JSONL, keyed by the
     image file's pixels, so compress and evaluate share one), then the captioner (BLIP-2 or
     Molmo-style, greedy, caption_tokens), whose captions are added to the cache (by default
     OUT/caption_cache.jsonl, so a resumed run does not caption again);
  3. else none: the image is coded with the empty caption, and evaluate prints one line saying how
     many were (`--text-mode none` codes every image without one, on purpose).
Each image's source (file, scene, cache, captioner, none) is in per_image.csv (caption_source),
run.json (caption_sources) and summary.json (`captions`: counts, per image, the note).

Metrics, computed on the reconstruction as saved (8-bit PNG under OUT/recon, so a resumed run
gives the numbers a fresh one would):

  psnr      always
  ms_ssim   for images larger than 160 px on both sides (5 scales of an 11-px window)
  lpips     when metrics_weights has "lpips_trunk" and "lpips_heads" (local files, see
            perco_jax.convert.lpips; "lpips_net": "alex" (default) or "vgg")
  fid, kid  over the whole set, when metrics_weights has "inception" (a weights file for
            perco_jax.eval.fid.InceptionFeatures, or any callable images [B, H, W, 3] in [0, 1]
            -> features [B, D]); statistics from perco_jax.eval.metrics
  clip_score  of the reconstruction against its caption (torchmetrics' definition), for images
            with a caption, when metrics_weights has "clip" (a local transformers CLIPModel folder,
            perco_jax.eval.clip_score)
  miou      over the whole set (per-class intersection and union accumulated over all images,
            perco_jax.eval.segmentation) between the segmentations of original and reconstruction,
            when metrics_weights has "segmentation" (a local transformers segmentation checkpoint);
            summary.json also has miou_image_mean (the mean of the images' own mIoU)
  colours_present, realism, background_right   synthetic data only: the scene metrics of the
            reconstruction (perco_jax.eval.scenes), the built-in set's perception and semantics
            measures; thumb_psnr, thumb_colours_present, thumb_realism, thumb_background_right:
            the same for the equal-bits thumbnail (`scenes.thumbnail_baseline` at the codec's
            grid_side and codebook_size: the bits of the uniformly coded indices spent on pixels).
            summary.json has their means, `psnr_gain_over_thumbnail` (mean PSNR - mean thumb_psnr)
            and a `scene` block (the thumbnail's bits, the originals' scene metrics);
            `format_scene_summary(summary)` prints them as a table (the CLI and the demo do)

Outputs (one setting): per_image.csv (CSV_COLUMNS, one row per image; an empty cell = metric not
computed for that image), summary.json (means, FID / KID, which metrics were skipped or only
partly computed and why), rd.png (bpp against each metric, with the reference points of
`published.csv` whose protocol is the data's (`data_protocol`: coco30k-512, kodak-full; or
`published_protocol`) overlaid: one series per method and source, named in the legend, hollow
markers for values read from a figure, a dotted level for a point without bpp; rows of another
protocol are never drawn on the same axes). For Kodak, summary.json's `kodak_per_image` (printed
by the CLI) sets our bpp of kodim07 / 10 / 13 / 21 next to PerCoV2's and PerCo (SD)'s per-image rates.

Sweeps: sweep={"guidance": [...], "steps": [...]} evaluates every combination into its own
subfolder OUT/guidance=G_steps=S/ (the files above) and writes a combined OUT/summary.json,
OUT/sweep.csv, OUT/rd.png (one point per setting) and OUT/dp.png (the distortion-perception
trade-off: mean PSNR against FID / KID / LPIPS, one point per setting); the bitstreams (which do not depend on
guidance or steps) are shared in OUT/streams.

Resuming (resume=True): an image whose row is in per_image.csv and whose reconstruction PNG exists
is skipped, and saved bitstreams are reused; OUT/run.json (codec fingerprint, data, protocol,
schedule, seed) and each setting's setting.json (guidance, steps) must match the new run, otherwise
ValueError (use another out_dir, or resume=False to recompute and overwrite).

Determinism: `Codec.decompress_batch` draws an image's sampler noise from (seed, CRC of its
stream), so a reconstruction depends only on the codec, the stream and the seed: not on
batch_size, on resuming, or on the other settings of a sweep.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from perco_jax.eval import metrics
from perco_jax.eval.scenes import SCENE_METRICS

IMAGE_METRICS = ("psnr", "ms_ssim", "lpips", "clip_score")
# synthetic data only: the reconstruction's scene metrics (perco_jax.eval.scenes), then the equal-bits
# thumbnail baseline's PSNR and scene metrics
SCENE_COLUMNS = SCENE_METRICS + ("thumb_psnr",) + tuple(f"thumb_{m}" for m in SCENE_METRICS)
CSV_COLUMNS = ("name", "height", "width", "bytes", "bpp", "bpp_caption", "bpp_indices", "bpp_container",
               *IMAGE_METRICS, *SCENE_COLUMNS, "caption", "caption_source")
# where an image's caption came from: a captions file, the synthetic scene's own caption, the caption
# cache (no captioner given), the captioner (or its entry in the cache), or none (coded without one)
CAPTION_SOURCES = ("file", "scene", "cache", "captioner", "none")
CAPTION_CACHE = "caption_cache.jsonl"  # in the output folder, when a captioner is given without a cache
IDENTITY_DEFAULTS = {"captions_file": "data", "captioner": None, "caption_cache": None}
SET_METRICS = ("fid", "kid", "miou")
NOT_IMPLEMENTED: dict = {}
RATE_COLUMNS = ("bytes", "bpp", "bpp_caption", "bpp_indices", "bpp_container")
WEIGHT_KEYS = ("lpips_trunk", "lpips_heads", "lpips_net", "inception", "clip", "segmentation")
DATA_KINDS = ("kodak", "folder", "coco30k", "synthetic")
# synthetic:N without a seed: scenes no training run or test draws (the training pipeline's synthetic
# splits use seeds config.data.seed + {0, 1, 2} * 2**32, i.e. 0, 2**32 and 2**33 by default; tests use
# small seeds); a prime well away from both
SYNTHETIC_SEED = 1_000_003
COCO30K_SIZE = 512
MS_SSIM_MIN_SIDE = (metrics.SSIM_WINDOW - 1) * 2 ** (len(metrics.MS_SSIM_WEIGHTS) - 1)  # 160: sides must exceed it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".jxl")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
PUBLISHED_CSV = Path(__file__).with_name("published.csv")
PUBLISHED_COLUMNS = ("method", "dataset", "resolution", "protocol", "image", "bpp", "psnr", "ms_ssim", "lpips",
                     "dists", "fid", "kid", "clip_score", "miou", "exactness", "source")
PUBLISHED_TEXT = ("method", "dataset", "resolution", "protocol", "image", "exactness", "source")
EXACTNESS = ("table", "figure")  # verbatim from a table / results file, or read from a plot (uncertainty in source)
PLOT_METRICS = ("psnr", "ms_ssim", "lpips", "clip_score", "fid", "kid", "miou")
LABELS = {"psnr": "PSNR (dB) ↑", "ms_ssim": "MS-SSIM ↑", "lpips": "LPIPS ↓", "clip_score": "CLIP score ↑",
          "fid": "FID ↓", "kid": "KID ↓", "miou": "mIoU ↑"}


# ----------------------------------------------------------------------------- data

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
        return preprocess(_read_rgb8(item.path), self.size, self.center_crop)

    def protocol(self) -> dict:
        return {"size": self.size, "center_crop": self.center_crop}


def _read_rgb8(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e


def preprocess(image: np.ndarray, size: Optional[int] = None, center_crop: bool = False) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H', W', 3] in [0, 1]: optional centre square crop, then an optional
    PIL bicubic resize to size x size (the clean-fid / PerCo (SD) resize), kept at 8-bit values."""
    from PIL import Image

    x = np.asarray(image, np.uint8)
    if center_crop:
        h, w = x.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[top:top + s, left:left + s]
    if size is not None and x.shape[:2] != (size, size):
        x = np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC), np.uint8)
    return x.astype(np.float32) / 255.0


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
        files = [d / f for d in dirs for f in CAPTION_FILES]
    by_path, by_name = _caption_table(files)
    items = []
    for n, p in zip(_names(paths, root), paths):
        caption = by_path.get(str(p.resolve()), by_name.get(p.name))
        items.append(Item(n, p, caption or "", caption_source="" if caption is None else "file"))
    return Dataset(spec=f"{kind}:{where}", kind=kind, items=items, size=None if size is None else int(size),
                   center_crop=bool(center_crop))


# ----------------------------------------------------------------------------- metric networks

@dataclasses.dataclass
class _Networks:
    lpips: Optional[Callable] = None      # (a, b) [1, H, W, 3] in [0, 1] -> [1]
    lpips_fits: Optional[Callable] = None  # (h, w) -> whether every LPIPS tap is non-empty
    features: Optional[Callable] = None   # images [B, H, W, 3] in [0, 1] -> [B, D]
    clip: Optional[Callable] = None       # (images, captions) -> CLIP scores [B]
    segmenter: Optional[object] = None    # perco_jax.eval.segmentation.Segmenter
    skipped: dict = dataclasses.field(default_factory=dict)
    real_features: Optional[np.ndarray] = None  # cached over the settings of a sweep


def _lpips_fits(net: str, params) -> Callable:
    """(h, w) -> True when the LPIPS trunk's five taps are non-empty for an h x w image (AlexNet's
    stride-4 stem and 3x3 pools need about 31 px per side)."""
    import functools

    import jax
    import jax.numpy as jnp

    from perco_jax.models.lpips import FeatureTrunk

    trunk = FeatureTrunk(net)

    @functools.lru_cache(maxsize=None)
    def fits(h: int, w: int) -> bool:
        taps = jax.eval_shape(lambda x: trunk.apply({"params": params["trunk"]}, x),
                              jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
        return all(min(t.shape[1:3]) > 0 for t in taps)

    return fits


def _networks(weights: Mapping) -> _Networks:
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(WEIGHT_KEYS))
    if unknown:
        raise ValueError(f"unknown metrics_weights keys {unknown}; expected some of {list(WEIGHT_KEYS)}")
    nets = _Networks()
    trunk, heads = weights.get("lpips_trunk"), weights.get("lpips_heads")
    if bool(trunk) != bool(heads):
        raise ValueError("LPIPS needs both weights files: the torchvision trunk (lpips_trunk / --lpips-trunk) "
                         "and the lpips package's linear heads (lpips_heads / --lpips-heads)")
    if trunk:
        import jax

        from perco_jax.convert.lpips import load_lpips

        net = weights.get("lpips_net") or "alex"
        model, params = load_lpips(trunk, heads, net)
        apply = jax.jit(lambda p, a, b: model.apply({"params": p}, a * 2.0 - 1.0, b * 2.0 - 1.0))
        nets.lpips = lambda a, b: apply(params, a, b)
        nets.lpips_fits = _lpips_fits(net, params)
    else:
        nets.skipped["lpips"] = ("no LPIPS weights given (metrics_weights lpips_trunk + lpips_heads, "
                                 "or --lpips-trunk / --lpips-heads)")
    if weights.get("clip"):
        from perco_jax.eval.clip_score import CLIPScorer

        nets.clip = CLIPScorer.load(weights["clip"])
    else:
        nets.skipped["clip_score"] = "no CLIP model given (metrics_weights clip, or --clip DIR)"
    if weights.get("segmentation"):
        from perco_jax.eval.segmentation import Segmenter

        nets.segmenter = Segmenter.load(weights["segmentation"])
    else:
        nets.skipped["miou"] = "no segmentation model given (metrics_weights segmentation, or --segmentation DIR)"
    inception = weights.get("inception")
    if callable(inception):
        nets.features = inception
    elif inception:
        try:
            from perco_jax.eval import fid
            nets.features = fid.InceptionFeatures.load(inception)
        except (ImportError, AttributeError) as e:
            reason = f"the FID InceptionV3 (perco_jax.eval.fid.InceptionFeatures) is not available: {e}"
            nets.skipped.update(fid=reason, kid=reason)
    else:
        reason = "no InceptionV3 weights given (metrics_weights inception, or --inception)"
        nets.skipped.update(fid=reason, kid=reason)
    return nets


# ----------------------------------------------------------------------------- files

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def write_rows(path: Path, rows: Sequence[dict], columns: Sequence[str] = CSV_COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    _write_atomic(path, buf.getvalue())


def _parse(value: str):
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def read_rows(path: Path) -> list[dict]:
    """Rows of a per_image.csv with numbers parsed (empty cells -> None; name / caption kept as text)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: (v if k in ("name", "caption", "caption_source") else _parse(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_identity(path: Path, want: dict, resume: bool, what: str) -> None:
    """Write `want` to path; with resume, a different stored identity is an error."""
    have = _read_json(path) if resume and path.exists() else None
    if isinstance(have, dict):  # caption_sources is a record, not identity; results written before the
        # caption-source keys existed used what their defaults mean
        have = {**{k: v for k, v in IDENTITY_DEFAULTS.items() if k in want},
                **{k: v for k, v in have.items() if k != "caption_sources"}}
    if have is not None and have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ValueError(f"{path.parent} holds results of another {what} (differs in {', '.join(diff)}: "
                         f"{ {k: have.get(k) for k in diff} } vs { {k: want.get(k) for k in diff} }); "
                         "give another output folder, or resume=False (--no-resume) to recompute and overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(want, indent=2) + "\n")


# ----------------------------------------------------------------------------- published points

def load_published(path: str | os.PathLike | None = None) -> list[dict]:
    """Rows of the published reference points CSV (`#` lines are comments; empty cells -> None; text
    columns PUBLISHED_TEXT, numbers otherwise). A row without bpp is a reference level (e.g. an
    autoencoder's upper bound); a row with an `image` is a per-image point (`kodak_per_image`)."""
    path = Path(path) if path is not None else PUBLISHED_CSV
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    reader = csv.DictReader(lines)
    lacking = [c for c in ("method", "dataset", "protocol", "bpp", "exactness", "source") if c not in reader.fieldnames]
    if lacking:
        raise ValueError(f"{path} lacks the columns {lacking} (expected {','.join(PUBLISHED_COLUMNS)})")
    out = []
    for r in reader:
        row = {}
        for k, v in r.items():
            if k is None:
                continue
            v = (v or "").strip()
            if k in PUBLISHED_TEXT:
                row[k] = v
            else:
                try:
                    row[k] = float(v) if v else None
                except ValueError:
                    raise ValueError(f"{path}: column {k} of {r.get('method')!r} is not a number: {v!r}") from None
        if row["exactness"] not in EXACTNESS:
            raise ValueError(f"{path}: exactness of {row['method']!r} must be one of {EXACTNESS}, got {row['exactness']!r}")
        out.append(row)
    return out


def data_protocol(ds: Dataset) -> str:
    """The protocol id of an evaluated set, as in published.csv's `protocol` column: coco30k-512
    (PerCo's MS-COCO 30k at 512x512), kodak-full (Kodak at its native size), else KIND-SIZE|full[-crop]
    (which no published row has; name a published protocol with evaluate(published_protocol=...))."""
    size = "full" if ds.size is None else str(ds.size)
    return f"{ds.kind}-{size}" + ("-crop" if ds.center_crop else "")


def _published_for(published: Sequence[dict], protocol: str) -> list[dict]:
    """The averaged published points (not per-image rows) of one protocol."""
    return [r for r in published if r.get("protocol") == protocol and not r.get("image")]


def kodak_per_image(rows: Sequence[dict], published: Sequence[dict]) -> list[dict]:
    """Per-image Kodak rates of the published rows with an `image` (PerCoV2's Fig. 2) next to ours,
    matched by file name (kodim10 ...): [{"image", "ours": bpp or None, METHOD: bpp, ...}]."""
    pub = [r for r in published if r.get("image") and r.get("dataset", "").lower() == "kodak"]
    ours = {str(r["name"]).lower(): r.get("bpp") for r in rows}
    table = {}
    for r in pub:
        entry = table.setdefault(r["image"], {"image": r["image"], "ours": ours.get(r["image"].lower())})
        entry[r["method"]] = r["bpp"]
    return [table[k] for k in sorted(table)]


def format_kodak_per_image(table: Sequence[dict]) -> str:
    """`kodak_per_image` as text: one line per image, bpp of ours and of each published method."""
    if not table:
        return ""
    methods = list(dict.fromkeys(k for e in table for k in e if k not in ("image", "ours")))
    lines = ["  Kodak per image, bpp (published: PerCoV2 arXiv:2503.09368 Fig. 2, its lowest setting)",
             f"  {'image':<10}{'ours':>10}" + "".join(f"{m:>14}" for m in methods)]
    for e in table:
        cells = [e.get(k) for k in ["ours"] + methods]
        lines.append(f"  {e['image']:<10}" + "".join(f"{'–' if v is None else f'{v:.5f}':>{10 if i == 0 else 14}}"
                                                     for i, v in enumerate(cells)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _published_label(row: dict) -> str:
    """Legend text of a published series: method, source (its first word: the repository or paper),
    and how it was read."""
    how = "read from a figure" if row["exactness"] == "figure" else "table"
    return f"{row['method']} ({row['source'].split()[0].rstrip(',;')}, {how})"


def plot_rd(path: Path, series: Sequence[dict], published: Sequence[dict], protocol: str,
            title: str = "") -> Optional[str]:
    """bpp (log x) against each metric that has a value. `series`: [{label, points: [(bpp, {metric: v})],
    annotate: [str] | None, scatter: bool}]. The published rows of `protocol` only (never two protocols
    on one axis) are overlaid, one series per method and source, named in the legend: filled markers
    for table values, hollow for values read from a figure, a dotted level for a row without bpp.
    Returns None when written, else why not."""
    mpl = _matplotlib()
    if mpl is None:
        return "matplotlib is not installed (pip install matplotlib)"
    pub = _published_for(published, protocol)
    shown = [m for m in PLOT_METRICS
             if any(v.get(m) is not None and math.isfinite(v[m]) for s in series for _, v in s["points"])]
    if not shown:
        return "no metric values to plot"
    groups: dict = {}  # one published series per (method, source, exactness), a colour each
    for r in pub:
        groups.setdefault((r["method"], r["source"], r["exactness"]), []).append(r)
    colour = {key: f"C{(len(series) + i) % 10}" for i, key in enumerate(groups)}
    legend: dict = {}  # label -> handle, over all panels (a source may have values on some metrics only)
    fig, axes = _panels(mpl, len(shown))
    for ax, m in zip(axes, shown):
        for i, s in enumerate(series):
            pts = [(b, v[m]) for b, v in s["points"] if v.get(m) is not None and math.isfinite(v[m]) and b > 0]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if s.get("scatter"):
                h = ax.scatter(xs, ys, s=10, alpha=0.35, color=f"C{i}")
            else:
                (h,) = ax.plot(xs, ys, marker="o", color=f"C{i}")
            legend.setdefault(s["label"], h)
            for (x, y), text in zip(pts, s.get("annotate") or []):
                ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for key, rows in groups.items():
            label = _published_label(rows[0])
            hollow = {"markerfacecolor": "none"} if key[2] == "figure" else {}
            pts = sorted((r["bpp"], r[m]) for r in rows if r.get("bpp") is not None and r.get(m) is not None)
            if pts:
                xs, ys = zip(*pts)
                (h,) = ax.plot(xs, ys, marker="s", ls="--", color=colour[key], **hollow)
                legend.setdefault(label, h)
            for r in rows:
                if r.get("bpp") is None and r.get(m) is not None:  # no rate: a level (an upper bound)
                    h = ax.axhline(r[m], ls=":", color=colour[key])
                    legend.setdefault(f"{label}, no bpp", h)
        ax.set_xscale("log")
        ax.set_xlabel("bpp")
        ax.set_ylabel(LABELS[m])
        ax.grid(True, which="both", alpha=0.3)
    fig.set_figheight(3.6 + 0.2 * math.ceil(len(legend) / 3))
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", fontsize=7,
               ncols=min(3, len(legend)))
    if title:
        fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return None


def _panels(mpl, n: int):
    """(figure, n axes side by side) for the plots."""
    Figure, FigureCanvasAgg = mpl
    fig = Figure(figsize=(4.2 * n, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n, squeeze=False)[0]


def plot_dp(path: Path, table: Sequence[dict], title: str = "") -> Optional[str]:
    """The distortion-perception trade-off of a sweep: mean PSNR (x) against each perception metric
    that has values (FID, KID, LPIPS), one point per setting, one line per step count."""
    mpl = _matplotlib()
    if mpl is None:
        return "matplotlib is not installed (pip install matplotlib)"

    def ok(v):
        return v is not None and math.isfinite(v)

    shown = [m for m in ("fid", "kid", "lpips") if any(ok(t.get(m)) and ok(t.get("psnr")) for t in table)]
    if not shown:
        return "no perception metric (FID, KID, LPIPS) was computed"
    fig, axes = _panels(mpl, len(shown))
    for ax, m in zip(axes, shown):
        for steps in sorted({t["steps"] for t in table}):
            pts = [t for t in table if t["steps"] == steps and ok(t.get(m)) and ok(t.get("psnr"))]
            ax.plot([t["psnr"] for t in pts], [t[m] for t in pts], marker="o", label=f"steps={steps}")
            for t in pts:
                ax.annotate(f"g={t['guidance']:g}", (t["psnr"], t[m]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(LABELS["psnr"])
        ax.set_ylabel(LABELS[m])
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return None


# ----------------------------------------------------------------------------- one setting

def _quantise(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0) / 255.0


def _image_metrics(original: np.ndarray, recon: np.ndarray, nets: _Networks, caption: str = "") -> dict:
    a, b = original[None], recon[None]
    out = {"psnr": float(np.asarray(metrics.psnr(a, b))[0]), "ms_ssim": None, "lpips": None, "clip_score": None}
    if nets.clip is not None and caption:
        out["clip_score"] = float(nets.clip([recon], [caption])[0])
    if min(original.shape[:2]) > MS_SSIM_MIN_SIDE:
        out["ms_ssim"] = float(np.asarray(metrics.ms_ssim(a, b))[0])
    if nets.lpips is not None and nets.lpips_fits(*original.shape[:2]):
        out["lpips"] = float(np.asarray(nets.lpips(a, b))[0])
    return out


def _scene_metrics(original: np.ndarray, recon: np.ndarray, scene, grid_side: int, codebook_size: int) -> dict:
    """SCENE_COLUMNS of a synthetic item: the reconstruction's scene metrics, and the PSNR and scene
    metrics of the equal-bits thumbnail of the original (8-bit, as a saved reconstruction)."""
    from perco_jax.eval import scenes

    thumb = _quantise(scenes.thumbnail_baseline(original, grid_side, codebook_size))
    out = scenes.scene_metrics(recon, scene)
    out["thumb_psnr"] = float(np.asarray(metrics.psnr(original[None], thumb[None]))[0])
    out.update({f"thumb_{k}": v for k, v in scenes.scene_metrics(thumb, scene).items()})
    return out


def _rate(stream: bytes) -> dict:
    from perco_jax.codec.codec import rate_split

    r = rate_split(stream)
    per = 8.0 / r["pixels"]
    return {"bytes": r["total"], "bpp": r["total"] * per, "bpp_caption": r["caption"] * per,
            "bpp_indices": r["indices"] * per, "bpp_container": r["container"] * per}


def _streams(codec, items: Sequence[Item], images: Sequence[np.ndarray], streams_dir: Path,
             schedule: Optional[str], reuse: bool) -> list[bytes]:
    """The bitstreams of `items` (read from streams_dir when saved and `reuse`, else compressed and saved)."""
    out: list = [None] * len(items)
    todo = []
    for i, it in enumerate(items):
        f = streams_dir / f"{it.name}.perco"
        if reuse and f.is_file():
            out[i] = f.read_bytes()
        else:
            todo.append(i)
    if todo:
        new = codec.compress_batch([images[i] for i in todo], [items[i].caption for i in todo], schedule=schedule)
        streams_dir.mkdir(parents=True, exist_ok=True)
        for i, s in zip(todo, new):
            tmp = streams_dir / f"{items[i].name}.perco.tmp"
            tmp.write_bytes(s)
            os.replace(tmp, streams_dir / f"{items[i].name}.perco")
            out[i] = s
    return out


def _features(fn: Callable, images: Sequence[np.ndarray]) -> np.ndarray:
    """Features of images of possibly different sizes (one call per run of equal shapes)."""
    out = []
    for _, group in itertools.groupby(images, key=lambda x: x.shape):
        out.append(np.asarray(fn(np.stack(list(group))), np.float32))
    return np.concatenate(out)


def _set_metrics(ds: Dataset, recon_dir: Path, nets: _Networks, batch_size: int, summary: dict) -> None:
    from perco_jax.images import load_image

    if nets.segmenter is not None:
        from perco_jax.eval.segmentation import segmentation_miou

        seg = segmentation_miou(nets.segmenter, (ds.load(it) for it in ds.items),
                                (load_image(recon_dir / f"{it.name}.png") for it in ds.items))
        summary["miou"], summary["miou_image_mean"] = seg["miou"], seg["miou_image_mean"]
    if nets.features is None:
        return
    n = len(ds.items)
    if n < 2:
        reason = f"needs at least 2 images, the set has {n}"
        summary["skipped"].update(fid=reason, kid=reason)
        return
    fake, real = [], []
    for start in range(0, n, batch_size):
        chunk = ds.items[start:start + batch_size]
        fake.append(_features(nets.features, [load_image(recon_dir / f"{it.name}.png") for it in chunk]))
        if nets.real_features is None:
            real.append(_features(nets.features, [ds.load(it) for it in chunk]))
    if nets.real_features is None:
        nets.real_features = np.concatenate(real)
    fake_f, real_f = np.concatenate(fake), nets.real_features
    try:
        summary["fid"] = metrics.frechet_distance(*metrics.feature_statistics(real_f), *metrics.feature_statistics(fake_f))
    except ValueError as e:
        summary["skipped"]["fid"] = f"FID failed on {n} images: {e}"
    kid_mean, kid_std = metrics.kid(real_f, fake_f)
    summary["kid"], summary["kid_std"] = kid_mean, kid_std
    if n < 2048:
        summary.setdefault("notes", []).append(
            f"FID / KID over {n} images (features of dimension {real_f.shape[1]}): small sets bias FID upwards; "
            "the COCO-30k protocol uses 30,000")


def _summarise(ds: Dataset, rows: Sequence[dict], nets: _Networks, setting: dict, codec, seed: int,
               schedule: Optional[str]) -> dict:
    n = len(rows)
    mean, count = {}, {}
    for c in RATE_COLUMNS + IMAGE_METRICS + SCENE_COLUMNS:
        vals = [r[c] for r in rows if r.get(c) is not None]
        count[c] = len(vals)
        mean[c] = float(np.mean(vals)) if vals else None
    skipped = dict(nets.skipped)
    partial = {}
    small = count["psnr"] - count["ms_ssim"]
    if count["ms_ssim"] == 0:
        skipped["ms_ssim"] = (f"every image has a side of at most {MS_SSIM_MIN_SIDE} px; MS-SSIM's 5 scales need both "
                              f"sides larger than {MS_SSIM_MIN_SIDE}")
    elif small:
        partial["ms_ssim"] = (f"computed on {count['ms_ssim']} of {n} images: {small} have a side of at most "
                              f"{MS_SSIM_MIN_SIDE} px; the mean is over the others")
    if nets.lpips is not None and count["lpips"] < n:
        (skipped if count["lpips"] == 0 else partial)["lpips"] = (
            f"computed on {count['lpips']} of {n} images: the others are too small for the LPIPS trunk "
            "(its five feature maps would be empty)")
    if nets.clip is not None and count["clip_score"] < n:
        (skipped if count["clip_score"] == 0 else partial)["clip_score"] = (
            f"computed on {count['clip_score']} of {n} images: the others have no caption")
    skipped.update(NOT_IMPLEMENTED)
    c = codec.config
    scene = _scene_summary(ds, mean, codec) if ds.kind == "synthetic" else None
    return {
        "data": ds.spec, "protocol": ds.protocol(), "num_images": n,
        "codec": {"fingerprint": codec.fingerprint.hex(), "image_size": int(c.image_size),
                  "grid": list(codec.grid), "codebook_size": int(c.codec.codebook_size),
                  "schedule": schedule or c.codec.schedule},
        **setting, "seed": seed,
        "mean": mean, "count": count, "fid": None, "kid": None, "kid_std": None, "miou": None,
        "psnr_gain_over_thumbnail": scene and scene["psnr_gain_over_thumbnail"], "scene": scene,
        "skipped": skipped, "partial": partial,
    }


def _scene_summary(ds: Dataset, mean: dict, codec) -> dict:
    """The synthetic set's scene block: the thumbnail baseline's bits, the originals' scene metrics
    (the ceiling: anti-aliased edges keep realism just under 1) and the PSNR gain over the thumbnail."""
    from perco_jax.eval import scenes

    g, k = codec.grid[0], int(codec.config.codec.codebook_size)
    levels = scenes.thumbnail_levels(k)
    originals = [scenes.scene_metrics(ds.load(it), it.scene) for it in ds.items]
    gain = None if mean.get("psnr") is None or mean.get("thumb_psnr") is None else mean["psnr"] - mean["thumb_psnr"]
    return {"thumbnail": {"grid_side": g, "levels_per_channel": levels,
                          "bits": g * g * 3 * math.log2(levels), "index_bits_uniform": g * g * math.log2(k)},
            "originals": {m: float(np.mean([o[m] for o in originals])) for m in SCENE_METRICS},
            "psnr_gain_over_thumbnail": gain}


def format_scene_summary(summary: dict) -> str:
    """The scene metrics of a synthetic evaluation (a summary from `evaluate`, one setting or a sweep)
    as a small text table: the codec per setting, the equal-bits thumbnail, the originals. "" for
    other data."""
    settings = summary.get("settings", [summary])
    if not settings or not settings[0].get("scene"):
        return ""
    first = settings[0]
    head = f"  {'':<30}{'bpp':>8}{'PSNR':>8}{'colours present':>17}{'realism':>9}{'background right':>18}"
    lines = [head]

    def row(label, bpp, psnr, vals):
        cells = "".join(f"{'–' if v is None else f'{v:.2f}':>{w}}" for v, w in zip(vals, (17, 9, 18)))
        lines.append(f"  {label:<30}{'' if bpp is None else f'{bpp:.4f}':>8}"
                     f"{'–' if psnr is None else f'{psnr:.2f}':>8}{cells}")

    for s in settings:
        m = s["mean"]
        row(f"codec (guidance {s['guidance']:g}, {s['steps']} steps)", m.get("bpp"), m.get("psnr"),
            [m.get(k) for k in SCENE_METRICS])
    t = first["scene"]["thumbnail"]
    m = first["mean"]
    side = (first.get("protocol") or {}).get("size")
    row(f"thumbnail {t['grid_side']}x{t['grid_side']}, {t['bits']:.0f} bits", side and t["bits"] / side ** 2,
        m.get("thumb_psnr"),
        [m.get(f"thumb_{k}") for k in SCENE_METRICS])
    row("originals", None, None, [first["scene"]["originals"][k] for k in SCENE_METRICS])
    gains = ", ".join("–" if s["psnr_gain_over_thumbnail"] is None else f"{s['psnr_gain_over_thumbnail']:+.2f} dB"
                      for s in settings)
    lines.append(f"  PSNR gain over the thumbnail: {gains} ({first['num_images']} scenes of {first['data']}; "
                 f"the thumbnail spends {t['bits']:.0f} bits, the indices {t['index_bits_uniform']:.0f} coded uniformly)")
    return "\n".join(lines)


def _evaluate_setting(codec, ds: Dataset, out: Path, streams_dir: Path, nets: _Networks, *, setting: dict,
                      seed: int, schedule: Optional[str], batch_size: int, resume: bool, progress: bool,
                      published: list, label: str, captions: dict, protocol: str) -> dict:
    from perco_jax.images import save_image

    _check_identity(out / "setting.json", setting, resume, "guidance / steps setting")
    recon_dir = out / "recon"
    recon_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out / "per_image.csv"
    rows: dict[str, dict] = {}
    if resume and csv_path.is_file():
        names = {it.name for it in ds.items}
        need = SCENE_COLUMNS if ds.kind == "synthetic" else ()  # (rows written before these columns existed)
        rows = {r["name"]: r for r in read_rows(csv_path)
                if r["name"] in names and (recon_dir / f"{r['name']}.png").is_file()
                and all(r.get(c) is not None for c in need)}
    batch_size = max(1, int(batch_size))
    n = len(ds.items)
    todo = [j for j in range(n) if ds.items[j].name not in rows]
    from tqdm.auto import tqdm

    bar = tqdm(total=n, initial=n - len(todo), disable=not progress, desc=f"evaluate {label}".strip(),
               unit="img", dynamic_ncols=True)
    try:
        for k in range(0, len(todo), batch_size):
            items = [ds.items[j] for j in todo[k:k + batch_size]]
            images = [ds.load(it) for it in items]
            streams = _streams(codec, items, images, streams_dir, schedule, reuse=resume)
            recons = codec.decompress_batch(streams, steps=setting["steps"], guidance=setting["guidance"], seed=seed)
            new = 0
            for it, image, stream, recon in zip(items, images, streams, recons):
                if it.name in rows:
                    continue
                recon = _quantise(recon)
                save_image(recon, recon_dir / f"{it.name}.png")
                rows[it.name] = {"name": it.name, "height": image.shape[0], "width": image.shape[1],
                                 **_rate(stream), **_image_metrics(image, recon, nets, it.caption),
                                 "caption": it.caption, "caption_source": it.caption_source}
                if it.scene is not None:
                    rows[it.name].update(_scene_metrics(image, recon, it.scene, codec.grid[0],
                                                        int(codec.config.codec.codebook_size)))
                new += 1
            write_rows(csv_path, [rows[it.name] for it in ds.items if it.name in rows])
            bar.update(new)
    finally:
        bar.close()
    ordered = [dict(rows[it.name], caption_source=it.caption_source) for it in ds.items]
    write_rows(csv_path, ordered)
    summary = _summarise(ds, ordered, nets, setting, codec, seed, schedule)
    _set_metrics(ds, recon_dir, nets, batch_size, summary)
    points = [(r["bpp"], r) for r in ordered]
    set_point = {"bpp": summary["mean"]["bpp"], **summary["mean"], "fid": summary["fid"], "kid": summary["kid"],
                 "miou": summary["miou"]}
    why = plot_rd(out / "rd.png", [{"label": "perco-jax (per image)", "points": points, "scatter": True},
                                   {"label": "perco-jax (mean)", "points": [(set_point["bpp"], set_point)]}],
                  published, protocol, title=f"{ds.spec}  guidance={setting['guidance']:g} steps={setting['steps']}")
    summary["files"] = {"per_image": "per_image.csv", "recon": "recon/", "streams": os.path.relpath(streams_dir, out),
                        "plot": None if why else "rd.png"}
    if why:
        summary["skipped"]["plot"] = why
    summary["published_protocol"] = protocol
    summary["published_points"] = len(_published_for(published, protocol))
    if ds.kind == "kodak":
        summary["kodak_per_image"] = kodak_per_image(ordered, published)
    summary["captions"] = captions
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return summary


# ----------------------------------------------------------------------------- captions

def _resolve_captions(ds: Dataset, codec, *, text_mode: str, captioner, cache, caption_tokens: int,
                      trust_remote_code: bool, progress: bool) -> Dataset:
    """Every item's caption and caption_source, as `compress` finds them: the data's own caption
    (captions file, scene), else `captioning.resolve_caption` (the caption cache, then the captioner,
    which adds to the cache), else none; then the text mode (none: no caption at all)."""
    from perco_jax import captioning as cap

    mode, _ = cap.parse_text_mode(text_mode)
    items = list(ds.items)
    missing = [i for i, it in enumerate(items) if not it.caption_source]
    if mode == "none":
        missing = []
        items = [dataclasses.replace(it, caption="", caption_source="none") for it in items]
    if missing and (captioner is not None or cache is not None):
        if captioner is not None and not isinstance(captioner, cap.Captioner):
            captioner = cap.Captioner.load(captioner, trust_remote_code=trust_remote_code,
                                           max_new_tokens=caption_tokens)
        if cache is not None and not isinstance(cache, cap.CaptionCache):
            cache = cap.CaptionCache(cache)
        source = "cache" if captioner is None else "captioner"
        from tqdm.auto import tqdm

        for i in tqdm(missing, disable=not progress or captioner is None, desc=f"captioning ({source})", unit="img"):
            it = items[i]
            try:  # the image as compress sees it: its file (the cache key is the file's pixels), or the scene
                text = cap.resolve_caption(it.path if it.path is not None else ds.load(it), captioner=captioner,
                                           cache=cache, max_new_tokens=caption_tokens)
            except cap.CaptionError:  # (no captioner, and the cache does not hold this image)
                continue
            items[i] = dataclasses.replace(it, caption=text, caption_source=source)
    items = [it if it.caption_source else dataclasses.replace(it, caption="", caption_source="none") for it in items]
    if mode == "truncate":
        toks = codec.prompt_encoder.tokenizers
        tok = toks[2] if toks[2] is not None else toks[0]
        items = [dataclasses.replace(it, caption=cap.apply_text_mode(it.caption, text_mode, tok)) for it in items]
    return dataclasses.replace(ds, items=items)


def _caption_record(ds: Dataset, text_mode: str, identity: dict) -> dict:
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


# ----------------------------------------------------------------------------- the driver

def _setting_dir(guidance: float, steps: int) -> str:
    return f"guidance={guidance:g}_steps={steps}"


def evaluate(codec, data, out_dir, *, metrics_weights: Optional[Mapping] = None, guidance: Optional[float] = None,
             steps: Optional[int] = None, sweep: Optional[Mapping] = None, batch_size: int = 8, resume: bool = True,
             progress: bool = True, seed: int = 0, schedule: Optional[str] = None, size: Optional[int] = None,
             center_crop: bool = False, published: str | os.PathLike | None = None, text_mode: str = "full",
             captions: str | os.PathLike | None = None, captioner=None, caption_cache=None,
             caption_tokens: int = 32, trust_remote_code: bool = False,
             published_protocol: Optional[str] = None) -> dict:
    """Evaluate `codec` (a perco_jax.codec.codec.Codec) on `data` (a spec string or a Dataset) into
    out_dir; returns the summary (for a sweep: {"settings": [summary per setting], "sweep": ...}).
    See the module doc for the outputs, resuming and determinism. `size` / `center_crop` set the
    protocol (a Dataset keeps its own); `published` is the published-points CSV (default:
    perco_jax/eval/published.csv) and `published_protocol` the protocol of its rows to overlay
    (default: the data's, `data_protocol`); `text_mode` (none | full | truncate:N,
    perco_jax.captioning) is applied to every caption before coding, to study the rate split
    between z_g and z_l.

    Captions, as `compress` finds them: the data's own (`captions`: None = the captions files beside
    the images or the scenes' captions, a captions file, or "none"), else the JSONL `caption_cache`,
    else the `captioner` (a local checkpoint folder or a loaded perco_jax.captioning.Captioner;
    `caption_tokens`, `trust_remote_code` as in compress), whose captions go to the cache (default
    OUT/caption_cache.jsonl); an image with none of them is coded with the empty caption, and one
    line says how many were."""
    from perco_jax import captioning

    ds = data if isinstance(data, Dataset) else parse_data(data, size=size, center_crop=center_crop, captions=captions)
    cfg = codec.config
    if ds.kind == "synthetic":
        if ds.size is None:  # drawn at the codec's resolution
            ds = dataclasses.replace(ds, size=int(cfg.image_size))
        if ds.size % codec.grid[0]:
            raise ValueError(f"synthetic scenes at {ds.size}x{ds.size} cannot have the equal-bits thumbnail of the "
                             f"codec's {codec.grid[0]}x{codec.grid[0]} grid: give a size that is a multiple of "
                             f"{codec.grid[0]}")
    captioning.parse_text_mode(text_mode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    default_g = float(cfg.sample.guidance if guidance is None else guidance)
    default_s = int(cfg.sample.steps if steps is None else steps)
    sweep = dict(sweep or {})
    unknown = sorted(set(sweep) - {"guidance", "steps"})
    if unknown:
        raise ValueError(f"unknown sweep keys {unknown}; a sweep takes 'guidance' and / or 'steps' lists")
    gs = [float(g) for g in sweep.get("guidance") or [default_g]]
    ss = [int(s) for s in sweep.get("steps") or [default_s]]
    if any(s < 1 for s in ss):
        raise ValueError(f"steps must be at least 1, got {ss}")
    if captioner is not None and caption_cache is None:
        caption_cache = out / CAPTION_CACHE
    captioner_id = None
    if captioner is not None:
        captioner_id = captioner.name if isinstance(captioner, captioning.Captioner) else \
            captioning.captioner_name(captioner, caption_tokens)
    identity = {"fingerprint": codec.fingerprint.hex(), "data": ds.spec, **ds.protocol(),
                "schedule": schedule or cfg.codec.schedule, "seed": int(seed), "text_mode": text_mode,
                "captions_file": "data" if captions is None else ("none" if str(captions) == "none"
                                                                  else str(Path(captions).expanduser().resolve())),
                "captioner": captioner_id,
                "caption_cache": None if captioner is not None or caption_cache is None
                else str(Path(caption_cache).expanduser().resolve())}
    _check_identity(out / "run.json", identity, resume,
                    "evaluation (codec, data, protocol, schedule, seed, text mode or caption sources)")
    ds = _resolve_captions(ds, codec, text_mode=text_mode, captioner=captioner, cache=caption_cache,
                           caption_tokens=caption_tokens, trust_remote_code=trust_remote_code, progress=progress)
    record = _caption_record(ds, text_mode, identity)
    _write_atomic(out / "run.json", json.dumps({**identity, "caption_sources": record["per_image"]}, indent=2) + "\n")
    if record["note"]:
        print(record["note"], file=sys.stderr, flush=True)
    nets = _networks(metrics_weights or {})
    rows = load_published(published)
    streams_dir = out / "streams"
    kw = dict(seed=int(seed), schedule=schedule, batch_size=batch_size, resume=resume, progress=progress,
              published=rows, captions=record, protocol=published_protocol or data_protocol(ds))
    if not sweep:
        return _evaluate_setting(codec, ds, out, streams_dir, nets, setting={"guidance": gs[0], "steps": ss[0]},
                                 label=ds.kind, **kw)
    summaries = []
    for g, s in itertools.product(gs, ss):
        sub = _setting_dir(g, s)
        summ = _evaluate_setting(codec, ds, out / sub, streams_dir, nets, setting={"guidance": g, "steps": s},
                                 label=f"{ds.kind} {sub}", **kw)
        summ["dir"] = sub
        summaries.append(summ)
    table = [{"guidance": x["guidance"], "steps": x["steps"], "dir": x["dir"], **x["mean"], "fid": x["fid"],
              "kid": x["kid"], "kid_std": x["kid_std"], "miou": x["miou"],
              "psnr_gain_over_thumbnail": x["psnr_gain_over_thumbnail"]} for x in summaries]
    columns = (("guidance", "steps", "dir") + RATE_COLUMNS + IMAGE_METRICS + ("fid", "kid", "kid_std", "miou")
               + SCENE_COLUMNS + ("psnr_gain_over_thumbnail",))
    write_rows(out / "sweep.csv", table, columns)
    series = []
    for s in ss:  # one curve per number of steps, along guidance
        pts = [(t["bpp"], t) for t in table if t["steps"] == s]
        series.append({"label": f"perco-jax steps={s}", "points": pts,
                       "annotate": [f"g={t['guidance']:g}" for t in table if t["steps"] == s]})
    why = plot_rd(out / "rd.png", series, rows, kw["protocol"], title=f"{ds.spec}  sweep")
    why_dp = plot_dp(out / "dp.png", table, title=f"{ds.spec}  distortion-perception")
    combined = {"data": ds.spec, "protocol": ds.protocol(), "num_images": len(ds.items),
                "sweep": {"guidance": gs, "steps": ss}, "settings": summaries, "captions": record,
                "files": {"table": "sweep.csv", "plot": None if why else "rd.png",
                          "dp_plot": None if why_dp else "dp.png"}}
    skipped = {k: v for k, v in (("plot", why), ("dp_plot", why_dp)) if v}
    if skipped:
        combined["skipped"] = skipped
    _write_atomic(out / "summary.json", json.dumps(combined, indent=2, allow_nan=True) + "\n")
    return combined


# ----------------------------------------------------------------------------- CLI

def _run(args) -> int:
    from perco_jax.codec.codec import Codec

    weights = {k: v for k, v in {"lpips_trunk": args.lpips_trunk, "lpips_heads": args.lpips_heads,
                                 "lpips_net": args.lpips_net, "inception": args.inception,
                                 "clip": args.clip, "segmentation": args.segmentation}.items() if v}
    guidance, steps = args.guidance or [], args.steps or []
    sweep = {}
    if len(guidance) > 1 or len(steps) > 1:
        sweep = {k: v for k, v in (("guidance", guidance), ("steps", steps)) if v}
    codec = Codec.load(args.checkpoint)
    result = evaluate(codec, args.data, args.out, metrics_weights=weights,
                      guidance=guidance[0] if len(guidance) == 1 else None,
                      steps=steps[0] if len(steps) == 1 else None, sweep=sweep or None,
                      batch_size=args.batch_size, resume=not args.no_resume, progress=not args.quiet,
                      seed=args.seed, schedule=args.schedule, size=args.size, center_crop=args.center_crop,
                      published=args.published, text_mode=args.text_mode, captions=args.captions,
                      captioner=args.captioner, caption_cache=args.caption_cache, caption_tokens=args.caption_tokens,
                      trust_remote_code=args.trust_remote_code, published_protocol=args.published_protocol)
    for s in result.get("settings", [result]):
        m = s["mean"]
        parts = [f"guidance={s['guidance']:g} steps={s['steps']}", f"bpp={m['bpp']:.5f}"]
        parts += [f"{k}={m[k]:.4f}" for k in IMAGE_METRICS if m.get(k) is not None]
        parts += [f"{k}={s[k]:.4f}" for k in SET_METRICS if s.get(k) is not None]
        print("  ".join(parts))
    first = result.get("settings", [result])[0]
    for k, why in first["skipped"].items():
        print(f"skipped {k}: {why}")
    for text in (format_scene_summary(result), format_kodak_per_image(first.get("kodak_per_image") or [])):
        if text:
            print(text)
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def add_parser(subparsers) -> "argparse.ArgumentParser":  # noqa: F821
    """Register `perco-jax evaluate` on an argparse subparsers object (its fn: `set_defaults(fn=...)`)."""
    p = subparsers.add_parser("evaluate", help="rate-distortion-perception of a codec on an image set "
                                               "(per-image CSV, summary JSON, plots)")
    p.add_argument("--checkpoint", required=True, help="codec folder (perco-jax export / demo/checkpoint)")
    p.add_argument("--data", required=True, help="kodak:DIR, folder:DIR, coco30k:FILELIST (a text file of image "
                                                 "paths; resized to 512x512) or synthetic:N[:SEED] (N built-in "
                                                 f"scenes, default seed {SYNTHETIC_SEED}, with scene metrics)")
    p.add_argument("--out", required=True, help="results folder (rerunning into it resumes)")
    p.add_argument("--lpips-trunk", help="torchvision AlexNet / VGG16 weights (.pth / .safetensors) for LPIPS")
    p.add_argument("--lpips-heads", help="the lpips package's linear heads (weights/v0.1/alex.pth or vgg.pth)")
    p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"), help="LPIPS trunk (default alex)")
    p.add_argument("--clip", help="a local transformers CLIPModel folder for the CLIP score")
    p.add_argument("--segmentation", help="a local transformers segmentation checkpoint (SegFormer, UperNet, "
                                          "Mask2Former, ...) for mIoU")
    p.add_argument("--inception", help="FID InceptionV3 weights (pt_inception-2015-12-05 or torchvision's) for FID / KID")
    p.add_argument("--guidance", type=float, nargs="+", metavar="G",
                   help="guidance scale(s); several values sweep them (default: the codec config's)")
    p.add_argument("--steps", type=int, nargs="+", metavar="N",
                   help="sampler step count(s); several values sweep them (default: the codec config's)")
    p.add_argument("--center-crop", action="store_true", help="crop the largest centred square first")
    p.add_argument("--size", type=int, help="resize every image to SIZE x SIZE (bicubic; default: native, "
                                            f"{COCO30K_SIZE} for coco30k, the codec's for synthetic)")
    p.add_argument("--batch-size", type=int, default=8, help="images per compress / decompress step (default 8)")
    p.add_argument("--schedule", help="masking schedule spec for the indices (default: the codec's)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's noise seed")
    p.add_argument("--text-mode", default="full", help="captions as z_g: full, none (empty prompt) or "
                                                       "truncate:N (first N tokens)")
    p.add_argument("--captions", help="a captions file (.jsonl / .csv, paths relative to it) instead of those "
                                      "beside the images, or 'none' to use no captions from the data")
    p.add_argument("--captioner", help="a local captioner checkpoint folder (BLIP-2, or Molmo-style with "
                                       "--trust-remote-code) for images without a caption, as compress")
    p.add_argument("--caption-cache", help="JSONL caption cache (read, and extended by the captioner; default with "
                                           f"--captioner: OUT/{CAPTION_CACHE})")
    p.add_argument("--caption-tokens", type=int, default=32, help="the captioner's token budget (PerCo: 32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a captioner that ships its own code")
    p.add_argument("--published", help="CSV of published operating points to overlay (default: perco_jax/eval/"
                                       "published.csv)")
    p.add_argument("--published-protocol", help="overlay the published rows of this protocol (e.g. "
                                                "clic2020-full:ms-illm for folder:CLIC2020; default: the data's, "
                                                "coco30k-512 or kodak-full)")
    p.add_argument("--no-resume", action="store_true", help="recompute every image and overwrite the results")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_run)
    return p
