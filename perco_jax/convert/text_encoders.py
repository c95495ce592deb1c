"""SD3's text encoders: transformers folders (CLIPTextModelWithProjection, T5EncoderModel) to Flax
params, and export back.

A folder is config.json + model.safetensors (single or sharded with an index), as
`save_pretrained` writes it (e.g. SD3's text_encoder/, text_encoder_2/, text_encoder_3/). A full
CLIPModel folder is accepted for CLIP (its vision tower is ignored), a T5ForConditionalGeneration
/ T5Model folder for T5 (its decoder is ignored). Every key and shape is checked before any tensor
is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.convert.common import (ConversionError, DictSource, Entry, SafetensorsSource, TensorSource,
                                      check_covers, diffusers_weight_files, export_state_dict,
                                      flat_shapes, write_folder, convert_checked)
from perco_jax.models.clip import ACTIVATIONS, CLIP_FIELDS, CLIPTextEncoder
from perco_jax.models.t5 import T5Encoder

T5_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
             "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj")
T5_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # tied: either one is the table


# ----------------------------------------------------------------------------- key maps

def _model(cls, config):
    return config if isinstance(config, cls) else cls(**config)


def clip_key_map(config: Union[CLIPTextEncoder, Mapping]) -> list[Entry]:
    """Every Flax parameter of the CLIP text encoder (a model or its kwargs) and its transformers key."""
    m = _model(CLIPTextEncoder, config)
    e = [Entry(("token_embedding", "embedding"), "text_model.embeddings.token_embedding.weight"),
         Entry(("position_embedding", "embedding"), "text_model.embeddings.position_embedding.weight")]

    e += clip_layer_entries("text_model", m.num_hidden_layers)
    e += norm_entries(("final_layer_norm",), "text_model.final_layer_norm")
    e += linear_entries(("text_projection",), "text_projection", bias=False)
    return e


def linear_entries(f: tuple, t: str, bias: bool = True) -> list[Entry]:
    return [Entry(f + ("kernel",), t + ".weight", "linear")] + ([Entry(f + ("bias",), t + ".bias")] if bias else [])


def norm_entries(f: tuple, t: str) -> list[Entry]:
    return [Entry(f + ("scale",), t + ".weight"), Entry(f + ("bias",), t + ".bias")]


def clip_layer_entries(tower: str, num_layers: int) -> list[Entry]:
    """The encoder layers of a CLIP tower ("text_model" / "vision_model"): Flax layers_{i} <->
    {tower}.encoder.layers.{i}."""
    e = []
    for i in range(num_layers):
        f, t = (f"layers_{i}",), f"{tower}.encoder.layers.{i}"
        e += norm_entries(f + ("layer_norm1",), t + ".layer_norm1")
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            e += linear_entries(f + ("self_attn", p), f"{t}.self_attn.{p}")
        e += norm_entries(f + ("layer_norm2",), t + ".layer_norm2")
        for p in ("fc1", "fc2"):
            e += linear_entries(f + ("mlp", p), f"{t}.mlp.{p}")
    return e


def t5_key_map(config: Union[T5Encoder, Mapping], embed_key: str = "shared.weight") -> list[Entry]:
    """Every Flax parameter of the T5 encoder (a model or its kwargs) and its transformers key;
    `embed_key` names the (tied) token table: "shared.weight" or "encoder.embed_tokens.weight"."""
    m = _model(T5Encoder, config)
    e = [Entry(("shared", "embedding"), embed_key)]
    gated = m.feed_forward_proj.startswith("gated-")
    for i in range(m.num_layers):
        t = f"encoder.block.{i}.layer"
        a, f = (f"block_{i}_layer_0",), (f"block_{i}_layer_1",)
        e.append(Entry(a + ("layer_norm", "scale"), f"{t}.0.layer_norm.weight"))
        for p in ("q", "k", "v", "o"):
            e.append(Entry(a + ("SelfAttention", p, "kernel"), f"{t}.0.SelfAttention.{p}.weight", "linear"))
        if i == 0:
            e.append(Entry(a + ("SelfAttention", "relative_attention_bias", "embedding"),
                           f"{t}.0.SelfAttention.relative_attention_bias.weight"))
        e.append(Entry(f + ("layer_norm", "scale"), f"{t}.1.layer_norm.weight"))
        for p in (("wi_0", "wi_1") if gated else ("wi",)) + ("wo",):
            e.append(Entry(f + ("DenseReluDense", p, "kernel"), f"{t}.1.DenseReluDense.{p}.weight", "linear"))
    e.append(Entry(("final_layer_norm", "scale"), "encoder.final_layer_norm.weight"))
    return e


def abstract_params(model: Union[CLIPTextEncoder, T5Encoder]) -> dict:
    """Parameter shapes (ShapeDtypeStructs) from `jax.eval_shape`: nothing is allocated."""
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids))["params"]


# ----------------------------------------------------------------------------- configs

def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name in CLIP_FIELDS + T5_FIELDS}


def clip_config_from_hf(cfg: Mapping) -> dict:
    """CLIPTextEncoder kwargs from a transformers config.json dict (CLIPTextConfig, or a CLIPConfig
    whose text_config is used); missing fields take CLIPTextConfig's defaults."""
    cfg = dict(cfg)
    kind = cfg.get("model_type")
    if kind == "clip":  # a whole CLIPModel: its text tower, projected to the top-level projection_dim
        text = dict(cfg.get("text_config") or {})
        if "projection_dim" in cfg:
            text["projection_dim"] = cfg["projection_dim"]
        cfg, kind = text, "clip_text_model"
    if kind not in (None, "clip_text_model"):
        raise ConversionError(f"expected a CLIP text model config (model_type 'clip_text_model'), got {kind!r}")
    kw = {**_defaults(CLIPTextEncoder), **{k: cfg[k] for k in CLIP_FIELDS if k in cfg}}
    if kw["hidden_act"] not in ACTIVATIONS:
        raise ConversionError(f"unsupported hidden_act {kw['hidden_act']!r}; supported: {sorted(ACTIVATIONS)}")
    if kw["hidden_size"] % kw["num_attention_heads"]:
        raise ConversionError(f"hidden_size {kw['hidden_size']} is not a multiple of num_attention_heads "
                              f"{kw['num_attention_heads']}")
    if isinstance(kw["eos_token_id"], (list, tuple)) or kw["eos_token_id"] is None:
        raise ConversionError(f"eos_token_id must be one integer, got {kw['eos_token_id']!r}")
    return kw


def clip_config_to_hf(model: CLIPTextEncoder) -> dict:
    """The config.json of `model` as transformers' CLIPTextModelWithProjection writes it (main fields)."""
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            **{k: getattr(model, k) for k in CLIP_FIELDS}}


def t5_config_from_hf(cfg: Mapping) -> dict:
    """T5Encoder kwargs from a transformers T5Config dict; missing fields take T5Config's defaults."""
    kind = cfg.get("model_type")
    if kind not in (None, "t5"):
        raise ConversionError(f"expected a T5 config (model_type 't5'), got {kind!r}")
    kw = {**_defaults(T5Encoder), **{k: cfg[k] for k in T5_FIELDS if k in cfg}}
    parts = kw["feed_forward_proj"].split("-")
    act = "gelu_new" if kw["feed_forward_proj"] == "gated-gelu" else parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or act not in ACTIVATIONS:
        raise ConversionError(f"unsupported feed_forward_proj {kw['feed_forward_proj']!r} "
                              "(expected 'relu', 'gated-gelu' or '[gated-]<activation>')")
    return kw


def t5_config_to_hf(model: T5Encoder) -> dict:
    """The config.json of `model` as transformers' T5EncoderModel writes it (main fields)."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "is_encoder_decoder": False,
            "use_cache": False, **{k: getattr(model, k) for k in T5_FIELDS}}


# ----------------------------------------------------------------------------- from tensors

def _clip_hint(source: TensorSource) -> str:
    if "text_projection.weight" not in source and "text_model.final_layer_norm.weight" in source:
        return "no text_projection: this is a CLIPTextModel, not a CLIPTextModelWithProjection"
    if "text_model.embeddings.token_embedding.weight" not in source:
        if any(k.startswith("encoder.block.") for k in source.keys()):
            return "these are T5 weights; use load_t5"
        return "no text_model.* keys: not a transformers CLIP text encoder"
    return ""


def clip_from_source(source: TensorSource, model: CLIPTextEncoder, *, dtype=jnp.float32,
                     progress: bool = False) -> dict:
    """Check then stream `source` (transformers keys) into params for `model`; raises ConversionError."""
    shapes = flat_shapes(abstract_params(model))
    entries = clip_key_map(model)
    ignore = [k for k in source.keys() if k == "text_model.embeddings.position_ids" or k == "logit_scale"
              or k.startswith(("vision_model.", "visual_projection."))]
    return convert_checked(entries, source, shapes, name="CLIP", ignore=ignore,
                           what="CLIP text encoder (CLIPTextModelWithProjection)",
                           hint=lambda: _clip_hint(source), dtype=dtype, progress=progress)


def _t5_hint(source: TensorSource, model: T5Encoder) -> str:
    keys = source.keys()
    if any(k.startswith("text_model.") for k in keys):
        return "these are CLIP weights; use load_clip"
    gated = model.feed_forward_proj.startswith("gated-")
    if gated and "encoder.block.0.layer.1.DenseReluDense.wi.weight" in source:
        return f"the checkpoint has a plain (wi) feed-forward but config says {model.feed_forward_proj!r}"
    if not gated and "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in source:
        return f"the checkpoint has a gated (wi_0, wi_1) feed-forward but config says {model.feed_forward_proj!r}"
    return ""


def t5_from_source(source: TensorSource, model: T5Encoder, *, dtype=jnp.float32, progress: bool = False) -> dict:
    """Check then stream `source` (transformers keys) into params for `model`; raises ConversionError.
    The token table is read from `shared.weight`, or `encoder.embed_tokens.weight` if that is the
    only copy (they are tied); a decoder and lm_head, if present, are ignored."""
    embed_key = next((k for k in T5_EMBED_KEYS if k in source), T5_EMBED_KEYS[0])
    shapes = flat_shapes(abstract_params(model))
    entries = t5_key_map(model, embed_key)
    ignore = [k for k in source.keys() if k in T5_EMBED_KEYS or k == "lm_head.weight" or k.startswith("decoder.")]
    return convert_checked(entries, source, shapes, name="T5", ignore=ignore, what="T5 encoder (T5EncoderModel)",
                           hint=lambda: _t5_hint(source, model), dtype=dtype, progress=progress)


def clip_from_state_dict(config: Mapping, state_dict: Mapping, *, dtype=jnp.float32, compute_dtype=None):
    """(model, params) from an in-memory transformers config dict and state dict (torch or numpy)."""
    model = CLIPTextEncoder(**clip_config_from_hf(config), dtype=compute_dtype or dtype)
    return model, clip_from_source(DictSource(state_dict), model, dtype=dtype)


def t5_from_state_dict(config: Mapping, state_dict: Mapping, *, dtype=jnp.float32, compute_dtype=None):
    """(model, params) from an in-memory transformers config dict and state dict (torch or numpy)."""
    model = T5Encoder(**t5_config_from_hf(config), dtype=compute_dtype or dtype)
    return model, t5_from_source(DictSource(state_dict), model, dtype=dtype)


# ----------------------------------------------------------------------------- folders

def _read_config(path: Path, what: str) -> dict:
    if not path.is_dir():
        raise ConversionError(f"no such {what} folder: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        subs = sorted(p.name for p in path.glob("text_encoder*") if (p / "config.json").exists())
        extra = f" (give one of its subfolders: {', '.join(subs)})" if subs else ""
        raise ConversionError(f"{path} has no config.json: not a transformers {what} folder{extra}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file} is not valid JSON: {e}") from e


def load_clip(path: str | os.PathLike, dtype=jnp.float32, *, compute_dtype=None, progress: bool = False):
    """(model, params, config) from a transformers CLIPTextModelWithProjection folder (e.g. SD3's
    text_encoder/ or text_encoder_2/). Params are cast to `dtype`; `compute_dtype` sets the
    model's compute dtype (default: `dtype`); `config` is the folder's config.json dict."""
    path = Path(path)
    cfg = _read_config(path, "CLIP text encoder")
    model = CLIPTextEncoder(**clip_config_from_hf(cfg), dtype=compute_dtype or dtype)
    source = SafetensorsSource(diffusers_weight_files(path, "model"))
    return model, clip_from_source(source, model, dtype=dtype, progress=progress), cfg


def load_t5(path: str | os.PathLike, dtype=jnp.float32, *, compute_dtype=None, progress: bool = False):
    """(model, params, config) from a transformers T5EncoderModel folder (e.g. SD3's text_encoder_3/).
    Params are cast to `dtype`; `compute_dtype` sets the model's compute dtype (default: `dtype`)."""
    path = Path(path)
    cfg = _read_config(path, "T5 encoder")
    model = T5Encoder(**t5_config_from_hf(cfg), dtype=compute_dtype or dtype)
    source = SafetensorsSource(diffusers_weight_files(path, "model"))
    return model, t5_from_source(source, model, dtype=dtype, progress=progress), cfg


def _merged(config: Optional[Mapping], ours: dict) -> dict:
    config = dict(config or {})
    if config.get("model_type") == "clip":  # a whole CLIPModel's config: keep its text part
        config = dict(config.get("text_config") or {})
    for k in ("torch_dtype", "dtype"):  # the weights are written in float32
        config.pop(k, None)
    return {**config, **ours}


def _save(model, params, folder, key_map, what, config: dict) -> Path:
    params = nn.meta.unbox(params)
    params = params.get("params", params)
    entries = key_map(model)
    check_covers(entries, flat_shapes(params), what)
    return write_folder(folder, export_state_dict(entries, params), config, "model.safetensors")


def save_clip(model: CLIPTextEncoder, params: Mapping, folder: str | os.PathLike,
              config: Optional[Mapping] = None) -> Path:
    """Write a transformers folder (config.json + float32 model.safetensors) that
    `CLIPTextModelWithProjection.from_pretrained` loads. `config` (e.g. the dict `load_clip`
    returned) keeps its other fields (token ids, ...); the model's fields override it."""
    return _save(model, params, folder, clip_key_map, "CLIP", _merged(config, clip_config_to_hf(model)))


def save_t5(model: T5Encoder, params: Mapping, folder: str | os.PathLike,
            config: Optional[Mapping] = None) -> Path:
    """Write a transformers folder (config.json + float32 model.safetensors with `shared.weight`)
    that `T5EncoderModel.from_pretrained` loads; `config` as for `save_clip`."""
    return _save(model, params, folder, t5_key_map, "T5", _merged(config, t5_config_to_hf(model)))
