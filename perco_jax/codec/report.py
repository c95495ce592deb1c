"""Rate of each masking schedule on a set of images: what the demo and benchmarks/rate.py print.

    schedule_rates(codec, images, captions, specs) -> [{schedule, groups, bits_per_index,
        model_bits_per_index, index_bytes, bpp_indices, bpp_total, encode_s, decode_s}, ...]

Every figure comes from real bitstreams (encoded, then decoded and checked equal) except
model_bits_per_index, the entropy model's cross-entropy for the same indices.

The tables `perco-jax` prints about rate come from here too:

    format_stream_rates(names, streams, grid, codebook_size) -> compress's table: per stream its
        bytes, bpp split into caption / indices / container, index bytes saved against uniform coding
    format_bitrate_presets(config) -> info's table: every bitrate preset's uniform-coding rate at
        config.image_size, and the config's own
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from perco_jax import build, schedules
from perco_jax.configs.common import BITRATE_PRESETS, TRAINING_SCHEDULES

# uniform coding, then every schedule stage 2 trains for
DEFAULT_SPECS = (schedules.UNIFORM,) + tuple(TRAINING_SCHEDULES)


def schedule_rates(codec, images: Sequence, captions: Sequence[str], specs: Sequence[str] = DEFAULT_SPECS,
                   indices=None) -> list[dict]:
    """One row per schedule spec over all images (times are per image; uniform has no model).

    indices [B, g, g] may be passed when already computed (they are the images' own)."""
    from perco_jax.codec.codec import prepare_image, rate_split

    if indices is None:
        prepared = np.stack([prepare_image(im, codec.config.image_size) for im in images])
        indices = codec.encode_images(prepared)
    n, positions = len(indices), codec.grid[0] * codec.grid[1]
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        streams = codec.compress_batch(images, captions, schedule=spec)
        t1 = time.perf_counter()
        decoded = codec.read_batch(streams)[2]
        t2 = time.perf_counter()
        if not np.array_equal(decoded, indices):
            raise AssertionError(f"schedule {spec}: decoded indices differ from the encoded ones")
        splits = [rate_split(s) for s in streams]
        index_bytes = np.mean([r["indices"] for r in splits])
        name = schedules.parse_spec(spec)[0]
        groups = 1 if name == schedules.UNIFORM else schedules.num_groups(schedules.from_spec(spec, *codec.grid))
        model_bits = float(np.mean(codec.rate_bits(indices, captions, spec))) / positions
        rows.append({"schedule": spec, "groups": groups, "bits_per_index": 8 * index_bytes / positions,
                     "model_bits_per_index": model_bits, "index_bytes": float(index_bytes),
                     "bpp_indices": float(np.mean([8 * r["indices"] / r["pixels"] for r in splits])),
                     "bpp_total": float(np.mean([8 * r["total"] / r["pixels"] for r in splits])),
                     "encode_s": (t1 - t0) / n, "decode_s": (t2 - t1) / n})
    return rows


def format_rates(rows: list[dict]) -> str:
    head = (f"  {'schedule':<14}{'groups':>7}{'bits/index':>11}{'(model)':>9}{'index B':>9}{'bpp idx':>9}"
            f"{'bpp all':>9}{'enc ms':>8}{'dec ms':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"  {r['schedule']:<14}{r['groups']:>7}{r['bits_per_index']:>11.3f}{r['model_bits_per_index']:>9.3f}"
                     f"{r['index_bytes']:>9.1f}{r['bpp_indices']:>9.4f}{r['bpp_total']:>9.4f}"
                     f"{1e3 * r['encode_s']:>8.1f}{1e3 * r['decode_s']:>8.1f}")
    return "\n".join(lines)


def format_stream_rates(names: Sequence[str], streams: Sequence[bytes], grid: tuple[int, int],
                        codebook_size: int) -> str:
    """The table `perco-jax compress` prints: one row per stream (named by the last 27 characters
    of its name), its bytes and bpp, the bpp split into caption, indices and container
    (`codec.rate_split`), and the index bytes saved against uniform coding of the grid[0] x grid[1]
    indices of a K = codebook_size codebook; a last line says what the columns mean."""
    from perco_jax.codec.codec import rate_split

    g, k = grid, codebook_size
    uniform = math.ceil(build.uniform_index_bits(g[0] * g[1], k) / 8)
    lines = [f"{'file':<28}{'bytes':>7}{'bpp':>9}{'caption':>9}{'indices':>9}{'container':>10}{'vs uniform':>12}"
             f"{'groups':>8}"]
    for name, stream in zip(names, streams):
        r = rate_split(stream)
        bpp = 8 / r["pixels"]
        lines.append(f"{str(name)[-27:]:<28}{r['total']:>7}{r['total'] * bpp:>9.4f}{r['caption'] * bpp:>9.4f}"
                     f"{r['indices'] * bpp:>9.4f}{r['container'] * bpp:>10.4f}"
                     f"{100 * (1 - r['indices'] / uniform):>11.1f}%"
                     f"{'all' if r['groups_sent'] is None else r['groups_sent']:>8}")
    lines.append(f"(bpp columns split the total; 'vs uniform' = index bytes saved against fixed-length "
                 f"coding, {uniform} bytes for {g[0]}x{g[1]} indices of K={k}; 'groups' = index groups sent, "
                 "of a prefix stream)")
    return "\n".join(lines)


def format_bitrate_presets(config) -> str:
    """The table `perco-jax info` prints: each preset of BITRATE_PRESETS (grid, K, bits and bpp of
    uniform coding at config.image_size), the config's own marked, then the config's rate."""
    size = config.image_size
    lines = [f"bitrate presets at {size}x{size} (uniform coding of z_l):",
             f"  {'preset':<14}{'grid':>8}{'K':>7}{'bits':>8}{'bpp':>10}"]
    for name, p in BITRATE_PRESETS.items():
        bits = build.uniform_index_bits(p["grid_side"] ** 2, p["codebook_size"])
        mark = "  <- this config" if name == config.codec.preset else ""
        lines.append(f"  {name:<14}{p['grid_side']:>5}x{p['grid_side']:<2}{p['codebook_size']:>7}{bits:>8.0f}"
                     f"{bits / size ** 2:>10.5f}{mark}")
    lines.append(f"this config: {config.codec.grid_side}x{config.codec.grid_side}, K={config.codec.codebook_size}: "
                 f"{build.bits_per_pixel(config):.5f} bpp")
    return "\n".join(lines)
