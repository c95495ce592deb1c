"""SD3 VAE conversion: a diffusers `vae/` folder (AutoencoderKL) to Flax params, and export back.

The key map (`vae_key_map`) is built from the config; loading checks every key and shape before
reading any tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.convert.common import (ConversionError, DictSource, Entry, SafetensorsSource, TensorSource,
                                      check_covers, diffusers_weight_files, export_state_dict,
                                      flat_shapes, write_folder, convert_checked)
from perco_jax.models.vae import AutoencoderKL

CLASS_NAME = "AutoencoderKL"
# diffusers' defaults for fields a config.json leaves out (not SD3's values).
DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1,
                          latent_channels=4, norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True,
                          scaling_factor=0.18215, shift_factor=None, mid_block_add_attention=True)
FIELDS = tuple(DIFFUSERS_DEFAULTS)
LEGACY_ATTN_KEY = "encoder.mid_block.attentions.0.query.weight"


# ----------------------------------------------------------------------------- key map

def vae_key_map(config: Union[AutoencoderKL, Mapping]) -> list[Entry]:
    """Every Flax parameter of the VAE (a model or its kwargs) and its diffusers AutoencoderKL key."""
    m = config if isinstance(config, AutoencoderKL) else AutoencoderKL(**config)
    chans = tuple(m.block_out_channels)
    e: list[Entry] = []

    def conv(f, t):
        e.extend([Entry(f + ("kernel",), t + ".weight", "conv"), Entry(f + ("bias",), t + ".bias")])

    def norm(f, t):
        e.extend([Entry(f + ("scale",), t + ".weight"), Entry(f + ("bias",), t + ".bias")])

    def resnet(f, t, cin, cout):
        norm(f + ("norm1",), t + ".norm1")
        conv(f + ("conv1",), t + ".conv1")
        norm(f + ("norm2",), t + ".norm2")
        conv(f + ("conv2",), t + ".conv2")
        if cin != cout:
            conv(f + ("conv_shortcut",), t + ".conv_shortcut")

    def mid(side):
        f, t, c = (side, "mid_block"), f"{side}.mid_block", chans[-1]
        resnet(f + ("resnets_0",), t + ".resnets.0", c, c)
        if m.mid_block_add_attention:
            a, ta = f + ("attentions_0",), t + ".attentions.0"
            norm(a + ("group_norm",), ta + ".group_norm")
            for n, tn in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
                e.extend([Entry(a + (n, "kernel"), f"{ta}.{tn}.weight", "linear"),
                          Entry(a + (n, "bias"), f"{ta}.{tn}.bias")])
        resnet(f + ("resnets_1",), t + ".resnets.1", c, c)

    conv(("encoder", "conv_in"), "encoder.conv_in")
    cin = chans[0]
    for i, c in enumerate(chans):
        for j in range(m.layers_per_block):
            resnet(("encoder", f"down_blocks_{i}_resnets_{j}"), f"encoder.down_blocks.{i}.resnets.{j}",
                   cin if j == 0 else c, c)
        cin = c
        if i < len(chans) - 1:
            conv(("encoder", f"down_blocks_{i}_downsample"), f"encoder.down_blocks.{i}.downsamplers.0.conv")
    mid("encoder")
    norm(("encoder", "conv_norm_out"), "encoder.conv_norm_out")
    conv(("encoder", "conv_out"), "encoder.conv_out")

    conv(("decoder", "conv_in"), "decoder.conv_in")
    mid("decoder")
    rev = chans[::-1]
    cin = rev[0]
    for i, c in enumerate(rev):
        for j in range(m.layers_per_block + 1):
            resnet(("decoder", f"up_blocks_{i}_resnets_{j}"), f"decoder.up_blocks.{i}.resnets.{j}",
                   cin if j == 0 else c, c)
        cin = c
        if i < len(rev) - 1:
            conv(("decoder", f"up_blocks_{i}_upsample"), f"decoder.up_blocks.{i}.upsamplers.0.conv")
    norm(("decoder", "conv_norm_out"), "decoder.conv_norm_out")
    conv(("decoder", "conv_out"), "decoder.conv_out")

    if m.use_quant_conv:
        conv(("quant_conv",), "quant_conv")
    if m.use_post_quant_conv:
        conv(("post_quant_conv",), "post_quant_conv")
    return e


def abstract_params(model: AutoencoderKL) -> dict:
    """Parameter shapes (ShapeDtypeStructs) from `jax.eval_shape`: nothing is allocated."""
    f = model.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))["params"]


# ----------------------------------------------------------------------------- configs

def vae_config_from_diffusers(cfg: Mapping) -> dict:
    """AutoencoderKL kwargs from a diffusers config.json dict (missing fields take diffusers' defaults)."""
    name = cfg.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ConversionError(f"expected an {CLASS_NAME} config, got {name!r}")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        got = cfg.get(key) or [want]
        if any(b != want for b in got):
            raise ConversionError(f"unsupported {key} {list(got)}: only {want} is implemented")
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        raise ConversionError(f"unsupported act_fn {cfg['act_fn']!r}: only silu is implemented")
    if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
        raise ConversionError("configs with latents_mean/latents_std are not supported "
                              "(SD3 scales latents with scaling_factor and shift_factor only)")
    kw = {k: cfg.get(k, DIFFUSERS_DEFAULTS[k]) for k in FIELDS}
    kw["block_out_channels"] = tuple(kw["block_out_channels"])
    kw["shift_factor"] = float(kw["shift_factor"] or 0.0)  # diffusers' None means no shift
    kw["scaling_factor"] = float(kw["scaling_factor"])
    for key in ("down_block_types", "up_block_types"):
        if key in cfg and len(cfg[key]) != len(kw["block_out_channels"]):
            raise ConversionError(f"{key} has {len(cfg[key])} entries but block_out_channels has "
                                  f"{len(kw['block_out_channels'])}")
    return kw


def vae_config_to_diffusers(model: AutoencoderKL) -> dict:
    """The config.json of `model` as diffusers writes it."""
    n = len(model.block_out_channels)
    cfg = {"_class_name": CLASS_NAME, "_diffusers_version": "0.35.0"}
    cfg.update({k: getattr(model, k) for k in FIELDS})
    cfg.update(block_out_channels=list(model.block_out_channels), down_block_types=["DownEncoderBlock2D"] * n,
               up_block_types=["UpDecoderBlock2D"] * n, act_fn="silu", latents_mean=None, latents_std=None,
               force_upcast=True)
    return cfg


# ----------------------------------------------------------------------------- load / save

def _hint(source: TensorSource) -> str:
    if LEGACY_ATTN_KEY in source:
        return ("old-style attention keys (query/key/value/proj_attn): load and re-save the folder with "
                "diffusers' AutoencoderKL.from_pretrained / save_pretrained first")
    if "encoder.conv_out.weight" in source and "encoder.conv_in.weight" in source:
        return (f"the checkpoint has {source.shape('encoder.conv_out.weight')[0] // 2} latent channels and "
                f"first width {source.shape('encoder.conv_in.weight')[0]}; does config.json match it?")
    return ""


def vae_from_source(source: TensorSource, model: AutoencoderKL, *, dtype=jnp.float32,
                    progress: bool = False) -> dict:
    """Check then stream `source` (diffusers keys) into params for `model`; raises ConversionError."""
    shapes = flat_shapes(abstract_params(model))
    entries = vae_key_map(model)
    return convert_checked(entries, source, shapes, name="VAE", what="SD3 VAE (AutoencoderKL)",
                           hint=lambda: _hint(source), dtype=dtype, progress=progress)


def vae_from_state_dict(config: Mapping, state_dict: Mapping, *, dtype=jnp.float32, compute_dtype=None):
    """(model, params) from an in-memory diffusers config dict and state dict (torch or numpy)."""
    model = AutoencoderKL(**vae_config_from_diffusers(dict(config)), dtype=compute_dtype or dtype)
    return model, vae_from_source(DictSource(state_dict), model, dtype=dtype)


def load_vae(path: str | os.PathLike, dtype=jnp.float32, *, compute_dtype=None, progress: bool = False):
    """(model, params) from a diffusers `vae/` folder (config.json + single or sharded safetensors).

    A pipeline folder (with a vae/ subfolder) is accepted too. Params are cast to `dtype`;
    `compute_dtype` sets the model's compute dtype (default: `dtype`).
    """
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"no such VAE folder: {path}")
    if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        path = path / "vae"
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ConversionError(f"{path} has no config.json: not a diffusers VAE folder (give the vae/ subfolder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file} is not valid JSON: {e}") from e
    model = AutoencoderKL(**vae_config_from_diffusers(cfg), dtype=compute_dtype or dtype)
    source = SafetensorsSource(diffusers_weight_files(path))
    return model, vae_from_source(source, model, dtype=dtype, progress=progress)


def save_vae(model: AutoencoderKL, params: Mapping, folder: str | os.PathLike) -> Path:
    """Write a diffusers folder (config.json + float32 safetensors) that
    `AutoencoderKL.from_pretrained` loads. Written to a temporary name, then renamed."""
    params = nn.meta.unbox(params)
    params = params.get("params", params)
    entries = vae_key_map(model)
    check_covers(entries, flat_shapes(params), "VAE")
    sd = export_state_dict(entries, params)
    return write_folder(folder, sd, vae_config_to_diffusers(model), "diffusion_pytorch_model.safetensors")
