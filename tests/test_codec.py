"""The real codec on a briefly trained tiny model: stage 2, compress / decompress round trips per
schedule, rate against the model's cross-entropy, corruptions, wrong checkpoints, bad images,
8-device vs 1-device determinism, the CLI."""
import copy
import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

from perco_jax import build, schedules
from perco_jax.cli import main as cli
from perco_jax.codec import bitstream, entropy_coding
from perco_jax.codec.errors import BitstreamError
from perco_jax.codec.codec import Codec, prepare_image, rate_split
from perco_jax.codec.report import DEFAULT_SPECS
from perco_jax.config import load_config
from perco_jax.data.pipeline import make_dataset
from perco_jax.images import load_image, save_image
from perco_jax.train.loop import train

# the session's quick codec: one pytest-xdist process trains it (see tests/conftest.py)
pytestmark = pytest.mark.xdist_group("tiny_codecs")


@pytest.fixture(scope="module")
def trained(trained_codec):
    """(config, codec folder, Codec) of the session's tiny codec (tests/conftest.py)."""
    return trained_codec


@pytest.fixture(scope="module")
def heldout(trained):
    config = trained[0]
    batch = next(make_dataset(config, split="validation"))
    return [np.asarray(x) / 2 + 0.5 for x in batch["image"][:6]], [str(c) for c in batch["caption"][:6]]


def test_every_schedule_round_trips_real_images(trained, heldout):
    _, _, codec = trained
    images, captions = heldout
    want = codec.encode_images(np.stack([im * 2 - 1 for im in images]))
    for spec in DEFAULT_SPECS:
        streams = codec.compress_batch(images, captions, schedule=spec)
        headers, got_captions, indices = codec.read_batch(streams)
        np.testing.assert_array_equal(indices, want, err_msg=spec)
        assert got_captions == captions
        assert {(h.image_height, h.image_width) for h in headers} == {(32, 32)}


def test_random_grids_round_trip_under_every_schedule(trained):
    _, _, codec = trained
    rng = np.random.default_rng(0)
    k = codec.config.codec.codebook_size
    indices = rng.integers(0, k, (5,) + codec.grid).astype(np.int32)
    captions = ["a red circle", "", "two squares", "ünïcödé ✓", "a blue triangle on green"]
    for spec in DEFAULT_SPECS:
        payloads = codec.encode_indices(indices, captions, spec)
        name, steps, seed = schedules.parse_spec(spec)
        if name == schedules.UNIFORM:
            continue
        model, batch = codec.coding_model()  # the tables of the version the codec writes
        got = entropy_coding.decode_indices(model, payloads, codec.grid, schedules.from_spec(spec, *codec.grid),
                                            codec.context(captions), batch_size=batch)
        np.testing.assert_array_equal(got, indices, err_msg=spec)


def test_payload_within_one_percent_of_cross_entropy_and_uniform_size(trained, heldout):
    _, _, codec = trained
    images, captions = heldout
    indices = codec.encode_images(np.stack([im * 2 - 1 for im in images]))
    n, k = codec.grid[0] * codec.grid[1], codec.config.codec.codebook_size
    for spec in ("qlds:8", "checkerboard", "implicit_var", "cosine:8"):
        bits = codec.rate_bits(indices, captions, spec)
        for stream, b in zip(codec.compress_batch(images, captions, spec), bits):
            payload = rate_split(stream)["indices"]
            assert payload <= 1.01 * b / 8 + 8, (spec, payload, b / 8)
            assert payload >= b / 8 - 8, (spec, payload, b / 8)
    for stream in codec.compress_batch(images, captions, "uniform"):
        r = rate_split(stream)
        assert r["indices"] == math.ceil(n * math.log2(k) / 8)
        assert r["total"] == r["indices"] + r["caption"] + r["container"]


def test_mim_codes_heldout_images_in_fewer_bits_than_uniform(trained, heldout):
    _, _, codec = trained
    images, captions = heldout
    uniform = np.mean([rate_split(s)["indices"] for s in codec.compress_batch(images, captions, "uniform")])
    for spec in DEFAULT_SPECS[1:]:
        mim = np.mean([rate_split(s)["indices"] for s in codec.compress_batch(images, captions, spec)])
        assert mim < uniform, (spec, mim, uniform)


def test_decompress_is_the_sampler_on_the_decoded_indices_at_the_original_size(trained, heldout):
    _, _, codec = trained
    images, captions = heldout
    wide = np.clip(np.repeat(images[0], 2, axis=1)[:, :50], 0, 1)  # 32 x 50: resized in, resized back
    streams = codec.compress_batch([images[1], wide, images[2]], captions[:3])
    out = codec.decompress_batch(streams, seed=3)
    assert out[0].shape == (32, 32, 3) and out[1].shape == (32, 50, 3)
    _, caps, indices = codec.read_batch(streams)
    direct = codec.decode_images(indices, caps, [zlib.crc32(s) for s in streams], seed=3)
    np.testing.assert_allclose(out[0], direct[0], atol=1e-6)
    np.testing.assert_allclose(out[2], direct[2], atol=1e-6)
    alone = codec.decompress(streams[2], seed=3)  # another batch: the same image (noise is per image)
    np.testing.assert_allclose(alone, out[2], atol=1e-4)
    size = codec.config.sample.batch_size
    try:  # the decoder in chunks of 2 (the last one padded): the same images
        codec.config.sample.batch_size = 2
        np.testing.assert_allclose(np.stack(codec.decompress_batch(streams, seed=3)[::2]), np.stack(out[::2]), atol=1e-4)
    finally:
        codec.config.sample.batch_size = size


def test_stochastic_sampler_is_the_configs_choice_and_repeats_per_stream(trained, heldout):
    """sample.stochastic picks the teacher's steps (fresh noise per image and step, drawn from the
    stream's id): the same stream decodes to the same image in any batch, and the Python option
    overrides the config (`decompress --stochastic`: test_cli_compress_decompress; a codec whose
    config predates the field: test_an_export_from_before_later_fields_codes_and_decodes_as_it_did)."""
    _, _, codec = trained
    images, captions = heldout
    streams = codec.compress_batch(images[:3], captions[:3])
    assert codec.config.sample.stochastic  # (the tiny config's choice)
    ode = codec.decompress_batch(streams, seed=1, stochastic=False)
    out = codec.decompress_batch(streams, seed=1, stochastic=True)
    np.testing.assert_allclose(codec.decompress(streams[2], seed=1, stochastic=True), out[2], atol=1e-4)
    assert min(float(np.abs(a - b).max()) for a, b in zip(out, ode)) > 0.02
    for a, b in zip(codec.decompress_batch(streams, seed=1), out):  # the config's choice
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_sampler_temperature_is_the_configs_choice_and_scales_all_its_noise(trained, heldout):
    """sample.temperature scales the teacher's starting noise and fresh draws: the Python option
    overrides the config; at 0 the decoder draws no noise (every seed gives the same image), at 1
    seeds differ; a negative one is refused (a codec whose config predates the field:
    test_an_export_from_before_later_fields_codes_and_decodes_as_it_did)."""
    _, _, codec = trained
    images, captions = heldout
    streams = codec.compress_batch(images[:2], captions[:2])
    t = codec.config.sample.temperature
    assert 0 < t < 1  # (the tiny config's choice)
    for a, b in zip(codec.decompress_batch(streams, seed=1), codec.decompress_batch(streams, seed=1, temperature=t)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    cold = [codec.decompress_batch(streams, seed=s, temperature=0.0) for s in (1, 2)]
    for a, b in zip(*cold):
        np.testing.assert_allclose(a, b, atol=1e-6)
    warm = [codec.decompress_batch(streams, seed=s, temperature=1.0) for s in (1, 2)]
    assert min(float(np.abs(a - b).max()) for a, b in zip(*warm)) > 0.02
    with pytest.raises(ValueError, match="temperature"):
        codec.decompress_batch(streams, temperature=-1.0)


# The later fields (config.LATER_FIELDS) that shape the networks: an export made before one of them
# holds the networks of its old value, which the session's codec does not (caption_input "context":
# test_integer_entropy's test_an_export_from_before_caption_input_decodes_its_streams; CLIP length 77).
NETWORK_FIELDS = ("text.clip_max_length", "entropy_model.caption_input")


@pytest.fixture(scope="module")
def old_export(trained, tmp_path_factory):
    """The session's codec folder as an export from before the other later fields wrote it (its
    config without them), loaded."""
    import json
    import shutil

    from perco_jax.checkpoint import MANIFEST
    from perco_jax.config import LATER_FIELDS

    folder = tmp_path_factory.mktemp("old_export") / "checkpoint"
    shutil.copytree(trained[1], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    config = manifest["components"]["codec"]
    for key in set(LATER_FIELDS) - set(NETWORK_FIELDS):
        section, _, name = key.rpartition(".")
        del (config[section] if section else config)[name]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return Codec.load(folder)


def test_an_export_from_before_later_fields_codes_and_decodes_as_it_did(trained, old_export, heldout):
    """A codec folder whose config lacks the later fields loads with their old defaults: it writes
    the same streams byte for byte, reads them back to the same indices, and decodes with what the
    sampler did then (the Euler ODE at temperature 1)."""
    _, _, codec = trained
    images, captions = heldout
    config = old_export.config
    assert config.sample.stochastic is False and config.sample.temperature == 1.0
    assert config.stage3.guidance is None and config.loss_detail == 0.0 and config.text.cache is False
    assert old_export.fingerprint == codec.fingerprint
    streams = codec.compress_batch(images[:3], captions[:3])
    assert old_export.compress_batch(images[:3], captions[:3]) == streams
    _, got_captions, indices = old_export.read_batch(streams)
    np.testing.assert_array_equal(indices, codec.read_batch(streams)[2])
    assert got_captions == captions[:3]
    then = codec.decompress_batch(streams, seed=1, stochastic=False, temperature=1.0)
    for a, b in zip(old_export.decompress_batch(streams, seed=1), then):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_framing_is_at_most_10_bytes_and_long_forms_round_trip(trained, heldout):
    """Versions 3 and 4 send only what the codec does not know: at its native size under its
    default schedule a stream spends 9 bytes on framing (the target is at most 10); other sizes
    (RESIZE keeps the original's) and schedules are sent in full and come back."""
    _, _, codec = trained
    images, captions = heldout
    for s in codec.compress_batch(images, captions):  # 32 x 32 (native), config.codec.schedule
        r = rate_split(s)
        assert s[0] == 0xA0 | bitstream.INTEGER_MODEL_VERSION and r["container"] == 9 <= 10, r
        assert r["total"] == r["caption"] + r["indices"] + r["container"] and r["pixels"] == 32 * 32
        assert rate_split(s, codec.stream_model) == r
    wide = np.clip(np.repeat(images[0], 2, axis=1)[:, :50], 0, 1)
    batch = [images[2], wide, images[1][:2, :3]]
    want = codec.encode_images(np.stack([prepare_image(im, 32) for im in batch]))
    # extra bytes: image size = two 1-byte varints; schedule = id [+ steps varint [+ seed varint]]
    for spec, extra in ((None, 0), ("checkerboard", 1), ("qlds:12", 2), ("random:8:300", 4), ("uniform", 1)):
        streams = codec.compress_batch(batch, captions[2:5], schedule=spec)
        headers, got, indices = codec.read_batch(streams)
        np.testing.assert_array_equal(indices, want, err_msg=spec)
        assert got == captions[2:5]
        assert [(h.image_height, h.image_width) for h in headers] == [(32, 32), (32, 50), (2, 3)]
        assert {(h.schedule, h.schedule_steps, h.schedule_seed) for h in headers} == \
            {schedules.parse_spec(spec or codec.config.codec.schedule)}
        splits = [rate_split(s) for s in streams]
        assert [r["container"] for r in splits] == [9 + extra, 11 + extra, 11 + extra], spec
        assert [r["pixels"] for r in splits] == [32 * 32, 32 * 50, 2 * 3]


def _with_crc(body: bytes, key: bytes = b"") -> bytes:
    """body + its CRC32 (of its bytes alone), keyed as version 3 keys it with the fingerprint."""
    return body + zlib.crc32(body, zlib.crc32(key)).to_bytes(4, "little")


def test_corruptions_and_truncations_end_in_a_clean_error_or_a_valid_decode(trained, heldout):
    _, _, codec = trained
    images, captions = heldout
    streams = [codec.compress(images[i], captions[i], spec) for i, spec in
               enumerate(("qlds:8", "implicit_var", "uniform", "random:8:3"))]
    rng = np.random.default_rng(1)
    outcomes = {"error": 0, "decoded": 0}
    for trial in range(1000):
        s = bytearray(streams[trial % len(streams)])
        kind = trial % 4
        if kind == 0:       # truncation
            s = s[:rng.integers(0, len(s))]
        elif kind == 1:     # random byte flips
            for _ in range(rng.integers(1, 4)):
                s[rng.integers(0, len(s))] ^= int(rng.integers(1, 256))
        elif kind == 2:     # garbage appended / inserted
            at = rng.integers(0, len(s) + 1)
            s = s[:at] + bytes(rng.integers(0, 256, rng.integers(1, 6)).astype(np.uint8)) + s[at:]
        else:               # corrupted payload with a CRC of its bytes: reaches the range decoder
            body = bytearray(s[:-4])
            header, caption, payload = bitstream.unpack(bytes(s), indices=None, model=codec.stream_model)
            start = len(body) - len(payload)
            if payload:
                body[start + rng.integers(0, len(payload))] ^= int(rng.integers(1, 256))
            else:
                body = body[:start] + bytes([rng.integers(0, 256)])
            s = bytearray(_with_crc(bytes(body), codec.fingerprint))
        try:
            _, _, indices = codec.read_batch([bytes(s)])
        except BitstreamError:
            outcomes["error"] += 1
        else:
            assert indices.shape == (1,) + codec.grid
            assert indices.min() >= 0 and indices.max() < codec.config.codec.codebook_size
            outcomes["decoded"] += 1
    # the CRC covers the decoded indices too: a corruption that decodes is a ~2^-32 event
    assert outcomes["error"] == 1000, outcomes


def test_indices_decoded_otherwise_than_encoded_are_an_error_not_a_wrong_image(trained, heldout, monkeypatch):
    """Another machine may compute the float entropy model's probabilities a rounding apart and
    leave the encoder's path in the range decoder without noticing: the CRC over the indices
    catches it (versions 2 and 3); version 4's integer tables do not depend on the float model."""
    _, _, codec = trained
    images, captions = heldout
    float_codec = codec.with_integer_model(None)  # writes version 3: tables from float probabilities
    streams = float_codec.compress_batch(images[:4], captions[:4])
    headers, caps, want = float_codec.read_batch(streams)
    assert {h.version for h in headers} == {bitstream.FLOAT_MODEL_VERSION}
    # the same streams as the version-1 and -2 packer writes them ("PRCO"; the CRC of v2 covers
    # the indices, v1's the bytes alone): still read
    payloads = [bitstream.unpack(s, indices=None, model=float_codec.stream_model)[2] for s in streams]
    old = {v: [bitstream.pack(dataclasses.replace(h, version=v), c, p, indices=g)
               for h, c, p, g in zip(headers, caps, payloads, want)] for v in (1, 2)}
    for v, olds in old.items():
        assert all(s[:5] == b"PRCO" + bytes([v]) for s in olds)
        np.testing.assert_array_equal(float_codec.read_batch(olds)[2], want)
    integer_streams = codec.compress_batch(images[:4], captions[:4])  # version 4: integer tables
    noise = np.random.default_rng(0).normal(0, 1.0, (codec.batch,) + codec.grid + (codec.config.codec.codebook_size,))

    def perturbed(coding_model):  # the float model's probabilities a little off, as on another machine
        def coding_model_elsewhere(version=None):
            model, batch = coding_model(version)
            if isinstance(model, entropy_coding.IntegerTables):
                return model, batch
            return (lambda x, m, c=None: model(x, m, c) + noise.astype(np.float32)), batch
        return coding_model_elsewhere

    for c in (codec, float_codec):
        monkeypatch.setattr(c, "coding_model", perturbed(c.coding_model))
    for version_streams in (streams, old[2]):
        with pytest.raises(BitstreamError, match="decoded indices.*another accelerator"):
            float_codec.read_batch(version_streams)
    # integer tables do not depend on the float model: version 4 decodes the same regardless
    np.testing.assert_array_equal(codec.read_batch(integer_streams)[2], want)
    monkeypatch.undo()
    np.testing.assert_array_equal(float_codec.read_batch(streams)[2], want)


def test_the_fingerprint_is_the_codec_not_where_its_files_lay():
    """Two exports of one trained codec from other folders (the stage-0 run, the precomputed text
    embeddings) carry the same fingerprint, so they write the same streams and decode them to the same
    images; a config field of the codec itself, or its weights, change it."""
    from perco_jax.codec.codec import fingerprint_of
    from perco_jax.config import load_config

    params, entropy, ae = {"w": np.arange(3.0)}, {"e": np.ones(2)}, {"a": np.zeros(4)}
    base = fingerprint_of(load_config("tiny", ["autoencoder_workdir=/a/stage0"]), params, entropy, ae)
    moved = load_config("tiny", ["autoencoder_workdir=/elsewhere/stage0", "text.embeddings=/b/emb"])
    assert fingerprint_of(moved, params, entropy, ae) == base
    assert fingerprint_of(load_config("tiny", ["mmdit.num_layers=4"]), params, entropy, ae) != base
    assert fingerprint_of(moved, params, entropy, {"a": np.ones(4)}) != base
    assert fingerprint_of(load_config("tiny", ["text.max_sequence_length=24"]), params, entropy, ae) != base


def test_wrong_checkpoint_is_detected(trained, heldout):
    config, folder, codec = trained
    images, captions = heldout
    stream = codec.compress(images[0], captions[0])
    import jax

    other = Codec(codec.config, codec.codec_params,
                  jax.tree_util.tree_map(lambda x: x * 1.01, codec.entropy_params), codec.ae_params,
                  codec.text_params, codec.prompt_encoder,
                  fingerprint=b"\x00" * 8)
    from perco_jax.codec.codec import fingerprint_of
    other.fingerprint = fingerprint_of(other.config, other.codec_params, other.entropy_params)
    assert other.fingerprint != codec.fingerprint
    with pytest.raises(BitstreamError, match="different model/config .fingerprint tag"):
        other.read_batch([stream])
    # a checkpoint whose fingerprint starts with the same 2-byte tag: the CRC, keyed with the
    # whole fingerprint, refuses it
    same_tag = copy.copy(codec)
    same_tag.fingerprint = codec.fingerprint[:2] + bytes(b ^ 0xFF for b in codec.fingerprint[2:])
    with pytest.raises(BitstreamError, match="CRC32 mismatch.*another model/config"):
        same_tag.read_batch([stream])
    # the saved folder decodes what the in-memory codec encoded
    np.testing.assert_array_equal(Codec.load(folder).read_batch([stream])[2], codec.read_batch([stream])[2])
    from perco_jax.checkpoint import CheckpointError
    with pytest.raises(CheckpointError):
        Codec.load(folder / "params")


def test_bad_images_raise_one_clear_error(trained):
    _, _, codec = trained
    bad = {"rgba": np.zeros((8, 8, 4), np.float32), "empty": np.zeros((0, 8, 3), np.float32),
           "int16": np.zeros((8, 8, 3), np.int16), "range": np.full((8, 8, 3), 2.0, np.float32),
           "nan": np.full((8, 8, 3), np.nan, np.float32), "4d": np.zeros((1, 8, 8, 3), np.float32)}
    for name, image in bad.items():
        with pytest.raises(ValueError):
            codec.compress(image)
    with pytest.raises(ValueError, match="captions"):
        codec.compress_batch([np.zeros((8, 8, 3))], ["a", "b"])
    grey = prepare_image(np.full((10, 12), 128, np.uint8), 32)
    assert grey.shape == (32, 32, 3) and np.allclose(grey, 128 / 255 * 2 - 1, atol=1e-3)
    with pytest.raises(ValueError, match="unknown masking schedule"):
        codec.compress(np.zeros((8, 8, 3)), schedule="zigzag")


def test_stage2_refuses_a_mismatched_or_missing_stage1(trained, tmp_path):
    config, folder, _ = trained
    stage1 = config.stage1_workdir
    with pytest.raises(build.ConfigError, match="codec"):
        train(load_config("tiny", ["stage=2", f"stage1_workdir={stage1}", "codec.codebook_size=32"]),
              tmp_path / "a", progress=False)
    with pytest.raises(build.ConfigError, match="stage1_workdir"):
        train(load_config("tiny", ["stage=2"]), tmp_path / "b", progress=False)


def test_cli_compress_decompress(trained, heldout, tmp_path, capsys):
    _, folder, codec = trained
    images, _ = heldout
    for i in range(2):
        save_image(images[i], tmp_path / f"in{i}.png")
    assert cli(["compress", "--checkpoint", str(folder), str(tmp_path / "in0.png"), str(tmp_path / "in1.png"),
                "-o", str(tmp_path / "out"), "--caption", "a scene", "--schedule", "checkerboard"]) == 0
    printed = capsys.readouterr().out
    assert "vs uniform" in printed and "in0.perco" in printed
    assert cli(["decompress", "--checkpoint", str(folder), str(tmp_path / "out" / "in0.perco"),
                "-o", str(tmp_path / "in0_rec.png"), "--steps", "2", "--no-stochastic"]) == 0
    stream = (tmp_path / "out" / "in0.perco").read_bytes()
    np.testing.assert_allclose(load_image(tmp_path / "in0_rec.png"), codec.decompress(stream, steps=2, stochastic=False),
                               atol=1 / 255 + 1e-6)
    assert cli(["decompress", "--checkpoint", str(folder), str(tmp_path / "out" / "in0.perco"),
                "-o", str(tmp_path / "in0_hot.png"), "--steps", "2", "--temperature", "1.5"]) == 0
    np.testing.assert_allclose(load_image(tmp_path / "in0_hot.png"), codec.decompress(stream, steps=2, temperature=1.5),
                               atol=1 / 255 + 1e-6)
    # no caption and no captioner: one clear error, unless the text mode asks for none
    assert cli(["compress", "--checkpoint", str(folder), str(tmp_path / "in0.png"), "-o", str(tmp_path / "n.perco")]) == 2
    assert "no caption" in capsys.readouterr().err
    from perco_jax.captions.captioner import CaptionCache, image_key
    CaptionCache(tmp_path / "caps.jsonl").put(image_key(tmp_path / "in1.png"), "a large red circle on grey", "blip2")
    for mode, want in (("none", ""), ("full", "a large red circle on grey"), ("truncate:2", None)):
        assert cli(["compress", "--checkpoint", str(folder), str(tmp_path / "in1.png"), "-o", str(tmp_path / "c.perco"),
                    "--caption-cache", str(tmp_path / "caps.jsonl"), "--text-mode", mode]) == 0
        caption = bitstream.unpack((tmp_path / "c.perco").read_bytes(), indices=None)[1]
        if want is not None:
            assert caption == want
        else:
            t5 = codec.prompt_encoder.tokenizers[2]
            assert 0 < len(t5(caption, add_special_tokens=False)["input_ids"]) <= 2
            assert "a large red circle on grey".startswith(caption)
    capsys.readouterr()
    (tmp_path / "bad.perco").write_bytes(b"PRCO\x01garbage")
    assert cli(["decompress", "--checkpoint", str(folder), str(tmp_path / "bad.perco"), "-o",
                str(tmp_path / "x.png")]) == 2
    assert "truncated" in capsys.readouterr().err


def test_compress_and_decode_on_8_devices_decompress_on_1_and_other_batches(trained, heldout, tmp_path):
    _, folder, codec = trained
    images, captions = heldout
    np.save(tmp_path / "images.npy", np.stack(images))
    (tmp_path / "captions.txt").write_text("\n".join(captions))
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from pathlib import Path
        from perco_jax.codec.codec import Codec
        assert jax.device_count() == 8
        codec = Codec.load({str(folder)!r})
        images = list(np.load({str(tmp_path / 'images.npy')!r}))
        captions = Path({str(tmp_path / 'captions.txt')!r}).read_text().split("\\n")
        streams = codec.compress_batch(images, captions)
        np.save({str(tmp_path / 'indices.npy')!r}, codec.encode_images(np.stack(images) * 2 - 1))
        for i, s in enumerate(streams):
            Path({str(tmp_path)!r}, f"{{i}}.perco").write_bytes(s)
        np.save({str(tmp_path / 'decoded.npy')!r}, np.stack(codec.decompress_batch(streams[:3])))  # sharded sampler
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    streams = [(tmp_path / f"{i}.perco").read_bytes() for i in range(len(images))]
    want = np.load(tmp_path / "indices.npy")
    np.testing.assert_array_equal(codec.read_batch(streams)[2], want)            # all together
    np.testing.assert_array_equal(np.concatenate([codec.read_batch([s])[2] for s in streams]), want)  # one by one
    np.testing.assert_array_equal(codec.read_batch(streams[::-1])[2], want[::-1])  # other batches
    # the decoder split over 8 devices gives the 1-device images
    np.testing.assert_allclose(np.load(tmp_path / "decoded.npy"), np.stack(codec.decompress_batch(streams[:3])),
                               atol=2e-5)


def test_export_takes_the_autoencoder_of_the_stage1_run(trained, stage1_run):
    """Export (and stage 2) need not be told the stage-0 run again: a config that leaves
    autoencoder_workdir empty takes the stage-1 run's, and gives the same codec."""
    from perco_jax.train.export import export_codec

    config, folder, codec = trained
    bare = config.copy_and_resolve_references()
    bare.autoencoder_workdir = ""
    again = export_codec(bare, config.stage1_workdir, folder.parent / "stage2")
    assert again.config.autoencoder_workdir == stage1_run[0].autoencoder_workdir
    assert again.fingerprint == codec.fingerprint
