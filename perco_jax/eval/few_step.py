"""The few-step decoder against the teacher: quality and decode time per number of steps.

    rows = compare_decoders(codec, seed, n=48, steps=(1, 2, 4))
    print(format_decoder_table(rows))

Each row is one decoder at one step count, on held-out synthetic scenes of `seed` (use evaluate's,
which no training run draws) coded by the codec (the same indices and captions for every row):

  teacher   the guided sampler at the codec's default steps (two MM-DiT passes per step)
  plain     the same guided sampler at N steps (a 1-step Euler step is the blurry conditional mean)
  student   the stage-3 few-step decoder at N steps (one pass per step)

with PSNR against the originals, the mean squared error against the teacher's images (same noise),
the scene scores (eval/scenes.py; shape IoU against the originals) and the decode time per image
(indices + caption -> image, after compilation, best of `repeats`).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from perco_jax.eval.metrics import image_psnr
from perco_jax.eval.results import column_means
from perco_jax.eval.scenes import SCENE_SCORES, scene_scores


def heldout_scenes(n: int, size: int, seed: int):
    """(scenes, images [n, size, size, 3] in [0, 1], captions) of the synthetic scenes 0..n-1 of `seed`."""
    from perco_jax.data.synthetic import render_scene, synthetic_scene

    scenes = [synthetic_scene(i, seed) for i in range(n)]
    return scenes, np.stack([render_scene(sc, size) for sc in scenes]), [sc.caption for sc in scenes]


def _timed(fn, repeats: int, warm_up=None):
    """(fn(), its best wall time of `repeats` runs) after one untimed run that compiles: of
    `warm_up` when given (a smaller call of the same programs), else of fn itself."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one run")
    (warm_up or fn)()
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def compare_decoders(codec, seed: int, n: int = 48, steps: Sequence[int] = (1, 2, 4), *, repeats: int = 1,
                     plain: bool = True, keep: int = 0) -> list[dict]:
    """Rows {"decoder", "steps", "psnr", "mse_to_teacher", SCENE_SCORES..., "seconds_per_image"}
    for the teacher, and per step count the plain sampler (plain=True) and the codec's few-step
    decoder (when it has one); see the module docstring. keep > 0: each row also holds "images",
    its first `keep` decoded images [keep, S, S, 3] in [0, 1]."""
    scenes, images, captions = heldout_scenes(n, codec.config.image_size, seed)
    indices = codec.encode_images(images * 2 - 1)

    m = min(n, int(codec.config.sample.batch_size))  # the warm-up: one chunk, the program of every chunk

    def row(name, k, sampler):
        out, seconds = _timed(lambda: codec.decode_images(indices, captions, steps=k, sampler=sampler), repeats,
                              lambda: codec.decode_images(indices[:m], captions[:m], steps=k, sampler=sampler))
        ms = [scene_scores(o, x, sc) for o, x, sc in zip(images, out, scenes)]
        r = {"decoder": name, "steps": int(k), "psnr": float(np.mean([image_psnr(o, x) for o, x in zip(images, out)]))}
        r.update(column_means(ms, SCENE_SCORES))
        r["seconds_per_image"] = seconds / n
        if keep:
            r["images"] = out[:keep]
        return r, out

    default = int(codec.config.sample.steps)
    teacher_row, teacher = row("teacher", default, "teacher")
    rows = [teacher_row]
    method = codec.few_step["config"]["method"] if codec.few_step is not None else None
    for k in steps:
        kinds = ([("plain", "teacher")] if plain else []) + ([(f"student ({method})", "few_step")] if method else [])
        for name, sampler in kinds:
            r, out = row(name, k, sampler)
            r["mse_to_teacher"] = float(np.mean((out - teacher) ** 2))
            rows.append(r)
    teacher_row["mse_to_teacher"] = 0.0
    return rows


def format_decoder_table(rows: list[dict]) -> str:
    """The rows as a text table, with each decoder's speed-up over the teacher."""
    base = rows[0]["seconds_per_image"]
    head = (f"  {'decoder':<22}{'steps':>6}{'PSNR':>8}{'MSE to teacher':>16}"
            + "".join(f"{m.replace('_', ' ').replace('iou', 'IoU'):>18}" for m in SCENE_SCORES)
            + f"{'ms / image':>12}{'speed-up':>10}")
    lines = [head]
    for r in rows:
        lines.append(f"  {r['decoder']:<22}{r['steps']:>6}{r['psnr']:>8.2f}{r['mse_to_teacher']:>16.5f}"
                     + "".join(f"{'–' if r[m] is None else f'{r[m]:.3f}':>18}" for m in SCENE_SCORES)
                     + f"{1000 * r['seconds_per_image']:>12.2f}{base / r['seconds_per_image']:>9.1f}x")
    return "\n".join(lines)


def flow_straightness(codec, images, captions: Sequence[str], *, student: bool, steps: int | None = None,
                      seed: int = 0) -> float:
    """Liu et al.'s straightness (flow.straightness, mean over the images) of the decoder's flow
    from the codec's sampler noise for these images [n, S, S, 3] in [0, 1]: the teacher's guided
    velocity, or (student=True) the few-step model's at d = 0, the reflowed flow of method reflow,
    conditional pass only: its guidance is trained in. `steps` Euler steps of the teacher's schedule
    (default sample.steps)."""
    import jax
    import jax.numpy as jnp

    from perco_jax import flow
    from perco_jax.models.perco import with_step_conditioning
    from perco_jax.codec.transforms import few_step_codec, initial_noise

    c = codec.config
    n = len(captions)
    indices = codec.encode_images(np.asarray(images, np.float32) * 2 - 1)
    codes = codec.model.apply(codec.codec_params, jnp.asarray(indices), method=codec.model.lookup)
    cond = codec.prompt_encoder(codec.text_params, list(captions), c.text.max_sequence_length)
    noise = initial_noise(seed, np.arange(n), codec.latent_shape)
    if student:
        model = with_step_conditioning(codec.model)
        params = few_step_codec(codec.codec_params, codec.few_step["params"])

        def velocity(x, t):
            return model.apply(params, x, t, codes, cond[0], cond[1], jnp.zeros((n,)), method=model.velocity)
    else:
        uncond = codec.prompt_encoder(codec.text_params, [""] * n, c.text.max_sequence_length)
        both = [jnp.concatenate(a) for a in ((uncond[0], cond[0]), (uncond[1], cond[1]), (codes, codes))]

        def velocity2(x, t):
            return codec.model.apply(codec.codec_params, x, t, both[2], both[0], both[1], method=codec.model.velocity)
        velocity = flow.guided(velocity2, float(c.sample.guidance))
    sigmas, timesteps = flow.sigma_schedule(int(steps or c.sample.steps), float(c.scheduler_shift))
    s = jax.jit(lambda z: flow.straightness(velocity, z, jnp.asarray(sigmas), jnp.asarray(timesteps)))(noise)
    return float(np.mean(np.asarray(s)))


def with_few_step_decoder(codec, stage3_workdir):
    """`codec` with the few-step decoder of a stage-3 run trained on its stage-1 run (the
    bitstream, fingerprint included, is unchanged)."""
    import dataclasses

    from perco_jax.train.stage3 import restore_few_step

    return dataclasses.replace(codec, few_step=restore_few_step(codec.config, stage3_workdir))


def run_stage3_demo(config, work, codec, seed: int, n: int = 48, shown: int = 8, upscale: int = 4,
                    steps: Sequence[int] | None = None):
    """The demo's stage 3: train config's stage 3 (config.stage3; stage1_workdir = work/stage1) in
    work/stage3, add its few-step decoder to `codec` and save it to work/checkpoint, and write
    work/few_step.png: `shown` held-out scenes of `seed`, each row original | teacher (default
    steps) | few-step decoder at 1 step | plain guided 1 step, upscaled `upscale` x (nearest).
    `steps`: the step counts compared (default: every count the few-step decoder was trained for).
    Returns (codec, compare_decoders rows on n scenes, the stage-3 training seconds)."""
    from pathlib import Path

    from perco_jax.images import save_image
    from perco_jax.train.loop import train

    work = Path(work)
    c3 = config.copy_and_resolve_references()
    c3.update(stage=3, stage1_workdir=str(work / "stage1"))
    start = time.perf_counter()
    train(c3, work / "stage3")
    seconds = time.perf_counter() - start
    codec = with_few_step_decoder(codec, work / "stage3")
    codec.save(work / "checkpoint")
    counts = tuple(codec.few_step_counts if steps is None else steps)
    rows = compare_decoders(codec, seed, n=n, steps=counts if 1 in counts else (1, *counts), keep=shown)
    _, images, _ = heldout_scenes(shown, codec.config.image_size, seed)
    # the table's own images (the first `shown` scenes), not decoded again
    pictures = {(r["decoder"].split(" ")[0], r["steps"]): r.pop("images") for r in rows}
    columns = [images, pictures["teacher", int(codec.config.sample.steps)], pictures["student", 1], pictures["plain", 1]]
    grid = np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)
    save_image(np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1), work / "few_step.png")
    return codec, rows, seconds
