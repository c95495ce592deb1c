"""COCO captions from TFDS (`coco_captions`), read from a data_dir the user prepared beforehand.

Nothing is ever downloaded here: `coco_builder` raises a clear error explaining how to prepare the
dataset when it is not in `data_dir`.

Each example becomes (image, caption): the image is decoded, resized (bicubic, antialiased) so
that its shorter side is `size`, centre-cropped to `size` x `size`, float32 in [0, 1] (the same
policy as image folders, `folder.decode_resize_tf`); the caption is the *first* of the
example's captions (a deterministic choice).

Per-host sharding and resumption: process p reads the p-th of `process_count` equal parts of the
split (`tfds.split_for_jax_process`, remainder dropped, files in a fixed order), and repeats it,
each epoch shuffled with a buffer seeded from (seed, epoch, process) so the order is the same in
every run. Resuming after `consumed` examples of that stream starts at epoch consumed // n and
skips consumed % n examples of it (before decoding, so skipping is cheap): the stream continues
exactly where an interrupted run with the same process_count stopped.
"""
from __future__ import annotations

from perco_jax.data.folder import decode_resize_tf

DEFAULT_NAME = "coco_captions"
PREPARE_HINT = (
    "Prepare it once, on a machine with internet access and ~40 GB of disk (COCO 2014 images and "
    "annotations), with\n"
    "    tfds build {name} --data_dir={data_dir}\n"
    "(or: python -m tensorflow_datasets.scripts.download_and_prepare --datasets={name} "
    "--data_dir={data_dir}), then copy that folder where training runs and set "
    "--config.data.tfds_data_dir to it.")


def coco_builder(data_dir: str = "", name: str = DEFAULT_NAME):
    """The TFDS builder of `name` in `data_dir` ("" = TFDS's default folder), checked to be prepared."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # unknown name, unreadable folder
        raise ValueError(f"cannot open TFDS dataset {name!r} in {data_dir or 'the default TFDS folder'}: {e}") from e
    if not builder.is_prepared():
        where = data_dir or "the default TFDS folder (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {where} (looked for {builder.data_dir}); it is never "
            "downloaded during training. " + PREPARE_HINT.format(name=name, data_dir=data_dir or "DIR"))
    return builder


def coco_dataset(*, data_dir: str, size: int, split: str = "train", name: str = DEFAULT_NAME, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, consumed: int = 0,
                 shuffle_buffer: int = 1024, num_parallel_calls: int = -1):
    """Unbatched, endless tf.data stream of {"image": float32 [size, size, 3] in [0, 1], "caption": string}
    for process `process_index`, starting after `consumed` of its examples (see the module doc)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = coco_builder(data_dir, name)
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    shard = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count,
                                       drop_remainder=True)
    n = builder.info.splits[shard].num_examples
    if n == 0:
        raise ValueError(f"split {split!r} of {name!r} has fewer examples than processes ({process_count})")
    parallel = tf.data.AUTOTUNE if num_parallel_calls < 0 else max(1, num_parallel_calls)
    raw = builder.as_dataset(split=shard, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
                             read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
    raw = raw.map(lambda ex: {"image": ex["image"], "caption": ex["captions"]["text"][0]})
    epoch0, skip = divmod(int(consumed), n)

    def epoch(e):
        shuffle_seed = (tf.cast(e, tf.int64) * 1_000_003 + process_index) * 1_000_003 + seed
        return raw.shuffle(max(1, shuffle_buffer), seed=shuffle_seed, reshuffle_each_iteration=False)

    ds = tf.data.Dataset.range(epoch0, 2**62).flat_map(epoch).skip(skip)

    def decode(ex):
        return {"image": decode_resize_tf(ex["image"], size), "caption": ex["caption"]}

    return ds.map(decode, num_parallel_calls=parallel, deterministic=True)


def coco_captions(*, data_dir: str, split: str = "train", name: str = DEFAULT_NAME) -> list[str]:
    """The caption training uses of each example of the split (the first), in the split's order;
    images are not decoded."""
    import tensorflow_datasets as tfds

    builder = coco_builder(data_dir, name)
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
    ds = ds.map(lambda ex: ex["captions"]["text"][0])
    return [c.decode("utf-8") for c in ds.as_numpy_iterator()]
