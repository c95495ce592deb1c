"""Precomputed text embeddings (perco_jax/text/store.py): the sharded job, the array_record store
read back, and the errors of incomplete, mixed or mismatched stores."""
import json
import os

import numpy as np
import pytest

from perco_jax import build
from perco_jax.config import load_config
from perco_jax.data.pipeline import dataset_captions
from perco_jax.text.store import TextEmbeddingStore, embed_captions, shard_name

OVER = ["text.max_sequence_length=8"]
CAPTIONS = ["a red circle", "two blue squares on grey", "ünïcödé ✓ caption", "a red circle", "x" * 300]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """(config, encoder, params, folder of a 3-shard store of CAPTIONS)."""
    root = tmp_path_factory.mktemp("text_store")
    config = load_config("tiny", OVER)
    for i in range(3):
        embed_captions(config, root / "emb", captions=CAPTIONS, batch_size=2, process_index=i, process_count=3,
                       progress=False)
    encoder, params = build.build_text(config, root / "tok")
    return config, encoder, params, root / "emb"


def test_store_equals_the_encoders(encoded):
    config, encoder, params, folder = encoded
    store = TextEmbeddingStore(folder, config)
    distinct = list(dict.fromkeys(["", *CAPTIONS]))
    assert len(store) == len(distinct) and all(c in store for c in distinct)
    # each process took every third caption of the same list
    metas = [json.loads((folder / f"{shard_name(i, 3)}.json").read_text()) for i in range(3)]
    assert [m["captions"] for m in metas] == [distinct[i::3] for i in range(3)]
    ctx, pooled = store(CAPTIONS[::-1] + [""])
    want_ctx, want_pooled = encoder(params, CAPTIONS[::-1] + [""], config.text.max_sequence_length)
    assert ctx.dtype == np.float32 and ctx.shape == want_ctx.shape and pooled.shape == want_pooled.shape
    np.testing.assert_allclose(ctx, np.asarray(want_ctx), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pooled, np.asarray(want_pooled), rtol=1e-6, atol=1e-6)


def test_bfloat16_store_and_rerun_skips_finished_shards(encoded, tmp_path):
    config, encoder, params, _ = encoded
    meta = embed_captions(config, tmp_path, captions=CAPTIONS, dtype="bfloat16", progress=False)
    records = meta.with_suffix(".array_record")
    stamp = records.stat().st_mtime_ns
    assert embed_captions(config, tmp_path, captions=["something else"], progress=False) == meta
    assert records.stat().st_mtime_ns == stamp
    ctx, _ = TextEmbeddingStore(tmp_path, config)(CAPTIONS)
    want, _ = encoder(params, CAPTIONS, config.text.max_sequence_length)
    np.testing.assert_allclose(ctx, np.asarray(want), rtol=1e-2, atol=1e-2)
    assert os.path.getsize(records) < os.path.getsize(
        next(encoded[3].glob("*.array_record"))) * 3 * 0.75  # about half the float32 bytes


def test_store_errors(encoded, tmp_path):
    config, _, _, folder = encoded
    with pytest.raises(ValueError, match="no text embeddings"):
        TextEmbeddingStore(tmp_path)
    with pytest.raises(ValueError, match=r"other text encoders.*seed: 0 vs 1"):
        TextEmbeddingStore(folder, load_config("tiny", OVER + ["seed=1"]))
    with pytest.raises(ValueError, match="max_sequence_length: 8 vs 20"):
        TextEmbeddingStore(folder, load_config("tiny", []))
    with pytest.raises(KeyError, match="not in the text embeddings"):
        TextEmbeddingStore(folder)(["a caption nobody embedded"])
    # an unfinished job: shard 1 of 3 has no .json yet
    partial = tmp_path / "partial"
    partial.mkdir()
    for i in (0, 2):
        for suffix in (".json", ".array_record"):
            (partial / f"{shard_name(i, 3)}{suffix}").write_bytes((folder / f"{shard_name(i, 3)}{suffix}").read_bytes())
    with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
        TextEmbeddingStore(partial)
    (partial / f"{shard_name(0, 2)}.json").write_text("{}")
    with pytest.raises(ValueError, match="mixes the shards"):
        TextEmbeddingStore(partial)
    with pytest.raises(ValueError, match="dtype"):
        embed_captions(config, tmp_path / "x", captions=["a"], dtype="int8")


def test_training_with_text_cache_and_store_is_refused():
    with pytest.raises(build.ConfigError, match="choose one"):
        build.validate(load_config("tiny", ["text.cache=True", "text.embeddings=/somewhere"]))


def test_dataset_captions(tmp_path):
    config = load_config("tiny", ["num_train_steps=3", "batch_size=4"])
    from perco_jax.data.synthetic import synthetic_example

    first = list(dict.fromkeys(synthetic_example(g, 0)[1] for g in range(12)))
    assert dataset_captions(config) == first
    assert dataset_captions(config, examples=2) == first[:2]
    from PIL import Image

    for name, caption in (("a.png", "one"), ("b.png", "two"), ("c.png", "one")):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"file": n, "caption": c}) + "\n" for n, c in
                                                     (("a.png", "one"), ("b.png", "two"), ("c.png", "one"))))
    folder = load_config("tiny", ["data.source=folder", f"data.folder={tmp_path}"])
    assert sorted(dataset_captions(folder)) == ["one", "two"]


def test_cli_embed_text(tmp_path, capsys):
    from perco_jax.cli import main as cli

    out = tmp_path / "emb"
    assert cli(["embed-text", "--config", "tiny", "-o", "text.max_sequence_length=8", "--out", str(out),
                "--examples", "6", "--batch", "4", "--dtype", "bfloat16"]) == 0
    assert "--config.text.embeddings=" in capsys.readouterr().out
    config = load_config("tiny", OVER)
    store = TextEmbeddingStore(out, config)
    assert store.dtype == "bfloat16" and len(store) == 1 + len(dataset_captions(config, examples=6))
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli(["embed-text", "--config", "tiny", "--out", str(tmp_path / "x"), "--dtype", "int8"])


def test_in_memory_cache_pads_misses_to_a_power_of_two(encoded, tmp_path):
    """config.text.cache's TextEmbeddingCache: each batch's new captions are encoded in one call
    padded to a power of two (few program shapes), with the encoders' values, and persisted."""
    from perco_jax.text.cache import TextEmbeddingCache

    config, encoder, params, _ = encoded
    sizes = []

    def counting(p, captions, length):
        sizes.append(len(captions))
        return encoder(p, captions, length)

    cache = TextEmbeddingCache(counting, params, 8, tmp_path)
    ctx, pooled = cache(CAPTIONS[:3])
    ctx2, _ = cache(CAPTIONS)  # one new caption (CAPTIONS repeats its first)
    assert sizes == [4, 1]
    want_ctx, want_pooled = encoder(params, CAPTIONS, 8)
    np.testing.assert_allclose(ctx2, np.asarray(want_ctx), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pooled, np.asarray(want_pooled)[:3], rtol=1e-6, atol=1e-6)
    cache.save()
    assert len(TextEmbeddingCache(counting, params, 8, tmp_path)) == len(set(CAPTIONS))
