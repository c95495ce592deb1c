"""The SD3 VAE bundled in an original single-file checkpoint (sd3_medium*.safetensors,
sd3.5_large.safetensors, ...), where it is stored under `first_stage_model.*` in the LDM (CompVis)
layout, not diffusers'.

`LDMVAESource` presents those tensors through diffusers' AutoencoderKL keys, lazily (shapes are
reported without reading any tensor), so the one key map of `perco_jax.convert.vae` serves both
layouts. The renaming, as diffusers' `convert_ldm_vae_checkpoint` does it:

  LDM                                       diffusers
  {enc,dec}.norm_out                        {enc,dec}.conv_norm_out
  encoder.down.{i}.block.{j}                encoder.down_blocks.{i}.resnets.{j}
  encoder.down.{i}.downsample.conv          encoder.down_blocks.{i}.downsamplers.0.conv
  decoder.up.{i}.block.{j}                  decoder.up_blocks.{n-1-i}.resnets.{j}   (order reversed:
  decoder.up.{i}.upsample.conv              decoder.up_blocks.{n-1-i}.upsamplers.0.conv  LDM's up.0 is
                                                                                     the full-size one)
  {enc,dec}.mid.block_{1,2}                 {enc,dec}.mid_block.resnets.{0,1}
  {enc,dec}.mid.attn_1.{norm,q,k,v,proj_out} {enc,dec}.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
  ...nin_shortcut                           ...conv_shortcut

The attention projections are 1x1 convolutions [C, C, 1, 1] in LDM and linear layers [C, C] in
diffusers; they are squeezed on reading. Anything else under the prefix that is not a VAE tensor of
this layout stays visible under its own name, so a mismatch is reported as unexpected tensors.

The file stores no VAE config: `infer_vae_config` reads it off the tensor shapes, except for the
fields that leave no trace in the weights, which take SD3's values (see `UNSTORED_DEFAULTS`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from perco_jax.convert.common import ConversionError, SafetensorsSource, TensorSource
from perco_jax.convert.vae import vae_from_source
from perco_jax.models.vae import AutoencoderKL

LDM_VAE_PREFIX = "first_stage_model."
# Training leftovers some LDM checkpoints carry next to the autoencoder (discriminator, LPIPS): not VAE
# weights, dropped rather than reported.
IGNORED_PREFIXES = ("loss.",)
# Not recoverable from the weights: the GroupNorm group count and the latent scaling of the SD3 /
# SD3.5 pipelines (diffusers' stabilityai/stable-diffusion-3*/vae/config.json). Override them with
# `load_single_file_vae(..., config=...)` for a checkpoint of another family.
UNSTORED_DEFAULTS = dict(norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609)

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_LEVEL = {"encoder.conv_in": "encoder.conv_in", "encoder.conv_out": "encoder.conv_out",
              "encoder.norm_out": "encoder.conv_norm_out", "decoder.conv_in": "decoder.conv_in",
              "decoder.conv_out": "decoder.conv_out", "decoder.norm_out": "decoder.conv_norm_out",
              "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
_UP_INDEX = re.compile(r"^decoder\.up\.(\d+)\.")


def _ldm_to_diffusers(key: str, num_up: int) -> tuple[str, bool] | None:
    """(diffusers key, squeeze a 1x1 conv to linear) for one LDM VAE key; None if not of the layout."""
    parts = key.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    module, suffix = ".".join(parts[:-1]), parts[-1]
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{suffix}", False
    m = re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)", module)
    if m and m[3] in _RESNET_PARTS:
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}.{suffix}", False
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv", module)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{suffix}", False
    m = re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)", module)
    if m and m[3] in _RESNET_PARTS:
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}.{suffix}", False
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv", module)
    if m:
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{suffix}", False
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)", module)
    if m and m[3] in _RESNET_PARTS:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_PARTS[m[3]]}.{suffix}", False
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)", module)
    if m and m[2] in _ATTN_PARTS:
        return (f"{m[1]}.mid_block.attentions.0.{_ATTN_PARTS[m[2]]}.{suffix}",
                m[2] != "norm" and suffix == "weight")
    return None


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """[C, C, 1, 1] (or [C, C, 1]) -> [C, C]; any other shape is left for the shape check to report."""
    if len(shape) > 2 and all(d == 1 for d in shape[2:]):
        return tuple(shape[:2])
    return tuple(shape)


class LDMVAESource(TensorSource):
    """The LDM-layout VAE of an original single-file checkpoint seen through diffusers' AutoencoderKL keys.

    `source` is a checkpoint path (its `prefix`ed tensors are used) or a TensorSource already holding
    bare LDM VAE keys (`encoder.down.0.block.0.norm1.weight`, ...).
    """

    def __init__(self, source: str | os.PathLike | TensorSource, prefix: str = LDM_VAE_PREFIX):
        if not isinstance(source, TensorSource):
            path = source
            source = SafetensorsSource([path], prefix=prefix)
            if not source.keys():
                raise ConversionError(f"{path} has no '{prefix}*' tensors: this single-file checkpoint does not "
                                      "bundle a VAE (load the VAE from a diffusers vae/ folder instead)")
        self._src = source
        orig = [k for k in source.keys() if not k.startswith(IGNORED_PREFIXES)]
        ups = [int(m[1]) for m in map(_UP_INDEX.match, orig) if m]
        num_up = max(ups) + 1 if ups else 0
        self._map: dict[str, tuple[str, bool]] = {}  # diffusers key -> (LDM key, squeeze)
        unused = []
        for k in orig:
            hit = _ldm_to_diffusers(k, num_up)
            if hit is None:
                unused.append(k)
            else:  # the renaming is one-to-one, so no two LDM keys land on one diffusers key
                self._map[hit[0]] = (k, hit[1])
        # A stray key that already bears the diffusers name of a mapped tensor is shadowed by it.
        self._unused = sorted(k for k in unused if k not in self._map)

    @property
    def unused_keys(self) -> list[str]:
        """LDM keys under the prefix that are not VAE tensors of this layout (reported as unexpected)."""
        return self._unused

    def keys(self) -> list[str]:
        return list(self._map) + self._unused

    def __contains__(self, key: str) -> bool:
        return key in self._map or key in self._unused

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._map:
            return tuple(self._src.shape(key))
        orig, squeeze = self._map[key]
        s = tuple(self._src.shape(orig))
        return _squeezed(s) if squeeze else s

    def get(self, key: str) -> np.ndarray:
        if key not in self._map:
            return self._src.get(key)
        orig, squeeze = self._map[key]
        x = self._src.get(orig)
        return x.reshape(_squeezed(x.shape)) if squeeze else x


# ----------------------------------------------------------------------------- config

def infer_vae_config(source: TensorSource) -> dict:
    """AutoencoderKL kwargs read off the tensor shapes of a diffusers-keyed source (e.g. an LDMVAESource).

    block_out_channels: the widths of the encoder's down blocks; layers_per_block: resnets per encoder
    down block; latent_channels: half the encoder's conv_out (it emits mean and logvar); quant convs and
    mid-block attention: present or not. `UNSTORED_DEFAULTS` (group count 32, SD3's scaling_factor
    1.5305 and shift_factor 0.0609) are not in the weights and are assumed.
    """
    keys = source.keys()
    for k in ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight"):
        if k not in source:
            raise ConversionError(f"not an AutoencoderKL checkpoint: no {k} (LDM: "
                                  f"{k.replace('conv_norm_out', 'norm_out')}) found")
    down = re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight$")
    found = [tuple(map(int, m.groups())) for m in map(down.match, keys) if m]
    if not found:
        raise ConversionError("not an AutoencoderKL checkpoint: the encoder has no down blocks")
    num_blocks = 1 + max(i for i, _ in found)
    chans = tuple(source.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(num_blocks))
    return dict(
        in_channels=source.shape("encoder.conv_in.weight")[1],
        out_channels=source.shape("decoder.conv_out.weight")[0],
        block_out_channels=chans,
        layers_per_block=1 + max(j for i, j in found if i == 0),
        latent_channels=source.shape("encoder.conv_out.weight")[0] // 2,
        use_quant_conv="quant_conv.weight" in source,
        use_post_quant_conv="post_quant_conv.weight" in source,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in source,
        **UNSTORED_DEFAULTS)


# ----------------------------------------------------------------------------- load

def load_single_file_vae(path: str | os.PathLike, dtype=jnp.float32, *, config: Mapping | None = None,
                         compute_dtype=None, progress: bool = False):
    """(model, params) from the `first_stage_model.*` VAE of an original SD3 / SD3.5 single file.

    The config is inferred from the tensors (`infer_vae_config`); fields given in `config`
    (AutoencoderKL kwargs) replace the inferred ones and are checked against the checkpoint. Params
    are cast to `dtype`; `compute_dtype` sets the model's compute dtype (default: `dtype`). Raises
    ConversionError when the file is missing, unreadable, holds no VAE, or does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no such checkpoint file: {path}")
    source = LDMVAESource(path)
    kw = infer_vae_config(source)
    if config is not None:
        kw.update(config.to_dict() if hasattr(config, "to_dict") else config)
    kw["block_out_channels"] = tuple(kw["block_out_channels"])
    model = AutoencoderKL(**kw, dtype=compute_dtype or dtype)
    return model, vae_from_source(source, model, dtype=dtype, progress=progress)
