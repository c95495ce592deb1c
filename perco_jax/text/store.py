"""Text embeddings precomputed by a distributed job into array_record files, read by training.

    perco-jax embed-text --config tiny --out EMB [--examples N] [--dtype bfloat16] [--batch 64]
    perco-jax train --config tiny --config.text.embeddings=EMB

**The job** (`embed_captions`). Every process lists the distinct captions of the config's training
data (`data.pipeline.dataset_captions`) plus the empty prompt, in the same order; process p of P
encodes captions p, p + P, p + 2P, ... with the frozen text encoders on its own devices (batches of
a fixed size; params and batch split over a mesh of its local devices: no collective between
processes) and writes
`EMB/embeddings-p-of-P.array_record`, one record per caption (msgpack of {"caption", "context"
[L, D], "pooled" [P_dim]}), then `EMB/embeddings-p-of-P.json` (its captions in record order, the
shapes, the dtype and `text_identity`) once the records are closed. A shard whose .json exists
is finished: a rerun after a preemption redoes only the others.

**Reading** (`TextEmbeddingStore`). A host reads the P caption lists into a caption -> (shard,
record) map and then only the records its batches need (array_record's random access): the
embeddings stay on disk (SD3's 333 x 4096 context is 2.7 MB per caption in bfloat16). Opening
checks that all P shards are there and agree, and that they were made with the text encoders of the
run's config (pretrained folder, or the tiny encoders' config sections and seed, and the T5
length): otherwise one ValueError naming the difference. A caption missing from the store also
raises. With config.text.embeddings the training loop builds no text encoder at all.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from perco_jax import build

FORMAT = 1
_SHARD = re.compile(r"embeddings-(\d{5})-of-(\d{5})\.json$")


def text_identity(config) -> dict:
    """What the embeddings depend on: the CLIP and T5 lengths and the encoders (the converted weights folder,
    or for random tiny encoders their config sections and seed)."""
    ident = {"max_sequence_length": int(config.text.max_sequence_length),
             "clip_max_length": build.clip_max_length(config),
             "joint_attention_dim": int(config.mmdit.joint_attention_dim),
             "pretrained": str(Path(config.pretrained).resolve()) if config.pretrained else ""}
    if not config.pretrained:
        ident.update(seed=int(config.seed), clip_l=config.clip_l.to_dict(), clip_g=config.clip_g.to_dict(),
                     t5=config.t5.to_dict())
    return json.loads(json.dumps(ident))  # (tuples -> lists: comparable with what is read back)


def shard_name(process_index: int, process_count: int) -> str:
    return f"embeddings-{process_index:05d}-of-{process_count:05d}"


def embed_captions(config, out: str | os.PathLike, *, captions: Sequence[str] | None = None,
                   examples: int | None = None, batch_size: int = 64, dtype: str = "float32",
                   process_index: int | None = None, process_count: int | None = None,
                   progress: bool = True) -> Path:
    """Write this process's shard of the text embeddings of `captions` (default: the distinct
    captions of the config's training data; `examples` bounds the endless synthetic stream) into
    `out`; returns the shard's .json path. Process index / count default to jax's."""
    import jax
    import jax.numpy as jnp
    from array_record.python.array_record_module import ArrayRecordWriter
    from flax import serialization
    from tqdm.auto import tqdm

    from perco_jax import parallel
    from perco_jax.data.pipeline import dataset_captions

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: float32, bfloat16 or float16")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need >= 1")
    p = jax.process_index() if process_index is None else int(process_index)
    n_proc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < n_proc:
        raise ValueError(f"process_index must be in [0, process_count), got {p} of {n_proc}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / f"{shard_name(p, n_proc)}.json"
    if meta_path.exists():
        return meta_path
    if captions is None:
        captions = dataset_captions(config, examples=examples)
    captions = list(dict.fromkeys(["", *captions]))[p::n_proc]

    with tempfile.TemporaryDirectory(prefix="perco_jax_tokenizers_") as tmp:  # (tiny tokenizers: made by code)
        encoder, params = build.build_text(config, tmp)

    # this host's devices as one fsdp axis: the encoders' params split over them as in training
    # (T5-XXL need not fit one device), the captions too
    local = jax.local_devices()
    mesh = parallel.make_mesh({"fsdp": -1}, local)
    params = parallel.place(params, parallel.text_shardings(encoder, params, mesh,
                                                   parallel.rules_from_config(config.sharding_rules)))
    batch = math.ceil(batch_size / len(local)) * len(local)  # fixed shape, divisible by the devices
    ids_sharding = parallel.batch_sharding(mesh)
    length = int(config.text.max_sequence_length)
    store_dtype = jnp.dtype(dtype)
    tmp_records = out / f"{shard_name(p, n_proc)}.array_record.tmp"
    writer = ArrayRecordWriter(str(tmp_records), "group_size:1")
    shapes = None
    try:
        bar = tqdm(total=len(captions), desc=f"embed text {p + 1}/{n_proc}", unit="caption", disable=not progress)
        for start in range(0, len(captions), batch):
            chunk = captions[start:start + batch]
            ids = encoder.tokenize(chunk + [""] * (batch - len(chunk)), length)
            ids = {k: jax.device_put(v, ids_sharding) for k, v in ids.items()}
            with jax.set_mesh(mesh):
                ctx, pooled = encoder.encode_tokens(params, ids, max_sequence_length=length)
            ctx = np.asarray(jax.device_get(ctx.astype(store_dtype)))
            pooled = np.asarray(jax.device_get(pooled.astype(store_dtype)))
            shapes = {"context": list(ctx.shape[1:]), "pooled": list(pooled.shape[1:])}
            for i, caption in enumerate(chunk):
                writer.write(serialization.msgpack_serialize(
                    {"caption": caption, "context": ctx[i], "pooled": pooled[i]}))
            bar.update(len(chunk))
        bar.close()
    finally:
        writer.close()
    os.replace(tmp_records, out / f"{shard_name(p, n_proc)}.array_record")
    meta = {"format": FORMAT, "process_index": p, "process_count": n_proc, "dtype": dtype, "shapes": shapes,
            "identity": text_identity(config), "captions": captions}
    tmp_meta = meta_path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_path)
    return meta_path


class TextEmbeddingStore:
    """Read-only caption -> (context [L, D], pooled [P]) float32 from a folder `embed_captions`
    wrote; `config` (optional) must be the one whose text encoders made it."""

    def __init__(self, folder: str | os.PathLike, config=None):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.folder = Path(folder)
        metas = sorted(p for p in self.folder.glob("embeddings-*-of-*.json") if _SHARD.search(p.name))
        if not metas:
            raise ValueError(f"{self.folder} holds no text embeddings (embeddings-*-of-*.json): run "
                             "`perco-jax embed-text --out` for it first")
        counts = {int(_SHARD.search(p.name).group(2)) for p in metas}
        if len(counts) != 1:
            raise ValueError(f"{self.folder} mixes the shards of jobs run on {sorted(counts)} processes: keep one")
        count = counts.pop()
        found = {int(_SHARD.search(p.name).group(1)) for p in metas}
        missing = sorted(set(range(count)) - found)
        if missing:
            raise ValueError(f"{self.folder}: shards {missing} of {count} are missing (the job has not finished: "
                             "rerun it with the same number of processes)")
        self._index: dict[str, tuple[int, int]] = {}
        first = None
        for shard, path in enumerate(self.folder / f"{shard_name(i, count)}.json" for i in range(count)):
            meta = json.loads(path.read_text())
            head = {k: meta[k] for k in ("format", "dtype", "shapes", "identity")}
            if meta["format"] != FORMAT:
                raise ValueError(f"{path}: format {meta['format']}, this version reads {FORMAT}")
            if first is None:
                first = head
            elif head != first:
                raise ValueError(f"{path} disagrees with shard 0 on {_diff(first, head)}: the shards come from "
                                 "different jobs")
            for i, caption in enumerate(meta["captions"]):
                self._index[caption] = (shard, i)
        self.dtype, self.shapes, self.identity = first["dtype"], first["shapes"], first["identity"]
        if config is not None:
            want = text_identity(config)
            if want != self.identity:
                raise ValueError(f"{self.folder} was made with other text encoders than this config's: "
                                 f"{_diff(self.identity, want)}")
        self._sources = [ArrayRecordDataSource([str(self.folder / f"{shard_name(i, count)}.array_record")])
                         for i in range(count)]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, caption: str) -> bool:
        return caption in self._index

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(context [B, L, D], pooled [B, P]) float32 for `captions`."""
        from flax import serialization

        missing = [c for c in captions if c not in self._index]
        if missing:
            raise KeyError(f"{len(missing)} caption(s) are not in the text embeddings of {self.folder}, e.g. "
                           f"{missing[0]!r}: rerun `perco-jax embed-text` for this data")
        ctx, pooled = [], []
        for c in captions:
            shard, i = self._index[c]
            rec = serialization.msgpack_restore(self._sources[shard][i])
            if rec["caption"] != c:
                raise ValueError(f"{self.folder}: record {i} of shard {shard} holds {rec['caption']!r}, "
                                 f"not {c!r} (corrupted store)")
            ctx.append(np.asarray(rec["context"], np.float32))
            pooled.append(np.asarray(rec["pooled"], np.float32))
        return np.stack(ctx), np.stack(pooled)


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys) or "nothing"
