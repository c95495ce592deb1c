"""The published reference points (published.csv: method, dataset, protocol, bpp and metrics, how
each value was read, its source): loading, selecting one protocol's points, and Kodak's
per-image rates next to ours."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

PUBLISHED_CSV = Path(__file__).with_name("published.csv")
PUBLISHED_COLUMNS = ("method", "dataset", "resolution", "protocol", "image", "bpp", "psnr", "ms_ssim", "lpips",
                     "dists", "fid", "kid", "clip_score", "miou", "exactness", "source")
PUBLISHED_TEXT = ("method", "dataset", "resolution", "protocol", "image", "exactness", "source")
EXACTNESS = ("table", "figure")  # verbatim from a table / results file, or read from a plot (uncertainty in source)


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


def published_for(published: Sequence[dict], protocol: str) -> list[dict]:
    """The averaged published points (not per-image rows) of one protocol."""
    return [r for r in published if r.get("protocol") == protocol and not r.get("image")]


def published_label(row: dict) -> str:
    """Legend text of a published series: method, source (its first word: the repository or paper),
    and how it was read."""
    how = "read from a figure" if row["exactness"] == "figure" else "table"
    return f"{row['method']} ({row['source'].split()[0].rstrip(',;')}, {how})"


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
