"""Precomputed text embeddings: the frozen encoders run once per distinct caption.

`TextEmbeddingCache(prompt_encoder, params, max_sequence_length, folder)` maps captions to
(context [L, D], pooled [P]) float32, computes the misses of a batch in one call, and persists to
`folder/text_cache.npz` + `folder/text_cache.json` (the caption list) so a resumed or repeated run
reads them back. With `config.text.cache = True` the training loop feeds these embeddings to the
step instead of token ids; the results are the same as encoding in the step.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


class TextEmbeddingCache:
    def __init__(self, prompt_encoder, params, max_sequence_length: int, folder: str | os.PathLike | None = None):
        self._encoder, self._params, self._len = prompt_encoder, params, max_sequence_length
        self._folder = Path(folder) if folder is not None else None
        self._index: dict[str, int] = {}
        self._context: list[np.ndarray] = []
        self._pooled: list[np.ndarray] = []
        if self._folder is not None and (self._folder / "text_cache.json").exists():
            captions = json.loads((self._folder / "text_cache.json").read_text())
            arrays = np.load(self._folder / "text_cache.npz")
            if arrays["context"].shape[0] != len(captions):
                raise ValueError(f"{self._folder}/text_cache.* are inconsistent; delete them to rebuild")
            self._index = {c: i for i, c in enumerate(captions)}
            self._context, self._pooled = list(arrays["context"]), list(arrays["pooled"])

    def __len__(self) -> int:
        return len(self._index)

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(context [B, L, D], pooled [B, P]) for `captions`."""
        misses = list(dict.fromkeys(c for c in captions if c not in self._index))
        if misses:
            # padded to a power of two: a few program shapes, not one per number of misses
            n = 1 << (len(misses) - 1).bit_length()
            ctx, pooled = self._encoder(self._params, misses + [""] * (n - len(misses)), self._len)
            ctx, pooled = np.asarray(ctx, np.float32), np.asarray(pooled, np.float32)
            for i, c in enumerate(misses):
                self._index[c] = len(self._context)
                self._context.append(ctx[i])
                self._pooled.append(pooled[i])
        rows = [self._index[c] for c in captions]
        return np.stack([self._context[r] for r in rows]), np.stack([self._pooled[r] for r in rows])

    def save(self) -> None:
        if self._folder is None or not self._index:
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        captions = sorted(self._index, key=self._index.get)
        tmp = self._folder / "text_cache.tmp.npz"
        np.savez(tmp, context=np.stack(self._context), pooled=np.stack(self._pooled))
        (self._folder / "text_cache.json.tmp").write_text(json.dumps(captions))
        os.replace(tmp, self._folder / "text_cache.npz")
        os.replace(self._folder / "text_cache.json.tmp", self._folder / "text_cache.json")
