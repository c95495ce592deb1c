"""The batch per device each pod recipe runs at on one host, as `benchmarks/train_step.py --recipe`
chooses it there: the recipe's batch per chip, or the largest that `perco-jax plan` says leaves 20%
of a device's memory where that is less. An estimate from shapes (no devices; about 5 minutes on 2
cores), to pick the host before renting it.

    python benchmarks/recipe_batches.py                     # every recipe x the hosts below
    python benchmarks/recipe_batches.py --recipe sd35_large-stage1-v5p-128 --json

Hosts: one and eight H100s (80 GB, of which JAX preallocates 75%: the memory its devices report,
with cuDNN's attention) and one host of each TPU generation the recipes use (v5e-8 and v6e-8: 8
chips; v5p-8: 4 chips; the splash kernel, and the step's code counted).
"""
import argparse
import json

from perco_jax.config import load_config
from perco_jax.configs.recipes import RECIPES
from perco_jax.train.aot import GENERATIONS
from perco_jax.train.plan import human, largest_batch, make_plan, recipe_on_devices

H100 = int(81559 * 2**20 * 0.75)  # nvidia-smi's 81,559 MiB, at XLA_PYTHON_CLIENT_MEM_FRACTION's default
HOSTS = {  # name: (devices, bytes a device, attention, TPU generation)
    "1 x H100": (1, H100, "cudnn", None),
    "8 x H100": (8, H100, "cudnn", None),
    "v5e-8": (8, GENERATIONS["v5e"][2], "splash", "v5e"),
    "v5p-8": (4, GENERATIONS["v5p"][2], "splash", "v5p"),
    "v6e-8": (8, GENERATIONS["v6e"][2], "splash", "v6e"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="(repeatable; default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for name in args.recipe or RECIPES:
        row = {"recipe": name, "batch_per_chip": None, "hosts": {}}
        for host, (devices, memory, attention, tpu) in HOSTS.items():
            preset, over, mesh, per_chip = recipe_on_devices(name, devices)
            config = load_config(preset, over)
            b = largest_batch(config, mesh, memory, most=per_chip, attention=attention, tpu=tpu)
            plan = None if b is None else make_plan(config, mesh, batch=b * devices, attention=attention, tpu=tpu)
            row["batch_per_chip"] = per_chip
            row["hosts"][host] = {"mesh": mesh, "memory_bytes": memory, "batch_per_device": b,
                                  "plan_bytes": None if plan is None else plan.per_device}
        rows.append(row)
        if not args.json:
            cells = [f"{h['batch_per_device']} ({human(h['plan_bytes'])})" if h["batch_per_device"] else "does not fit"
                     for h in row["hosts"].values()]
            print(" | ".join([f"`{name}`", str(row["batch_per_chip"])] + cells), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("columns: recipe | its batch per chip | " + " | ".join(
            f"{h} ({d} x {human(m)})" for h, (d, m, _, _) in HOSTS.items()))


if __name__ == "__main__":
    main()
