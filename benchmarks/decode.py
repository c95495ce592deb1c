"""Few-step decoding (issue 15): quality and decode time per number of steps, teacher against students.

For a trained codec folder (default: the one `make demo` leaves at demo/checkpoint, which carries
the demo's few-step decoder) and optionally more stage-3 runs trained on the same stage-1 run
(--stage3 RUN ..., e.g. one per method), decodes the same held-out synthetic scenes (evaluate's
seed) with the guided teacher sampler at the codec's default steps, the plain guided sampler at
each step count, and every few-step decoder at each step count, and prints the scene metrics,
PSNR, the mean squared error to the teacher's images (same noise) and the decode time per image
(indices + caption -> image, after compilation, best of --repeats) with the speed-up over the
teacher; writes decode.csv and decode.png (PSNR, realism and time against steps) to --out.

Targets at 1 step against the teacher: PSNR within 0.5 dB, realism within 0.01, colours present
within 0.05, at least 5x faster; 2 and 4 steps at least as good.

    python benchmarks/decode.py [--checkpoint demo/checkpoint] [--stage3 runs/s3_reflow ...]
                                [--images 48] [--steps 1 2 4] [--out benchmarks/out]
"""
import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from common import load_codec  # noqa: E402
from perco_jax.eval.datasets import SYNTHETIC_SEED  # noqa: E402
from perco_jax.eval.few_step import compare_decoders, format_decoder_table, with_few_step_decoder  # noqa: E402


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    teacher = rows[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("psnr", "realism", "seconds_per_image"),
                              ("PSNR (dB)", "realism", "decode ms / image")):
        scale = 1000.0 if key == "seconds_per_image" else 1.0
        ax.axhline(teacher[key] * scale, color="gray", ls="--", label=f"teacher ({teacher['steps']} steps)")
        for name in dict.fromkeys(r["decoder"] for r in rows[1:]):
            pts = [(r["steps"], r[key] * scale) for r in rows[1:] if r["decoder"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("few-step decoding: quality and time per number of steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="demo/checkpoint")
    p.add_argument("--stage3", nargs="*", default=[], help="more stage-3 runs (students) on the codec's stage-1 run")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args(argv)
    codec = load_codec(args.checkpoint)
    codecs = ([codec] if codec.few_step is not None or not args.stage3 else []) + [
        with_few_step_decoder(codec, run) for run in args.stage3]
    rows = []
    for i, c in enumerate(codecs):
        got = compare_decoders(c, SYNTHETIC_SEED, n=args.images, steps=args.steps, repeats=args.repeats, plain=i == 0)
        rows += got if i == 0 else got[1:]
    print(f"{args.images} held-out scenes (seed {SYNTHETIC_SEED}), {codec.config.image_size}^2, teacher = guided "
          f"sampler at {codec.config.sample.steps} steps, guidance {codec.config.sample.guidance}")
    print(format_decoder_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    made = plot(rows, out / "decode.png")
    print(f"\nwrote {out / 'decode.csv'}" + (f" and {out / 'decode.png'}" if made else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
