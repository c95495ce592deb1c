"""`make demo`: the built-in job on the tiny config, with nothing downloaded.

1. SD3 port check: a small random diffusers SD3 transformer is converted with `perco-jax convert`
   and compared with diffusers on the same inputs.
2. Stage 1: the tiny codec (space-to-depth autoencoder, small random frozen text encoders, a small
   MM-DiT, hyper-encoder and VQ) trains on the built-in synthetic captioned scenes, with progress;
   a finished run is reused (training resumes from the workdir's checkpoint).
3. Reconstruction of held-out scenes from their z_l indices and captions; side-by-side PNG
   (original | reconstruction) and a table of bpp and PSNR.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def check_sd3_port(work: Path) -> float:
    """Convert a random tiny diffusers transformer and return the relative error against it."""
    import jax
    import torch
    from diffusers import SD3Transformer2DModel

    from perco_jax.checkpoint import load_weights
    from perco_jax.cli import main as cli
    from perco_jax.config import load_config
    from perco_jax.convert.transformer import config_from_diffusers
    from perco_jax.models.mmdit import mmdit_from_config

    cfg = load_config("tiny").mmdit.to_dict()
    cfg.pop("extra_in_channels")
    cfg["qk_norm"] = cfg["qk_norm"] or None
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-inits the adaLN gates; give every weight a value
        for p in ref.parameters():
            p.normal_(0, 0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.05)
    ref.save_pretrained(work / "diffusers_transformer")
    if cli(["convert", "--diffusers", str(work / "diffusers_transformer"), "--out", str(work / "weights"),
            "--quiet"]):
        raise RuntimeError("conversion failed")
    configs, params = load_weights(work / "weights", ["transformer"])
    model = mmdit_from_config(config_from_diffusers(configs["transformer"]))
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, cfg["in_channels"], 16, 12)).astype(np.float32)
    t = np.array([250.0, 750.0], np.float32)
    ctx = rng.standard_normal((2, 10, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, cfg["pooled_projection_dim"])).astype(np.float32)
    ours = np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
        params["transformer"], lat.transpose(0, 2, 3, 1), t, ctx, pooled))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(lat), torch.from_numpy(ctx), torch.from_numpy(pooled),
                     torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def run_demo(workdir: str) -> int:
    from perco_jax import build
    from perco_jax.config import load_config
    from perco_jax.images import save_image
    from perco_jax.reconstruct import psnr, reconstruct_heldout
    from perco_jax.train.loop import train

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    err = check_sd3_port(work / "sd3_port")
    print(f"[1/3] SD3 port: converted MM-DiT vs diffusers, relative max error {err:.2e}")
    if err > 1e-4:
        print("demo FAILED: the converted MM-DiT differs from diffusers")
        return 1

    config = load_config("tiny")
    print(f"[2/3] stage 1: training the tiny codec for {config.num_train_steps} steps on synthetic scenes "
          f"(z_l: {config.codec.grid_side}x{config.codec.grid_side} indices, K={config.codec.codebook_size})")
    state = train(config, work / "stage1")

    originals, recon, captions = reconstruct_heldout(config, state, work / "stage1")
    grid = np.concatenate([np.concatenate([o, r], axis=1) for o, r in zip(originals, recon)], axis=0)
    save_image(grid, work / "reconstructions.png")
    bpp = build.bits_per_pixel(config)
    print(f"[3/3] reconstructions of {len(captions)} held-out scenes -> {work / 'reconstructions.png'}")
    print(f"  {'caption':<70}{'bpp(z_l)':>10}{'PSNR':>8}")
    for c, o, r in zip(captions, originals, recon):
        print(f"  {c[:68]:<70}{bpp:>10.4f}{psnr(o, r):>8.2f}")
    print(f"demo OK in {time.time() - start:.0f} s")
    return 0
