"""Device mesh, logical-axis rules and shardings: one code path for 1 CPU, 8 GPUs or a TPU pod.

Parameters carry logical axis names (see `models/layers.py`); a rule table maps them to the mesh
axes `data`, `fsdp` and `tensor`. Batches are split over (`data`, `fsdp`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. FSDP shards the model width; tensor parallelism the heads / MLP.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
    ("joint", None), ("pooled", None), ("conv_in", None), ("conv_out", "fsdp"), ("norm", None),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 (= all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes ({known})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) > len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"{len(devices)} available")
    # Auto axes: XLA propagates shardings through reshapes (explicit axes would need annotations
    # on every reshape of the models).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:  # a multi-slice TPU job: the data axis spans the slices (DCN), the rest ICI
        n = len(slices)
        if int(np.prod(sizes)) != len(devices) or sizes[0] % n:
            raise ValueError(f"multi-slice mesh {dict(zip(MESH_AXES, sizes))}: use all {len(devices)} devices, with "
                             f"the data axis a multiple of the {n} slices (data crosses slices)")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // n, sizes[1], sizes[2]), (n, 1, 1), devices=devices)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)
    devices = devices[:int(np.prod(sizes))]  # a fully specified smaller mesh uses the first devices
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=auto)
    except NotImplementedError:
        # An axis that is no product of whole torus axes (fsdp 64 on a 16x16 v6e slice): split a
        # physical axis, as MaxText's allow_split_physical_axes does; its collectives then use part
        # of a ring.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes), devices=devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
    """Config rules as [[logical, mesh_axis_or_None], ...] (or the defaults when empty)."""
    if not rules:
        return DEFAULT_RULES
    return tuple((str(k), (None if v in (None, "", "none") else v)) for k, v in rules)


def fit_spec(spec: P, shape: Sequence[int], mesh_shape: Mapping[str, int]) -> P:
    """`spec` for an array of `shape`, without the mesh axes that do not divide their dimension (a
    dimension keeps its axes in order while their product divides it). jax places no array
    unevenly (IndivisibleError), so a leaf too small for its axes stays whole along that dimension:
    SD3's VAE output bias (32 channels, "conv_out" -> fsdp) on fsdp = 64."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        kept, n = [], 1
        for a in axes:
            if int(dim) % (n * int(mesh_shape[a])) == 0:
                kept.append(a)
                n *= int(mesh_shape[a])
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def fitted(shardings: Any, shapes: Any) -> Any:
    """NamedShardings of `shapes` (arrays or ShapeDtypeStructs; the same tree) with each spec
    `fit_spec`-ted to its leaf's shape."""
    def fit(s, x):  # (an empty node of `shapes`, optax's MaskedNode, holds a sharding but no array)
        if not hasattr(x, "shape"):
            return s
        return NamedSharding(s.mesh, fit_spec(s.spec, x.shape, dict(s.mesh.shape)))

    return jax.tree_util.tree_map(fit, shardings, shapes, is_leaf=lambda s: isinstance(s, NamedSharding))


def param_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (possibly abstract) params carrying nn.Partitioned boxes;
    unannotated leaves are replicated, axes that do not divide a leaf's dimension dropped
    (`fit_spec`)."""
    specs = nn.get_partition_spec(boxed_tree)
    return fitted(nn.logical_to_mesh_sharding(specs, mesh, rules), nn.meta.unbox(boxed_tree))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def map_batch_chunks(fn, x: jax.Array, chunk: int):
    """fn(x) for a per-example fn of x [B, ...] (a pytree of [B, ...] out), run `chunk` examples
    per batch shard at a time: a lax.map of B / (shards x chunk) steps, each on [shards x chunk, ...]
    split as the batch is, so every device encodes its own rows with no communication and holds
    one chunk's working set, not its whole share's. shards = data x fsdp of the mesh set by
    `jax.set_mesh` (1 without one). chunk <= 0 or >= the per-shard batch: fn(x) at once."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    b = x.shape[0]
    per = b // shards
    if chunk <= 0 or chunk >= per:
        return fn(x)
    if b % shards or per % chunk:
        raise ValueError(f"a chunk of {chunk} examples does not divide the {per} examples of each of the "
                         f"{shards} batch shards (batch {b})")
    n = per // chunk

    def constrain(a, spec):
        return jax.lax.with_sharding_constraint(a, spec) if axes else a

    # [B] = [shards, n, chunk] (each shard's rows contiguous, as P(BATCH_AXES) splits them) ->
    # [n, shards x chunk]: local to each device
    xs = jnp.swapaxes(x.reshape(shards, n, chunk, *x.shape[1:]), 0, 1)
    xs = constrain(xs.reshape(n, shards * chunk, *x.shape[1:]), P(None, axes))
    out = jax.lax.map(lambda xi: fn(constrain(xi, P(axes))), xs)

    def merge(y):
        y = jnp.swapaxes(y.reshape(n, shards, chunk, *y.shape[2:]), 0, 1)
        return constrain(y.reshape(b, *y.shape[3:]), P(axes))

    return jax.tree_util.tree_map(merge, out)


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
    """Assemble this process's numpy batch into global jax Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def module_shardings(module: nn.Module, example_args: Sequence, params: Any, mesh: jax.sharding.Mesh,
                     rules=DEFAULT_RULES) -> Any:
    """NamedShardings for `params` (the unboxed params of `module`, e.g. converted weights) from the
    logical axes `module.init(rng, *example_args)` declares (traced with jax.eval_shape: nothing is
    allocated). Raises ValueError when `params` is not the module's tree."""
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), *example_args)["params"]
    shardings = param_shardings(boxed, mesh, rules)
    want = jax.tree_util.tree_structure(nn.meta.unbox(boxed))
    got = jax.tree_util.tree_structure(params)
    if want != got:
        raise ValueError(f"{type(module).__name__} params do not match the module's parameter tree "
                         f"({got.num_leaves} leaves given, {want.num_leaves} expected)")
    return shardings


def place(tree: Any, shardings: Any) -> Any:
    """Put `tree` (host or device arrays, the same on every process) onto `shardings`. Through a jit
    with out_shardings, so dimensions that do not divide by their mesh axes are padded by XLA
    instead of refused as by device_put."""
    return jax.jit(lambda t: t, out_shardings=shardings)(tree)


def text_shardings(prompt_encoder, text_params: dict, mesh, rules) -> dict:
    """Shardings of {"text_encoder", "text_encoder_2"[, "text_encoder_3"]: params} by the logical
    axes of the prompt encoder's CLIP-L / CLIP-G / T5 modules ({} without text params: a run that
    reads precomputed embeddings has no prompt encoder)."""
    if not text_params:
        return {}
    ids = (jnp.zeros((1, 8), jnp.int32),)
    modules = {"text_encoder": prompt_encoder.clip_l, "text_encoder_2": prompt_encoder.clip_g,
               "text_encoder_3": prompt_encoder.t5}
    return {name: module_shardings(modules[name], ids, p, mesh, rules) for name, p in text_params.items()}
