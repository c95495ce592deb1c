"""Loading run configs by preset name or file path, with `key=value` overrides, and completing
configs saved by earlier versions (`complete`): every loaded config has every field."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
from pathlib import Path

import ml_collections

PRESETS = ("tiny", "sd3_medium", "sd35_medium", "sd35_large")
# Fields added after configs were first saved (beside a run's checkpoints, in codec folders), each
# with what the code did before it existed: a config saved earlier lacks it and means that. Only
# `complete` reads this table (where configs are loaded); code reads the fields as attributes.
LATER_FIELDS = {"text.clip_max_length": 77,  # (SD3's: text.prompt.CLIP_MAX_LENGTH)
                "text.cache": False, "text.embeddings": "", "frozen_placement": "sharded",
                "entropy_model.caption_input": "context", "stage3.guidance": None,
                "sample.stochastic": False, "loss_detail": 0.0, "stage0.loss_detail": 0.0,
                "sample.temperature": 1.0, "sample.batch_size": 8, "stage3.coupling_sampler": "ode"}


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`load_config("tiny")` or `load_config("configs/sd3_medium.py", ["mmdit.num_layers=2"])`."""
    if name_or_path in PRESETS:
        module = importlib.import_module(f"perco_jax.configs.{name_or_path}")
    elif os.path.isfile(name_or_path):
        spec = importlib.util.spec_from_file_location("perco_user_config", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        raise ValueError(f"unknown config {name_or_path!r}: give one of {', '.join(PRESETS)} or a .py file")
    config = complete(module.get_config())  # (a user's file may predate fields)
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Apply one `a.b.c=value` override; the value is a Python literal or a bare string."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
        if p not in node:
            raise ValueError(f"override {item!r}: no config field {key!r}")
        node = node[p]
    if parts[-1] not in node:
        raise ValueError(f"override {item!r}: no config field {key!r}")
    node[parts[-1]] = value


def complete(config: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict | dict:
    """`config` (a ConfigDict, or a dict as read from a saved config.json) with every LATER_FIELDS
    field it lacks set to its old default, in place; returns it. Called once wherever a config is
    loaded (`load_config`, `read_saved_config`, `Codec.load`, scripts/train.py). A field whose
    section the config lacks altogether stays absent (e.g. stage3.guidance in a config from before
    stage 3: code asks `config.get("stage3")`)."""
    for key, default in LATER_FIELDS.items():
        *sections, name = key.split(".")
        node = config
        for part in sections:
            node = node.get(part) if isinstance(node, (dict, ml_collections.ConfigDict)) else None
        if not isinstance(node, (dict, ml_collections.ConfigDict)) or name in node:
            continue
        if isinstance(node, ml_collections.ConfigDict):
            with node.unlocked():  # (scripts/train.py's config flags are locked)
                node[name] = default
        else:
            node[name] = default
    return config


def read_saved_config(path: str | os.PathLike) -> dict:
    """The config a run saved as `path` (train.loop writes WORKDIR/config.json), as a dict, `complete`."""
    return complete(json.loads(Path(path).read_text()))
