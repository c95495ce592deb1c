"""Whole-checkpoint conversion into a perco-jax weights folder (see `perco_jax.checkpoint`)."""
from __future__ import annotations

import os
from pathlib import Path

from perco_jax.checkpoint import save_weights
from perco_jax.convert.common import ConversionError
from perco_jax.convert.transformer import config_to_diffusers, load_transformer


def convert_to_folder(*, out: str | os.PathLike, diffusers: str | None = None, single_file: str | None = None,
                      extra_in_channels: int = 0, progress: bool = True) -> Path:
    """Convert a diffusers transformer folder or an original single file; nothing is written on error."""
    if (diffusers is None) == (single_file is None):
        raise ConversionError("give exactly one of a diffusers folder or a single file")
    path = Path(diffusers or single_file)
    if diffusers is not None and (path / "transformer").is_dir():
        path = path / "transformer"
    model, params = load_transformer(path, extra_in_channels=extra_in_channels, progress=progress)
    return save_weights(out, {"transformer": (config_to_diffusers(model), params)})
