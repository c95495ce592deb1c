"""MM-DiT forward: jitted Flax against diffusers (eager PyTorch), same config, same machine.

SD3-medium widths (24 heads x 64), 2 layers, 32x32 latent, 333 context tokens, batch 1, float32.
Run: `python benchmarks/mmdit.py [--layers 2] [--repeats 5]`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
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
    args = ap.parse_args()

    cfg = load_config("sd3_medium").mmdit.to_dict()
    cfg.pop("extra_in_channels")
    cfg.update(num_layers=args.layers, qk_norm=None)
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg).eval()
    model = mmdit_from_config(config_from_diffusers(dict(ref.config)))
    params = transformer_from_source(DictSource(ref.state_dict()), model)

    rng = np.random.default_rng(0)
    lat = rng.standard_normal((1, 16, args.latent, args.latent)).astype(np.float32)
    t = np.array([500.0], np.float32)
    ctx = rng.standard_normal((1, args.context, 4096)).astype(np.float32)
    pooled = rng.standard_normal((1, 2048)).astype(np.float32)

    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    jargs = [jax.device_put(x) for x in (lat.transpose(0, 2, 3, 1), t, ctx, pooled)]
    t_jax = median_time(lambda: fwd(params, *jargs).block_until_ready(), args.repeats)
    targs = [torch.from_numpy(x) for x in (lat, ctx, pooled, t)]

    def torch_fwd():
        with torch.inference_mode():
            ref(targs[0], encoder_hidden_states=targs[1], pooled_projections=targs[2], timestep=targs[3])

    t_torch = median_time(torch_fwd, args.repeats)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    report(f"MM-DiT fwd ({args.layers} layers, {args.latent}^2, {args.context} ctx)", t_jax, t_torch, 1.5)


if __name__ == "__main__":
    main()
