"""MM-DiT conversion: diffusers `transformer/` folders and original single-file SD3 checkpoints
to Flax params, and export back to a diffusers folder.

The diffusers key map lives in `transformer_key_map`; the original (Stability) single-file layout is
translated to diffusers keys lazily by `SD3SingleFileSource` (fused qkv split, shift/scale swapped
for the adaLN outputs stored in the other order), so there is one key map for both.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from perco_jax.convert.common import (ConversionError, Entry, SafetensorsSource, TensorSource,
                                      check_covers, check_entries, diffusers_weight_files,
                                      export_state_dict, flat_shapes, load_params, write_folder)
from perco_jax.models.mmdit import MMDiT, mmdit_from_config, sincos_pos_embed

CONFIG_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                 "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                 "pooled_projection_dim", "out_channels", "pos_embed_max_size", "dual_attention_layers",
                 "qk_norm")
SINGLE_FILE_PREFIX = "model.diffusion_model."
POS_EMBED_KEY = "pos_embed.pos_embed"


# ----------------------------------------------------------------------------- key map

def transformer_key_map(model: MMDiT) -> list[Entry]:
    """Every Flax parameter of `model` and its diffusers SD3Transformer2DModel key."""
    e = [Entry(("pos_embed", "kernel"), "pos_embed.proj.weight", "conv"),
         Entry(("pos_embed", "bias"), "pos_embed.proj.bias")]

    def linear(flax_path, torch_prefix):
        return [Entry(flax_path + ("kernel",), torch_prefix + ".weight", "linear"),
                Entry(flax_path + ("bias",), torch_prefix + ".bias")]

    for which in ("timestep_embedder", "text_embedder"):
        for j in (1, 2):
            e += linear((f"{which}_{j}",), f"time_text_embed.{which}.linear_{j}")
    e += linear(("context_embedder",), "context_embedder")
    attn_names = ["to_q", "to_k", "to_v"]
    for i in range(model.num_layers):
        f, t = (f"blocks_{i}",), f"transformer_blocks.{i}"
        e += linear(f + ("norm1",), t + ".norm1.linear")
        e += linear(f + ("norm1_context",), t + ".norm1_context.linear")
        attns = ["attn", "attn2"] if i in tuple(model.dual_attention_layers) else ["attn"]
        for a in attns:
            names = attn_names + (["add_q_proj", "add_k_proj", "add_v_proj"] if a == "attn" else [])
            for n in names:
                e += linear(f + (a, n), f"{t}.{a}.{n}")
            e += linear(f + (a, "to_out"), f"{t}.{a}.to_out.0")
            if a == "attn" and i != model.num_layers - 1:
                e += linear(f + (a, "to_add_out"), f"{t}.{a}.to_add_out")
            if model.qk_norm:
                norms = ["norm_q", "norm_k"] + (["norm_added_q", "norm_added_k"] if a == "attn" else [])
                e += [Entry(f + (a, n, "scale"), f"{t}.{a}.{n}.weight") for n in norms]
        ffs = ["ff"] if i == model.num_layers - 1 else ["ff", "ff_context"]
        for ff in ffs:
            e += linear(f + (ff, "fc1"), f"{t}.{ff}.net.0.proj")
            e += linear(f + (ff, "fc2"), f"{t}.{ff}.net.2")
    e += linear(("norm_out",), "norm_out.linear")
    e += linear(("proj_out",), "proj_out")
    return e


def abstract_params(model: MMDiT) -> dict:
    """Parameter shapes (ShapeDtypeStructs) from `jax.eval_shape`: nothing is allocated."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.dummy_inputs()))
    return nn.meta.unbox(boxed)["params"]


# ----------------------------------------------------------------------------- configs

def config_from_diffusers(cfg: Mapping) -> dict:
    """MMDiT kwargs from a diffusers config.json dict (ours adds `perco_extra_in_channels`)."""
    if cfg.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise ConversionError(f"expected an SD3Transformer2DModel config, got {cfg.get('_class_name')!r}")
    kw = {k: cfg[k] for k in CONFIG_FIELDS if k in cfg}
    kw["dual_attention_layers"] = tuple(kw.get("dual_attention_layers") or ())
    kw["qk_norm"] = kw.get("qk_norm") or None
    if kw.get("out_channels") is None:
        kw["out_channels"] = kw.get("in_channels", 16)
    extra = int(cfg.get("perco_extra_in_channels", 0))
    if extra:
        kw["in_channels"] -= extra
        kw["extra_in_channels"] = extra
    return kw


def config_to_diffusers(model: MMDiT) -> dict:
    cfg = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.35.0"}
    for k in CONFIG_FIELDS:
        cfg[k] = getattr(model, k)
    cfg["dual_attention_layers"] = list(model.dual_attention_layers)
    cfg["in_channels"] = model.in_channels + model.extra_in_channels
    cfg["perco_extra_in_channels"] = model.extra_in_channels
    return cfg


def infer_config(source: TensorSource) -> dict:
    """MMDiT kwargs read off the tensors of a diffusers-keyed source (head_dim from QK-norm, else 64)."""
    if "pos_embed.proj.weight" not in source:
        raise ConversionError("not an SD3 transformer checkpoint: no patch embedding "
                              "(pos_embed.proj.weight / x_embedder.proj.weight) found")
    d, cin, p, _ = source.shape("pos_embed.proj.weight")
    keys = source.keys()
    num_layers = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("transformer_blocks."))
    head_dim = source.shape("transformer_blocks.0.attn.norm_q.weight")[0] \
        if "transformer_blocks.0.attn.norm_q.weight" in source else 64
    max_size = int(round(np.sqrt(source.shape(POS_EMBED_KEY)[1]))) if POS_EMBED_KEY in source else 96
    return dict(
        patch_size=p, in_channels=cin, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=d // head_dim, joint_attention_dim=source.shape("context_embedder.weight")[1],
        caption_projection_dim=source.shape("context_embedder.weight")[0],
        pooled_projection_dim=source.shape("time_text_embed.text_embedder.linear_1.weight")[1],
        out_channels=source.shape("proj_out.weight")[0] // (p * p), pos_embed_max_size=max_size,
        dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in keys if ".attn2." in k})),
        qk_norm="rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in source else None,
        sample_size=_infer_sample_size(source, d, p, max_size))


def _infer_sample_size(source: TensorSource, dim: int, patch: int, max_size: int) -> int:
    """sample_size is not stored, but it sets the position scaling of the stored sin-cos table:
    find the one whose centre row matches (128, the published value, is tried first)."""
    if POS_EMBED_KEY not in source:
        return 128
    row = source.get(POS_EMBED_KEY).reshape(max_size, max_size, dim)[(max_size - 1) // 2]
    for base in [128 // patch] + list(range(1, max_size + 1)):
        if np.allclose(sincos_pos_embed(dim, 1, max_size, max_size, base)[:, :], row, atol=1e-4):
            return base * patch
    raise ConversionError(f"{POS_EMBED_KEY} is not an SD3 sin-cos table for any sample_size")


def _family_hint(source: TensorSource, model: MMDiT) -> str:
    """Name the published model the checkpoint looks like, when it is not what was asked for."""
    from perco_jax.config import load_config

    try:
        got = infer_config(source)
    except (ConversionError, KeyError, ValueError):
        return ""
    names = []
    for preset in ("sd3_medium", "sd35_medium", "sd35_large"):
        m = load_config(preset).mmdit
        if (m.num_layers, m.num_attention_heads, bool(m.qk_norm), len(m.dual_attention_layers)) == (
                got["num_layers"], got["num_attention_heads"], bool(got["qk_norm"]),
                len(got["dual_attention_layers"])):
            names.append(preset)
    looks = f"this looks like {names[0]}" if names else "this checkpoint has"
    return (f"{looks} ({got['num_layers']} layers, {got['num_attention_heads']} heads, "
            f"qk_norm={got['qk_norm']}, {len(got['dual_attention_layers'])} dual-attention layers), "
            f"but the model has {model.num_layers} layers, {model.num_attention_heads} heads, "
            f"qk_norm={model.qk_norm}, {len(model.dual_attention_layers)} dual-attention layers")


# ----------------------------------------------------------------------------- sources

class SD3SingleFileSource(TensorSource):
    """An original SD3 / SD3.5 single-file checkpoint seen through diffusers' transformer keys."""

    def __init__(self, path: str | os.PathLike):
        self._src = SafetensorsSource([path], prefix=SINGLE_FILE_PREFIX)
        orig = self._src.keys()
        if not orig:
            raise ConversionError(f"{path} has no '{SINGLE_FILE_PREFIX}*' tensors: not an SD3 single-file checkpoint")
        self._map: dict[str, tuple[str, str, int]] = {}  # diffusers key -> (orig key, op, arg)
        layers = sorted({int(k.split(".")[1]) for k in orig if k.startswith("joint_blocks.")})
        last = layers[-1] if layers else -1
        dim = self._src.shape("x_embedder.proj.weight")[0] if "x_embedder.proj.weight" in self._src else 0
        m = self._map
        for k in orig:
            for suffix in ("weight", "bias"):
                self._add_simple(k, suffix)
        for i in layers:
            for which, attns in (("x_block", ("attn", "attn2")), ("context_block", ("attn",))):
                for a in attns:
                    for suffix in ("weight", "bias"):
                        qkv = f"joint_blocks.{i}.{which}.{a}.qkv.{suffix}"
                        if qkv not in self._src:
                            continue
                        names = ("to_q", "to_k", "to_v") if which == "x_block" else \
                            ("add_q_proj", "add_k_proj", "add_v_proj")
                        for j, n in enumerate(names):
                            m[f"transformer_blocks.{i}.{a}.{n}.{suffix}"] = (qkv, "chunk3", j)
            for suffix in ("weight", "bias"):
                src = f"joint_blocks.{i}.context_block.adaLN_modulation.1.{suffix}"
                if i == last and src in self._src:
                    m[f"transformer_blocks.{i}.norm1_context.linear.{suffix}"] = (src, "swap", dim)
        for suffix in ("weight", "bias"):
            src = f"final_layer.adaLN_modulation.1.{suffix}"
            if src in self._src:
                m[f"norm_out.linear.{suffix}"] = (src, "swap", dim)
        self._unused = sorted(set(orig) - {v[0] for v in m.values()})

    _SIMPLE = {
        "pos_embed": POS_EMBED_KEY,
        "x_embedder.proj.{s}": "pos_embed.proj.{s}",
        "t_embedder.mlp.0.{s}": "time_text_embed.timestep_embedder.linear_1.{s}",
        "t_embedder.mlp.2.{s}": "time_text_embed.timestep_embedder.linear_2.{s}",
        "y_embedder.mlp.0.{s}": "time_text_embed.text_embedder.linear_1.{s}",
        "y_embedder.mlp.2.{s}": "time_text_embed.text_embedder.linear_2.{s}",
        "context_embedder.{s}": "context_embedder.{s}",
        "final_layer.linear.{s}": "proj_out.{s}",
    }
    _BLOCK = {
        "x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
        "x_block.attn2.proj": "attn2.to_out.0",
        "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
        "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
        "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
        "x_block.adaLN_modulation.1": "norm1.linear", "context_block.adaLN_modulation.1": "norm1_context.linear",
        "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
        "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
    }

    def _add_simple(self, k: str, s: str) -> None:
        for orig, diff in self._SIMPLE.items():
            if k == orig.format(s=s):
                self._map[diff.format(s=s)] = (k, "copy", 0)
        parts = k.split(".")
        if parts[0] == "joint_blocks" and k.endswith("." + s):
            inner = ".".join(parts[2:])[: -len(s) - 1]
            if inner in self._BLOCK:
                self._map[f"transformer_blocks.{parts[1]}.{self._BLOCK[inner]}.{s}"] = (k, "copy", 0)

    @property
    def unused_keys(self) -> list[str]:
        return self._unused

    def keys(self):  # unknown original keys stay visible so that they are reported as unexpected
        return list(self._map) + self._unused

    def __contains__(self, key):
        return key in self._map

    def shape(self, key):
        if key not in self._map:
            return self._src.shape(key)
        orig, op, _ = self._map[key]
        s = self._src.shape(orig)
        return (s[0] // 3,) + tuple(s[1:]) if op == "chunk3" else s

    def get(self, key):
        orig, op, arg = self._map[key]
        x = self._src.get(orig)
        if op == "chunk3":
            return np.split(x, 3, axis=0)[arg]
        if op == "swap":  # stored (shift, scale); diffusers has (scale, shift)
            shift, scale = np.split(x, 2, axis=0)
            return np.concatenate([scale, shift], axis=0)
        return x


class _PadPatchEmbed(TensorSource):
    """Zero-pads the patch-embed input channels of a pretrained checkpoint up to in + extra."""

    def __init__(self, src: TensorSource, extra: int):
        self._src, self._extra = src, extra

    def keys(self):
        return self._src.keys()

    def __contains__(self, key):
        return key in self._src

    def shape(self, key):
        s = self._src.shape(key)
        return (s[0], s[1] + self._extra) + tuple(s[2:]) if key == "pos_embed.proj.weight" else s

    def get(self, key):
        x = self._src.get(key)
        if key == "pos_embed.proj.weight":
            x = np.concatenate([x, np.zeros((x.shape[0], self._extra) + x.shape[2:], x.dtype)], axis=1)
        return x


# ----------------------------------------------------------------------------- public API

def _check_pos_embed(model: MMDiT, source: TensorSource) -> None:
    """The sin-cos table is computed, not stored; a stored one must agree with the config."""
    if POS_EMBED_KEY not in source:
        return
    n = model.pos_embed_max_size
    stored = source.get(POS_EMBED_KEY).reshape(-1, model.inner_dim)
    if stored.shape[0] != n * n:
        raise ConversionError(f"{POS_EMBED_KEY} has {stored.shape[0]} positions, expected {n}x{n}")
    ours = model.pos_embed(n, n)
    if not np.allclose(stored, ours, atol=1e-4):
        raise ConversionError(f"{POS_EMBED_KEY} differs from the sin-cos table of sample_size={model.sample_size}"
                              f" (max diff {np.abs(stored - ours).max():.3g}): wrong sample_size in the config?")


def transformer_from_source(source: TensorSource, model: MMDiT, *, dtype=jnp.float32,
                            progress: bool = False) -> dict:
    """Check then stream `source` (diffusers keys) into params for `model`; raises ConversionError."""
    if model.extra_in_channels and "pos_embed.proj.weight" in source and \
            source.shape("pos_embed.proj.weight")[1] == model.in_channels:
        source = _PadPatchEmbed(source, model.extra_in_channels)
    shapes = flat_shapes(abstract_params(model))
    entries = transformer_key_map(model)
    check_covers(entries, shapes, "MM-DiT")
    check_entries(entries, source, shapes, ignore=[POS_EMBED_KEY], what="SD3 transformer",
                  hint=lambda: _family_hint(source, model))
    _check_pos_embed(model, source)
    return load_params(entries, source, dtype=dtype, progress=progress, desc="MM-DiT")


def load_transformer(path: str | os.PathLike, dtype=jnp.float32, *, config: Mapping | None = None,
                     extra_in_channels: int = 0, compute_dtype=None, progress: bool = False):
    """Load an MM-DiT from a diffusers `transformer/` folder or an original single-file checkpoint.

    Returns (model, params). The config comes from the folder's config.json, or is inferred from the
    tensors of a single file; passing `config` (MMDiT kwargs) checks the checkpoint against it instead.
    Parameters are cast to `dtype`; `compute_dtype` sets the model's compute dtype (default: `dtype`).
    """
    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ConversionError(f"{path} has no config.json: not a diffusers transformer folder "
                                  "(give the pipeline's transformer/ subfolder)")
        kw = config_from_diffusers(json.loads(cfg_file.read_text()))
        source: TensorSource = SafetensorsSource(diffusers_weight_files(path))
    elif path.is_file():
        source = SD3SingleFileSource(path)
        kw = infer_config(source)
    else:
        raise ConversionError(f"no such checkpoint: {path}")
    if config is not None:
        kw = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    kw.setdefault("extra_in_channels", 0)
    kw["extra_in_channels"] = max(kw["extra_in_channels"], extra_in_channels)
    model = mmdit_from_config(kw, dtype=compute_dtype or dtype)
    return model, transformer_from_source(source, model, dtype=dtype, progress=progress)


def save_transformer(model: MMDiT, params: Mapping, folder: str | os.PathLike) -> Path:
    """Write a diffusers folder (config.json + float32 safetensors) that
    `SD3Transformer2DModel.from_pretrained` loads. Written to a temporary name, then renamed."""
    params = nn.meta.unbox(params)
    entries = transformer_key_map(model)
    check_covers(entries, flat_shapes(params), "MM-DiT")
    sd = export_state_dict(entries, params)
    n = model.pos_embed_max_size
    sd[POS_EMBED_KEY] = model.pos_embed(n, n)[None]
    return write_folder(folder, sd, config_to_diffusers(model), "diffusion_pytorch_model.safetensors")
