"""Every tree of a training run as shapes, with the mesh-axis sharding of each leaf: what the memory
plan (`plan`) and the FLOPs count (`flops`) read, from `jax.eval_shape` alone (nothing is allocated,
no device is needed).

    abstract_components(config, stage, batch) -> Components(config, state: Part, frozen: {name: Part})
    Part(shapes, specs).per_device(mesh_shape) -> bytes of one device's shards of the tree

A `Part` pairs a pytree of ShapeDtypeStructs with the PartitionSpec (in mesh axes data / fsdp /
tensor, from `parallel.py`'s logical-axis rules on a unit `AbstractMesh`) of each leaf. A leaf of
shape [d0, d1, ...] holds [d0 / n0, d1 / n1, ...] on one device, n_i the product of the mesh axes its
spec names for dim i that divide it (`parallel.fit_spec`: jax shards no array unevenly).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from perco_jax import build, parallel


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of one device's shard: each dim divided by the mesh axes of its spec that divide it
    (`parallel.fit_spec`: the loop places a leaf so, since jax shards no array unevenly)."""
    spec = parallel.fit_spec(spec, shape, mesh_shape)
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        out.append(int(dim) // math.prod(int(mesh_shape[a]) for a in axes))
    return tuple(out)


def path_keys(path) -> tuple[str, ...]:
    """The keys (dict keys, attribute names, indices) of a pytree path, as strings."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def nbytes(x) -> int:
    """Bytes of a whole array (or ShapeDtypeStruct)."""
    return int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


@dataclasses.dataclass
class Part:
    """A pytree of ShapeDtypeStructs and a tree of the mesh-axis PartitionSpec of each leaf."""
    shapes: Any
    specs: Any

    def leaves(self):
        """[(path, ShapeDtypeStruct, PartitionSpec)], matched by path (the specs tree may hold a
        spec where the shapes have an empty node, e.g. optax's MaskedNode of a frozen leaf)."""
        specs = dict(jax.tree_util.tree_leaves_with_path(self.specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
        out = []
        for path, x in jax.tree_util.tree_leaves_with_path(self.shapes):
            if path not in specs:
                raise ValueError(f"plan: no sharding for {jax.tree_util.keystr(path)}")
            out.append((path, x, specs[path]))
        return out

    def total(self, where=lambda path: True) -> int:
        return sum(nbytes(x) for path, x, _ in self.leaves() if where(path))

    def per_device(self, mesh_shape, replicated: bool = False, where=lambda path: True) -> int:
        return sum((nbytes(x) if replicated else
                    int(np.prod(shard_shape(x.shape, s, mesh_shape), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize)
                   for path, x, s in self.leaves() if where(path))


_LAYER = re.compile(r"^(blocks?|layers)_(\d+)")


def largest_layer_gathered(part: Part, mesh_shape: Mapping[str, int], under: str | None = None) -> int:
    """Bytes of the largest layer (keys blocks_i / block_i_* / layers_i) once FSDP has all-gathered
    it on a device: its shard with the fsdp axis undone (0 when fsdp = 1)."""
    if int(mesh_shape.get("fsdp", 1)) == 1:
        return 0
    gathered_mesh = dict(mesh_shape, fsdp=1)
    sizes: dict[str, int] = {}
    for path, x, spec in part.leaves():
        keys = path_keys(path)
        if under is not None and under not in keys:
            continue
        layer = next((m.group(0) for k in keys if (m := _LAYER.match(k))), None)
        if layer is not None:
            shard = shard_shape(x.shape, spec, gathered_mesh)
            sizes[layer] = sizes.get(layer, 0) + int(np.prod(shard, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
    return max(sizes.values(), default=0)


def _specs_of(shardings):
    """The PartitionSpec tree of a NamedSharding tree."""
    return jax.tree_util.tree_map(lambda s: s.spec, shardings, is_leaf=lambda s: isinstance(s, NamedSharding))


def _boxed_part(boxed, rules) -> Part:
    """Part of a boxed (nn.Partitioned) abstract tree: logical specs mapped by the rules."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), _UNIT_MESH, rules)
    return Part(nn.meta.unbox(boxed), _specs_of(shardings))


_UNIT_MESH = AbstractMesh((1,) * len(parallel.MESH_AXES), parallel.MESH_AXES)


@dataclasses.dataclass
class Components:
    """Every abstract tree of a run (mesh-independent: specs are in mesh axes)."""
    config: Any               # the stage's config (build.stage_config)
    state: Part               # the TrainState
    frozen: dict[str, Part]   # name -> frozen params on device


def abstract_text_encoders(config) -> dict[str, Any]:
    """Boxed abstract params of CLIP-L, CLIP-G and T5 from the config's sections."""
    ids = jnp.zeros((1, 8), jnp.int32)
    modules = dict(zip(("CLIP-L", "CLIP-G", "T5"), build.text_modules(config)))
    key = jax.random.PRNGKey(0)
    return {name: jax.eval_shape(m.init, key, ids)["params"] for name, m in modules.items()}


def abstract_autoencoder(config):
    """Boxed abstract params of the frozen autoencoder ({} for space-to-depth)."""
    if config.autoencoder == "space_to_depth":
        return {}
    ae = build.build_autoencoder(config)
    x = jnp.zeros((1, ae.downsample_factor, ae.downsample_factor, 3))
    return jax.eval_shape(ae.init, jax.random.PRNGKey(0), x)["params"]


_CACHE: dict[tuple, Components] = {}


def abstract_components(config, stage: int | None = None, batch: int | None = None) -> Components:
    """All abstract trees of a run of `config` (stage and batch override the config's); the last
    few are cached (planning several meshes traces the model once)."""
    key = (config.to_json_best_effort(sort_keys=True), stage, batch)
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _abstract_components(config, stage, batch)
    return _CACHE[key]


def _abstract_components(config, stage, batch) -> Components:
    from perco_jax.train import stage2, stage3, step
    from perco_jax.train.state import make_optimizer

    config = config.copy_and_resolve_references()
    if stage is not None:
        config.stage = int(stage)
    if config.stage in (2, 3) and not config.stage1_workdir:
        config.stage1_workdir = "(plan: not read)"
    build.validate(config)
    config = build.stage_config(config)
    if batch is not None:
        if int(batch) < 1:
            raise ValueError(f"batch={batch}: need >= 1")
        config.batch_size = int(batch)
    rules = parallel.rules_from_config(config.sharding_rules)
    tx = make_optimizer(config)
    s1 = config.copy_and_resolve_references()
    s1.stage = 1
    s1_state, s1_shardings = step.init_state(s1, build.build_perco(s1), make_optimizer(s1), _UNIT_MESH, rules,
                                             abstract=True)
    frozen: dict[str, Part] = {}
    if config.stage == 1:
        state = Part(s1_state, _specs_of(s1_shardings))
    else:
        if config.stage == 2:
            st, sh = stage2.init_state(config, build.build_entropy_model(config), tx, _UNIT_MESH, rules, abstract=True)
        else:
            st, sh = stage3.init_state(config, stage3.student_model(config), tx, _UNIT_MESH, rules, abstract=True)
        state = Part(st, _specs_of(sh))
        # the loop keeps the stage-1 codec's params (EMA when kept) and VQ state on device
        which = "ema_params" if s1_state.ema_params is not None else "params"
        frozen["stage-1 codec"] = Part({"params": getattr(s1_state, which), "vq": s1_state.vq_state},
                                       {"params": _specs_of(getattr(s1_shardings, which)),
                                        "vq": _specs_of(s1_shardings.vq_state)})
    if build.text_encoders_built(config):  # (a run reading precomputed embeddings loads none)
        for name, boxed in abstract_text_encoders(config).items():
            frozen[name] = _boxed_part(boxed, rules)
    frozen["VAE"] = _boxed_part(abstract_autoencoder(config), rules)
    return Components(config, state, frozen)
