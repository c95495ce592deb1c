"""Machinery shared by every converter: tensor sources, key-map entries, streaming load and export.

A converter for one network is a *key map*: a list of `Entry(flax_path, torch_key, kind)` built
from the model's config. `kind` fixes the (invertible) layout change between the two frameworks:

  linear   torch [out, in]            <-> flax kernel [in, out]
  conv     torch [out, in, kh, kw]    <-> flax kernel [kh, kw, in, out]
  vector   identical (biases, norm scales, embeddings tables)

`load_params` checks every key and shape *before* reading any tensor (so a wrong checkpoint
fails with one error naming what is wrong and nothing is built), then reads tensors one at a time
from memory-mapped safetensors, so peak memory is about one copy of the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np


class ConversionError(ValueError):
    """A checkpoint does not match what the model expects (missing / unexpected / mis-shaped)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    flax: tuple[str, ...]
    torch: str
    kind: str = "vector"  # "linear" | "conv" | "vector"


def to_flax(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


def torch_shape(kind: str, flax_shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(flax_shape)
    if kind == "linear":
        return s[::-1]
    if kind == "conv":
        return (s[3], s[2], s[0], s[1])
    return s


# ----------------------------------------------------------------------------- tensor sources

class TensorSource:
    """Read-only, lazily loaded mapping from torch key to array (float32 numpy on `get`)."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())


def _to_numpy_f32(t) -> np.ndarray:
    # safetensors' "flax" framework reads bf16/fp16 too (numpy cannot hold bf16).
    return np.asarray(t, dtype=np.float32)


class SafetensorsSource(TensorSource):
    """One or several .safetensors files, memory-mapped; optional key prefix to strip."""

    def __init__(self, files: Sequence[str | os.PathLike], prefix: str = ""):
        from safetensors import safe_open

        self._files = [str(f) for f in files]
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._prefix = prefix
        for f in self._files:
            if not os.path.exists(f):
                raise ConversionError(f"checkpoint file not found: {f}")
            try:
                with safe_open(f, framework="flax") as h:
                    for k in h.keys():
                        if k.startswith(prefix):
                            self._where[k[len(prefix):]] = f
                            self._shapes[k[len(prefix):]] = tuple(h.get_slice(k).get_shape())
            except ConversionError:
                raise
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ConversionError(f"{f} is not a readable safetensors file: {e}") from e
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        f = self._where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="flax")
        return _to_numpy_f32(self._handles[f].get_tensor(self._prefix + key))


class DictSource(TensorSource):
    """An in-memory state dict (torch tensors or arrays), e.g. `model.state_dict()` in tests."""

    def __init__(self, state_dict: Mapping[str, object]):
        self._sd = dict(state_dict)

    def keys(self) -> list[str]:
        return list(self._sd)

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> np.ndarray:
        t = self._sd[key]
        if hasattr(t, "detach"):
            t = t.detach().float().cpu().numpy()
        return np.asarray(t, dtype=np.float32)


def diffusers_weight_files(folder: str | os.PathLike, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors files of a diffusers/transformers model folder (single or sharded with index)."""
    folder = Path(folder)
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / f"{stem}.safetensors"
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise ConversionError(f"no {stem}.safetensors (or sharded index) in {folder}")


# ----------------------------------------------------------------------------- load / export

def _describe(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_entries(entries: Sequence[Entry], source: TensorSource, flax_shapes: Mapping[tuple, tuple],
                  *, ignore: Iterable[str] = (), what: str = "model",
                  hint: Callable[[], str] | None = None) -> None:
    """Raise one ConversionError listing every missing, unexpected and mis-shaped tensor."""
    wanted = {e.torch for e in entries}
    present = set(source.keys())
    missing = sorted(wanted - present)
    unexpected = sorted(present - wanted - set(ignore))
    misshaped = []
    for e in entries:
        if e.torch in present:
            want = torch_shape(e.kind, flax_shapes[e.flax])
            got = tuple(source.shape(e.torch))
            if got != want:
                misshaped.append(f"{e.torch}: checkpoint {got}, model expects {want}")
    if missing or unexpected or misshaped:
        lines = [f"checkpoint does not match the {what}:"]
        if missing:
            lines.append(f"  missing {len(missing)} tensor(s): {_describe(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} tensor(s): {_describe(unexpected)}")
        if misshaped:
            lines.append(f"  {len(misshaped)} mis-shaped tensor(s): " + "; ".join(misshaped[:6])
                         + (" ..." if len(misshaped) > 6 else ""))
        if hint is not None:
            h = hint()
            if h:
                lines.append("  likely cause: " + h)
        raise ConversionError("\n".join(lines))


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def load_params(entries: Sequence[Entry], source: TensorSource, *, dtype=np.float32,
                progress: bool = False, desc: str = "converting") -> dict:
    """Read every entry (already checked) into a nested params dict of `dtype` jax arrays."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    params: dict = {}
    for e in tqdm(entries, desc=desc, disable=not progress, unit="tensor"):
        set_path(params, e.flax, jnp.asarray(to_flax(e.kind, source.get(e.torch)), dtype=dtype))
    return params


def export_state_dict(entries: Sequence[Entry], params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of `load_params`: a torch-layout float32 state dict (contiguous numpy arrays)."""
    out = {}
    for e in entries:
        out[e.torch] = np.ascontiguousarray(to_torch(e.kind, np.asarray(get_path(params, e.flax), np.float32)))
    return out


def flat_shapes(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of every leaf of a (possibly abstract) params tree."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat_shapes(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = tuple(v.shape)
    return out


def check_covers(entries: Sequence[Entry], flax_shapes: Mapping[tuple, tuple], what: str) -> None:
    """A key map must name every model parameter exactly once (a bug here is ours, not the user's)."""
    named = [e.flax for e in entries]
    if len(set(named)) != len(named) or set(named) != set(flax_shapes):
        extra = set(named) - set(flax_shapes)
        lacking = set(flax_shapes) - set(named)
        raise AssertionError(f"{what} key map out of sync with model: extra={sorted(extra)[:5]} "
                             f"lacking={sorted(lacking)[:5]}")


def write_folder(folder: str | os.PathLike, state_dict: Mapping[str, np.ndarray], config: Mapping,
                 weights_name: str) -> Path:
    """Write `weights_name` (safetensors) + config.json into `folder` as diffusers / transformers
    save them; built under a temporary name and renamed, so a failure leaves nothing partial."""
    import shutil

    from safetensors.numpy import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(dict(state_dict), str(tmp / weights_name), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(dict(config), indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def convert_checked(entries: Sequence[Entry], source: TensorSource, flax_shapes: Mapping[tuple, tuple], *,
                    name: str, what: str, ignore: Iterable[str] = (), hint: Callable[[], str] | None = None,
                    dtype=np.float32, progress: bool = False) -> dict:
    """The whole of a network's conversion: key map covers the model, checkpoint matches, then stream."""
    check_covers(entries, flax_shapes, name)
    check_entries(entries, source, flax_shapes, ignore=ignore, what=what, hint=hint)
    return load_params(entries, source, dtype=dtype, progress=progress, desc=name)
