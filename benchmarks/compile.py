"""The pod recipes (`perco_jax.configs.recipes`) compiled for their TPU slices by XLA's TPU compiler,
without a TPU: memory per chip (the compiler's beside `perco-jax plan`'s), headroom, compile time,
and XLA's FLOP count beside the model FLOPs of `perco_jax.train.flops`.

    python benchmarks/compile.py                               # every recipe (minutes each on 2 cores)
    python benchmarks/compile.py --recipe sd3_medium-stage1-v5e-256
    python benchmarks/compile.py --recipe sd35_large-stage1-v5p-128 --layers 4,8   # fewer layers, scaled
    python benchmarks/compile.py --recipe sd35_large-stage1-v5p-128 --attention xla  # logits stored
    python benchmarks/compile.py --recipe sd35_large-stage1-v5p-128 --buffers-only   # 3-5 minutes, all 38 blocks

--layers L1,L2 compiles the MM-DiT with L1 and with L2 blocks instead of all of them and scales
each figure linearly in the block count to the config's (per chip: a + b x blocks; exact for the
blocks' params, optimiser state and remat-saved inputs, which grow by one block each, and for the
temporaries while one block's working set is the peak). --layers L compiles L blocks and adds the
plan's own growth from L blocks to all of them (params, optimiser, EMA and saved block inputs,
exact from shapes). Compiling takes 5 to 15 minutes a program on 2 cores, little of it in the
blocks: a 2-block SD3-medium step compiles in about as long as the 24-block one.

Model FLOPs against XLA's count (XLA/model: both per chip, of the compiled block count): the training
step has no loop (its blocks are unrolled), so XLA's count is the whole step. It exceeds the model
FLOPs by the rematerialised forward of the MM-DiT (remat: about a third of forward + backward) and
the elementwise work model FLOPs leave out, and falls short by what it does not see: the splash
kernel's matmuls are a custom call, which XLA's count leaves out.
"""
import argparse
import json
import time

from perco_jax.train import aot

aot.compile_environment()  # before jax picks its backend

from perco_jax.config import load_config  # noqa: E402
from perco_jax.configs.recipes import RECIPES  # noqa: E402
from perco_jax.train import plan as planning  # noqa: E402
from perco_jax.train.flops import step_flops  # noqa: E402


def compile_recipe(name: str, layers=None, attention=None, decode: bool = False, per_chip: int | None = None,
                   buffers_only: bool = False) -> dict:
    r = dict(RECIPES[name])
    topology = aot.parse_topology(r["topology"])
    mesh = planning.parse_mesh(r["mesh"], topology.chips)
    if per_chip:  # another batch per chip than the recipe's (searching for the largest that fits)
        r["batch"] = per_chip * mesh["data"] * mesh["fsdp"]
    config = load_config(r["config"], list(r["overrides"]))
    full = int(config.mmdit.num_layers)
    counts = [full] if not layers else list(layers)
    figures = []
    for n in counts:
        c = load_config(r["config"], list(r["overrides"]) + [f"mmdit.num_layers={n}"])
        p = planning.make_plan(c, mesh, stage=r["stage"], batch=r["batch"], attention=attention or "splash",
                               tpu=topology.generation)
        prog = aot.compile_program("train", c, topology, mesh, stage=r["stage"], batch=r["batch"], attention=attention,
                                   until_buffers=buffers_only)
        print(aot.format_program(prog, topology.hbm_bytes, p), flush=True)
        figures.append((n, p, prog))
    n2, p2, c2 = figures[-1]

    full_plan = planning.make_plan(config, mesh, stage=r["stage"], batch=r["batch"], attention=attention or "splash",
                                   tpu=topology.generation)

    def scaled(f, plan_f=None):
        """The figure at `full` blocks: linear through two compiled counts; from one count, plus the
        plan's own growth from that count to `full` (plan_f), or the figure itself when none."""
        if len(figures) == 1:
            n, p, prog = figures[0]
            return f(figures[0]) + (plan_f(full_plan) - plan_f(p) if plan_f and n != full else 0)
        (a, fa), (b, fb) = (figures[0][0], f(figures[0])), (figures[-1][0], f(figures[-1]))
        return fb + (fb - fa) * (full - b) / (b - a)

    # a compile stopped after buffer assignment has no code: the plan's totals leave theirs out too
    without = (lambda p: p.per_device - p.code_bytes) if buffers_only else (lambda p: p.per_device)
    if any(prog.error for _, _, prog in figures):
        compiled, plan_total = None, None
    else:
        compiled = scaled(lambda t: t[2].per_device, without)
        plan_total = scaled(lambda t: without(t[1]), without)
    model = step_flops(config, batch=r["batch"], stage=r["stage"]).step / topology.chips
    # XLA's count against the model FLOPs of the same compiled program (the last block count)
    n_last = figures[-1][0]
    model_last = step_flops(load_config(r["config"], list(r["overrides"]) + [f"mmdit.num_layers={n_last}"]),
                            batch=r["batch"], stage=r["stage"]).step / topology.chips
    xla_ratio = None if figures[-1][2].flops is None else figures[-1][2].flops / model_last
    out = {"recipe": name, "topology": topology.describe(), "mesh": mesh, "batch": r["batch"],
           "batch_per_chip": r["batch"] // (mesh["data"] * mesh["fsdp"]), "attention": attention or "auto",
           "layers_compiled": counts, "layers_full": full, "plan_bytes": without(full_plan),
           "plan_code_bytes": full_plan.code_bytes, "plan_bytes_scaled": plan_total,
           "compiled_bytes": compiled, "hbm_bytes": topology.hbm_bytes,
           "headroom": None if compiled is None else 1 - compiled / topology.hbm_bytes,
           "compile_seconds": sum(prog.seconds for _, _, prog in figures),
           "stopped": figures[-1][2].stopped,
           "model_tflops_per_chip": model / 1e12, "xla_over_model_flops": xla_ratio,
           "error": next((prog.error for _, _, prog in figures if prog.error), None)}
    if decode:
        out["decoding"] = [aot.compile_program("decode", config, topology, sampler=s, attention=attention,
                                               until_buffers=buffers_only).to_dict(topology.hbm_bytes)
                           for s in ("teacher", "few_step")]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="(repeatable; default: all)")
    ap.add_argument("--layers", help="L1,L2: compile that many MM-DiT blocks and scale to the config's")
    ap.add_argument("--attention", choices=("auto", "xla", "splash"), default="auto")
    ap.add_argument("--decode", action="store_true", help="also compile the recipe's decoders")
    ap.add_argument("--batch-per-chip", type=int, help="instead of the recipe's batch per chip")
    ap.add_argument("--buffers-only", action="store_true",
                    help="stop each compile after XLA's buffer assignment (arguments + temporaries, no code)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    attention = None if args.attention == "auto" else args.attention
    rows = []
    for name in args.recipe or sorted(RECIPES):
        t0 = time.time()
        rows.append(compile_recipe(name, layers, attention, args.decode, args.batch_per_chip, args.buffers_only))
        print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
    gib = 2 ** 30
    print(f"\n{'recipe':<34}{'per chip':>9}{'plan':>9}{'compiler':>10}{'plan/comp':>10}{'headroom':>9}"
          f"{'model TF':>10}{'XLA/model':>10}{'compile':>9}")
    for r in rows:
        comp = r["compiled_bytes"]
        plan_total = r["plan_bytes_scaled"] or r["plan_bytes"]
        print(f"{r['recipe']:<34}{r['batch_per_chip']:>9}{r['plan_bytes'] / gib:>8.2f}G"
              f"{(comp / gib if comp else float('nan')):>9.2f}G"
              f"{(plan_total / comp if comp else float('nan')):>10.2f}"
              f"{(r['headroom'] if comp else float('nan')):>9.0%}{r['model_tflops_per_chip']:>10.1f}"
              f"{(r['xla_over_model_flops'] or float('nan')):>10.2f}{r['compile_seconds']:>8.0f}s"
              + (f"  (scaled from {r['layers_compiled']} blocks)" if r['layers_compiled'] != [r['layers_full']] else "")
              + (f"  ({r['stopped']}: no code)" if r['stopped'] else "")
              + (f"  DOES NOT FIT: {r['error'][:80]}" if r['error'] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
