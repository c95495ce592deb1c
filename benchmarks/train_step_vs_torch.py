"""Stage-1 training step, Flax against PyTorch, same model and loss, same machine, side by side.

The step both sides run: the MM-DiT with the codec's extra z_l input channels (diffusers'
SD3Transformer2DModel with in_channels = latent + code_dim, converted to Flax), the rectified-flow
velocity loss (x_t = (1 - s) x0 + s noise, target noise - x0) at fixed sigmas, backward, gradient
clipping at 1 and one AdamW update. Inputs (latents, z_l codes, context, pooled) are fixed random
tensors, so the frozen encoders and data pipeline are not timed. JAX: one jitted step with donated
state; PyTorch: eager, torch.optim.AdamW (foreach).

    python benchmarks/train_step_vs_torch.py [--layers 2] [--latent 32] [--context 154] [--batch 2]
    (GPU: add --device cuda --dtype bfloat16; JAX then runs on its default accelerator)
Target (issue 7): Flax >= 1.5x faster.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

from common import median_time, report  # noqa: E402
from perco_jax.config import load_config  # noqa: E402
from perco_jax.convert.common import DictSource  # noqa: E402
from perco_jax.convert.transformer import config_from_diffusers, transformer_from_source  # noqa: E402
from perco_jax.models.mmdit import mmdit_from_config  # noqa: E402

LR, CLIP = 1e-4, 1.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="sd3_medium", help="preset whose MM-DiT widths are used")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--context", type=int, default=154, help="77 CLIP + 77 T5 tokens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--code-dim", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    cfg = load_config(args.config).mmdit.to_dict()
    cfg.pop("extra_in_channels")
    c = cfg["in_channels"]
    cfg.update(num_layers=args.layers, qk_norm=cfg["qk_norm"] or None, in_channels=c + args.code_dim, out_channels=c)
    cfg["dual_attention_layers"] = tuple(i for i in cfg["dual_attention_layers"] if i < args.layers)
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg).train()
    model = mmdit_from_config(config_from_diffusers(dict(ref.config)), dtype=jnp.dtype(args.dtype))
    params = transformer_from_source(DictSource(ref.state_dict()), model)
    ref = ref.to(args.device)  # float32 master weights on both sides; compute dtype below

    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent
    x0 = rng.standard_normal((b, s, s, c)).astype(np.float32)
    noise = rng.standard_normal((b, s, s, c)).astype(np.float32)
    codes = rng.standard_normal((b, s, s, args.code_dim)).astype(np.float32)
    sigma = np.linspace(0.2, 0.8, b).astype(np.float32)
    ctx = rng.standard_normal((b, args.context, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((b, cfg["pooled_projection_dim"])).astype(np.float32)

    # ---- JAX
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, weight_decay=0.01))

    def loss_fn(p, x0, noise, codes, sigma, ctx, pooled):
        sg = sigma[:, None, None, None]
        x_t = (1 - sg) * x0 + sg * noise
        v = model.apply({"params": p}, jnp.concatenate([x_t, codes], -1), sigma * 1000, ctx, pooled)
        return jnp.mean((v.astype(jnp.float32) - (noise - x0)) ** 2)

    def step(p, opt, *batch):
        loss, g = jax.value_and_grad(loss_fn)(p, *batch)
        up, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, up), opt, loss

    state = [params, tx.init(params)]
    jbatch = [jax.device_put(x) for x in (x0, noise, codes, sigma, ctx, pooled)]
    step = jax.jit(step, donate_argnums=(0, 1))

    def jax_step():
        state[0], state[1], loss = step(state[0], state[1], *jbatch)
        loss.block_until_ready()

    t_jax = median_time(jax_step, args.repeats, warmup=2)

    # ---- PyTorch
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01, foreach=True)
    dt = getattr(torch, args.dtype)
    tb = [torch.from_numpy(x).to(args.device) for x in (x0, noise, codes, sigma, ctx, pooled)]

    def torch_step():
        x0_, n_, c_, s_, ctx_, p_ = tb
        sg = s_[:, None, None, None]
        x_t = (1 - sg) * x0_ + sg * n_
        inp = torch.cat([x_t, c_], -1).permute(0, 3, 1, 2)
        with torch.autocast(args.device.split(":")[0], dtype=dt, enabled=args.dtype != "float32"):
            v = ref(inp, encoder_hidden_states=ctx_, pooled_projections=p_, timestep=s_ * 1000).sample
        loss = torch.mean((v.float().permute(0, 2, 3, 1) - (n_ - x0_)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    t_torch = median_time(torch_step, args.repeats, warmup=2)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); MM-DiT {n / 1e6:.0f}M params")
    report(f"train step {args.dtype} ({args.layers}L, {s}^2, ctx {args.context}, b{b})", t_jax, t_torch, 1.5)


if __name__ == "__main__":
    main()
