"""The evaluation's plots (matplotlib, Agg): rd.png (bpp against each metric, published points of
one protocol overlaid; also a prefix sweep's prefix.png) and dp.png (a sweep's distortion-perception
trade-off). Each returns None when written, else why not."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

from perco_jax.eval.published import published_for, published_label

PLOT_METRICS = ("psnr", "ms_ssim", "lpips", "clip_score", "fid", "kid", "miou")
LABELS = {"psnr": "PSNR (dB) ↑", "ms_ssim": "MS-SSIM ↑", "lpips": "LPIPS ↓", "clip_score": "CLIP score ↑",
          "fid": "FID ↓", "kid": "KID ↓", "miou": "mIoU ↑", "colours_present": "colours present ↑",
          "shape_iou": "shape IoU ↑"}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def plot_rd(path: Path, series: Sequence[dict], published: Sequence[dict], protocol: str,
            title: str = "", *, metrics: Sequence[str] = PLOT_METRICS, levels: Sequence[dict] = (),
            log_x: bool = True) -> Optional[str]:
    """bpp (log x; linear with log_x=False) against each of `metrics` (keys of LABELS) that has a
    value. `series`: [{label, points: [(bpp, {metric: v})], annotate: [str] | None, scatter: bool}].
    The published rows of `protocol` only (never two protocols on one axis) are overlaid, one series
    per method and source, named in the legend: filled markers for table values, hollow for values
    read from a figure, a dotted level for a row without bpp. `levels`: [{label, values: {metric: v}}],
    references drawn as dash-dotted levels (e.g. the equal-bits thumbnail). Returns None when
    written, else why not."""
    mpl = _matplotlib()
    if mpl is None:
        return "matplotlib is not installed (pip install matplotlib)"
    pub = published_for(published, protocol)
    shown = [m for m in metrics
             if any(v.get(m) is not None and math.isfinite(v[m]) for s in series for _, v in s["points"])]
    if not shown:
        return "no metric values to plot"
    groups: dict = {}  # one published series per (method, source, exactness), a colour each
    for r in pub:
        groups.setdefault((r["method"], r["source"], r["exactness"]), []).append(r)
    colour = {key: f"C{(len(series) + i) % 10}" for i, key in enumerate(groups)}
    level_colour = [f"C{(len(series) + len(groups) + i) % 10}" for i in range(len(levels))]
    legend: dict = {}  # label -> handle, over all panels (a source may have values on some metrics only)
    fig, axes = panels(mpl, len(shown))
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
            label = published_label(rows[0])
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
        for level, c in zip(levels, level_colour):
            v = level["values"].get(m)
            if v is not None and math.isfinite(v):
                legend.setdefault(level["label"], ax.axhline(v, ls="-.", color=c))
        ax.set_xscale("log" if log_x else "linear")
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


def panels(mpl, n: int):
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
    fig, axes = panels(mpl, len(shown))
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
