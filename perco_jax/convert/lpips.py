"""LPIPS conversion: a torchvision AlexNet / VGG16 state dict + the `lpips` package's linear heads
(`weights/v0.1/alex.pth` / `vgg.pth`) -> Flax params of `perco_jax.models.lpips.LPIPS`.

Both are local files (.pth / .pt read with `torch.load(weights_only=True)`, or .safetensors):

  trunk  torchvision keys `features.{i}.weight` [out, in, k, k] / `features.{i}.bias`; the
         classifier (`classifier.*`) of a full torchvision checkpoint is ignored
  heads  `lin{i}.model.1.weight` [1, C_i, 1, 1]

Both files are checked (every key and shape) before any tensor is read; a mismatch in either
raises one ConversionError naming the missing, unexpected and mis-shaped tensors of both.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.convert.common import (ConversionError, DictSource, Entry, SafetensorsSource, TensorSource,
                                      check_covers, check_entries, flat_shapes, load_params)
from perco_jax.models.lpips import LPIPS, TRUNKS, Conv, tap_channels

Source = Union[TensorSource, Mapping, str, os.PathLike]


def trunk_key_map(net: str) -> list[Entry]:
    """The trunk's Flax parameters and their torchvision `features.*` keys."""
    entries = []
    for stage in TRUNKS[net]:
        for layer in stage:
            if isinstance(layer, Conv):
                f, t = ("trunk", f"features_{layer.index}"), f"features.{layer.index}"
                entries += [Entry(f + ("kernel",), t + ".weight", "conv"), Entry(f + ("bias",), t + ".bias")]
    return entries


def heads_key_map(net: str) -> list[Entry]:
    """The linear heads' Flax kernels [1, 1, C, 1] and the lpips package's keys [1, C, 1, 1]."""
    return [Entry((f"lin{i}", "kernel"), f"lin{i}.model.1.weight", "conv") for i in range(len(TRUNKS[net]))]


def abstract_params(net: str) -> dict:
    """Parameter shapes (ShapeDtypeStructs) from `jax.eval_shape`: nothing is allocated."""
    model = LPIPS(net)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, x))["params"]


def open_source(src: Source) -> TensorSource:
    """A TensorSource from a state dict, a .safetensors file or a torch pickle (.pth / .pt / .bin)."""
    if isinstance(src, TensorSource):
        return src
    if isinstance(src, Mapping):
        return DictSource(src)
    path = Path(src)
    if not path.exists():
        raise ConversionError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsSource([path])
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors have many types
        raise ConversionError(f"{path} is not a readable PyTorch state dict: {e}") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ConversionError(f"{path} does not hold a state dict (a mapping of tensor names to tensors)")
    return DictSource(sd)


def _guess(source: TensorSource) -> tuple[str, str] | None:
    """(part, net) that a checkpoint looks like: part 'trunk' or 'heads'; None when unsure."""
    keys = set(source.keys())
    if "features.0.weight" in keys:
        k = source.shape("features.0.weight")[-1]
        for net in TRUNKS:
            if TRUNKS[net][0][0].kernel == k:
                return "trunk", net
    if "lin1.model.1.weight" in keys:
        c = source.shape("lin1.model.1.weight")[1]
        for net in TRUNKS:
            if tap_channels(net)[1] == c:
                return "heads", net
    return None


TORCHVISION_NAMES = {"alex": "alexnet", "vgg": "vgg16"}


def _part_name(part: str, net: str) -> str:
    if part == "trunk":
        return f"torchvision {TORCHVISION_NAMES[net]} trunk (net={net!r})"
    return f"lpips linear heads (net={net!r})"


def _hint(source: TensorSource, part: str, net: str) -> str:
    guess = _guess(source)
    if guess is None or guess == (part, net):
        return ""
    return f"this file looks like the {_part_name(*guess)}, not the {_part_name(part, net)}"


def lpips_params(trunk: Source, heads: Source, net: str = "alex", progress: bool = False) -> dict:
    """Flax params of `LPIPS(net)` from a torchvision trunk and an lpips heads checkpoint."""
    if net not in TRUNKS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(TRUNKS)}")
    shapes = flat_shapes(abstract_params(net))
    parts = [("trunk", trunk_key_map(net), open_source(trunk)), ("heads", heads_key_map(net), open_source(heads))]
    check_covers([e for _, entries, _ in parts for e in entries], shapes, f"lpips {net}")
    errors = []
    for part, entries, source in parts:
        ignore = [k for k in source.keys() if k.startswith("classifier.")] if part == "trunk" else []
        try:
            check_entries(entries, source, shapes, ignore=ignore, what=_part_name(part, net),
                          hint=lambda s=source, p=part: _hint(s, p, net))
        except ConversionError as e:
            errors.append(str(e))
    if errors:
        raise ConversionError("\n".join(errors))
    params: dict = {}
    for part, entries, source in parts:
        params.update(load_params(entries, source, progress=progress, desc=f"lpips {net} {part}"))
    return params


def load_lpips(trunk_path: Source, heads_path: Source, net: str = "alex") -> tuple[LPIPS, dict]:
    """`LPIPS(net)` and its params from local files, e.g. torchvision's `alexnet-owt-7be5be79.pth`
    and the lpips package's `weights/v0.1/alex.pth`."""
    return LPIPS(net), lpips_params(trunk_path, heads_path, net)
