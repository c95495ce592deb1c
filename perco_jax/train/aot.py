"""Ahead-of-time compilation for TPU slices without a TPU: `perco-jax plan --compile --topology NAME`.

    topo = parse_topology("v5e-256")                   # Cloud TPU's name -> Topology (256 chips)
    report = compile_training(config, topo, {"data": 16, "fsdp": 16})
    report.per_device, report.collectives, report.error   # the compiler's figures, or its OOM

XLA's TPU compiler (the `libtpu` package: `pip install -e '.[tpu]'`) compiles for a slice it is not
running on: `jax.experimental.topologies.get_topology_desc` gives the slice's chips as compile-only
devices, and `jax.jit(...).lower(<ShapeDtypeStructs sharded on a mesh of them>).compile()` is the real
program, its memory per chip and its collectives, or the compiler's RESOURCE_EXHAUSTED when it does
not fit in HBM. Nothing is allocated: every tree comes from `shapes.abstract_components`
(jax.eval_shape), so SD3.5-large's 8B-parameter MM-DiT and T5-XXL are shapes only.

The programs are the ones a run executes:
  training   the loop's jitted step of config.stage (`loop.make_step`, `loop.jit_step`: the state
             donated and sharded by the logical-axis rules, the batch split over data x fsdp, the
             frozen text encoders / VAE / stage-1 codec placed as `loop.frozen_shardings` places them)
  decoding   `Codec.decompress_batch`'s jitted decoders (`codec.transforms.make_decoder`, the guided
             sampler at config.sample.steps, and `make_few_step_decoder` at the fewest steps of
             config.stage3.steps) on a decoder batch (config.sample.batch_size) split over one
             host's chips, parameters replicated, as a `Codec` runs them.

A process that compiles for TPU runs with JAX_PLATFORMS=cpu and TPU_SKIP_MDS_QUERY=1 (the CLI sets
both when unset): the host's own backend stays the CPU, and libtpu does not look for a TPU or its
metadata server; ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets several compiling processes load libtpu at once.
Nothing else in the package touches libtpu.

Topology names follow Cloud TPU's accelerator types: v5e-N and v6e-N count chips (v5litepod-N is
v5e-N), v4-N and v5p-N count TensorCores, two per chip (v5p-128 is 64 chips); a literal topology
("v5e:16x16", "v5p:4x4x4") is accepted too; `num_slices` > 1 is a multi-slice job over DCN.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Mapping

# (generation) -> (dimensions of its torus, TensorCores counted per chip in its accelerator-type
# name, HBM per chip in bytes (Cloud TPU's system-architecture pages), jax device kind)
GENERATIONS = {
    "v4": (3, 2, 32 * 2**30, "TPU v4"),
    "v5e": (2, 1, 16 * 2**30, "TPU v5 lite"),
    "v5p": (3, 2, 95 * 2**30, "TPU v5"),
    "v6e": (2, 1, 32 * 2**30, "TPU v6 lite"),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def compile_environment() -> None:
    """Sets the environment a deviceless TPU compile needs, before jax initialises a backend: the
    host's backend the CPU unless JAX_PLATFORMS says otherwise (jax reads the variable when it is
    imported, hence the config update), and no query of a TPU VM's metadata server."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu's lockfile keeps a second process off a host's TPU chips; a compile-only process opens
    # none, and several may run at once (a test beside a long compile)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


# ----------------------------------------------------------------------------- topologies

@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (or `num_slices` of them): generation, chip grid and HBM per chip."""
    name: str            # as given: "v5e-256", "v5p:4x4x4"
    generation: str      # v4, v5e, v5p, v6e
    grid: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips(self) -> int:
        """Chips of all slices (one jax device each: v4 and v5p as megacore)."""
        return math.prod(self.grid) * self.num_slices

    @property
    def hbm_bytes(self) -> int:
        return GENERATIONS[self.generation][2]

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "topology": self.topology_name, "chips": self.chips,
                "hbm_bytes": self.hbm_bytes}

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return (f"{self.name} ({self.topology_name}{slices}: {self.chips} chips of {self.hbm_bytes / 2**30:g} GiB HBM, "
                f"{GENERATIONS[self.generation][3]})")

    def devices(self) -> list:
        """The slice's chips as compile-only jax devices (needs libtpu; no TPU)."""
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            raise RuntimeError(f"compiling for {self.name} needs XLA's TPU compiler: pip install -e '.[tpu]'")
        compile_environment()
        from jax.experimental import topologies

        kw = {"num_slices": self.num_slices} if self.num_slices > 1 else {}
        if self.generation == "v4":
            kw["chip_config_name"] = "megacore"  # one device per chip, as v4 pods run
        return list(topologies.get_topology_desc(topology_name=self.topology_name, platform="tpu", **kw).devices)


def _grid(generation: str, chips: int) -> tuple[int, ...]:
    """Cloud TPU's chip grid of a slice: 2D (v5e, v6e) a x b with b in (a, 2a); 3D (v4, v5p) the
    most cubic power-of-two box, v5p-8 / v4-8 being 2x2x1."""
    dims = GENERATIONS[generation][0]
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{generation}: {chips} chips is not a power of two")
    if dims == 2:
        a = 2 ** (int(math.log2(chips)) // 2)
        return (a, chips // a)
    if chips < 4:
        raise ValueError(f"{generation}: the smallest slice is 4 chips (2x2x1)")
    grid = [1, 1, 1]
    while math.prod(grid) < chips:
        i = grid.index(min(grid[:2])) if min(grid[:2]) < min(grid) * 2 and grid[2] == 1 else grid.index(min(grid))
        grid[i] *= 2
    return tuple(sorted(grid)) if grid[2] > 1 else (grid[0], grid[1], 1)


def parse_topology(text: str, num_slices: int = 1) -> Topology:
    """"v5e-256" / "v5p-128" / "v4-64" / "v6e-16" / "v5litepod-8", or "v5e:16x16" / "v5p:4x4x4"."""
    t = str(text).strip().lower()
    if int(num_slices) < 1:
        raise ValueError(f"num_slices={num_slices}: need >= 1")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v6litepod)-(\d+)", t)
    if m:
        gen = ALIASES.get(m.group(1), m.group(1))
        n = int(m.group(2))
        per_chip = GENERATIONS[gen][1]
        if n % per_chip:
            raise ValueError(f"topology {text!r}: {gen}-N counts TensorCores ({per_chip} per chip); {n} is odd")
        return Topology(str(text), gen, _grid(gen, n // per_chip), int(num_slices))
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v6litepod):(\d+(?:x\d+)+)", t)
    if m:
        gen = ALIASES.get(m.group(1), m.group(1))
        grid = tuple(int(x) for x in m.group(2).split("x"))
        if len(grid) != GENERATIONS[gen][0]:
            raise ValueError(f"topology {text!r}: {gen} grids have {GENERATIONS[gen][0]} dimensions")
        return Topology(str(text), gen, grid, int(num_slices))
    raise ValueError(f"topology {text!r}: give a Cloud TPU type such as v5e-256, v5p-128 (TensorCores), v4-64, "
                     f"v6e-256, or a grid such as v5e:16x16 / v5p:4x4x4; generations: {', '.join(GENERATIONS)}")


# ----------------------------------------------------------------------------- the report

@dataclasses.dataclass
class CompiledProgram:
    """One program compiled for a topology: the compiler's bytes per chip, or its error."""
    name: str
    mesh: dict[str, int]
    seconds: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0        # outputs written into donated arguments (the train state)
    temp_bytes: int = 0
    code_bytes: int = 0
    resident_bytes: int = 0     # on the chips but not in the program: the text encoders a run with
                                # text.cache keeps placed (jit drops arguments a program never reads)
    flops: float | None = None  # XLA's count: a loop body (the samplers' steps) is counted once
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    attention: str = ""         # the MM-DiT's attention in the program
    error: str | None = None    # the compiler's message (RESOURCE_EXHAUSTED: does not fit)
    stopped: str | None = None  # "after buffer assignment": figures from XLA's buffer assignment, no
                                # code size or FLOP count (`compile_until_buffers`)
    peak: dict | None = None    # with `stopped`: what the temporaries hold at their peak (`peak_breakdown`)

    @property
    def per_device(self) -> int:
        """Peak bytes on one chip: arguments + outputs not written in place + temporaries + code, and
        what the run keeps on the chips outside the program."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
                + self.resident_bytes)

    @property
    def out_of_memory(self) -> bool:
        return self.error is not None and "RESOURCE_EXHAUSTED" in self.error

    def fits(self, hbm: int) -> bool:
        return self.error is None and self.per_device <= hbm

    def to_dict(self, hbm: int | None = None) -> dict:
        d = dataclasses.asdict(self)
        d["per_device_bytes"] = self.per_device if self.error is None else None
        if hbm is not None:
            d.update(hbm_bytes=hbm, fits=self.fits(hbm),
                     headroom=None if self.error else 1 - self.per_device / hbm)
        return d


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


_FUSED_REDUCE_SCATTER = re.compile(r"^%?(all-reduce-scatter[\w.\-]*) \(.*\) -> (.*) \{\s*$")


def _shape_bytes(text: str) -> int:
    return sum(_BYTES[t] * math.prod(int(x) for x in dims.split(",") if x) for t, dims in _SHAPE.findall(text))


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in a compiled module's text (async pairs counted
    once, at their -start; bytes of the result shapes). A loop body's collectives are counted once.
    XLA:TPU writes a reduce-scatter as an all-reduce inside a fused computation named
    all-reduce-scatter.N whose results are the shards: that all-reduce counts as a reduce-scatter,
    with the bytes of the computation's results (the shards), not the whole buffers it reduces."""
    out: dict[str, dict[str, int]] = {}
    op_re = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    fused = None  # the results of the all-reduce-scatter computation being read, else None
    for line in hlo_text.splitlines():
        head = _FUSED_REDUCE_SCATTER.match(line.strip())
        if head:
            fused = head.group(2)
            continue
        if line.startswith("}"):
            fused = None
            continue
        m = op_re.search(line)
        if not m:
            continue
        if fused is not None and m.group(2) == "all-reduce":
            op, nbytes = "reduce-scatter", _shape_bytes(fused)
        else:
            result = m.group(1)
            if m.group(3):  # an async start returns (operands, results[, contexts]): count the results
                shapes = _SHAPE.findall(result)
                shapes = shapes[len(shapes) // 2:] if len(shapes) > 1 else shapes
            else:
                shapes = _SHAPE.findall(result)
            op, nbytes = m.group(2), sum(_BYTES[t] * math.prod(int(x) for x in dims.split(",") if x) for t, dims in shapes)
        e = out.setdefault(op, {"count": 0, "bytes": 0})
        e["count"] += 1
        e["bytes"] += nbytes
    return out


def _compile(name: str, fn, args, mesh_shape: Mapping[str, int], mesh, attention: str,
             options: Mapping | None = None, resident: int = 0) -> CompiledProgram:
    """Lowers and compiles jitted `fn` on abstract `args` under the mesh; the compiler's figures.
    `options`: XLA debug options for this compile; with "xla_dump_to" the program's header (name,
    mesh, attention, resident bytes) is written there first, for `compile_until_buffers`."""
    import json

    import jax

    if options and options.get("xla_dump_to"):
        with open(os.path.join(options["xla_dump_to"], HEADER), "w") as f:
            json.dump({"name": name, "mesh": dict(mesh_shape), "attention": attention, "resident": resident}, f)
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args).compile(compiler_options=dict(options or {}))
    except Exception as e:  # the compiler's own message: RESOURCE_EXHAUSTED names HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return CompiledProgram(name, dict(mesh_shape), time.perf_counter() - t0, resident_bytes=resident,
                               attention=attention, error=str(e))
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return CompiledProgram(
        name, dict(mesh_shape), seconds, argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), code_bytes=int(mem.generated_code_size_in_bytes),
        resident_bytes=resident, flops=float(cost.get("flops", 0.0)) if cost else None,
        collectives=collectives(compiled.as_text()), attention=attention)


# ----------------------------------------------------------------------------- abstract trees

def _sharded(shapes, specs, mesh, replicated: bool = False):
    """ShapeDtypeStructs of `shapes` carrying NamedShardings of their mesh-axis `specs` (matched by
    path, as `shapes.Part.leaves`) on `mesh`, or replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from perco_jax.parallel import fit_spec

    by_path = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            mesh, PartitionSpec() if replicated else fit_spec(by_path[p], x.shape, dict(mesh.shape)))), shapes)


def _shardings_of(structs):
    import jax

    return jax.tree_util.tree_map(lambda x: x.sharding, structs)


def _token_inputs(config, b: int) -> dict:
    """Abstract token ids [b, length] int32 of CLIP-L, CLIP-G and T5."""
    import jax
    import jax.numpy as jnp

    from perco_jax import build

    clip = build.clip_max_length(config)
    return {"clip_l": jax.ShapeDtypeStruct((b, clip), jnp.int32), "clip_g": jax.ShapeDtypeStruct((b, clip), jnp.int32),
            "t5": jax.ShapeDtypeStruct((b, config.text.max_sequence_length), jnp.int32)}


def _text_inputs(config, prompt_encoder, b: int) -> dict:
    """Abstract text inputs of b examples as the loop feeds them: precomputed embeddings (text.cache
    or text.embeddings) {"context" [b, M, D], "pooled" [b, P]} float32, else token ids (int32)."""
    import jax
    import jax.numpy as jnp

    from perco_jax import build

    m = build.clip_max_length(config) + config.text.max_sequence_length
    if prompt_encoder is None or config.text.cache:
        return {"context": jax.ShapeDtypeStruct((b, m, config.mmdit.joint_attention_dim), jnp.float32),
                "pooled": jax.ShapeDtypeStruct((b, config.mmdit.pooled_projection_dim), jnp.float32)}
    return _token_inputs(config, b)


def _prompt_encoder(config):
    """The modules of the frozen text encoders (no tokenizers: the programs take token ids)."""
    from perco_jax import build
    from perco_jax.text.prompt import PromptEncoder

    clip_l, clip_g, t5 = build.text_modules(config)
    return PromptEncoder.without_tokenizers(clip_l, clip_g, t5, joint_attention_dim=config.mmdit.joint_attention_dim,
                                            clip_max_length=build.clip_max_length(config))


def _with_attention(model, attention: str | None):
    """The PerCo model with its MM-DiT's attention implementation set (None: the automatic choice,
    the splash kernel when compiling for TPU)."""
    return model if attention is None else model.clone(mmdit=model.mmdit.clone(attention_impl=attention))


def _attention_name(attention: str | None) -> str:
    return attention or "auto (splash on TPU)"


def training_mesh(topology: Topology, mesh_shape: Mapping[str, int]):
    from perco_jax import parallel

    if math.prod(mesh_shape.values()) != topology.chips:
        raise ValueError(f"mesh {dict(mesh_shape)} has {math.prod(mesh_shape.values())} devices; {topology.name} "
                         f"has {topology.chips} chips")
    return parallel.make_mesh(mesh_shape, topology.devices())


def compile_training(config, topology: Topology, mesh_shape: Mapping[str, int], *, stage: int | None = None,
                     batch: int | None = None, frozen: str | None = None,
                     attention: str | None = None, options: Mapping | None = None) -> CompiledProgram:
    """Compiles the loop's training step of `config` (stage / batch / frozen placement override the
    config's) for `topology` on a mesh of `mesh_shape` ({axis: size}, product = its chips);
    `options`: XLA debug options (`_compile`)."""
    import jax

    from perco_jax import build, parallel
    from perco_jax.train import loop, stage3
    from perco_jax.train.shapes import abstract_components
    from perco_jax.train.state import make_optimizer

    comp = abstract_components(config, stage, batch)
    cfg = comp.config
    frozen = frozen or cfg.frozen_placement
    if frozen not in build.FROZEN_PLACEMENTS:
        raise ValueError(f"frozen={frozen!r}: choose one of {build.FROZEN_PLACEMENTS}")
    data_fsdp = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    if cfg.batch_size % data_fsdp:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by data x fsdp = {data_fsdp}")
    mesh = training_mesh(topology, mesh_shape)
    b = cfg.batch_size
    model = stage3.student_model(cfg) if cfg.stage == 3 else build.build_perco(cfg)
    model = _with_attention(model, attention)
    autoencoder = build.build_autoencoder(cfg)
    prompt_encoder = _prompt_encoder(cfg) if build.text_encoders_built(cfg) else None
    step = loop.make_step(cfg, model, autoencoder, prompt_encoder, make_optimizer(cfg))

    state = _sharded(comp.state.shapes, comp.state.specs, mesh)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))
    replicated = frozen == "replicated"
    place = lambda name: _sharded(comp.frozen[name].shapes, comp.frozen[name].specs, mesh, replicated)  # noqa: E731
    frozen_args = {"autoencoder": place("VAE"), "text": {}}
    if prompt_encoder is not None:
        frozen_args["text"] = {k: place(n) for k, n in (("text_encoder", "CLIP-L"), ("text_encoder_2", "CLIP-G"),
                                                          ("text_encoder_3", "T5"))}
    if "stage-1 codec" in comp.frozen:  # restored on the state's shardings, whatever the placement
        c = comp.frozen["stage-1 codec"]
        frozen_args["codec"] = {"params": _sharded(c.shapes["params"], c.specs["params"], mesh),
                                "vq": _sharded(c.shapes["vq"], c.specs["vq"], mesh)}
    side, channels = build.latent_geometry(cfg)
    f32 = jax.numpy.float32
    if cfg.stage == 3 and cfg.stage3.method == "reflow":
        g = cfg.codec.grid_side
        data = {"noise": ((b, side, side, channels), f32), "latent": ((b, side, side, channels), f32),
                "indices": ((b, g, g), jax.numpy.int32)}
    else:
        data = {"image": ((b, cfg.image_size, cfg.image_size, 3), f32)}
    text = _text_inputs(cfg, prompt_encoder, b) if cfg.stage else {}
    batch_args = {k: jax.ShapeDtypeStruct(s, d, sharding=split) for k, (s, d) in data.items()}
    batch_args.update({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split) for k, v in text.items()})
    rep = parallel.replicated(mesh)
    empty = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype, sharding=rep) for k, v in text.items()}
    fn = loop.jit_step(step, _shardings_of(state), mesh)
    resident = 0
    if prompt_encoder is not None and not build.text_encoders_in_step(cfg):
        # text.cache: the loop places the encoders (it encodes the captions the cache misses), the step
        # never reads them, so the compiled program leaves them out
        resident = sum(comp.frozen[n].per_device(mesh_shape, replicated=replicated) for n in ("CLIP-L", "CLIP-G", "T5"))
    return _compile(f"stage {cfg.stage} training step (batch {b})", fn, (state, batch_args, frozen_args, empty),
                    mesh_shape, mesh, _attention_name(attention), options, resident)


def host_devices(topology: Topology) -> list:
    """The chips of one host (process 0's) of the slice: what a `Codec` decodes on."""
    devices = topology.devices()
    return [d for d in devices if d.process_index == devices[0].process_index
            and getattr(d, "slice_index", 0) == getattr(devices[0], "slice_index", 0)]


def compile_decoding(config, topology: Topology, *, sampler: str = "teacher", steps: int | None = None,
                     batch: int | None = None, attention: str | None = None,
                     options: Mapping | None = None) -> CompiledProgram:
    """Compiles `Codec.decompress_batch`'s decoder for `topology`: sampler "teacher" (the guided
    sampler, config.sample.steps) or "few_step" (the stage-3 decoder, its fewest steps) on
    config.sample.batch_size images (or `batch`), split over one host's chips when they divide
    it (as `Codec` places a chunk), every parameter replicated; `options`: XLA debug options."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from perco_jax import build
    from perco_jax.codec import transforms
    from perco_jax.models.perco import with_step_conditioning
    from flax import linen as nn

    from perco_jax.train.shapes import abstract_components, abstract_text_encoders

    if sampler not in ("teacher", "few_step"):
        raise ValueError(f"sampler={sampler!r}: teacher or few_step")
    comp = abstract_components(config, 1, None)
    cfg = comp.config
    b = int(batch or cfg.sample.batch_size)
    devices = host_devices(topology)
    n = len(devices) if b % len(devices) == 0 else 1
    mesh = Mesh(np.array(devices[:n]), ("data",))
    split, rep = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    model = _with_attention(build.build_perco(cfg), attention)
    autoencoder = build.build_autoencoder(cfg)
    prompt_encoder = _prompt_encoder(cfg)
    st = comp.state.shapes
    codec_params = {"params": st.ema_params if st.ema_params is not None else st.params, "vq": st.vq_state}
    kw = dict(max_sequence_length=cfg.text.max_sequence_length, shift=cfg.scheduler_shift)
    if sampler == "few_step":
        student = with_step_conditioning(model)
        s3 = abstract_components(config, 3, None).state.shapes.params["mmdit"]
        codec_params = transforms.few_step_codec(codec_params, s3)
        decode = transforms.make_few_step_decoder(student, autoencoder, prompt_encoder, **kw)
        steps = int(steps or min(int(k) for k in cfg.stage3.steps))
    else:
        decode = transforms.make_decoder(model, autoencoder, prompt_encoder, **kw)
        steps = int(steps or cfg.sample.steps)
    # a codec always holds the text encoders (training may have read precomputed embeddings)
    text = {name: nn.meta.unbox(boxed) for name, boxed in abstract_text_encoders(cfg).items()}
    frozen = {"autoencoder": comp.frozen["VAE"].shapes,
              "text": {"text_encoder": text["CLIP-L"], "text_encoder_2": text["CLIP-G"], "text_encoder_3": text["T5"]}}
    on = lambda tree, sh: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)  # noqa: E731
    side, channels = build.latent_geometry(cfg)
    g = cfg.codec.grid_side
    tokens = _token_inputs(cfg, b)  # (a Codec tokenizes the captions: its decoder takes ids)
    empty = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in tokens.items()}
    stochastic = sampler == "teacher" and bool(cfg.sample.stochastic)
    args = (on(codec_params, rep), on(frozen, rep), on(jax.ShapeDtypeStruct((b, g, g), jnp.int32), split),
            on(tokens, split), on(empty, rep), on(jax.ShapeDtypeStruct((b, side, side, channels), jnp.float32), split),
            on(jax.ShapeDtypeStruct((b, 2), jnp.uint32), split) if stochastic else None,
            on(jax.ShapeDtypeStruct((), jnp.float32), rep), on(jax.ShapeDtypeStruct((), jnp.float32), rep))
    lowered = _StaticSteps(decode, steps)
    name = (f"decoding, {'guided sampler' if sampler == 'teacher' else 'few-step decoder'}, {steps} steps "
            f"(batch {b} on {n} chip{'s' if n > 1 else ''})")
    return _compile(name, lowered, args, {"data": n}, mesh, _attention_name(attention), options)


class _StaticSteps:
    """decode.lower(*args, steps=steps) behind the `lower(*args)` that `_compile` calls."""

    def __init__(self, fn, steps: int):
        self.fn, self.steps = fn, steps

    def lower(self, *args):
        return self.fn.lower(*args, steps=self.steps)


# ----------------------------------------------------------------------------- stopping after buffer assignment

HEADER = "program.json"  # the program's name, mesh and attention, written into the dump folder
BUFFERS = "after buffer assignment"


def _program(kind: str):
    """The compile function of a program kind: "train" or "decode"."""
    programs = {"train": compile_training, "decode": compile_decoding}
    if kind not in programs:
        raise ValueError(f"kind={kind!r}: train or decode")
    return programs[kind]


def read_buffer_assignment(folder: str) -> tuple[int, int] | None:
    """(argument bytes, temporary bytes) a chip from the buffer assignment XLA dumped into `folder`
    (`*memory-usage-report.txt`: the HBM space's total; `*buffer-assignment.txt`: its parameter
    allocations), or None while the files are not complete."""
    import glob

    report = glob.glob(os.path.join(folder, "*memory-usage-report.txt"))
    assignment = glob.glob(os.path.join(folder, "*after_optimizations-buffer-assignment.txt"))
    if not report or not assignment:
        return None
    with open(report[0]) as f:
        m = re.search(r"^Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)", f.read(), re.M)
    if m is None:
        return None
    with open(assignment[0]) as f:
        # allocations of other memory spaces (on-chip VMEM, SMEM, host) name their colour
        args = sum(int(a.group(1)) for a in re.finditer(r"^allocation \d+: size (\d+), parameter", f.read(), re.M))
    return args, int(m.group(1)) - args


_VALUE = re.compile(r"^\s*value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\)", re.M)
_RANGE = re.compile(r"^\s{4}(\S+\{[\d,]*\}):(\d+)-(\d+)$", re.M)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = [^\n]*? ([a-z][\w-]*)\(%([\w.\-]+)[^\n]*$", re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _op_names(hlo_text: str) -> dict[str, str]:
    """{instruction: the jaxpr op that made it} of an HLO dump; an instruction without one (a copy
    XLA inserted, a slice of an async copy) takes its first operand's, named after its opcode."""
    names, first = {}, {}
    for m in _INSTRUCTION.finditer(hlo_text):
        op = _OP_NAME.search(m.group(0))
        if op:
            names[m.group(1)] = op.group(1)
        else:
            first[m.group(1)] = (m.group(2), m.group(3))
    for name, (opcode, operand) in first.items():
        hops = 0
        while operand in first and hops < 8:  # through chains of inserted copies
            operand, hops = first[operand][1], hops + 1
        names[name] = f"{opcode} of {names[operand]}" if operand in names else opcode
    return names


def peak_breakdown(folder: str, top: int = 8, hlo_text: str | None = None) -> dict | None:
    """What the temporaries of the program XLA dumped into `folder` hold at their peak:
    {"heap_bytes": the temporary heap XLA allocated, "live_bytes": the bytes live at the peak,
    "groups": [{"what", "count", "bytes"}] the `top` largest groups of the values live there}, or
    None without the dump's files. `hlo_text`: the optimised HLO's text when the caller has read it.

    The peak is the program point (nested computations included) where the values of the heap that
    are live at once take the most bytes; heap - live is the space between them that XLA's packing
    leaves. A group is the values made by one op of the jaxpr, the MM-DiT's blocks taken together
    (`blocks_3/...` and `blocks_7/...` are `blocks_N/...`), so 37 blocks' saved inputs are one row."""
    import glob

    import numpy as np

    found = [glob.glob(os.path.join(folder, f"*after_optimizations{suffix}.txt"))
             for suffix in ("-buffer-assignment", "-live-range", "")]
    if not all(found[:2]) or (hlo_text is None and not found[2]):
        return None
    with open(found[0][0]) as f:
        assignment = f.read()
    # the preallocated temporary heap: one allocation holding every temporary value at an offset
    m = re.search(r"^allocation \d+: size (\d+), preallocated-temp:\n((?:\s+value:.*\n)*)", assignment, re.M)
    if m is None:
        return None
    values = {(v.group(1) if v.group(1).endswith("}") else v.group(1) + "{}"): (int(v.group(2)), int(v.group(3)))
              for v in _VALUE.finditer(m.group(2))}
    with open(found[1][0]) as f:
        ranges = {r.group(1): (int(r.group(2)), int(r.group(3))) for r in _RANGE.finditer(f.read())}
    values = {k: v for k, v in values.items() if k in ranges}
    if not values:
        return None
    live = np.zeros(max(e for _, e in ranges.values()) + 2, np.int64)
    for k, (size, _) in values.items():
        start, end = ranges[k]
        live[start] += size
        live[end + 1] -= size
    t = int(np.cumsum(live).argmax())
    at_peak = [(k, size, offset) for k, (size, offset) in values.items() if ranges[k][0] <= t <= ranges[k][1]]
    if hlo_text is None:
        with open(found[2][0]) as f:
            hlo_text = f.read()
    op_names = _op_names(hlo_text)
    groups: dict[str, list[int]] = {}
    seen: set[int] = set()
    for k, size, offset in sorted(at_peak, key=lambda v: -v[1]):
        if offset in seen:  # values of one buffer (an op updating its operand in place) count once
            continue
        seen.add(offset)
        name = op_names.get(k.split("{")[0], k.split(".")[0])
        what = re.sub(r"blocks_\d+", "blocks_N", re.sub(r"jit\([^/]*\)/", "", name, count=1))
        g = groups.setdefault(what, [0, 0])
        g[0] += 1
        g[1] += size
    rows = sorted(groups.items(), key=lambda g: -g[1][1])
    return {"heap_bytes": int(m.group(1)), "live_bytes": int(sum(b for _, (_, b) in rows)),
            "groups": [{"what": w, "count": c, "bytes": b} for w, (c, b) in rows[:top]]}


def die_with_parent(parent: int) -> None:
    """Linux: this process is SIGKILLed when its parent ends, however it ends (a SIGTERM or SIGKILL of
    the parent runs none of its clean-up, and an orphaned compile would run on for many minutes)."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before that took effect
        os._exit(1)


def _run_program(kind: str, args: tuple, kw: dict, folder: str, precision, parent: int) -> None:
    """The child process of `compile_until_buffers`: compiles with the dump options and the parent's
    matmul precision (a jax setting, not inherited), never from the persistent compilation cache
    (which writes no dump); a finished compile (or the compiler's error) is pickled into `folder`.
    It ends with its parent (`parent`: the parent's pid)."""
    import pickle

    die_with_parent(parent)
    compile_environment()
    import jax

    jax.config.update("jax_default_matmul_precision", precision)
    jax.config.update("jax_enable_compilation_cache", False)
    options = {"xla_dump_to": folder, "xla_dump_hlo_as_text": True}
    try:
        result = _program(kind)(*args, **kw, options=options)
    except Exception as e:  # noqa: BLE001 (handed to the parent, which raises it)
        result = e
    with open(os.path.join(folder, "result.pickle.tmp"), "wb") as f:
        pickle.dump(result, f)
    os.replace(os.path.join(folder, "result.pickle.tmp"), os.path.join(folder, "result.pickle"))


def compile_until_buffers(kind: str, *args, poll: float = 1.0, **kw) -> CompiledProgram:
    """`compile_training` (kind "train") or `compile_decoding` ("decode") with the same arguments, in
    a child process that is stopped once XLA's TPU compiler has assigned the program's buffers.

    Buffer assignment ends the HLO passes, 2 to 6 minutes into an SD3-size compile whose code
    generation takes 10 to 40 more and, for SD3.5-large's 38 blocks, more host memory than 24 GiB.
    Its figures: arguments and temporaries a chip (`read_buffer_assignment`), the collectives of
    the optimised HLO, no code size or FLOP count (`stopped`). On large programs they read 0.7 to
    0.8 GiB under `memory_analysis()` of the finished compile, code included (docs/training.md);
    on small ones they may read over it (v5e's memory-space assignment later moves small
    temporaries into on-chip memory). A program that finishes first is returned whole; the
    compiler's RESOURCE_EXHAUSTED comes back as `error`."""
    import json
    import multiprocessing
    import pickle
    import shutil
    import tempfile

    import jax

    _program(kind)
    folder = tempfile.mkdtemp(prefix="perco-jax-buffers-")
    result_path, figures, sizes = os.path.join(folder, "result.pickle"), None, None
    t0 = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(
        target=_run_program, args=(kind, args, kw, folder, jax.config.jax_default_matmul_precision, os.getpid()))
    child.start()
    try:
        while figures is None and not os.path.exists(result_path):
            if not child.is_alive() and not os.path.exists(result_path):
                raise RuntimeError(f"the compiling process ended with status {child.exitcode} and no result")
            time.sleep(poll)
            now = sorted((f, os.path.getsize(os.path.join(folder, f))) for f in os.listdir(folder))
            if now == sizes and any(f.endswith("memory-usage-report.txt") for f, _ in now):
                figures = read_buffer_assignment(folder)  # the files stopped growing
            sizes = now
        if os.path.exists(result_path):
            with open(result_path, "rb") as f:
                result = pickle.load(f)
            if isinstance(result, Exception):
                raise result
            return result
        with open(os.path.join(folder, HEADER)) as f:
            header = json.load(f)
        hlo = [f for f in os.listdir(folder) if f.endswith(".after_optimizations.txt")]
        text = None
        if hlo:
            with open(os.path.join(folder, hlo[0])) as f:
                text = f.read()
        return CompiledProgram(header["name"], header["mesh"], time.perf_counter() - t0,
                               argument_bytes=figures[0], temp_bytes=figures[1],
                               collectives=collectives(text) if text else {},
                               resident_bytes=header["resident"], attention=header["attention"], stopped=BUFFERS,
                               peak=peak_breakdown(folder, hlo_text=text) if text else None)
    finally:
        child.join(0 if figures is not None else 30)  # a child that handed its result back is exiting
        if child.is_alive():
            child.kill()  # (SIGKILL: libtpu's handler would print a stack trace for a SIGTERM)
        child.join()
        shutil.rmtree(folder, ignore_errors=True)


def compile_program(kind: str, *args, until_buffers: bool = False, **kw) -> CompiledProgram:
    """`compile_training` (kind "train") or `compile_decoding` ("decode"), or with `until_buffers`
    the same stopped after buffer assignment (`compile_until_buffers`)."""
    return compile_until_buffers(kind, *args, **kw) if until_buffers else _program(kind)(*args, **kw)


# ----------------------------------------------------------------------------- printing

def comparison_rows(plan, program: CompiledProgram) -> list[tuple[str, int | None, int]]:
    """(term, the analytic plan's bytes per device or None, the compiler's) of a training step: the
    plan's persistent rows (state, frozen encoders, the batch) are the program's arguments, its
    gradients and activations its temporaries."""
    batch = sum(v for n, v in plan.activation_rows if n.startswith("batch"))
    grads = plan.row("gradients (float32, all params)")[1]
    code = plan.code_bytes
    persistent = sum(r[2] for r in plan.rows) - grads - code + batch
    rows = [("arguments: state, frozen encoders, batch", persistent - program.resident_bytes, program.argument_bytes)]
    if program.resident_bytes:
        rows.append(("text encoders on the chips, not in the step (cache)", program.resident_bytes,
                     program.resident_bytes))
    rows += [("outputs not written in place", 0, program.output_bytes - program.alias_bytes),
             ("temporaries: gradients, activations, buffers", plan.per_device - code - persistent, program.temp_bytes)]
    if program.stopped:  # no code was generated: both totals without it
        return rows + [("total per chip, without the code", plan.per_device - code, program.per_device)]
    return rows + [("generated code", code or None, program.code_bytes),
                   ("total per chip", plan.per_device, program.per_device)]


def verdict(program: CompiledProgram, hbm: int) -> str:
    if program.error is not None:
        return f"does not fit: {program.error.strip()}"
    headroom = 1 - program.per_device / hbm
    if headroom < 0:
        return f"does not fit: {-headroom:.0%} over the chip's HBM"
    return f"fits, {headroom:.0%} headroom"


def format_program(program: CompiledProgram, hbm: int, plan=None) -> str:
    from perco_jax.train.plan import human

    mesh = " x ".join(f"{a}={n}" for a, n in program.mesh.items())
    lines = [f"compiled: {program.name}, mesh {mesh}, attention {program.attention}, "
             + (f"stopped {program.stopped} after {program.seconds:.0f} s (arguments + temporaries; no code size)"
                if program.stopped else f"{program.seconds:.0f} s to compile")]
    if program.error is None:
        if plan is not None:
            lines.append(f"  {'':<48}{'plan':>12}{'compiler':>12}{'compiler/plan':>15}")
            for name, est, got in comparison_rows(plan, program):
                ratio = f"{got / est:.2f}" if est else "-"
                lines.append(f"  {name:<48}{human(est) if est is not None else '-':>12}{human(got):>12}{ratio:>15}")
        else:
            for name, got in (("arguments", program.argument_bytes),
                              ("outputs not written in place", program.output_bytes - program.alias_bytes),
                              ("temporaries", program.temp_bytes),
                              *([] if program.stopped else [("generated code", program.code_bytes)]),
                              ("total per chip", program.per_device)):
                lines.append(f"  {name:<48}{human(got):>12}")
        coll = ", ".join(f"{op} x{c['count']} ({human(c['bytes'])})" for op, c in program.collectives.items())
        lines.append(f"  collectives (a loop body counted once): {coll or 'none'}")
        if program.flops is not None:
            lines.append(f"  XLA's FLOP count per chip (a loop body counted once): {program.flops / 1e12:.3f} T")
        if program.peak:
            pk = program.peak
            lines.append(f"  temporaries at their peak: {human(pk['live_bytes'])} live, in a heap of "
                         f"{human(pk['heap_bytes'])} (the rest lies between them); the largest:")
            lines.extend(f"    {human(g['bytes']):>10} {g['count']:>4} x {g['what'][:110]}" for g in pk["groups"])
    lines.append(f"  {verdict(program, hbm)}")
    return "\n".join(lines)
