"""Loading run configs by preset name or file path, with `key=value` overrides."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os

import ml_collections

PRESETS = ("tiny", "sd3_medium", "sd35_medium", "sd35_large")
# Fields added after configs were first written into codec folders: a config read back from an
# older folder lacks them and means what the code did before each existed (the one home of these
# defaults; read them with `setting`).
LATER_FIELDS = {"text.cache": False, "text.embeddings": "", "frozen_placement": "sharded",
                "entropy_model.caption_input": "context", "stage3.guidance": None,
                "sample.stochastic": False, "loss_detail": 0.0, "stage0.loss_detail": 0.0,
                "sample.temperature": 1.0}


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
    config = module.get_config()
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


def setting(config: ml_collections.ConfigDict, key: str):
    """config's dotted field `key` (e.g. "text.cache"), or its LATER_FIELDS default when the config
    predates the field."""
    node = config
    for part in key.split("."):
        if part not in node:
            if key in LATER_FIELDS:
                return LATER_FIELDS[key]
            raise KeyError(f"config has no field {key!r}")
        node = node[part]
    return node
