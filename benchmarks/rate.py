"""Rate of the learned entropy model against uniform coding, per masking schedule.

For a trained codec folder (default: the one `make demo` leaves at demo/checkpoint) and held-out
images of its data (the validation split), codes the z_l indices of every image with each
schedule through the real bitstream, checks they decode, and prints bits per index, bpp and the
ratio to uniform coding (log2 K bits per index) side by side, with the coding time per image;
writes rate.csv and rate.png (bits per index against the number of coding steps) to --out.

Float against integer entropy model (issue 14): every schedule is coded twice, with the float
model's tables (bitstream version 3) and the integer model's (version 4; quantised here by
integer_export.calibrate when the codec folder has none), and a second table compares their bits
per index and coding times. The integer model's budget: at most 1% more index bits. The header
names the entropy model's caption input (entropy_model.caption_input: "tokens", exact on any
machine, or "context"); compare the two with a codec exported from a stage-2 run of each.

    python benchmarks/rate.py [--checkpoint demo/checkpoint] [--images 64] [--out benchmarks/out]
"""
import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from perco_jax import build
from perco_jax.codec import integer_export
from perco_jax.codec.codec import Codec
from perco_jax.codec.report import DEFAULT_SPECS, format_rates, schedule_rates
from perco_jax.data.pipeline import make_dataset



def heldout(config, n: int):
    images, captions = [], []
    data = make_dataset(config, split="validation")
    while len(images) < n:
        batch = next(data)
        images += [np.asarray(x) / 2 + 0.5 for x in batch["image"]]
        captions += [str(c) for c in batch["caption"]]
    return images[:n], captions[:n]


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    uniform = next(r for r in rows if r["schedule"] == "uniform")
    ax.axhline(uniform["bits_per_index"], color="gray", ls="--", label="uniform (log2 K)")
    for r in rows:
        if r["schedule"] != "uniform":
            ax.scatter(r["groups"], r["bits_per_index"])
            ax.annotate(r["schedule"], (r["groups"], r["bits_per_index"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("coding steps (groups)")
    ax.set_ylabel("bits per index")
    ax.set_title("z_l rate per masking schedule")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def format_float_vs_integer(rows, int_rows) -> str:
    """Per schedule: bits per index of the float and the integer model (coded: the streams'
    bytes, which round to whole bytes; model: the tables' cross-entropy), the integer model's
    extra model bits in percent, and each one's encode / decode time per image."""
    lines = [f"\n  {'schedule':<14}{'coded float':>12}{'int':>7}{'model float':>12}{'int':>7}{'extra':>8}"
             f"{'float enc/dec ms':>18}{'int enc/dec ms':>16}"]
    for f, i in zip(rows, int_rows):
        extra = 100 * (i["model_bits_per_index"] / f["model_bits_per_index"] - 1)
        lines.append(f"  {f['schedule']:<14}{f['bits_per_index']:>12.3f}{i['bits_per_index']:>7.3f}"
                     f"{f['model_bits_per_index']:>12.4f}{i['model_bits_per_index']:>7.4f}{extra:>+7.2f}%"
                     f"{1e3 * f['encode_s']:>9.1f} /{1e3 * f['decode_s']:>6.1f}"
                     f"{1e3 * i['encode_s']:>8.1f} /{1e3 * i['decode_s']:>6.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="demo/checkpoint")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        sys.exit(f"{args.checkpoint} does not exist: run `make demo` first (it trains and exports the tiny codec)")
    loaded = Codec.load(args.checkpoint)
    integer = loaded if loaded.integer_model is not None else loaded.with_integer_model(integer_export.calibrate(loaded))
    codec = loaded.with_integer_model(None)  # the float model: version 3
    images, captions = heldout(codec.config, args.images)
    rows = schedule_rates(codec, images, captions, DEFAULT_SPECS)
    int_rows = schedule_rates(integer, images, captions, DEFAULT_SPECS)
    uniform = next(r for r in rows if r["schedule"] == "uniform")["bits_per_index"]
    k = codec.config.codec.codebook_size
    print(f"{len(images)} held-out images, {codec.grid[0]}x{codec.grid[1]} indices, K={k} "
          f"(uniform = {np.log2(k):.2f} bits/index + byte rounding), caption input: "
          f"{build.caption_input(codec.config) or 'none'}")
    print(format_rates(rows))
    print(f"\n  {'schedule':<14}{'coded bits / uniform bits':>27}")
    for r in rows:
        print(f"  {r['schedule']:<14}{r['bits_per_index'] / uniform:>27.3f}")
    print(format_float_vs_integer(rows, int_rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rate.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model"] + list(rows[0]))
        w.writeheader()
        w.writerows([{"model": "float", **r} for r in rows] + [{"model": "integer", **r} for r in int_rows])
    made = plot(rows, out / "rate.png")
    print(f"\nwrote {out / 'rate.csv'}" + (f" and {out / 'rate.png'}" if made else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
