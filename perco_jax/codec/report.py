"""Rate of each masking schedule on a set of images: what the demo and benchmarks/rate.py print.

    schedule_rates(codec, images, captions, specs) -> [{schedule, groups, bits_per_index,
        model_bits_per_index, index_bytes, bpp_indices, bpp_total, encode_s, decode_s}, ...]

Every figure comes from real bitstreams (encoded, then decoded and checked equal) except
model_bits_per_index, the entropy model's cross-entropy for the same indices.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from perco_jax import schedules
from perco_jax.configs.common import TRAINING_SCHEDULES

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
