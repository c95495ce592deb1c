"""Training input pipelines: endless iterators of per-process numpy batches.

`make_dataset(config, ...)` yields dicts

    {"image": float32 [b, size, size, 3] in [-1, 1], "caption": str array [b], "index": int64 [b]}

with b = config.batch_size // process_count (the per-process share of the global batch).

**The global stream.** All sources are defined by one global sequence of examples, numbered by a
global position g = 0, 1, 2, ...; global batch k holds positions [k*B, (k+1)*B) (B = batch_size)
and process p takes the slice [p*b, (p+1)*b) of it, so the processes' shards are disjoint and
together are exactly the single-process stream. `index` is g. `start_index` (the number of global
examples already consumed, stored by the training loop in its checkpoints) starts the stream at
g = start_index, so a resumed run continues exactly where the interrupted one stopped.

- `synthetic`: position g is `synthetic_example(g, seed)`: exact by construction, for any
  process_count and start_index. Plain Python/numpy (drawing is ~0.2 ms per 64x64 image), no tf.data;
  the "validation" and "test" splits use other seeds than "train".
- `folder`: position g is image perm_e[g mod N] of the N listed images, where e = g // N is the
  epoch and perm_e a permutation seeded by (seed, e) (`tf.random.experimental.index_shuffle`,
  random access, so skipping is free): exact for any process_count and start_index. tf.data with
  parallel decoding in the graph (see folder.py) and prefetch; a file that fails to decode raises
  ValueError naming it. A folder has no splits: `split` is ignored
  (point data.folder / data.captions at another folder to evaluate).
- `coco`: TFDS `coco_captions` (or data.tfds_name), sharded per process by
  `tfds.split_for_jax_process`, each process's shard repeated with a seeded shuffle per epoch (see
  coco.py). The union of the shards is not the single-process stream (each process reads its own part
  of the split), and resumption is exact for an unchanged process_count, from a start_index that is a
  multiple of batch_size (what the training loop stores).

TensorFlow is only used on the host CPU: GPUs are hidden from it before it first runs.
"""
from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

SOURCES = ("synthetic", "folder", "coco")
SYNTHETIC_SPLITS = {"train": 0, "validation": 1, "test": 2}
_SPLIT_SEED_STRIDE = 2**32


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` section with its defaults (the built-in synthetic data at 64x64)."""
    return ml_collections.ConfigDict(dict(
        source="synthetic",          # "synthetic" | "folder" | "coco"
        image_size=64,
        folder="",                   # image folder (source=folder)
        captions="",                 # captions .jsonl/.csv ("" = folder/captions.jsonl or .csv)
        tfds_data_dir="",            # prepared TFDS data_dir (source=coco); "" = TFDS's default
        tfds_name="coco_captions",
        seed=0,                      # order of folder/TFDS data, content of synthetic data
        shuffle_buffer=1024,         # TFDS per-epoch shuffle buffer
        num_parallel_calls=-1,       # tf.data map parallelism (-1 = AUTOTUNE)
        num_threads=0,               # tf.data private thread pool size (0 = TF's default)
        prefetch=2,                  # batches prefetched by tf.data
    ))


def _tf():
    """TensorFlow, with accelerators hidden from it (it must never take memory JAX needs)."""
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # already initialised, or no such device type
            pass
    return tf


def _get(data, key: str):
    return data.get(key, default_data_config()[key])


def _positions(start_index: int, batch_size: int, per_host: int, process_index: int, step: int) -> np.ndarray:
    return (start_index + step * batch_size + process_index * per_host + np.arange(per_host)).astype(np.int64)


def _check(config, split, process_index, process_count, start_index) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count), got {process_index} of {process_count}")
    if config.batch_size < 1 or config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the number of processes "
                         f"({process_count}): each process needs an equal share of the global batch")
    if start_index < 0:
        raise ValueError(f"start_index must be >= 0, got {start_index}")
    source = config.data.source
    if source not in SOURCES:
        raise ValueError(f"unknown data.source {source!r}; expected one of {', '.join(SOURCES)}")
    if int(config.data.image_size) < 8:
        raise ValueError(f"data.image_size must be >= 8, got {config.data.image_size}")
    if source == "synthetic" and split not in SYNTHETIC_SPLITS:
        raise ValueError(f"the synthetic data has splits {', '.join(SYNTHETIC_SPLITS)}, not {split!r}")
    return config.batch_size // process_count


def make_dataset(config, *, split: str = "train", process_index: int = 0, process_count: int = 1,
                 start_index: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's batches (see the module doc for the order and sharding)."""
    per_host = _check(config, split, process_index, process_count, start_index)
    source = config.data.source
    if source == "synthetic":
        return _synthetic(config, split, process_index, per_host, start_index)
    tf = _tf()
    if source == "folder":
        ds, diagnose = _folder(tf, config, process_index, per_host, start_index)
    else:
        ds, diagnose = _coco(tf, config, split, process_index, process_count, per_host, start_index)
    return _numpy_batches(tf, ds, diagnose, config, per_host, process_index, start_index)


def dataset_captions(config, *, split: str = "train", examples: int | None = None) -> list[str]:
    """The distinct captions of the data `make_dataset` reads, in order of first appearance: of a
    folder's or TFDS split's examples, or of the synthetic stream's first `examples` positions (it
    is endless; default: what config.num_train_steps x config.batch_size steps read)."""
    source = config.data.source
    if source not in SOURCES:
        raise ValueError(f"unknown data.source {source!r}; expected one of {', '.join(SOURCES)}")
    if source == "synthetic":
        from perco_jax.data.synthetic import synthetic_scene

        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"the synthetic data has splits {', '.join(SYNTHETIC_SPLITS)}, not {split!r}")
        n = int(examples if examples is not None else config.num_train_steps * config.batch_size)
        seed = int(config.data.seed) + SYNTHETIC_SPLITS[split] * _SPLIT_SEED_STRIDE
        captions = (synthetic_scene(g, seed).caption for g in range(n))
    elif source == "folder":
        from perco_jax.data.folder import folder_examples

        captions = (c for _, c in folder_examples(config.data.folder, config.data.captions))
    else:
        from perco_jax.data.coco import coco_captions

        captions = coco_captions(data_dir=config.data.tfds_data_dir, split=split, name=_get(config.data, "tfds_name"))
    return list(dict.fromkeys(captions))


def _synthetic(config, split, process_index, per_host, start_index):
    from perco_jax.data.synthetic import synthetic_example

    seed = int(config.data.seed) + SYNTHETIC_SPLITS[split] * _SPLIT_SEED_STRIDE
    size = int(config.data.image_size)
    step = 0
    while True:
        index = _positions(start_index, config.batch_size, per_host, process_index, step)
        images, captions = zip(*(synthetic_example(int(g), seed, size) for g in index))
        yield {"image": np.stack(images) * np.float32(2.0) - np.float32(1.0),
               "caption": np.asarray(captions), "index": index}
        step += 1


def _map_options(tf, config):
    calls = int(_get(config.data, "num_parallel_calls"))
    return tf.data.AUTOTUNE if calls < 0 else max(1, calls)


def _folder_file_index(tf, g, n: int, seed: int):
    """File (0..n-1) at global position g: a seeded permutation of the n files per epoch g // n."""
    g = tf.cast(g, tf.int64)
    return tf.random.experimental.index_shuffle(g % n, tf.stack([tf.constant(seed, tf.int64), g // n]),
                                                tf.constant(n - 1, tf.int64))


def _folder(tf, config, process_index, per_host, start_index):
    from perco_jax.data.folder import decode_resize_tf, folder_examples

    examples = folder_examples(config.data.folder, config.data.captions)
    n, size, seed = len(examples), int(config.data.image_size), int(config.data.seed)
    paths = tf.constant([p for p, _ in examples])
    captions = tf.constant([c for _, c in examples])
    b, big_b = per_host, config.batch_size

    def load(j):  # j-th example of this process -> global position g -> (epoch, permuted file)
        g = start_index + (j // b) * big_b + process_index * b + j % b
        i = _folder_file_index(tf, g, n, seed)
        return {"image": decode_resize_tf(tf.io.read_file(tf.gather(paths, i)), size),
                "caption": tf.gather(captions, i)}

    def diagnose(step):  # name the file that made the decoder fail in batch `step`
        from perco_jax.data.folder import first_unreadable

        index = _positions(start_index, big_b, b, process_index, step)
        files = [examples[int(_folder_file_index(tf, int(g), n, seed))][0] for g in index]
        bad = first_unreadable(files)
        return bad[1] if bad else None

    ds = tf.data.Dataset.range(2**62)
    return ds.map(load, num_parallel_calls=_map_options(tf, config), deterministic=True), diagnose


def _coco(tf, config, split, process_index, process_count, per_host, start_index):
    from perco_jax.data.coco import coco_dataset

    if start_index % config.batch_size:
        raise ValueError(f"TFDS data resumes at a whole global batch: start_index {start_index} is not a "
                         f"multiple of batch_size {config.batch_size}")
    return coco_dataset(data_dir=config.data.tfds_data_dir, size=int(config.data.image_size), split=split,
                        name=_get(config.data, "tfds_name"), seed=int(config.data.seed),
                        process_index=process_index, process_count=process_count,
                        consumed=start_index // config.batch_size * per_host,
                        shuffle_buffer=int(_get(config.data, "shuffle_buffer")),
                        num_parallel_calls=int(_get(config.data, "num_parallel_calls"))), None


def _numpy_batches(tf, ds, diagnose, config, per_host, process_index, start_index):
    ds = ds.map(lambda ex: {"image": ex["image"] * 2.0 - 1.0, "caption": ex["caption"]})
    ds = ds.batch(per_host, drop_remainder=True).prefetch(max(0, int(_get(config.data, "prefetch"))))
    options = tf.data.Options()
    options.deterministic = True
    threads = int(_get(config.data, "num_threads"))
    if threads > 0:
        options.threading.private_threadpool_size = threads
    ds = ds.with_options(options)
    return _iterate(tf, ds, diagnose, config, per_host, process_index, start_index)


def _iterate(tf, ds, diagnose, config, per_host, process_index, start_index):
    it = ds.as_numpy_iterator()
    step = 0
    while True:
        try:
            batch = next(it)
        except tf.errors.OpError as e:
            culprit = diagnose(step) if diagnose is not None else None
            raise ValueError(f"reading {config.data.source} data failed: {culprit or e.message}") from None
        yield {"image": batch["image"].astype(np.float32, copy=False),
               "caption": np.asarray([c.decode("utf-8") for c in batch["caption"]]),
               "index": _positions(start_index, config.batch_size, per_host, process_index, step)}
        step += 1
