"""SD3 pipeline speed: VAE decode and a full 28-step generation with CFG, jitted JAX against
diffusers (eager PyTorch), same random weights, same machine, side by side.

The default "small" config is the tiny config widened: an SD3-shaped VAE at 1/4 width (factor 8),
a 4-layer 128-wide MM-DiT, at 256x256. Run: `python benchmarks/pipeline.py [--size 256] [--steps 28]`.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusion3Pipeline  # noqa: E402

from common import median_time, report  # noqa: E402
from perco_jax.config import load_config  # noqa: E402
from perco_jax.convert.pipeline import convert_to_folder  # noqa: E402
from perco_jax.models.vae import unscale_latents  # noqa: E402
from perco_jax.sd3 import SD3Pipeline  # noqa: E402
from perco_jax.tiny import save_tiny_sd3_pipeline  # noqa: E402

SMALL = ["vae.block_out_channels=(32, 64, 128, 128)", "vae.layers_per_block=2", "vae.norm_num_groups=32",
         "mmdit.num_layers=4", "mmdit.num_attention_heads=4", "mmdit.attention_head_dim=32",
         "mmdit.caption_projection_dim=128", "mmdit.sample_size=32"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp())
    save_tiny_sd3_pipeline(work / "pipe", config=load_config("tiny", SMALL))
    convert_to_folder(diffusers=str(work / "pipe"), out=work / "ckpt", progress=False)
    ref = StableDiffusion3Pipeline.from_pretrained(work / "pipe")
    ref.set_progress_bar_config(disable=True)
    pipe = SD3Pipeline.load(work / "ckpt")
    f = pipe.vae_factor
    lat = np.random.default_rng(0).standard_normal((1, 16, args.size // f, args.size // f)).astype(np.float32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); image {args.size}^2, latent {lat.shape[2]}^2")

    vae = pipe.vae
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, unscale_latents(z, vae.scaling_factor,
                                                                              vae.shift_factor), method=vae.decode))
    z = jnp.asarray(lat.transpose(0, 2, 3, 1))
    t_jax = median_time(lambda: decode(pipe.params["vae"], z).block_until_ready(), args.repeats)
    zt = torch.from_numpy(lat)

    def torch_decode():
        with torch.inference_mode():
            ref.vae.decode(zt / ref.vae.config.scaling_factor + ref.vae.config.shift_factor)

    report("VAE decode", t_jax, median_time(torch_decode, args.repeats), 1.0)

    prompt = "a large red circle above a small blue square"
    t_jax = median_time(lambda: pipe.generate(prompt, steps=args.steps, guidance=7.0, latents=lat), args.repeats)

    def torch_generate():
        with torch.inference_mode():
            ref(prompt, num_inference_steps=args.steps, guidance_scale=7.0, latents=torch.from_numpy(lat),
                output_type="np")

    report(f"generate ({args.steps} steps, CFG, incl. text + decode)", t_jax,
           median_time(torch_generate, args.repeats), 1.0)


if __name__ == "__main__":
    main()
