"""MM-DiT forward: jitted Flax against diffusers (eager PyTorch), same config, same machine.

SD3-medium widths (24 heads x 64), 2 layers, 32x32 latent, 333 context tokens, batch 1, float32.
Run: `python benchmarks/mmdit.py [--layers 2] [--repeats 5]`; on a GPU machine add
`--device cuda --dtype bfloat16` (JAX then runs on its default accelerator, PyTorch on CUDA).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

from common import median_time, report  # noqa: E402
from perco_jax.config import load_config  # noqa: E402
from perco_jax.convert.common import DictSource  # noqa: E402
from perco_jax.convert.transformer import config_from_diffusers, transformer_from_source  # noqa: E402
from perco_jax.models.mmdit import mmdit_from_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--context", type=int, default=333)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="PyTorch device: cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    tdtype = getattr(torch, args.dtype)

    cfg = load_config("sd3_medium").mmdit.to_dict()
    cfg.pop("extra_in_channels")
    cfg.update(num_layers=args.layers, qk_norm=None)
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg).eval()
    model = mmdit_from_config(config_from_diffusers(dict(ref.config)), dtype=jnp.dtype(args.dtype))
    params = transformer_from_source(DictSource(ref.state_dict()), model)
    ref = ref.to(device=args.device, dtype=tdtype)

    rng = np.random.default_rng(0)
    b = args.batch
    lat = rng.standard_normal((b, 16, args.latent, args.latent)).astype(np.float32)
    t = np.full((b,), 500.0, np.float32)
    ctx = rng.standard_normal((b, args.context, 4096)).astype(np.float32)
    pooled = rng.standard_normal((b, 2048)).astype(np.float32)

    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    jargs = [jax.device_put(x) for x in (lat.transpose(0, 2, 3, 1), t, ctx, pooled)]
    t_jax = median_time(lambda: fwd(params, *jargs).block_until_ready(), args.repeats)
    targs = [torch.from_numpy(x).to(device=args.device, dtype=tdtype) for x in (lat, ctx, pooled)]
    targs.append(torch.from_numpy(t).to(args.device))

    def torch_fwd():
        with torch.inference_mode():
            ref(targs[0], encoder_hidden_states=targs[1], pooled_projections=targs[2], timestep=targs[3])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    t_torch = median_time(torch_fwd, args.repeats)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    report(f"MM-DiT fwd {args.dtype} ({args.layers} layers, {args.latent}^2, {args.context} ctx, b{b})",
           t_jax, t_torch, 1.5)


if __name__ == "__main__":
    main()
