"""Stage-1 or stage-3 training step at any config: step time, model FLOPs and MFU on the devices at hand.

    python benchmarks/train_step.py                                  # tiny on whatever is there
    python benchmarks/train_step.py --config sd3_medium --batch 8    # on a GPU / TPU host (512^2, bf16)
    python benchmarks/train_step.py --recipe sd3_medium-stage1-v5e-256   # a pod recipe on this host's devices

--recipe runs a pod recipe (perco_jax.configs.recipes, docs/training.md) at a reduced slice: its
config, overrides and stage on the devices at hand (`plan.recipe_on_devices`: FSDP over as many of
them as the recipe's fsdp allows, data over the rest), at its batch per chip, or at the largest
batch that `perco-jax plan` says leaves 20% of a device's memory (as the device reports it, or
--device-memory) where that is less; a stage-3 recipe's teacher is a random stage-1 codec.

Builds the config's real shapes with random weights (MM-DiT + hyper-encoder + VQ trained; the VAE
and, with --text encode, CLIP-L/G + T5 frozen, placed as config.frozen_placement says), runs the
jitted sharded step of `perco_jax.train` on synthetic images over all devices (mesh data=-1 unless
-o mesh.* says otherwise), no checkpoints, and prints the median step time, the model FLOPs per
step from `perco_jax.train.flops.step_flops` (the step's own jaxpr: forward + backward of the trained
network, forward of the frozen ones, no rematerialisation recompute), XLA's own count of the
compiled program for comparison, and MFU = model FLOPs / step time / (devices x peak).

Peak dense 16-bit FLOP/s come from PEAK_TFLOPS by device kind, or --peak-tflops (needed on CPUs,
where no MFU is printed otherwise). --text cache (the default) feeds precomputed text embeddings,
as a run with config.text.cache or the embeddings of `perco-jax embed-text` does; --text encode
runs the frozen encoders in the step (T5-XXL is 4.7B parameters: count its memory with
`perco-jax plan`).
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
from perco_jax.train.flops import step_flops
from perco_jax.train.plan import recipe_on_devices
from perco_jax.train import stage3
from perco_jax.train.loop import frozen_shardings, jit_step, make_step
from perco_jax.train.stage0 import autoencoder_params
from perco_jax.train.state import make_optimizer, sharded_init
from perco_jax.train.step import TOKEN_KEYS, init_state, init_variables

# Dense bf16 / fp16 peak per device, TFLOP/s (vendor data sheets, without sparsity). Matched in
# order against jax's device_kind, so the more specific names come first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
               ("A100", 312.0), ("L4", 121.0), ("TPU v6", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
               ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0))


def peak_tflops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS if k.lower() in device_kind.lower()), None)


def step_attention(config) -> str:
    """The MM-DiT attention the step runs on this platform (the automatic choice for its heads)."""
    from perco_jax.models.attention import attention_implementation

    head = jax.ShapeDtypeStruct((1, 1, 1, config.mmdit.attention_head_dim), jnp.dtype(config.dtype))
    return attention_implementation(None, head)


def tpu_generation(device_kind: str) -> str | None:
    """"v5e" for "TPU v5 lite" or "TPU v5e", etc. (the plan then counts the step's code); None off TPUs."""
    from perco_jax.train.aot import GENERATIONS

    kind = device_kind.lower()
    return next((g for g, v in GENERATIONS.items() if kind in (v[3].lower(), f"tpu {g}")), None)


def device_memory(text: str | None) -> int | None:
    """Bytes of one device: --device-memory, else what the device reports (GPUs, TPUs; None on CPUs)."""
    from perco_jax.train.plan import parse_bytes

    if text:
        return parse_bytes(text)
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def recipe_batch(config, mesh: dict, per_chip: int, memory: int | None) -> int:
    """The batch per device of a recipe run on these devices: the recipe's per chip, or less where
    `perco-jax plan` says it would not leave 20% of `memory` to spare. One clear exit where a single
    image a device does not fit."""
    from perco_jax.train.plan import HEADROOM, human, largest_batch

    if memory is None:
        return per_chip
    b = largest_batch(config, mesh, memory, most=per_chip, attention=step_attention(config),
                      tpu=tpu_generation(jax.devices()[0].device_kind))
    if b is None:
        raise SystemExit(f"{config.name} stage {config.stage} on mesh {mesh}: one image a device leaves under "
                         f"{HEADROOM:.0%} of {human(memory)} per device in `perco-jax plan` (try more devices, "
                         f"which FSDP splits the state over, or --batch to run anyway)")
    if b < per_chip:
        print(f"batch per device {b}, not the recipe's {per_chip}: the most that `perco-jax plan` fits in "
              f"{human(memory)} with {HEADROOM:.0%} to spare (--batch to choose)")
    return b


def print_memory(config, mesh, batch: int, mem) -> None:
    """The compiled program's bytes per device (XLA's memory analysis) and the device allocator's peak,
    beside `perco-jax plan`'s estimate for the same run (fused attention where the step uses it)."""
    from perco_jax.train.plan import human, make_plan

    p = make_plan(config, dict(mesh.shape), batch=batch, attention=step_attention(config))
    line = f"plan (attention {p.attention}): {human(p.per_device)} per device"
    if mem is not None:
        program = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes \
            - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes
        line += (f"; compiled program: {human(program)} (arguments {human(mem.argument_size_in_bytes)}, "
                 f"temporaries {human(mem.temp_size_in_bytes)}) = plan x {p.per_device / program:.2f}")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        line += f"; device peak in use {human(stats['peak_bytes_in_use'])}"
    print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--recipe", help="a pod recipe (perco_jax.configs.recipes) at this host's devices: its "
                                     "config, overrides, stage and batch per chip")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 8, or the recipe's per chip)")
    ap.add_argument("--image", type=int, default=None, help="image side (default: the config's)")
    ap.add_argument("--text", choices=("cache", "encode"), default="cache")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after one compile step)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (default: by device kind)")
    ap.add_argument("--device-memory", help="with --recipe: one device's memory, e.g. 80GiB, for the batch the "
                                            "plan fits (default: what the device reports; CPUs report none)")
    ap.add_argument("-o", "--override", action="append", default=[], help="config override, e.g. remat=False")
    args = ap.parse_args()
    preset, over, batch = args.config, [], args.batch or 8
    if args.recipe:
        preset, over, _, per_chip = recipe_on_devices(args.recipe, jax.device_count())
    if not any(o.startswith("text.embeddings=") for o in over):  # (a recipe reads stored embeddings)
        over.append(f"text.cache={args.text == 'cache'}")
    over += args.override
    if args.image:
        over += [f"image_size={args.image}", f"data.image_size={args.image}"]
    config = load_config(preset, over)
    if args.recipe and not args.batch:
        mesh_shape = dict(parallel.make_mesh(config.mesh.to_dict()).shape)  # (the recipe's, or -o mesh.*)
        batch = recipe_batch(config, mesh_shape, per_chip, device_memory(args.device_memory)) * jax.device_count()
    if config.stage == 3 and not config.stage1_workdir:
        config.stage1_workdir = "(benchmark: a random stage-1 codec)"
    config = build.stage_config(config)
    config.batch_size = batch
    mesh = parallel.make_mesh(config.mesh.to_dict())
    rules = parallel.rules_from_config(config.sharding_rules)
    model = stage3.student_model(config) if config.stage == 3 else build.build_perco(config)
    ae = build.build_autoencoder(config)
    length = config.text.max_sequence_length
    t0 = time.time()
    flops = step_flops(config, batch=batch)  # (stage_config again would take the stage-3 section's batch)
    print(f"model FLOPs per step {flops.step / 1e12:.3f} T (traced in {time.time() - t0:.0f} s): MM-DiT forward "
          f"{flops.mmdit_forward / 1e12:.3f} T, trained forward {flops.trained_forward / 1e12:.3f} T, VAE encoder "
          f"{flops.autoencoder_forward / 1e12:.3f} T, text encoders {flops.text_forward / 1e12:.3f} T")
    t0 = time.time()
    encoder, text_params = None, {}  # precomputed text: the step runs no encoder (none is built)
    if args.text == "encode":
        if not build.text_encoders_built(config):
            raise SystemExit("--text encode: this config reads stored embeddings (text.embeddings)")
        encoder, text_params = build.build_text(config, "/tmp/perco-bench")
    tx = make_optimizer(config)
    with jax.set_mesh(mesh):
        frozen = {"autoencoder": autoencoder_params(config, ae), "text": text_params}
        if config.stage == 3:  # the teacher: a random stage-1 codec (the step's work is the same)
            s1 = config.copy_and_resolve_references()
            s1.stage = 1
            teacher = build.build_perco(s1)
            # its params and VQ state alone ({"params", "vq"}, as stage2.codec_params gives them): a
            # whole stage-1 state would add its optimiser state and EMA to the build's peak
            frozen["codec"], _ = sharded_init(lambda r: init_variables(s1, teacher, r), jax.random.PRNGKey(s1.seed),
                                              mesh, rules)
            state, shardings = stage3.init_state(config, model, tx, mesh, rules)
        else:
            state, shardings = init_state(config, model, tx, mesh, rules)
        placed = frozen_shardings(config, frozen, encoder, ae, mesh, rules)
        frozen = parallel.place(frozen, placed)
        print(f"built in {time.time() - t0:.0f} s; trained params "
              f"{sum(x.size for x in jax.tree_util.tree_leaves(state.params)) / 1e9:.3f} B")
        ex = [synthetic_example(i, 0, config.image_size) for i in range(batch)]
        rng = np.random.default_rng(0)
        if config.stage == 3 and config.stage3.method == "reflow":  # its batch: the teacher's couplings
            side, channels = build.latent_geometry(config)
            g = config.codec.grid_side
            inputs = {"noise": rng.standard_normal((batch, side, side, channels), np.float32),
                      "latent": rng.standard_normal((batch, side, side, channels), np.float32),
                      "indices": rng.integers(0, config.codec.codebook_size, (batch, g, g), np.int32)}
        else:
            inputs = {"image": np.stack([im for im, _ in ex]).astype(np.float32) * 2 - 1}
        if args.text == "cache":  # random stand-ins of the right shapes: the step's work is the same
            j, p = config.mmdit.joint_attention_dim, config.mmdit.pooled_projection_dim
            m = build.clip_max_length(config) + length
            text = {"context": rng.standard_normal((batch, m, j), np.float32),
                    "pooled": rng.standard_normal((batch, p), np.float32)}
            empty = {k: jnp.asarray(v[:1]) for k, v in text.items()}
        else:
            tokens = encoder.tokenize([c for _, c in ex], length)
            text = {k: tokens[k] for k in TOKEN_KEYS}
            empty = {k: jnp.asarray(v[:1]) for k, v in encoder.tokenize([""], length).items()}
        batch_arrays = parallel.global_batch({**inputs, **text}, mesh)
        step = jit_step(make_step(config, model, ae, encoder, tx), shardings, mesh)
        t0 = time.time()
        compiled = step.lower(state, batch_arrays, frozen, empty).compile()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        state, m = compiled(state, batch_arrays, frozen, empty)
        jax.block_until_ready(m)
        print(f"compile + first step {time.time() - t0:.0f} s, loss {float(m['loss']):.4f}")
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch_arrays, frozen, empty)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    n, kind = jax.device_count(), jax.devices()[0].device_kind
    peak = args.peak_tflops or peak_tflops(kind)
    achieved = flops.step / t / 1e12
    # XLA counts the compiled program of one device (its shard), elementwise work and any
    # rematerialisation included: per device it should be a little above model FLOPs / devices.
    print(f"XLA cost analysis: {xla_flops / 1e12:.3f} TFLOPs per device per step "
          f"= {xla_flops * n / flops.step:.2f} x model FLOPs / devices")
    mfu = f"MFU {achieved / (n * peak):.1%} of {n} x {peak:g} TFLOP/s" if peak else \
        "MFU: unknown peak for this device (give --peak-tflops)"
    print_memory(config, mesh, batch, mem)
    print(f"{config.name} stage-{config.stage} step, batch {batch} at {config.image_size}^2, {config.dtype}, text "
          f"{args.text}, on {n} x {kind}: {t * 1e3:.1f} ms/step, {batch / t:.1f} images/s, "
          f"{achieved:.2f} TFLOP/s model; {mfu}")


if __name__ == "__main__":
    main()
