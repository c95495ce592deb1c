"""The evaluation driver: rate-distortion-perception of a trained codec on an image set.

    evaluate(codec, "kodak:DIR" | "folder:DIR" | "coco30k:FILELIST", out_dir,
             metrics_weights={...}, guidance=None, steps=None, temperature=None, sweep=None,
             groups=None, fill_temperature=0.0) -> summary dict
    perco-jax evaluate --checkpoint W --data SPEC --out DIR [...]     (perco_jax.eval.command)

Every image goes through the real bitstream: it is compressed (`Codec.compress_batch`, caption
included), the stream is written to OUT/streams/NAME.perco, and the reconstruction is decoded from
those bytes. bpp = 8 * stream bytes / (H * W) of the evaluated image, split into caption, indices
and container (`rate_split`).

Data specs (kodak:DIR, folder:DIR, coco30k:FILELIST, synthetic:N[:SEED]), the protocol that
prepares each image, and where captions come from: perco_jax.eval.datasets.

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
  colours_present, realism, background_right, shape_iou   synthetic data only: the scene scores
            of the reconstruction (perco_jax.eval.scenes; shape_iou against the original), the
            built-in set's perception and semantics measures; thumb_psnr, thumb_colours_present,
            thumb_realism, thumb_background_right, thumb_shape_iou: the same for the equal-bits
            thumbnail (`scenes.thumbnail_baseline` at the codec's grid_side and codebook_size: the
            bits of the uniformly coded indices spent on pixels). summary.json has their means,
            `psnr_gain_over_thumbnail` (mean PSNR - mean thumb_psnr) and a `scene` block (the
            thumbnail's bits, the originals' scene scores, and PSNR and scene scores of the
            originals through the codec's learned autoencoder alone: the ceiling of the flow
            model's latents);
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

Prefix sweeps: groups=[K1, K2, ...] evaluates the stream prefixes of one setting: for each K (a
whole number in 0..S, S = `Codec.num_groups(schedule)`) only the first K index groups of the masking
schedule are sent (`Codec.compress_batch(..., groups=K)`; K = S is the full stream) and the decoder
predicts the rest with the entropy model (argmax at fill_temperature 0, sampled above). Each K goes
into its own subfolder OUT/groups=K/ (the files above, and its own OUT/groups=K/streams: the streams
differ per K), then a combined OUT/summary.json, OUT/prefix.csv (one row per K, ascending) and
OUT/prefix.png (mean bpp against PSNR, colours present and shape IoU, one point per K, the
equal-bits thumbnail as a level). A prefix sweep does not combine with a guidance / steps sweep.

Resuming (resume=True): an image whose row is in per_image.csv and whose reconstruction PNG exists
is skipped, and saved bitstreams are reused; OUT/run.json (codec fingerprint, data, protocol,
schedule, seed, prefix groups, fill temperature) and each setting's setting.json (guidance, steps,
temperature; a prefix's K and fill temperature) must match the new run, otherwise
ValueError (use another out_dir, or resume=False to recompute and overwrite).

Determinism: `Codec.decompress_batch` draws an image's sampler noise from (seed, CRC of its
stream), so a reconstruction depends only on the codec, the stream and the seed: not on
batch_size, on resuming, or on the other settings of a sweep.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from perco_jax import build
from perco_jax.eval import metrics
from perco_jax.eval.datasets import Dataset, Item, caption_record, data_protocol, parse_data, resolve_captions
from perco_jax.eval.networks import Networks, load_networks
from perco_jax.eval.plots import plot_rd
from perco_jax.eval.published import kodak_per_image, load_published, published_for
from perco_jax.eval.results import (IMAGE_METRICS, RATE_COLUMNS, SCENE_COLUMNS, check_identity, column_means,
                                    read_rows, write_atomic, write_rows)
from perco_jax.eval.scenes import SCENE_SCORES
from perco_jax.eval.sweep import (prefix_dir, prefix_groups, setting_dir, setting_label, sweep_settings, write_prefix,
                                  write_sweep)

CAPTION_CACHE = "caption_cache.jsonl"  # in the output folder, when a captioner is given without a cache
MS_SSIM_MIN_SIDE = (metrics.SSIM_WINDOW - 1) * 2 ** (len(metrics.MS_SSIM_WEIGHTS) - 1)  # 160: sides must exceed it


# ----------------------------------------------------------------------------- one setting

def quantise(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] float -> the same at 8-bit values k / 255 in [0, 1], as the saved PNG reads back."""
    return np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0) / 255.0


def _image_metrics(original: np.ndarray, recon: np.ndarray, nets: Networks, caption: str = "") -> dict:
    a, b = original[None], recon[None]
    out = {"psnr": metrics.image_psnr(original, recon), "ms_ssim": None, "lpips": None, "clip_score": None}
    if nets.clip is not None and caption:
        out["clip_score"] = float(nets.clip([recon], [caption])[0])
    if min(original.shape[:2]) > MS_SSIM_MIN_SIDE:
        out["ms_ssim"] = float(np.asarray(metrics.ms_ssim(a, b))[0])
    if nets.lpips is not None and nets.lpips_fits(*original.shape[:2]):
        out["lpips"] = float(np.asarray(nets.lpips(a, b))[0])
    return out


def _scene_metrics(original: np.ndarray, recon: np.ndarray, scene, grid_side: int, codebook_size: int) -> dict:
    """SCENE_COLUMNS of a synthetic item (original, recon [H, W, 3] in [0, 1]): the reconstruction's
    scene scores, and the PSNR and scene scores of the equal-bits thumbnail of the original (8-bit, as
    a saved reconstruction)."""
    from perco_jax.eval import scenes

    thumb = quantise(scenes.thumbnail_baseline(original, grid_side, codebook_size))
    out = scenes.scene_scores(original, recon, scene)
    out["thumb_psnr"] = metrics.image_psnr(original, thumb)
    out.update({f"thumb_{k}": v for k, v in scenes.scene_scores(original, thumb, scene).items()})
    return out


def _rate(stream: bytes) -> dict:
    from perco_jax.codec.codec import rate_split

    r = rate_split(stream)
    per = 8.0 / r["pixels"]
    return {"bytes": r["total"], "bpp": r["total"] * per, "bpp_caption": r["caption"] * per,
            "bpp_indices": r["indices"] * per, "bpp_container": r["container"] * per}


def _streams(codec, items: Sequence[Item], images: Sequence[np.ndarray], streams_dir: Path,
             schedule: Optional[str], reuse: bool, groups: Optional[int] = None) -> list[bytes]:
    """The bitstreams of `items` (read from streams_dir when saved and `reuse`, else compressed and
    saved): the full streams, or (groups=K) the streams of the first K index groups."""
    out: list = [None] * len(items)
    todo = []
    for i, it in enumerate(items):
        f = streams_dir / f"{it.name}.perco"
        if reuse and f.is_file():
            out[i] = f.read_bytes()
        else:
            todo.append(i)
    if todo:
        new = codec.compress_batch([images[i] for i in todo], [items[i].caption for i in todo], schedule=schedule,
                                   groups=groups)
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


def _set_metrics(ds: Dataset, recon_dir: Path, nets: Networks, batch_size: int, summary: dict) -> None:
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


def _summarise(ds: Dataset, rows: Sequence[dict], nets: Networks, setting: dict, codec, seed: int,
               schedule: Optional[str]) -> dict:
    n = len(rows)
    columns = RATE_COLUMNS + IMAGE_METRICS + SCENE_COLUMNS
    mean = column_means(rows, columns)
    count = {c: sum(r.get(c) is not None for r in rows) for c in columns}
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
    """The synthetic set's scene block: the thumbnail baseline's bits, the originals' scene scores
    (the ceiling: anti-aliased edges keep realism just under 1; shape IoU 1), the PSNR gain over the
    thumbnail, and `autoencoder`: PSNR and scene scores of the originals through the codec's learned
    autoencoder alone (`Codec.autoencode`, 8-bit as a saved reconstruction): the ceiling of any latent
    the flow model draws (None for a space-to-depth codec, whose autoencoder is exact)."""
    from perco_jax.codec.codec import prepare_image
    from perco_jax.eval import scenes
    from perco_jax.images import resize

    g, k = codec.grid[0], int(codec.config.codec.codebook_size)
    levels = scenes.thumbnail_levels(k)
    images = [ds.load(it) for it in ds.items]
    originals = [scenes.scene_scores(im, im, it.scene) for im, it in zip(images, ds.items)]
    gain = None if mean.get("psnr") is None or mean.get("thumb_psnr") is None else mean["psnr"] - mean["thumb_psnr"]
    ae = None
    if codec.ae_params and images:
        size = int(codec.config.image_size)
        rt = codec.autoencode(np.stack([prepare_image(im, size) for im in images]))
        rt = [quantise(resize(r, *im.shape[:2])) for r, im in zip(rt, images)]
        rows = [{"psnr": metrics.image_psnr(im, r), **scenes.scene_scores(im, r, it.scene)}
                for im, r, it in zip(images, rt, ds.items)]
        ae = column_means(rows, ("psnr",) + SCENE_SCORES)
    return {"thumbnail": {"grid_side": g, "levels_per_channel": levels,
                          "bits": g * g * 3 * math.log2(levels), "index_bits_uniform": build.uniform_index_bits(g * g, k)},
            "originals": column_means(originals, SCENE_SCORES),
            "autoencoder": ae, "psnr_gain_over_thumbnail": gain}


def format_scene_summary(summary: dict) -> str:
    """The scene scores of a synthetic evaluation (a summary from `evaluate`, one setting or a sweep)
    as a small text table: the codec per setting (per K of a prefix sweep), the equal-bits thumbnail,
    the learned autoencoder alone (when there is one), the originals. "" for other data."""
    settings = summary.get("settings", [summary])
    if not settings or not settings[0].get("scene"):
        return ""
    first = settings[0]
    rows = []

    def row(label, bpp, psnr, vals):
        # (3 decimals: the targets sit at 0.90 / 0.95, which 2 would round across)
        cells = "".join(f"{'–' if v is None else f'{v:.3f}':>{w}}" for v, w in zip(vals, (17, 9, 18, 11)))
        rows.append((label, f"{'' if bpp is None else f'{bpp:.4f}':>8}{'–' if psnr is None else f'{psnr:.2f}':>8}"
                            + cells))

    for s in settings:
        m = s["mean"]
        what = f"guidance {s['guidance']:g}, {s['steps']} steps, T {s.get('temperature', 1.0):g}"
        if s.get("groups") is not None:  # a prefix sweep's K
            what = f"{s['groups']} groups, {what}"
        row(f"codec ({what})", m.get("bpp"), m.get("psnr"), [m.get(k) for k in SCENE_SCORES])
    t = first["scene"]["thumbnail"]
    m = first["mean"]
    side = (first.get("protocol") or {}).get("size")
    row(f"thumbnail {t['grid_side']}x{t['grid_side']}, {t['bits']:.0f} bits", side and t["bits"] / side ** 2,
        m.get("thumb_psnr"),
        [m.get(f"thumb_{k}") for k in SCENE_SCORES])
    # (the autoencoder row and shape IoU are absent from summaries written before they were measured)
    ae = first["scene"].get("autoencoder")
    if ae:
        row("autoencoder alone (the ceiling)", None, ae["psnr"], [ae.get(k) for k in SCENE_SCORES])
    row("originals", None, None, [first["scene"]["originals"].get(k) for k in SCENE_SCORES])
    width = max(36, max(len(label) + 1 for label, _ in rows))
    lines = [f"  {'':<{width}}{'bpp':>8}{'PSNR':>8}{'colours present':>17}{'realism':>9}{'background right':>18}"
             f"{'shape IoU':>11}"]
    lines += [f"  {label:<{width}}{cells}" for label, cells in rows]
    gains = ", ".join("–" if s["psnr_gain_over_thumbnail"] is None else f"{s['psnr_gain_over_thumbnail']:+.2f} dB"
                      for s in settings)
    lines.append(f"  PSNR gain over the thumbnail: {gains} ({first['num_images']} scenes of {first['data']}; "
                 f"the thumbnail spends {t['bits']:.0f} bits, the indices {t['index_bits_uniform']:.0f} coded uniformly)")
    return "\n".join(lines)


def _evaluate_setting(codec, ds: Dataset, out: Path, streams_dir: Path, nets: Networks, *, setting: dict,
                      seed: int, schedule: Optional[str], batch_size: int, resume: bool, progress: bool,
                      published: list, label: str, captions: dict, protocol: str) -> dict:
    from perco_jax.images import save_image

    check_identity(out / "setting.json", setting, resume, "guidance / steps / temperature (/ groups) setting")
    recon_dir = out / "recon"
    recon_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out / "per_image.csv"
    rows: dict[str, dict] = {}
    if resume and csv_path.is_file():
        names = {it.name for it in ds.items}
        # rows written before a scene column existed lack it: redo them (shape IoU may be empty: see
        # scenes.shape_iou, so only its column must be there)
        need = SCENE_COLUMNS if ds.kind == "synthetic" else ()
        rows = {r["name"]: r for r in read_rows(csv_path)
                if r["name"] in names and (recon_dir / f"{r['name']}.png").is_file()
                and all(c in r and (r[c] is not None or c in ("shape_iou", "thumb_shape_iou")) for c in need)}
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
            streams = _streams(codec, items, images, streams_dir, schedule, reuse=resume, groups=setting.get("groups"))
            recons = codec.decompress_batch(streams, steps=setting["steps"], guidance=setting["guidance"], seed=seed,
                                            temperature=setting["temperature"],
                                            fill_temperature=setting.get("fill_temperature", 0.0))
            new = 0
            for it, image, stream, recon in zip(items, images, streams, recons):
                if it.name in rows:
                    continue
                recon = quantise(recon)
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
                  published, protocol, title=f"{ds.spec}  {setting_label(setting)}")
    summary["files"] = {"per_image": "per_image.csv", "recon": "recon/", "streams": os.path.relpath(streams_dir, out),
                        "plot": None if why else "rd.png"}
    if why:
        summary["skipped"]["plot"] = why
    summary["published_protocol"] = protocol
    summary["published_points"] = len(published_for(published, protocol))
    if ds.kind == "kodak":
        summary["kodak_per_image"] = kodak_per_image(ordered, published)
    summary["captions"] = captions
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return summary


# ----------------------------------------------------------------------------- the driver

def evaluate(codec, data, out_dir, *, metrics_weights: Optional[Mapping] = None, guidance: Optional[float] = None,
             steps: Optional[int] = None, sweep: Optional[Mapping] = None, batch_size: int = 8, resume: bool = True,
             progress: bool = True, seed: int = 0, schedule: Optional[str] = None, size: Optional[int] = None,
             temperature: Optional[float] = None,
             center_crop: bool = False, published: str | os.PathLike | None = None, text_mode: str = "full",
             captions: str | os.PathLike | None = None, captioner=None, caption_cache=None,
             caption_tokens: int = 32, trust_remote_code: bool = False,
             published_protocol: Optional[str] = None, groups: Optional[Sequence[int]] = None,
             fill_temperature: float = 0.0) -> dict:
    """Evaluate `codec` (a perco_jax.codec.codec.Codec) on `data` (a spec string or a Dataset) into
    out_dir; returns the summary (for a sweep: {"settings": [summary per setting], "sweep": ...}; for
    a prefix sweep: {"settings": [summary per K], "prefix": ...}). See the module doc for the
    outputs, resuming and determinism. `groups` [K, ...] makes it a prefix sweep (whole numbers in
    0..S, no duplicates; with a guidance / steps `sweep`: ValueError), its unsent indices predicted at
    `fill_temperature` (>= 0; only with `groups`). `size` / `center_crop` set the protocol (a Dataset
    keeps its own); `published` is the published-points CSV (default: perco_jax/eval/published.csv)
    and `published_protocol` the protocol of its rows to overlay (default: the data's,
    `data_protocol`); `text_mode` (none | full | truncate:N, perco_jax.captions.text_modes) is applied
    to every caption before coding, to study the rate split between z_g and z_l.

    Captions, as `compress` finds them: the data's own (`captions`: None = the captions files beside
    the images or the scenes' captions, a captions file, or "none"), else the JSONL `caption_cache`,
    else the `captioner` (a local checkpoint folder or a loaded perco_jax.captions.captioner.Captioner;
    `caption_tokens`, `trust_remote_code` as in compress), whose captions go to the cache (default
    OUT/caption_cache.jsonl); an image with none of them is coded with the empty caption, and one
    line says how many were."""
    from perco_jax.captions import captioner as captioning, text_modes

    ds = data if isinstance(data, Dataset) else parse_data(data, size=size, center_crop=center_crop, captions=captions)
    cfg = codec.config
    if ds.kind == "synthetic":
        if ds.size is None:  # drawn at the codec's resolution
            ds = dataclasses.replace(ds, size=int(cfg.image_size))
        if ds.size % codec.grid[0]:
            raise ValueError(f"synthetic scenes at {ds.size}x{ds.size} cannot have the equal-bits thumbnail of the "
                             f"codec's {codec.grid[0]}x{codec.grid[0]} grid: give a size that is a multiple of "
                             f"{codec.grid[0]}")
    text_modes.parse_text_mode(text_mode)
    default_g = float(cfg.sample.guidance if guidance is None else guidance)
    default_s = int(cfg.sample.steps if steps is None else steps)
    temp = float(cfg.sample.temperature if temperature is None else temperature)
    if not temp >= 0:
        raise ValueError(f"temperature={temperature!r}: need a number >= 0")
    gs, ss = sweep_settings(sweep, default_g, default_s)
    fill = float(fill_temperature)
    if not fill >= 0:
        raise ValueError(f"fill_temperature={fill_temperature!r}: need a number >= 0")
    prefix = None
    if groups is not None:
        if sweep:
            raise ValueError("groups (a prefix sweep) does not combine with a guidance / steps sweep: give one "
                             "guidance and one step count, or sweep them without groups")
        num_groups = codec.num_groups(schedule)
        prefix = {"groups": prefix_groups(groups, num_groups), "num_groups": num_groups, "fill_temperature": fill}
    elif fill != 0:
        raise ValueError(f"fill_temperature={fill:g} predicts the indices a stream prefix leaves out: it needs groups "
                         "(every index is sent otherwise)")
    out = Path(out_dir)  # (made once the arguments are checked)
    out.mkdir(parents=True, exist_ok=True)
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
                else str(Path(caption_cache).expanduser().resolve()),
                "groups": None if prefix is None else prefix["groups"], "fill_temperature": fill}
    check_identity(out / "run.json", identity, resume,
                   "evaluation (codec, data, protocol, schedule, seed, text mode, caption sources, groups or "
                   "fill temperature)")
    ds = resolve_captions(ds, codec, text_mode=text_mode, captioner=captioner, cache=caption_cache,
                          caption_tokens=caption_tokens, trust_remote_code=trust_remote_code, progress=progress)
    record = caption_record(ds, text_mode, identity)
    write_atomic(out / "run.json", json.dumps({**identity, "caption_sources": record["per_image"]}, indent=2) + "\n")
    if record["note"]:
        print(record["note"], file=sys.stderr, flush=True)
    nets = load_networks(metrics_weights or {})
    rows = load_published(published)
    streams_dir = out / "streams"
    kw = dict(seed=int(seed), schedule=schedule, batch_size=batch_size, resume=resume, progress=progress,
              published=rows, captions=record, protocol=published_protocol or data_protocol(ds))
    if not sweep and prefix is None:
        return _evaluate_setting(codec, ds, out, streams_dir, nets, setting={"guidance": gs[0], "steps": ss[0],
                                                                             "temperature": temp},
                                 label=ds.kind, **kw)
    if prefix is None:  # (subfolder, setting, streams folder): a sweep's settings share the streams
        runs = [(setting_dir(g, s), {"guidance": g, "steps": s, "temperature": temp}, streams_dir)
                for g, s in itertools.product(gs, ss)]
    else:  # a prefix's streams are its own
        runs = [(prefix_dir(k), {"guidance": gs[0], "steps": ss[0], "temperature": temp, "groups": k,
                                 "fill_temperature": fill}, out / prefix_dir(k) / "streams") for k in prefix["groups"]]
    summaries = []
    for sub, setting, streams in runs:
        summ = _evaluate_setting(codec, ds, out / sub, streams, nets, setting=setting, label=f"{ds.kind} {sub}", **kw)
        summ["dir"] = sub
        summaries.append(summ)
    if prefix is not None:
        return write_prefix(out, ds, summaries, {**prefix, "schedule": identity["schedule"]}, rows, kw["protocol"],
                            record)
    return write_sweep(out, ds, summaries, gs, ss, rows, kw["protocol"], record)
