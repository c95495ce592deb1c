"""An evaluation's files: the per_image.csv columns, CSV rows written and read back, their means,
atomic writes, and the identity files (run.json, setting.json) that a resumed run must match."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from perco_jax.eval.scenes import SCENE_SCORES

IMAGE_METRICS = ("psnr", "ms_ssim", "lpips", "clip_score")
# synthetic data only: the reconstruction's scene scores (perco_jax.eval.scenes), then the equal-bits
# thumbnail baseline's PSNR and scene scores
SCENE_COLUMNS = SCENE_SCORES + ("thumb_psnr",) + tuple(f"thumb_{m}" for m in SCENE_SCORES)
CSV_COLUMNS = ("name", "height", "width", "bytes", "bpp", "bpp_caption", "bpp_indices", "bpp_container",
               *IMAGE_METRICS, *SCENE_COLUMNS, "caption", "caption_source")
RATE_COLUMNS = ("bytes", "bpp", "bpp_caption", "bpp_indices", "bpp_container")
SET_METRICS = ("fid", "kid", "miou")
IDENTITY_DEFAULTS = {"captions_file": "data", "captioner": None, "caption_cache": None, "temperature": 1.0,
                     "groups": None, "fill_temperature": 0.0}


def write_atomic(path: Path, text: str) -> None:
    """Write `text` beside `path`, then rename: a reader (or a resumed run) never sees half a file."""
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
    write_atomic(path, buf.getvalue())


def column_means(rows: Sequence[dict], columns: Sequence[str]) -> dict:
    """{column: the mean of the rows' values that are not None (None when none is)} (an absent or
    None value is a metric not computed for that row)."""
    out = {}
    for c in columns:
        vals = [r[c] for r in rows if r.get(c) is not None]
        out[c] = float(np.mean(vals)) if vals else None
    return out


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


def check_identity(path: Path, want: dict, resume: bool, what: str) -> None:
    """Write `want` to path; with resume, a different stored identity is an error."""
    have = _read_json(path) if resume and path.exists() else None
    if isinstance(have, dict):  # caption_sources is a record, not identity; results written before the
        # caption-source keys (or a setting's temperature, the prefix groups) existed used what their defaults mean
        have = {**{k: v for k, v in IDENTITY_DEFAULTS.items() if k in want},
                **{k: v for k, v in have.items() if k != "caption_sources"}}
    if have is not None and have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ValueError(f"{path.parent} holds results of another {what} (differs in {', '.join(diff)}: "
                         f"{ {k: have.get(k) for k in diff} } vs { {k: want.get(k) for k in diff} }); "
                         "give another output folder, or resume=False (--no-resume) to recompute and overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(want, indent=2) + "\n")
