"""`make demo`: the built-in job on the tiny config, with nothing downloaded.

Today it builds a small random diffusers SD3 transformer in the tiny config's shapes, saves it as a
diffusers folder, converts it with `perco-jax convert`, reloads the weights folder and checks the
Flax model against diffusers on the same inputs. Later stages grow this into the codec's job.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run_demo(workdir: str) -> int:
    import jax
    import torch
    from diffusers import SD3Transformer2DModel

    from perco_jax.checkpoint import load_weights
    from perco_jax.cli import main as cli
    from perco_jax.config import load_config
    from perco_jax.convert.transformer import config_from_diffusers
    from perco_jax.models.mmdit import mmdit_from_config

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config("tiny").mmdit.to_dict()
    cfg.pop("extra_in_channels")
    cfg["qk_norm"] = cfg["qk_norm"] or None
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-inits the adaLN gates; give every weight a value
        for p in ref.parameters():
            p.normal_(0, 0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.05)
    ref.save_pretrained(work / "diffusers_transformer")
    print(f"[1/3] saved a random tiny SD3 transformer (diffusers) to {work / 'diffusers_transformer'}")

    if cli(["convert", "--diffusers", str(work / "diffusers_transformer"), "--out", str(work / "weights")]):
        return 1
    configs, params = load_weights(work / "weights", ["transformer"])
    model = mmdit_from_config(config_from_diffusers(configs["transformer"]))
    print(f"[2/3] converted to {work / 'weights'}")

    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, cfg["in_channels"], 16, 12)).astype(np.float32)
    t = np.array([250.0, 750.0], np.float32)
    ctx = rng.standard_normal((2, 10, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, cfg["pooled_projection_dim"])).astype(np.float32)
    fwd = jax.jit(lambda p, *a: model.apply({"params": p["transformer"]}, *a))
    ours = np.asarray(fwd(params, lat.transpose(0, 2, 3, 1), t, ctx, pooled))
    start = time.perf_counter()
    ours = np.asarray(fwd(params, lat.transpose(0, 2, 3, 1), t, ctx, pooled))
    t_jax = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        theirs = ref(torch.from_numpy(lat), torch.from_numpy(ctx), torch.from_numpy(pooled),
                     torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
        t_torch = time.perf_counter() - start
    err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    print(f"[3/3] Flax vs diffusers on a 16x12 latent: relative max error {err:.2e} "
          f"(jax {t_jax * 1e3:.1f} ms, torch {t_torch * 1e3:.1f} ms)")
    if err > 1e-4:
        print("demo FAILED: outputs differ")
        return 1
    print("demo OK")
    return 0
