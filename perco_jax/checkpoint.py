"""Converted-weights folders: the format `perco-jax convert` writes and every command reads.

    CKPT/
      perco.json        {"format": "perco-jax", "version": 1, "components": {name: config}}
      params/           orbax checkpoint of {name: params pytree}
      tokenizer*/       tokenizer files copied from the pipeline (when converted from one)

Training checkpoints (optimizer state, EMA, step) are the train loop's own CheckpointManager;
this is the inference/export format for pretrained or exported weights.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

FORMAT, VERSION = "perco-jax", 1
MANIFEST = "perco.json"
# The tokenizer folders of CLIP-L, OpenCLIP bigG and T5 (diffusers' names; T5's is optional).
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
# Their encoders' weight components, in the same order.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class CheckpointError(ValueError):
    """A weights folder is missing, foreign, or lacks a component that was asked for."""


def save_weights(folder: str | os.PathLike, components: Mapping[str, tuple[dict, Mapping]],
                 *, metadata: Mapping | None = None, extra_dirs: Mapping[str, os.PathLike] | None = None,
                 overwrite: bool = True) -> Path:
    """Write {name: (config, params)} (+ `metadata` in the manifest, + copies of `extra_dirs`
    {name: folder}, e.g. tokenizers) to `folder`; written beside it first, then renamed."""
    import orbax.checkpoint as ocp
    from flax import linen as nn

    folder = Path(folder).absolute()
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tree = {name: nn.meta.unbox(params) for name, (_, params) in components.items()}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", tree)
    ckptr.wait_until_finished()
    for name, src in (extra_dirs or {}).items():
        shutil.copytree(src, tmp / name)
    manifest = {"format": FORMAT, "version": VERSION, "metadata": dict(metadata or {}),
                "components": {name: cfg for name, (cfg, _) in components.items()}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
    if folder.exists():
        if not overwrite:
            raise CheckpointError(f"{folder} exists")
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if hasattr(o, "dtype") or hasattr(o, "name"):
        return str(getattr(o, "name", o))
    raise TypeError(f"not JSON serialisable: {o!r}")


def read_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{folder} is not a perco-jax weights folder (no {MANIFEST}); "
                              "create one with `perco-jax convert`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupted: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a perco-jax manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer perco-jax (version {manifest['version']})")
    return manifest


def load_weights(folder: str | os.PathLike, names: list[str] | None = None) -> tuple[dict, dict]:
    """Return ({name: config}, {name: params}) for `names` (default: all components); a subset is
    read alone (as numpy arrays), the other components' bytes are not loaded."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    configs = read_manifest(folder)["components"]
    names = list(configs) if names is None else names
    lacking = [n for n in names if n not in configs]
    if lacking:
        raise CheckpointError(f"{folder} has no component(s) {lacking}; it has {sorted(configs)}")
    if set(names) == set(configs):
        restored = ocp.StandardCheckpointer().restore(folder / "params")
    else:  # read only the named components (e.g. SD3.5-large's VAE without its 8B MM-DiT and T5-XXL)
        import jax
        import numpy as np

        ckptr = ocp.PyTreeCheckpointer()
        meta = ckptr.metadata(folder / "params")
        tree = getattr(meta, "item_metadata", meta)
        wanted = {n: tree[n] for n in names}
        item = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
        args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = ckptr.restore(folder / "params", args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                                   partial_restore=True))
    return {n: configs[n] for n in names}, {n: restored[n] for n in names}


def load_tokenizer(folder: str | os.PathLike):
    """A transformers tokenizer from a local folder, e.g. a weights folder's tokenizer*/ (never the hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
