"""`perco-jax evaluate`: its arguments (`add_parser`) and the command (`run`: load the codec,
`evaluate`, print the means, what was skipped and the tables)."""
from __future__ import annotations

from pathlib import Path

from perco_jax.eval.datasets import COCO30K_SIZE, SYNTHETIC_SEED
from perco_jax.eval.evaluate import CAPTION_CACHE, evaluate, format_scene_summary
from perco_jax.eval.published import format_kodak_per_image
from perco_jax.eval.results import IMAGE_METRICS, SET_METRICS
from perco_jax.eval.sweep import setting_label


def run(args) -> int:
    """`perco-jax evaluate ARGS`: evaluate the codec folder, print one line per setting (per K of a
    prefix sweep), what was skipped, the scene and Kodak tables, and where the summary is."""
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
                      steps=steps[0] if len(steps) == 1 else None, sweep=sweep or None, temperature=args.temperature,
                      batch_size=args.batch_size, resume=not args.no_resume, progress=not args.quiet,
                      seed=args.seed, schedule=args.schedule, size=args.size, center_crop=args.center_crop,
                      published=args.published, text_mode=args.text_mode, captions=args.captions,
                      captioner=args.captioner, caption_cache=args.caption_cache, caption_tokens=args.caption_tokens,
                      trust_remote_code=args.trust_remote_code, published_protocol=args.published_protocol,
                      groups=args.groups, fill_temperature=args.fill_temperature)
    for s in result.get("settings", [result]):
        m = s["mean"]
        parts = [setting_label(s), f"bpp={m['bpp']:.5f}"]
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
    p.add_argument("--temperature", type=float, help="the samplers' noise scale (default: the codec config's "
                                                     "sample.temperature)")
    p.add_argument("--groups", type=int, nargs="+", metavar="K",
                   help="a prefix sweep: send only the first K index groups of the masking schedule, for each K "
                        "(0..S, S = the schedule's groups; K = S is the full stream), each into OUT/groups=K/, plus "
                        "OUT/prefix.csv and OUT/prefix.png; not with several --guidance / --steps")
    p.add_argument("--fill-temperature", type=float, default=0.0, metavar="T",
                   help="with --groups: the entropy model's temperature for the indices not sent (default 0: "
                        "its most likely index)")
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
    p.set_defaults(fn=run)
    return p
