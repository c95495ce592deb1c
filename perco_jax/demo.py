"""`make demo`: the built-in job on the tiny config, with nothing downloaded.

1. SD3 port check: a small random diffusers SD3 transformer is converted with `perco-jax convert`
   and compared with diffusers on the same inputs.
2. Stage 1: the tiny codec (space-to-depth autoencoder, small random frozen text encoders, a small
   MM-DiT, hyper-encoder and VQ) trains on the built-in synthetic captioned scenes, with progress.
3. Stage 2: the entropy model trains on the frozen codec's indices. Finished stages are reused
   (training resumes from each workdir's checkpoint).
4. The codec is exported to WORKDIR/checkpoint (what `perco-jax compress/decompress --checkpoint`
   take); held-out scenes and a real photo (skimage.data, when scikit-image is installed) are
   compressed to .perco files and decompressed; side-by-side PNGs (original | reconstruction),
   a rate table per masking schedule against uniform coding, PSNR, and the time taken.
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


def _photo():
    """skimage's astronaut photo (512x512 RGB), or None without scikit-image."""
    try:
        from skimage import data
    except ImportError:
        return None
    return data.astronaut()


def run_demo(workdir: str) -> int:
    from perco_jax.codec.codec import Codec, rate_split
    from perco_jax.codec.report import format_rates, schedule_rates
    from perco_jax.config import load_config
    from perco_jax.data.pipeline import make_dataset
    from perco_jax.images import save_image
    from perco_jax.reconstruct import psnr
    from perco_jax.train.loop import train

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    err = check_sd3_port(work / "sd3_port")
    print(f"[1/4] SD3 port: converted MM-DiT vs diffusers, relative max error {err:.2e}")
    if err > 1e-4:
        print("demo FAILED: the converted MM-DiT differs from diffusers")
        return 1

    config = load_config("tiny")
    print(f"[2/4] stage 1: training the tiny codec for {config.num_train_steps} steps on synthetic scenes "
          f"(z_l: {config.codec.grid_side}x{config.codec.grid_side} indices, K={config.codec.codebook_size})")
    train(config, work / "stage1")
    config2 = load_config("tiny", ["stage=2", f"stage1_workdir={work / 'stage1'}"])
    print(f"[3/4] stage 2: training the entropy model for {config.stage2.num_train_steps} steps on the "
          f"codec's indices ({len(config.stage2.schedules)} masking schedules)")
    train(config2, work / "stage2")
    codec = Codec.from_runs(config, work / "stage1", work / "stage2")
    codec.save(work / "checkpoint")
    codec = Codec.load(work / "checkpoint")

    batch = next(make_dataset(config, split="validation"))
    images = [np.asarray(x) / 2 + 0.5 for x in batch["image"][:8]]
    captions = [str(c) for c in batch["caption"][:8]]
    names = [f"heldout_{i}" for i in range(len(images))]
    photo = _photo()
    if photo is not None:
        images.append(photo)
        captions.append("a person in a white space suit in front of a flag")
        names.append("astronaut")
    t0 = time.time()
    streams = codec.compress_batch(images, captions)
    t1 = time.time()
    recon = codec.decompress_batch(streams)
    t2 = time.time()
    (work / "streams").mkdir(exist_ok=True)
    for name, stream, o, r in zip(names, streams, images, recon):
        (work / "streams" / f"{name}.perco").write_bytes(stream)
        save_image(np.concatenate([_float(o), r], axis=1), work / "streams" / f"{name}.png")
    side = config.image_size
    grid = np.concatenate([np.concatenate([_float(o, side), _resize(r, side)], axis=1)
                           for o, r in zip(images, recon)], axis=0)
    save_image(grid, work / "reconstructions.png")
    print(f"[4/4] codec exported to {work / 'checkpoint'}; {len(images)} images compressed in "
          f"{t1 - t0:.1f} s and decompressed in {t2 - t1:.1f} s (schedule {config.codec.schedule}) -> "
          f"{work / 'streams'}, {work / 'reconstructions.png'}")
    print(f"  {'image':<12}{'size':>9}{'bytes':>7}{'bpp':>8}{'caption B':>10}{'index B':>9}{'PSNR':>7}  caption")
    for name, stream, o, r, c in zip(names, streams, images, recon, captions):
        rs = rate_split(stream)
        size = f"{o.shape[1]}x{o.shape[0]}"
        print(f"  {name:<12}{size:>9}{rs['total']:>7}{8 * rs['total'] / rs['pixels']:>8.4f}{rs['caption']:>10}"
              f"{rs['indices']:>9}{psnr(_float(o), r):>7.2f}  {c[:48]}")
    print(f"\n  rate of the z_l indices per masking schedule ({len(images)} images, index bytes exact; "
          f"'(model)' = the entropy model's cross-entropy):")
    print(format_rates(schedule_rates(codec, images, captions)))
    print(f"\nnext: perco-jax compress --checkpoint {work / 'checkpoint'} YOUR.png -o YOUR.perco --caption '...'")
    print(f"demo OK in {time.time() - start:.0f} s")
    return 0


def _float(image, side=None):
    x = np.asarray(image)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return x if side is None else _resize(x, side)


def _resize(image, side: int):
    import jax

    if image.shape[:2] == (side, side):
        return image
    return np.clip(np.asarray(jax.image.resize(image, (side, side, 3), "bicubic", antialias=True)), 0, 1)
