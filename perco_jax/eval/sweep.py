"""Sweeps of one evaluation, each setting in its own subfolder of the output folder:

  over guidance and step counts   OUT/guidance=G_steps=S/, and the combined OUT/summary.json,
                                  OUT/sweep.csv, OUT/rd.png (one point per setting) and OUT/dp.png
                                  (mean PSNR against FID / KID / LPIPS)
  over stream prefixes            OUT/groups=K/ (the first K index groups of the masking schedule
                                  sent), and the combined OUT/summary.json, OUT/prefix.csv and
                                  OUT/prefix.png (the prefix's rate-quality curve)
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Mapping, Optional, Sequence

from perco_jax.eval.plots import plot_dp, plot_rd
from perco_jax.eval.results import IMAGE_METRICS, RATE_COLUMNS, SCENE_COLUMNS, write_atomic, write_rows

PREFIX_METRICS = ("psnr", "colours_present", "shape_iou")  # prefix.png's panels (those that have values)


def setting_dir(guidance: float, steps: int) -> str:
    """A setting's subfolder of the output folder."""
    return f"guidance={guidance:g}_steps={steps}"


def setting_label(setting: Mapping) -> str:
    """A setting (or its summary) in one line: "guidance=G steps=S temperature=T", and for a prefix
    "groups=K fill_temperature=F" before it."""
    text = f"guidance={setting['guidance']:g} steps={setting['steps']} temperature={setting['temperature']:g}"
    if setting.get("groups") is not None:
        text = f"groups={setting['groups']} fill_temperature={setting['fill_temperature']:g} {text}"
    return text


def prefix_dir(groups: int) -> str:
    """A prefix's subfolder of the output folder."""
    return f"groups={groups}"


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


def prefix_groups(groups: Sequence[int], num_groups: int) -> list[int]:
    """The group counts K of a prefix sweep, ascending; ValueError unless they are whole numbers in
    0..num_groups (the schedule's S), at least one, without duplicates."""
    ks = list(groups)
    if not ks:
        raise ValueError("groups: give at least one number of index groups K to send")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= num_groups]
    if bad:
        raise ValueError(f"groups {bad}: each K must be a whole number of index groups in 0..{num_groups} "
                         f"(the schedule has {num_groups})")
    dup = sorted({int(k) for k in ks if ks.count(k) > 1})
    if dup:
        raise ValueError(f"groups {dup} given more than once")
    return sorted(int(k) for k in ks)


def _table(summaries: Sequence[dict], keys: tuple) -> tuple[list[dict], tuple]:
    """(rows, columns) of a sweep's table: per setting (a summary with its "dir") its `keys`, its
    folder, the means and the set metrics."""
    rows = [{**{k: x[k] for k in keys}, "dir": x["dir"], **x["mean"], "fid": x["fid"], "kid": x["kid"],
             "kid_std": x["kid_std"], "miou": x["miou"], "psnr_gain_over_thumbnail": x["psnr_gain_over_thumbnail"]}
            for x in summaries]
    columns = (keys + ("dir",) + RATE_COLUMNS + IMAGE_METRICS + ("fid", "kid", "kid_std", "miou")
               + SCENE_COLUMNS + ("psnr_gain_over_thumbnail",))
    return rows, columns


def _combined(out: Path, ds, summaries: Sequence[dict], captions: dict, sweep: dict, files: dict) -> dict:
    """The combined summary.json of a sweep (written to `out`, returned); `files`: {key: (file, why
    not written or None)}."""
    combined = {"data": ds.spec, "protocol": ds.protocol(), "num_images": len(ds.items), **sweep,
                "settings": list(summaries), "captions": captions,
                "files": {k: None if why else f for k, (f, why) in files.items()}}
    skipped = {k: why for k, (_, why) in files.items() if why}
    if skipped:
        combined["skipped"] = skipped
    write_atomic(out / "summary.json", json.dumps(combined, indent=2, allow_nan=True) + "\n")
    return combined


def write_sweep(out: Path, ds, summaries: Sequence[dict], gs: Sequence[float], ss: Sequence[int],
                published: Sequence[dict], protocol: str, captions: dict) -> dict:
    """The combined results of a sweep's settings (their summaries, each with its "dir") in `out`:
    sweep.csv, rd.png, dp.png and summary.json, which is returned. `ds` is the evaluated Dataset."""
    table, columns = _table(summaries, ("guidance", "steps"))
    write_rows(out / "sweep.csv", table, columns)
    series = []
    for s in ss:  # one curve per number of steps, along guidance
        pts = [(t["bpp"], t) for t in table if t["steps"] == s]
        series.append({"label": f"perco-jax steps={s}", "points": pts,
                       "annotate": [f"g={t['guidance']:g}" for t in table if t["steps"] == s]})
    why = plot_rd(out / "rd.png", series, published, protocol, title=f"{ds.spec}  sweep")
    why_dp = plot_dp(out / "dp.png", table, title=f"{ds.spec}  distortion-perception")
    return _combined(out, ds, summaries, captions, {"sweep": {"guidance": list(gs), "steps": list(ss)}},
                     {"table": ("sweep.csv", None), "plot": ("rd.png", why), "dp_plot": ("dp.png", why_dp)})


def write_prefix(out: Path, ds, summaries: Sequence[dict], prefix: dict, published: Sequence[dict], protocol: str,
                 captions: dict) -> dict:
    """The combined results of a prefix sweep (the summaries of its group counts, ascending, each
    with its "dir") in `out`: prefix.csv (one row per K), prefix.png (mean bpp against PSNR, colours
    present and shape IoU, one point per K, the equal-bits thumbnail as a level) and summary.json,
    which is returned. `prefix`: {"groups": [K...], "num_groups": S, "fill_temperature": T, ...}."""
    table, columns = _table(summaries, ("groups",))
    write_rows(out / "prefix.csv", table, columns)
    mean, scene = summaries[0]["mean"], summaries[0].get("scene")
    levels = []
    if scene:  # (the thumbnail is the same for every K)
        levels.append({"label": f"equal-bits thumbnail ({scene['thumbnail']['bits']:.0f} bits)",
                       "values": {m: mean.get(f"thumb_{m}") for m in PREFIX_METRICS}})
    series = [{"label": f"perco-jax, first K of {prefix['num_groups']} index groups",
               "points": [(t["bpp"], t) for t in table], "annotate": [f"K={t['groups']}" for t in table]}]
    # (linear x: the prefixes of one codec span a narrow range of bpp, the caption's bits shared by all)
    why = plot_rd(out / "prefix.png", series, published, protocol, metrics=PREFIX_METRICS, levels=levels, log_x=False,
                  title=f"{ds.spec}  stream prefixes (unsent indices filled at temperature "
                        f"{prefix['fill_temperature']:g})")
    return _combined(out, ds, summaries, captions, {"prefix": dict(prefix)},
                     {"table": ("prefix.csv", None), "plot": ("prefix.png", why)})
