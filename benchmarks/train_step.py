"""Stage-1 training step at any config: step time, analytic model FLOPs and, on an accelerator, MFU.

    python benchmarks/train_step.py --config sd3_medium --batch 8 --image 512 [--steps 10]

Builds the real shapes (random weights: MM-DiT + hyper-encoder + VQ trained, frozen CLIP-L/G + T5
and VAE), runs the jitted sharded step of `perco_jax.train` on synthetic data, no checkpoints.
FLOPs count the MM-DiT's matmuls and attention (forward x3 for forward + backward); the
frozen encoders, VAE and hyper-encoder are excluded, so MFU is a lower bound.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from perco_jax import build, parallel
from perco_jax.config import load_config
from perco_jax.data.synthetic import synthetic_example
from perco_jax.train.loop import _autoencoder_params, init_state
from perco_jax.train.state import make_optimizer
from perco_jax.train.step import TOKEN_KEYS, make_train_step

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def mmdit_flops(config, side: int, text_len: int) -> float:
    """Forward FLOPs per example of the MM-DiT's matmuls + attention."""
    m = config.mmdit
    d = m.num_attention_heads * m.attention_head_dim
    n = (side // m.patch_size) ** 2
    L = 77 + text_len
    per_block = 2 * (n + L) * d * d * 12 + 2 * 2 * (n + L) ** 2 * d  # qkv+out+mlp(4x), scores+values
    dual = len(m.dual_attention_layers) * (2 * n * d * d * 4 + 2 * 2 * n * n * d)
    return m.num_layers * per_block + dual


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=None)
    ap.add_argument("--text-len", type=int, default=77, help="T5 tokens")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("-o", "--override", action="append", default=[])
    args = ap.parse_args()
    over = [f"batch_size={args.batch}", f"text.max_sequence_length={args.text_len}"] + args.override
    if args.image:
        over += [f"image_size={args.image}", f"data.image_size={args.image}"]
    config = load_config(args.config, over)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    rules = parallel.rules_from_config(config.sharding_rules)
    model, ae = build.build_perco(config), build.build_autoencoder(config)
    t0 = time.time()
    encoder, text_params = build.build_text(config, "/tmp/perco-bench")
    tx = make_optimizer(config)
    with jax.set_mesh(mesh):
        state, shardings = init_state(config, model, tx, mesh, rules)
        frozen = jax.device_put({"autoencoder": _autoencoder_params(config, ae), "text": text_params},
                                parallel.replicated(mesh))
        print(f"built in {time.time() - t0:.0f} s; trainable+frozen codec params "
              f"{sum(x.size for x in jax.tree_util.tree_leaves(state.params)) / 1e9:.2f} B")
        empty = {k: jnp.asarray(v[:1]) for k, v in encoder.tokenize([""], args.text_len).items()}
        step = jax.jit(make_train_step(model, ae, encoder, config, tx),
                       in_shardings=(shardings, parallel.batch_sharding(mesh), None, None),
                       out_shardings=(shardings, None), donate_argnums=(0,))
        ex = [synthetic_example(i, 0, config.image_size) for i in range(args.batch)]
        tokens = encoder.tokenize([c for _, c in ex], args.text_len)
        batch = parallel.global_batch({"image": np.stack([im for im, _ in ex]) * 2 - 1,
                                       **{k: tokens[k] for k in TOKEN_KEYS}}, mesh)
        t0 = time.time()
        state, m = step(state, batch, frozen, empty)
        jax.block_until_ready(m)
        print(f"compile + first step {time.time() - t0:.0f} s, loss {float(m['loss']):.4f}")
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = step(state, batch, frozen, empty)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    side, _ = build.latent_geometry(config)
    flops = 3 * args.batch * mmdit_flops(config, side, args.text_len)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    mfu = f", MFU {flops / t / 1e12 / (peak * jax.device_count()):.1%} of {peak:.0f} TFLOP/s x {jax.device_count()}" \
        if peak else ""
    print(f"{config.name} stage-1 step, batch {args.batch} at {config.image_size}^2 on {jax.device_count()} x {kind}: "
          f"{t * 1e3:.1f} ms/step, {flops / t / 1e12:.1f} TFLOP/s (MM-DiT){mfu}; loss {float(m['loss']):.4f}")


if __name__ == "__main__":
    main()
