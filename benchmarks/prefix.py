"""One stream, many rates: the prefix curve of one codec beside codecs trained for each rate.

The demo codec (tiny config: 4x4 indices, K = 64, qlds:8) decodes from any prefix of k of its 8
index groups (bitstream version 5). This trains tiny codecs for lower rates with the same recipe and
the demo's stage-0 autoencoder (by default a 2x2 grid at K = 64 and a 4x4 grid at K = 16), then
evaluates on held-out scenes (evaluate's synthetic seed: no training run draws them):
  - the demo codec's prefix sweep, k = 0..S (`evaluate(..., groups=...)`), with the groups not sent
    filled by argmax, and by draws at --fill-temperatures;
  - each per-rate codec's full streams;
  - the demo codec's full streams with a shortened caption (--text-modes: the other way to spend
    fewer bytes);
and prints one table (bpp, PSNR, colours present, shape IoU, realism, and the equal-bits thumbnail
of each codec's own grid) and draws OUT/prefix_vs_per_rate.png.

    python benchmarks/prefix.py [--demo demo] [--out benchmarks/out/prefix] [--scenes 192]
"""
import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from perco_jax.codec.codec import Codec  # noqa: E402
from perco_jax.config import load_config  # noqa: E402
from perco_jax.eval.datasets import SYNTHETIC_SEED  # noqa: E402
from perco_jax.eval.evaluate import evaluate  # noqa: E402
from perco_jax.train.export import export_codec  # noqa: E402
from perco_jax.train.loop import train  # noqa: E402

PER_RATE = {"2x2_k64": ["codec.grid_side=2", "codec.codebook_size=64"],
            "4x4_k16": ["codec.grid_side=4", "codec.codebook_size=16"]}
METRICS = ("bpp", "psnr", "colours_present", "shape_iou", "realism", "thumb_psnr", "thumb_colours_present",
           "thumb_shape_iou")


def per_rate_codec(name: str, overrides, stage0: Path, work: Path) -> Codec:
    """The tiny config with `overrides`, stages 1 and 2 trained on the autoencoder of stage0 (the
    demo's: the same recipe as `make demo`), exported to work/NAME/checkpoint (kept for reruns)."""
    folder = work / name
    if not (folder / "checkpoint").is_dir():
        config = load_config("tiny", [*overrides, f"autoencoder_workdir={stage0}"])
        train(config, folder / "stage1")
        train(load_config("tiny", [*overrides, f"autoencoder_workdir={stage0}", "stage=2",
                                   f"stage1_workdir={folder / 'stage1'}"]), folder / "stage2")
        export_codec(config, folder / "stage1", folder / "stage2").save(folder / "checkpoint")
    return Codec.load(folder / "checkpoint")


def _row(label: str, summary: dict) -> dict:
    return {"codec": label, **{m: summary["mean"].get(m) for m in METRICS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="demo", help="a `make demo` workdir (its checkpoint/ and stage0/)")
    ap.add_argument("--out", default="benchmarks/out/prefix")
    ap.add_argument("--scenes", type=int, default=192, help="held-out scenes")
    ap.add_argument("--fill-temperatures", type=float, nargs="*", default=[1.0],
                    help="also fill the groups not sent by draws at these temperatures (besides argmax)")
    ap.add_argument("--text-modes", nargs="*", default=["truncate:4", "none"],
                    help="also the demo codec's full streams with the caption under these text modes")
    ap.add_argument("--train-only", action="store_true", help="train the per-rate codecs and stop")
    args = ap.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    others = {name: per_rate_codec(name, ov, demo / "stage0", out) for name, ov in PER_RATE.items()}
    if args.train_only:
        return
    data = f"synthetic:{args.scenes}:{SYNTHETIC_SEED}"
    codec = Codec.load(demo / "checkpoint")
    s = codec.num_groups()
    rows = []
    for t in [0.0] + list(args.fill_temperatures):
        summ = evaluate(codec, data, out / f"prefix_T{t:g}", groups=list(range(s + 1)), fill_temperature=t,
                        progress=False)
        for k, sk in zip(range(s + 1), summ["settings"]):
            rows.append({**_row(f"demo codec, {k} of {s} groups, fill T={t:g}", sk), "groups": k, "fill": t})
    for name, other in others.items():
        rows.append({**_row(f"per-rate {name}", evaluate(other, data, out / name, progress=False)), "groups": None,
                     "fill": None})
    for mode in args.text_modes:  # the caption shortened instead: all groups, fewer caption bytes
        summ = evaluate(codec, data, out / f"text_{mode.replace(':', '')}", text_mode=mode, progress=False)
        rows.append({**_row(f"demo codec, all groups, text mode {mode}", summ), "groups": None, "fill": None})
    with open(out / "prefix_vs_per_rate.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "prefix_vs_per_rate.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'codec':<44}" + "".join(f"{m:>12}" for m in METRICS))
    for r in rows:
        print(f"{r['codec']:<44}" + "".join("–".rjust(12) if r[m] is None else f"{r[m]:>12.4f}" for m in METRICS))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax, m in zip(axes, ("psnr", "colours_present", "shape_iou")):
        for t in [0.0] + list(args.fill_temperatures):
            pts = [r for r in rows if r["fill"] == t]
            ax.plot([r["bpp"] for r in pts], [r[m] for r in pts], "o-", label=f"demo codec, prefix k = 0..{s} "
                                                                               f"({'argmax' if t == 0 else f'T={t:g}'} fill)")
            if t == 0:
                for r in pts:
                    ax.annotate(str(r["groups"]), (r["bpp"], r[m]), textcoords="offset points", xytext=(3, 3), fontsize=8)
        for r in rows:
            if r["groups"] is None:
                ax.plot([r["bpp"]], [r[m]], "s", ms=9, label=r["codec"])
        ax.axhline(rows[0][f"thumb_{m}"], ls="-.", c="grey", lw=1,
                   label=f"equal-bits thumbnail of the demo codec's {codec.grid[0]}x{codec.grid[1]} grid")
        ax.set_xlabel("bpp (whole stream, 32x32 scenes)")
        ax.set_title(m.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(f"one stream, many rates: {args.scenes} held-out scenes ({data})")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)  # (below: no point hidden)
    fig.savefig(out / "prefix_vs_per_rate.png", dpi=110)
    print(f"wrote {out / 'prefix_vs_per_rate.png'}, .csv, .json")


if __name__ == "__main__":
    main()
