"""Memory plan of a training run per device, before launching it: `perco-jax plan`.

    plan = make_plan(config, parse_mesh("data=8,fsdp=8,tensor=1"), stage=1)
    print(format_plan(plan, device_memory=parse_bytes("16GB")))

Everything comes from `jax.eval_shape` (nothing is allocated: SD3.5-large's 8B-parameter MM-DiT and
the 4.7B T5-XXL are shapes only) and from the parameter shardings that `parallel.py`'s logical-axis
rules (config.sharding_rules) give on a `jax.sharding.AbstractMesh` of the requested shape, so no
devices are needed. A leaf's bytes on one device are those of its shard: each dimension divided by
the product of the mesh axes its PartitionSpec names that divide it (`parallel.fit_spec`: an axis
that does not divide a dimension leaves it whole, as the loop places it).

Counted per device (exact, from shapes and shardings):
  params        the TrainState's params, split by config.trainable into trainable and frozen leaves
                (stage 2: the entropy model's)
  gradients     one float32 gradient per param leaf, sharded like it (the step differentiates the
                whole params tree: frozen leaves' gradients enter the logged grad norm)
  optimiser     the optax state: AdamW mu + nu of the trainable leaves (plus accumulated gradients
                when grad_accum_steps > 1)
  EMA           ema_params (config.ema_decay > 0)
  other state   VQ codebook statistics, step, rng
  frozen        the text encoders (CLIP-L, CLIP-G, T5-XXL; shapes from config.clip_l / clip_g / t5)
                and the SD3 VAE, and for stage 2 the stage-1 codec (its params tree, as the loop
                restores it), placed by `frozen`: "sharded" by the same rules (default) or
                "replicated" on every device: config.frozen_placement unless --frozen says otherwise
                (train/loop.py's frozen_shardings places them the same way); stage 3 keeps the
                stage-1 codec too (its hyper-encoder and VQ code the batch; the teacher) and trains
                the MM-DiT with its step embedder

Activations and buffers come from `activations` (an estimate; its docstring has the formulas).
The tree shapes and shardings come from `shapes`.

Not counted: XLA's temporary buffers, prefetching and fragmentation, and on GPUs the memory JAX
does not preallocate (XLA_PYTHON_CLIENT_MEM_FRACTION, 75% by default): leave headroom.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Mapping

from jax.sharding import AbstractMesh

from perco_jax import build, parallel
from perco_jax.train.activations import ALWAYS, FROZEN_FORWARD, activations
from perco_jax.train.shapes import Components, abstract_components, largest_layer_gathered, path_keys


# ----------------------------------------------------------------------------- parsing

def parse_mesh(text: str, num_devices: int | None = None) -> dict[str, int]:
    """"data=8,fsdp=8,tensor=1" -> {"data": 8, "fsdp": 8, "tensor": 1} (missing axes are 1).

    One axis may be -1 (all remaining devices) when `num_devices` (the total) is given.
    """
    out: dict[str, int] = {}
    for item in [p.strip() for p in str(text).split(",") if p.strip()]:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"mesh {text!r}: {item!r} is not AXIS=SIZE (e.g. data=8,fsdp=8,tensor=1)")
        if name not in parallel.MESH_AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {name!r}; the axes are {', '.join(parallel.MESH_AXES)}")
        if name in out:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh {text!r}: {name}={value.strip()!r} is not an integer") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh {text!r}: {name}={size}; sizes are >= 1 (or -1 = the remaining devices)")
        out[name] = size
    if not out:
        raise ValueError(f"mesh {text!r}: give at least one axis, e.g. data=8,fsdp=8,tensor=1")
    free = [a for a, s in out.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {text!r}: only one axis may be -1, got {', '.join(free)}")
    shape = {a: out.get(a, 1) for a in parallel.MESH_AXES}
    if free:
        known = math.prod(s for s in shape.values() if s != -1)
        if num_devices is None:
            raise ValueError(f"mesh {text!r}: {free[0]}=-1 needs the total device count (--devices N)")
        if num_devices % known:
            raise ValueError(f"mesh {text!r}: {num_devices} devices do not divide by the fixed axes ({known})")
        shape[free[0]] = num_devices // known
    elif num_devices is not None and math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {text!r} has {math.prod(shape.values())} devices, not {num_devices}")
    return shape


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """"16GB" -> 16e9, "80GiB" -> 80 * 2**30, "1.5e10" -> bytes (GB = 10^9 bytes, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"device memory {text!r}: give a size such as 16GB, 80GiB or 17179869184")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Plan:
    name: str
    stage: int
    mesh: dict[str, int]
    batch: int
    per_device_batch: int
    dtype: str
    trainable: str
    frozen_placement: str
    attention: str  # the step's attention implementation ("xla", "cudnn" or "splash")
    rows: list[tuple[str, int | None, int]]   # (what, total bytes or None, bytes per device)
    activation_rows: list[tuple[str, int]]

    @property
    def flash_attention(self) -> bool:
        """The MM-DiT's attention stores no logits."""
        return self.attention != "xla"

    @property
    def vae_flash_attention(self) -> bool:
        """Nor does the VAE's (head size 512: TPU's splash kernel only)."""
        return self.attention == "splash"

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def activation_bytes(self) -> int:
        """The frozen forward passes run before the trained network's: the peak is the larger of
        the two, plus what lives throughout (the batch, FSDP's gathered block)."""
        always = sum(v for n, v in self.activation_rows if n.startswith(ALWAYS))
        frozen = sum(v for n, v in self.activation_rows if n == FROZEN_FORWARD)
        train = sum(v for n, v in self.activation_rows if n != FROZEN_FORWARD and not n.startswith(ALWAYS))
        return always + max(frozen, train)

    @property
    def per_device(self) -> int:
        return sum(r[2] for r in self.rows) + self.activation_bytes

    @property
    def code_bytes(self) -> int:
        """The program's generated code (counted for TPU programs only: `tpu_code_bytes`)."""
        return sum(r[2] for r in self.rows if r[0] == CODE_ROW)

    def row(self, name: str) -> tuple[int | None, int]:
        for r in self.rows:
            if r[0] == name:
                return r[1], r[2]
        raise KeyError(name)

    def to_dict(self, device_memory: int | None = None) -> dict:
        d = {"config": self.name, "stage": self.stage, "mesh": self.mesh, "devices": self.num_devices,
             "batch": self.batch, "per_device_batch": self.per_device_batch, "dtype": self.dtype,
             "trainable": self.trainable, "frozen_placement": self.frozen_placement,
             "attention": self.attention, "flash_attention": self.flash_attention,
             "vae_flash_attention": self.vae_flash_attention,
             "rows": [{"what": n, "total_bytes": t, "per_device_bytes": p} for n, t, p in self.rows],
             "activations": [{"what": n, "per_device_bytes": p} for n, p in self.activation_rows],
             "activation_bytes": self.activation_bytes, "per_device_bytes": self.per_device}
        if device_memory is not None:
            d.update(device_memory_bytes=device_memory, fits=self.per_device <= device_memory,
                     margin_bytes=device_memory - self.per_device)
        return d


CODE_ROW = "generated code (TPU, estimate)"
# XLA:TPU's code for one training step (`aot.CompiledProgram.code_bytes`). The MM-DiT's blocks are
# unrolled (no scan), so each block's forward, recomputation and backward are code of their own,
# and that code differs between TPU generations and models. Fitted to finished compiles of the
# recipes' programs at 2 and 6 blocks (docs/training.md), MiB a block: v5e 54.5 (SD3-medium) to 66.5
# (SD3.5-large), 72 for SD3-medium's stage 3; v6e 58 (SD3.5-large); v5p 51 (SD3-medium) and 99
# (SD3.5-large: the larger, so the plan errs on the safe side); v4 not measured (v5p's, the other
# two-core generation). The rest of the step is 58-191 MiB.
TPU_CODE_BASE = 150 * 2**20
TPU_CODE_PER_BLOCK = {"v4": 99 * 2**20, "v5e": 62 * 2**20, "v5p": 99 * 2**20, "v6e": 58 * 2**20}


def tpu_code_bytes(config, generation: str) -> int:
    """Bytes of the generated code of a stage-1 or stage-3 training step on a TPU `generation`
    (v4, v5e, v5p, v6e): an estimate from measured programs, TPU_CODE_BASE + the generation's
    TPU_CODE_PER_BLOCK x the MM-DiT's blocks."""
    if generation not in TPU_CODE_PER_BLOCK:
        raise ValueError(f"TPU generation {generation!r}: one of {', '.join(TPU_CODE_PER_BLOCK)}")
    return TPU_CODE_BASE + TPU_CODE_PER_BLOCK[generation] * int(config.mmdit.num_layers)


def make_plan(config, mesh: Mapping[str, int], *, stage: int | None = None, batch: int | None = None,
              frozen: str | None = None, attention: str = "xla", components: Components | None = None,
              tpu: str | None = None) -> Plan:
    """The per-device memory plan of training `config` on a mesh of shape `mesh` ({axis: size}).

    `components` (from `abstract_components`, for the same config / stage / batch) skips the
    eval_shape when planning several meshes. frozen=None: config.frozen_placement.
    `attention`: the step's attention implementation (`models.attention.IMPLEMENTATIONS`): "xla"
    stores the logits, "cudnn" (GPUs) and "splash" (TPU) are fused kernels (`activations`).
    `tpu`: the TPU generation the run is for (v4, v5e, v5p, v6e), whose training-step code the
    plan then counts (`tpu_code_bytes`, stages 1 and 3); None: not a TPU run, or not known."""
    if frozen is None:
        frozen = config.frozen_placement
    if frozen not in build.FROZEN_PLACEMENTS:
        raise ValueError(f"frozen={frozen!r}: choose one of {build.FROZEN_PLACEMENTS}")
    unknown = set(mesh) - set(parallel.MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {parallel.MESH_AXES}")
    mesh = {a: int(mesh.get(a, 1)) for a in parallel.MESH_AXES}
    if any(v < 1 for v in mesh.values()):
        raise ValueError(f"mesh {mesh}: every axis must be >= 1")
    AbstractMesh(tuple(mesh.values()), parallel.MESH_AXES)  # the mesh the shardings live on
    comp = components if components is not None else abstract_components(config, stage, batch)
    cfg = comp.config
    data_fsdp = mesh["data"] * mesh["fsdp"]
    if cfg.batch_size % data_fsdp:
        raise ValueError(f"batch size {cfg.batch_size} (stage {cfg.stage}) is not divisible by data x fsdp = "
                         f"{mesh['data']} x {mesh['fsdp']} = {data_fsdp}: the batch is split over both axes")
    st = comp.state
    trainable = cfg.trainable if cfg.stage in (1, 3) else "all"  # stage 2 trains all the entropy model
    from perco_jax.train.state import trainable_label

    def in_state(field, pred=lambda keys: True):
        def where(path):
            keys = path_keys(path)
            return keys[0] == field and pred(keys[1:])
        return st.total(where), st.per_device(mesh, where=where)

    def label(keys):
        return trainable_label(keys, trainable) == "train"

    rows: list[tuple[str, int | None, int]] = [
        ("params, trainable", *in_state("params", label)),
        ("params, frozen", *in_state("params", lambda k: not label(k))),
        ("gradients (float32, all params)", *in_state("params")),
        ("optimiser state (AdamW mu+nu)", *in_state("opt_state")),
        ("EMA of params", *in_state("ema_params")),
    ]
    other = [in_state(f) for f in ("vq_state", "step", "rng")]
    rows.append(("VQ statistics, step, rng", sum(o[0] for o in other), sum(o[1] for o in other)))
    for name, part in comp.frozen.items():
        what = {"T5": "T5 text encoder", "CLIP-L": "CLIP-L text encoder", "CLIP-G": "CLIP-G text encoder",
                "VAE": {"sd3_vae": "SD3 VAE", "patch": "patch autoencoder"}.get(cfg.autoencoder, "autoencoder (no params)")
                }.get(name, name)
        rows.append((f"{what} (frozen)", part.total(), part.per_device(mesh, replicated=frozen == "replicated")))
    b = cfg.batch_size // data_fsdp
    text_gather = 0 if frozen == "replicated" else max(
        [largest_layer_gathered(comp.frozen[k], mesh) for k in ("CLIP-L", "CLIP-G", "T5") if k in comp.frozen], default=0)
    acts = activations(cfg, b, mesh["tensor"], attention, text_gather)
    gathered = largest_layer_gathered(st, mesh, under="params")
    if gathered:
        acts.append(("FSDP: one block's params + grads all-gathered", 2 * gathered))
    if tpu is not None and cfg.stage in (1, 3):  # a TPU program: its code takes HBM too
        rows.append((CODE_ROW, None, tpu_code_bytes(cfg, tpu)))
    return Plan(cfg.name, int(cfg.stage), mesh, int(cfg.batch_size), b, str(cfg.dtype), trainable, frozen,
                attention, rows, acts)


def format_plan(plan: Plan, device_memory: int | None = None) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in plan.mesh.items())
    attn = {"xla": "attention logits stored (--flash-attention: a fused kernel)",
            "cudnn": "fused attention (cuDNN; the VAE's logits stored)",
            "splash": "fused attention (TPU's splash kernel, the VAE's too)"}[plan.attention]
    lines = [f"plan: {plan.name}, stage {plan.stage}, mesh {mesh} ({plan.num_devices} devices), "
             f"batch {plan.batch} ({plan.per_device_batch} per device), compute {plan.dtype}, "
             f"trainable={plan.trainable}",
             f"frozen encoders {plan.frozen_placement}; {attn}",
             "", f"  {'':<52}{'total':>12}{'per device':>14}"]
    for name, total, per in plan.rows:
        lines.append(f"  {name:<52}{human(total) if total is not None else '-':>12}{human(per):>14}")
    lines.append(f"  {'activations and buffers (estimate)':<52}{'-':>12}{human(plan.activation_bytes):>14}")
    for name, per in plan.activation_rows:
        lines.append(f"    {name:<50}{'':>12}{human(per):>14}")
    lines.append(f"  {'-' * 78}")
    lines.append(f"  {'total per device':<52}{'':>12}{human(plan.per_device):>14}")
    if device_memory is not None:
        margin = device_memory - plan.per_device
        verdict = (f"fits, {human(margin)} to spare" if margin >= 0 else f"does not fit, {human(-margin)} over")
        lines.append(f"device memory {human(device_memory)} ({device_memory:,} bytes): {verdict}")
    return "\n".join(lines)


def plan_json(plan: Plan, device_memory: int | None = None) -> str:
    return json.dumps(plan.to_dict(device_memory), indent=2)


# ----------------------------------------------------------------------------- recipes and batches

def recipe(name: str) -> dict:
    """The pod recipe `name` of perco_jax.configs.recipes (config, stage, topology, mesh, batch,
    overrides); an unknown name is one ValueError listing them."""
    from perco_jax.configs.recipes import RECIPES

    if name not in RECIPES:
        raise ValueError(f"recipe {name!r}: one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def recipe_on_devices(name: str, devices: int) -> tuple[str, list[str], dict[str, int], int]:
    """Pod recipe `name` at a reduced slice of `devices` devices: (preset, overrides, mesh, batch per
    device). The overrides are the recipe's plus its stage and the mesh; FSDP spans gcd(the recipe's
    fsdp, devices), data the rest; the batch per device is the recipe's batch per chip."""
    r = recipe(name)
    pod = parse_mesh(r["mesh"])
    fsdp = math.gcd(pod["fsdp"], devices)
    mesh = {"data": devices // fsdp, "fsdp": fsdp, "tensor": 1}
    over = list(r["overrides"]) + [f"stage={r['stage']}"] + [f"mesh.{a}={n}" for a, n in mesh.items()]
    return r["config"], over, mesh, r["batch"] // math.prod(pod.values())


HEADROOM = 0.2  # the share of each device's memory the pod recipes keep free (docs/training.md)


def largest_batch(config, mesh: Mapping[str, int], memory: int, *, headroom: float = HEADROOM, most: int = 1024,
                  stage: int | None = None, frozen: str | None = None, attention: str = "xla",
                  tpu: str | None = None) -> int | None:
    """The largest batch per device, at most `most`, whose plan (`make_plan`, same arguments) leaves
    `headroom` of `memory` bytes per device to spare; None when one image a device does not fit.
    Only batches the frozen VAE's chunks divide are tried (config.autoencoder_chunk: a batch per
    device up to one chunk, or a multiple of it)."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom {headroom}: a fraction in [0, 1)")
    data_fsdp = int(mesh.get("data", 1)) * int(mesh.get("fsdp", 1))
    comp = abstract_components(config, stage, data_fsdp)  # (the state's shapes do not depend on the batch)
    chunk = build.autoencoder_chunk(comp.config)
    sizes = [b for b in range(1, most + 1) if chunk <= 0 or b <= chunk or b % chunk == 0]

    def fits(b: int) -> bool:
        cfg = comp.config.copy_and_resolve_references()
        cfg.batch_size = b * data_fsdp
        p = make_plan(config, mesh, frozen=frozen, attention=attention, tpu=tpu,
                      components=dataclasses.replace(comp, config=cfg))
        return p.per_device <= (1 - headroom) * memory

    lo, hi = 0, len(sizes)  # sizes[:lo] fit (the plan grows with the batch), sizes[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(sizes[mid]):
            lo = mid + 1
        else:
            hi = mid
    return sizes[lo - 1] if lo else None
