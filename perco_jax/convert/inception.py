"""InceptionV3 conversion: a PyTorch state dict -> Flax variables of `perco_jax.models.inception`.

The checkpoint is a local file (.pth / .pt read with `torch.load(weights_only=True)`, or a
.safetensors of the same tensors):

  variant "fid"          pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (fc 1008 classes)
  variant "torchvision"  torchvision's `inception_v3_google-0cc3c7bd.pth` (fc 1000 classes; its
                         `AuxLogits.*` head is ignored)

Both use torchvision's key names; per `BasicConv2d` at module path P:

  P.conv.weight [out, in, kh, kw]          -> params      P/conv/kernel [kh, kw, in, out]
  P.bn.weight / P.bn.bias [C]              -> params      P/bn/scale, P/bn/bias
  P.bn.running_mean / P.bn.running_var [C] -> batch_stats P/bn/mean, P/bn/var
  (P.bn.num_batches_tracked is ignored)
  fc.weight [classes, 2048] / fc.bias      -> params      fc/kernel [2048, classes], fc/bias

Every key and shape is checked before any tensor is read; a mismatch raises one ConversionError
naming the missing, unexpected and mis-shaped tensors (and, when it can tell, what the file is).
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.convert.common import ConversionError, Entry, TensorSource, convert_checked, flat_shapes
from perco_jax.convert.lpips import open_source
from perco_jax.models.inception import MIN_SIZE, VARIANTS, InceptionV3

Source = Union[TensorSource, Mapping, str, os.PathLike]

# Flax leaf (collection, name) -> (torch attribute, layout kind)
_LEAVES = {
    ("params", "kernel"): ("weight", None),   # kind from the rank: conv [kh, kw, in, out] or fc [in, out]
    ("params", "scale"): ("weight", "vector"),
    ("params", "bias"): ("bias", "vector"),
    ("batch_stats", "mean"): ("running_mean", "vector"),
    ("batch_stats", "var"): ("running_var", "vector"),
}

FILE_NAMES = {"fid": "pytorch-fid's pt_inception-2015-12-05-*.pth",
              "torchvision": "torchvision's inception_v3_google-*.pth"}


def abstract_variables(variant: str = "fid") -> dict:
    """Variable shapes ({"params", "batch_stats"} of ShapeDtypeStructs) from `jax.eval_shape`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown InceptionV3 variant {variant!r}; expected one of {sorted(VARIANTS)}")
    model = InceptionV3(variant, resize_input=False)
    x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))


@functools.lru_cache(maxsize=None)
def _shapes(variant: str) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    """(path, shape) of every variable, sorted; cached (tracing the network takes about a second)."""
    return tuple(sorted(flat_shapes(abstract_variables(variant)).items()))


def key_map(variant: str = "fid") -> list[Entry]:
    """Every Flax variable (paths start with the collection) and its torchvision key."""
    entries = []
    for path, shape in _shapes(variant):
        collection, *modules, leaf = path
        attr, kind = _LEAVES[(collection, leaf)]
        if kind is None:
            kind = "conv" if len(shape) == 4 else "linear"
        entries.append(Entry(path, ".".join(modules + [attr]), kind))
    return entries


def _ignored(source: TensorSource, variant: str) -> list[str]:
    keys = source.keys()
    ignore = [k for k in keys if k.endswith(".num_batches_tracked")]
    if variant == "torchvision":
        ignore += [k for k in keys if k.startswith("AuxLogits.")]
    return ignore


def _hint(source: TensorSource, variant: str) -> str:
    keys = set(source.keys())
    if "fc.weight" in keys:
        classes = source.shape("fc.weight")[0]
        for other, v in VARIANTS.items():
            if other != variant and v.num_classes == classes:
                return (f"this looks like {FILE_NAMES[other]} ({classes} classes): load it with "
                        f"variant={other!r}, or use {FILE_NAMES[variant]}")
    if any(k.startswith("blocks.") for k in keys):
        return ("this looks like the state dict of pytorch-fid's InceptionV3 wrapper (`blocks.*`); "
                f"use the file it loads, {FILE_NAMES['fid']}")
    if keys and all(k.startswith("module.") for k in keys):
        return "every key starts with 'module.' (a DataParallel wrapper): strip that prefix"
    return ""


def inception_variables(src: Source, variant: str = "fid", progress: bool = False) -> dict:
    """Flax variables {"params", "batch_stats"} of `InceptionV3(variant)` from a checkpoint."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown InceptionV3 variant {variant!r}; expected one of {sorted(VARIANTS)}")
    shapes = dict(_shapes(variant))
    source = open_source(src)
    return convert_checked(key_map(variant), source, shapes, name=f"inception {variant}",
                           what=f"InceptionV3 ({variant} variant, {FILE_NAMES[variant]})",
                           ignore=_ignored(source, variant), hint=lambda: _hint(source, variant),
                           progress=progress)


def load_inception(path: Source, variant: str = "fid", **model_kwargs) -> tuple[InceptionV3, dict]:
    """`InceptionV3(variant, **model_kwargs)` and its variables from a local file, e.g. pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth`: `model.apply(variables, images)` -> [B, 2048]."""
    return InceptionV3(variant, **model_kwargs), inception_variables(path, variant)


__all__ = ["ConversionError", "abstract_variables", "key_map", "inception_variables", "load_inception"]
