"""SD3 pipeline speed: VAE decode and a full 28-step generation with CFG, jitted JAX against
diffusers (eager PyTorch), same random weights, same machine, side by side.

The default "small" config is the tiny config widened: an SD3-shaped VAE at 1/4 width (factor 8),
a 4-layer 128-wide MM-DiT, at 256x256. Run: `python benchmarks/pipeline.py [--size 256] [--steps 28]`.
On a GPU machine, the real SD3-medium shapes (random weights, no T5):
`python benchmarks/pipeline.py --config sd3_medium --no-t5 --size 1024 --device cuda --dtype bfloat16`.
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
from perco_jax.tiny_sd3 import save_tiny_sd3_pipeline  # noqa: E402

SMALL = ["vae.block_out_channels=(32, 64, 128, 128)", "vae.layers_per_block=2", "vae.norm_num_groups=32",
         "mmdit.num_layers=4", "mmdit.num_attention_heads=4", "mmdit.attention_head_dim=32",
         "mmdit.caption_projection_dim=128", "mmdit.sample_size=32"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", default="tiny", help="preset; 'tiny' is widened to the small config above")
    ap.add_argument("--no-t5", action="store_true")
    ap.add_argument("--device", default="cpu", help="PyTorch device: cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    tdtype = getattr(torch, args.dtype)

    work = Path(tempfile.mkdtemp())
    config = load_config("tiny", SMALL) if args.config == "tiny" else load_config(args.config)
    save_tiny_sd3_pipeline(work / "pipe", config=config, with_t5=not args.no_t5)
    convert_to_folder(diffusers=str(work / "pipe"), out=work / "ckpt", progress=False)
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if args.no_t5 else {}
    ref = StableDiffusion3Pipeline.from_pretrained(work / "pipe", torch_dtype=tdtype, **no_t5).to(args.device)
    ref.set_progress_bar_config(disable=True)
    pipe = SD3Pipeline.load(work / "ckpt", dtype=jnp.dtype(args.dtype))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    f = pipe.vae_factor
    lat = np.random.default_rng(0).standard_normal((1, 16, args.size // f, args.size // f)).astype(np.float32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); image {args.size}^2, latent {lat.shape[2]}^2")

    vae = pipe.vae
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, unscale_latents(z, vae.scaling_factor,
                                                                              vae.shift_factor), method=vae.decode))
    z = jnp.asarray(lat.transpose(0, 2, 3, 1))
    t_jax = median_time(lambda: decode(pipe.params["vae"], z).block_until_ready(), args.repeats)
    zt = torch.from_numpy(lat).to(args.device, tdtype)

    def torch_decode():
        with torch.inference_mode():
            ref.vae.decode(zt / ref.vae.config.scaling_factor + ref.vae.config.shift_factor)
        sync()

    report("VAE decode", t_jax, median_time(torch_decode, args.repeats), 1.0)

    prompt = "a large red circle above a small blue square"
    t_jax = median_time(lambda: pipe.generate(prompt, steps=args.steps, guidance=7.0, latents=lat), args.repeats)

    def torch_generate():
        with torch.inference_mode():
            ref(prompt, num_inference_steps=args.steps, guidance_scale=7.0,
                latents=torch.from_numpy(lat).to(args.device, tdtype), output_type="np")
        sync()

    report(f"generate ({args.steps} steps, CFG, incl. text + decode)", t_jax,
           median_time(torch_generate, args.repeats), 1.0)


if __name__ == "__main__":
    main()
