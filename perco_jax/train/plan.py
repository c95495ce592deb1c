"""Memory plan of a training run per device, before launching it: `perco-jax plan`.

    plan = make_plan(config, parse_mesh("data=8,fsdp=8,tensor=1"), stage=1)
    print(format_plan(plan, device_memory=parse_bytes("16GB")))

Everything comes from `jax.eval_shape` (nothing is allocated: SD3.5-large's 8B-parameter MM-DiT and
the 4.7B T5-XXL are shapes only) and from the parameter shardings that `parallel.py`'s logical-axis
rules (config.sharding_rules) give on a `jax.sharding.AbstractMesh` of the requested shape, so no
devices are needed. A leaf's bytes on one device are those of its shard: each dimension divided by
the product of the mesh axes its PartitionSpec names (rounded up: XLA pads uneven shards).

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

Activations are an estimate (b = per-device batch = batch / (data * fsdp), s = bytes of
config.dtype, t = the tensor axis, which splits heads and MLP widths). Stage 1, the MM-DiT with
L layers, width D, H heads, N = (latent side / patch)^2 image tokens and M = CLIP length (SD3: 77)
+ T5 length context tokens, T = N + M:
  one block      A = b * [ s * (7 T D + (12 + 2 q) T D / t) + S ]
                 (7 T D: norms, modulated inputs, attention projection, gated residuals, MLP output;
                 12 T D / t: q, k, v, attention output, MLP hidden before and after GELU; 2 T D / t
                 with QK RMS-norm (q = 1); S = ceil(H / t) T^2 (4 + s): float32 attention logits and
                 the probabilities, 0 with a fused (flash) attention kernel; an SD3.5 dual-attention
                 block adds the same terms for the image tokens alone)
  with remat     L b T D s (every block's saved inputs) + 2 A (one block recomputed + its cotangents)
  without        sum of all blocks' A + A
  plus           the hyper-encoder's saved activations (ResNet blocks at the latent side and below),
                 the embeddings / output / latents / noise, and the batch (images float32, text context)
  frozen         the frozen forward passes (no saved activations), the larger of the VAE encoder
                 (3 feature maps at full resolution, or its mid-block attention) and the text
                 encoders (3 MLP-width tensors + attention logits per layer; none with
                 config.text.cache). They finish before the trained network starts, so the total is
                 batch + FSDP buffers + max(frozen forward passes, the training pass).
Stage 3, the few-step decoder: stage 1's MM-DiT terms (the hyper-encoder runs forward only); the
shortcut method's self-consistency targets are two guided forward passes of the MM-DiT on 2 x
bootstrap_fraction x b examples before the training pass, counted among the frozen forward passes
as one block's working set (no saved activations). The reflow method's batch is its couplings
(float32 noise and latent [b, h, w, C], indices [b, g, g]) and the text inputs: no VAE or
hyper-encoder runs in its step.
Stage 2, the entropy model (no remat; n = g^2 grid tokens + M context tokens if conditional,
width w, MLP ratio r): per block b [ s (6 n w + (4 + 2 r) n w / t) + ceil(H / t) n^2 (4 + s) ],
all blocks + one for the cotangents, plus logits b g^2 K * 4 bytes * 3; the frozen forward passes
(VAE encoder, the stage-1 hyper-encoder, text encoders) count as in stage 1.

With fsdp > 1, a block's params are all-gathered before use and its gradients reduce-scattered
after: 2 x the largest block's params with the fsdp axis undone (the text encoders' largest layer
is added to their forward working set).

Not counted: XLA's temporary buffers, prefetching and fragmentation, and on GPUs the memory JAX
does not preallocate (XLA_PYTHON_CLIENT_MEM_FRACTION, 75% by default): leave headroom.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from perco_jax import build, parallel
from perco_jax.config import setting


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


# ----------------------------------------------------------------------------- shapes and shards

def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of one device's shard: each dim divided (rounded up) by its spec's mesh axes."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        out.append(-(-int(dim) // math.prod(int(mesh_shape[a]) for a in axes)))
    return tuple(out)


def nbytes(x) -> int:
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
        keys = _keys(path)
        if under is not None and under not in keys:
            continue
        layer = next((m.group(0) for k in keys if (m := _LAYER.match(k))), None)
        if layer is not None:
            shard = shard_shape(x.shape, spec, gathered_mesh)
            sizes[layer] = sizes.get(layer, 0) + int(np.prod(shard, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
    return max(sizes.values(), default=0)


def _specs_of(shardings):
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


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


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


# ----------------------------------------------------------------------------- activations

FROZEN_FORWARD = "frozen forward passes (run first; peak = max)"
ALWAYS = ("batch", "FSDP")

def _text_forward_peak(config, b: int, s: int, t: int) -> int:
    """Largest per-layer working set of the frozen text encoders' forward passes."""
    peaks, clip = [], build.clip_max_length(config)
    for sec, n, ff, d, h in (
            (config.clip_l, clip, config.clip_l.intermediate_size, config.clip_l.hidden_size,
             config.clip_l.num_attention_heads),
            (config.clip_g, clip, config.clip_g.intermediate_size, config.clip_g.hidden_size,
             config.clip_g.num_attention_heads),
            (config.t5, config.text.max_sequence_length, config.t5.d_ff, config.t5.d_model, config.t5.num_heads)):
        peaks.append(b * (n * (3 * ff * s // t + 3 * d * 4) + -(-h // t) * n * n * (4 + s)))
    return max(peaks)


def _vae_encoder_peak(config, b: int, s: int) -> int:
    if config.autoencoder != "sd3_vae":
        return 0
    chans = tuple(config.vae.block_out_channels)
    img, lat = config.image_size, config.image_size // 2 ** (len(chans) - 1)
    return b * max(3 * img * img * chans[0] * s, lat ** 4 * (4 + s) + 4 * lat * lat * chans[-1] * s)


def _hyper_encoder(config, b: int, s: int, saved: bool) -> int:
    """Saved activations (training) or the forward working set of the hyper-encoder."""
    from perco_jax.models.hyper_encoder import num_stages

    side, _ = build.latent_geometry(config)
    he, g = config.hyper_encoder, config.codec.grid_side
    w = he.width
    if not saved:
        return 3 * b * side * side * w * s
    total = side * side * w * s  # conv_in
    for k in range(num_stages(side, g)):
        total += (6 * he.depth + 1) * (side // 2 ** k) ** 2 * w * s
    total += 13 * g * g * w * s + (g ** 4 * (4 + s) if he.attention else 0)
    return b * total


def activations(config, b: int, tensor: int = 1, flash_attention: bool = False,
                text_gather: int = 0) -> list[tuple[str, int]]:
    """(name, bytes per device) of the activation estimate of one training step of config.stage
    (the formulas are in the module docstring); `text_gather`: bytes of the largest text-encoder
    layer all-gathered by FSDP (added to the text encoders' forward working set)."""
    s, t = jnp.dtype(config.dtype).itemsize, int(tensor)
    side, ch = build.latent_geometry(config)
    m_ctx = build.clip_max_length(config) + config.text.max_sequence_length
    joint = config.mmdit.joint_attention_dim
    text_peak = _text_forward_peak(config, b, s, t) + text_gather if build.text_encoders_in_step(config) else 0
    text_in = b * (m_ctx * joint * s + config.mmdit.pooled_projection_dim * s)
    batch = b * config.image_size ** 2 * 3 * 4 + text_in
    if config.stage == 2:
        em, g, k = config.entropy_model, config.codec.grid_side, config.codec.codebook_size
        n = g * g + (m_ctx if em.conditional else 0)
        w = em.width
        scores = 0 if flash_attention else -(-em.num_heads // t) * n * n * (4 + s)
        block = b * (s * (6 * n * w + (4 + 2 * em.mlp_ratio) * n * w // t) + scores)
        frozen_fwd = max(_vae_encoder_peak(config, b, s), _hyper_encoder(config, b, s, saved=False),
                         text_peak if em.conditional else 0)
        return [(f"entropy model, {em.depth} blocks + cotangents", (em.depth + 1) * block),
                ("logits, log-softmax, their gradient", b * g * g * k * 4 * 3),
                (FROZEN_FORWARD, frozen_fwd),
                ("batch (images, text context)", batch)]
    mm = config.mmdit
    n_img = (side // mm.patch_size) ** 2
    tok = n_img + m_ctx
    d, h, layers = mm.num_attention_heads * mm.attention_head_dim, mm.num_attention_heads, mm.num_layers
    q = 2 if mm.qk_norm else 0
    heads = -(-h // t)

    def block(dual: bool) -> int:
        resid, split = 7 * tok * d, (12 + q) * tok * d
        scores = 0 if flash_attention else heads * tok * tok * (4 + s)
        if dual:
            resid += 2 * n_img * d
            split += (4 + q) * n_img * d
            scores += 0 if flash_attention else heads * n_img * n_img * (4 + s)
        return b * (s * (resid + split // t) + scores)

    duals = set(mm.dual_attention_layers or ())
    blocks = [block(i in duals) for i in range(layers)]
    if config.remat:
        mmdit = [(f"MM-DiT saved block inputs ({layers} blocks, remat)", layers * b * tok * d * s),
                 ("MM-DiT one block recomputed + cotangents", 2 * max(blocks))]
    else:
        mmdit = [(f"MM-DiT all {layers} blocks (no remat)", sum(blocks)),
                 ("MM-DiT one block's cotangents", max(blocks))]
    embed = b * (4 * tok * d * s + 4 * side * side * (ch + config.codec.code_dim) * 4)
    frozen_fwd = max(_vae_encoder_peak(config, b, s), text_peak)
    if config.stage == 3:  # the hyper-encoder is frozen; the shortcut targets are forward passes
        nb = 2 * int(round(b * config.stage3.bootstrap_fraction)) if config.stage3.method == "shortcut" else 0
        targets = max(blocks) // b * nb  # one block's working set on the target passes' examples
        frozen_fwd = max(frozen_fwd, _hyper_encoder(config, b, s, saved=False), targets)
        if config.stage3.method == "reflow":  # the batch is couplings: no image is encoded in the step
            g = config.codec.grid_side
            couplings = b * (2 * side * side * ch * 4 + g * g * 4) + text_in  # float32 noise + latent, indices
            return mmdit + [("MM-DiT embeddings, output, latents, noise", embed),
                            (FROZEN_FORWARD, text_peak),
                            ("batch (noise, latents, indices, text context)", couplings)]
        return mmdit + [("MM-DiT embeddings, output, latents, noise", embed),
                        (FROZEN_FORWARD, frozen_fwd),
                        ("batch (images, text context)", batch)]
    return mmdit + [("MM-DiT embeddings, output, latents, noise", embed),
                    ("hyper-encoder (saved for backward)", _hyper_encoder(config, b, s, saved=True)),
                    (FROZEN_FORWARD, frozen_fwd),
                    ("batch (images, text context)", batch)]


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
    flash_attention: bool
    rows: list[tuple[str, int | None, int]]   # (what, total bytes or None, bytes per device)
    activation_rows: list[tuple[str, int]]

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

    def row(self, name: str) -> tuple[int | None, int]:
        for r in self.rows:
            if r[0] == name:
                return r[1], r[2]
        raise KeyError(name)

    def to_dict(self, device_memory: int | None = None) -> dict:
        d = {"config": self.name, "stage": self.stage, "mesh": self.mesh, "devices": self.num_devices,
             "batch": self.batch, "per_device_batch": self.per_device_batch, "dtype": self.dtype,
             "trainable": self.trainable, "frozen_placement": self.frozen_placement,
             "flash_attention": self.flash_attention,
             "rows": [{"what": n, "total_bytes": t, "per_device_bytes": p} for n, t, p in self.rows],
             "activations": [{"what": n, "per_device_bytes": p} for n, p in self.activation_rows],
             "activation_bytes": self.activation_bytes, "per_device_bytes": self.per_device}
        if device_memory is not None:
            d.update(device_memory_bytes=device_memory, fits=self.per_device <= device_memory,
                     margin_bytes=device_memory - self.per_device)
        return d


def make_plan(config, mesh: Mapping[str, int], *, stage: int | None = None, batch: int | None = None,
              frozen: str | None = None, flash_attention: bool = False,
              components: Components | None = None) -> Plan:
    """The per-device memory plan of training `config` on a mesh of shape `mesh` ({axis: size}).

    `components` (from `abstract_components`, for the same config / stage / batch) skips the
    eval_shape when planning several meshes. frozen=None: config.frozen_placement."""
    if frozen is None:
        frozen = setting(config, "frozen_placement")
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
            keys = _keys(path)
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
    acts = activations(cfg, b, mesh["tensor"], flash_attention, text_gather)
    gathered = largest_layer_gathered(st, mesh, under="params")
    if gathered:
        acts.append(("FSDP: one block's params + grads all-gathered", 2 * gathered))
    return Plan(cfg.name, int(cfg.stage), mesh, int(cfg.batch_size), b, str(cfg.dtype), trainable, frozen,
                bool(flash_attention), rows, acts)


def format_plan(plan: Plan, device_memory: int | None = None) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in plan.mesh.items())
    attn = ("fused attention kernel" if plan.flash_attention
            else "attention logits stored (--flash-attention: fused kernel)")
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
