"""A sweep over guidance and step counts: the settings, each one's subfolder OUT/guidance=G_steps=S/,
and the combined OUT/summary.json, OUT/sweep.csv, OUT/rd.png (one point per setting) and OUT/dp.png
(mean PSNR against FID / KID / LPIPS)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from perco_jax.eval.plots import plot_dp, plot_rd
from perco_jax.eval.results import IMAGE_METRICS, RATE_COLUMNS, SCENE_COLUMNS, write_atomic, write_rows


def setting_dir(guidance: float, steps: int) -> str:
    """A setting's subfolder of the output folder."""
    return f"guidance={guidance:g}_steps={steps}"


def sweep_settings(sweep: Optional[Mapping], guidance: float, steps: int) -> tuple[list[float], list[int]]:
    """(guidance values, step counts) of a sweep {"guidance": [...], "steps": [...]} (either may be
    missing: the single `guidance` / `steps` then); ValueError for other keys or steps < 1."""
    sweep = dict(sweep or {})
    unknown = sorted(set(sweep) - {"guidance", "steps"})
    if unknown:
        raise ValueError(f"unknown sweep keys {unknown}; a sweep takes 'guidance' and / or 'steps' lists")
    gs = [float(g) for g in sweep.get("guidance") or [guidance]]
    ss = [int(s) for s in sweep.get("steps") or [steps]]
    if any(s < 1 for s in ss):
        raise ValueError(f"steps must be at least 1, got {ss}")
    return gs, ss


def write_sweep(out: Path, ds, summaries: Sequence[dict], gs: Sequence[float], ss: Sequence[int],
                published: Sequence[dict], protocol: str, captions: dict) -> dict:
    """The combined results of a sweep's settings (their summaries, each with its "dir") in `out`:
    sweep.csv, rd.png, dp.png and summary.json, which is returned. `ds` is the evaluated Dataset."""
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
    why = plot_rd(out / "rd.png", series, published, protocol, title=f"{ds.spec}  sweep")
    why_dp = plot_dp(out / "dp.png", table, title=f"{ds.spec}  distortion-perception")
    combined = {"data": ds.spec, "protocol": ds.protocol(), "num_images": len(ds.items),
                "sweep": {"guidance": list(gs), "steps": list(ss)}, "settings": list(summaries), "captions": captions,
                "files": {"table": "sweep.csv", "plot": None if why else "rd.png",
                          "dp_plot": None if why_dp else "dp.png"}}
    skipped = {k: v for k, v in (("plot", why), ("dp_plot", why_dp)) if v}
    if skipped:
        combined["skipped"] = skipped
    write_atomic(out / "summary.json", json.dumps(combined, indent=2, allow_nan=True) + "\n")
    return combined
