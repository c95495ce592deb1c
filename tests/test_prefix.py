"""Prefix streams (bitstream version 5) on the session's tiny codec: every prefix of whole index
groups decodes the groups it sends; the full stream is today's byte for byte; `truncate` cuts what
`compress --groups K` writes; rate control meets its budget; the groups not sent are filled
deterministically; cut or corrupted prefix streams end in errors; the CLI."""
import dataclasses
import zlib

import numpy as np
import pytest

from perco_jax import schedules
from perco_jax.cli import main as cli
from perco_jax.codec import bitstream, entropy_coding
from perco_jax.codec.codec import rate_split
from perco_jax.codec.errors import BitstreamError
from perco_jax.data.pipeline import make_dataset
from perco_jax.images import save_image

# the session's quick codec: one pytest-xdist process trains it (see tests/conftest.py)
pytestmark = pytest.mark.xdist_group("tiny_codecs")


@pytest.fixture(scope="module")
def codec(trained_codec):
    return trained_codec[2]


@pytest.fixture(scope="module")
def heldout(trained_codec):
    batch = next(make_dataset(trained_codec[0], split="validation"))
    return [np.asarray(x) / 2 + 0.5 for x in batch["image"][:6]], [str(c) for c in batch["caption"][:6]]


def _payload(codec, stream):
    return bitstream.unpack(stream, indices=None, model=codec.stream_model)[2]


@pytest.mark.parametrize("spec", ["qlds:8", "quincunx", "random:6:3"])
def test_every_prefix_decodes_the_groups_it_sends(codec, heldout, spec):
    images, captions = heldout
    want = codec.encode_images(np.stack([im * 2 - 1 for im in images]))
    groups = schedules.from_spec(spec, *codec.grid)
    s = codec.num_groups(spec)
    full = codec.compress_batch(images, captions, schedule=spec)
    previous = [-1] * len(images)
    for k in range(s + 1):
        streams = codec.compress_batch(images, captions, schedule=spec, groups=k)
        headers, got_captions, indices = codec.read_batch(streams)
        assert got_captions == captions
        for i, (h, stream) in enumerate(zip(headers, streams)):
            assert (h.version, h.groups_sent) == ((4, None) if k == s else (bitstream.PREFIX_VERSION, k))
            sent = codec.sent_mask(h)
            np.testing.assert_array_equal(sent, groups < k)
            np.testing.assert_array_equal(indices[i][sent], want[i][sent])  # what was sent decodes exactly
            payload = _payload(codec, stream)
            assert _payload(codec, full[i]).startswith(payload), (k, i)  # a layered stream: a cut of the full one
            assert len(payload) >= previous[i]  # each group adds bytes, never removes any
            previous[i] = len(payload)
        assert indices.min() >= 0 and indices.max() < codec.config.codec.codebook_size
    assert streams == full  # all groups: today's stream, byte for byte


def test_full_streams_cost_nothing_and_a_prefix_one_byte_of_framing(codec, heldout):
    images, captions = heldout
    s = codec.num_groups()
    full = codec.compress_batch(images, captions)
    assert codec.compress_batch(images, captions, groups=s) == full
    assert all(rate_split(x)["container"] == 9 for x in full)
    assert all(rate_split(x)["container"] == 10 for x in codec.compress_batch(images, captions, groups=s - 1))


def test_truncate_cuts_what_compress_groups_writes(codec, heldout):
    images, captions = heldout
    s = codec.num_groups()
    full = codec.compress_batch(images, captions)
    for k in (0, 1, s // 2, s - 1, s):
        direct = codec.compress_batch(images, captions, groups=k)
        assert codec.truncate_batch(full, groups=k) == direct
        # a prefix cut further is the shorter prefix; asking a prefix for more groups than it has keeps it
        assert codec.truncate_batch(direct, groups=max(k - 1, 0)) == \
            codec.compress_batch(images, captions, groups=max(k - 1, 0))
        assert codec.truncate_batch(direct, groups=s) == direct
    with pytest.raises(ValueError, match="groups, max_bytes or target_bpp"):
        codec.truncate_batch(full)


def test_truncated_streams_decompress_to_the_images_of_compress_groups(codec, heldout, tmp_path, capsys):
    images, captions = heldout
    save_image(images[0], tmp_path / "a.png")
    k = codec.num_groups() // 2
    args = ["--checkpoint", str(codec_folder(codec, tmp_path))]
    assert cli(["compress", *args, str(tmp_path / "a.png"), "--caption", captions[0], "-o", str(tmp_path / "a.perco")]) == 0
    assert cli(["truncate", *args, str(tmp_path / "a.perco"), "--groups", str(k), "-o", str(tmp_path / "t.perco")]) == 0
    assert cli(["compress", *args, str(tmp_path / "a.png"), "--caption", captions[0], "--groups", str(k),
                "-o", str(tmp_path / "g.perco")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0][-7:]: line for line in out.splitlines() if ".perco" in line.split()[0]}
    assert rows["a.perco"].endswith("     all")  # the groups column
    assert rows["t.perco"].endswith(f"{k:>8}") and rows["g.perco"].endswith(f"{k:>8}")
    assert (tmp_path / "t.perco").read_bytes() == (tmp_path / "g.perco").read_bytes()
    for name in ("t", "g"):
        assert cli(["decompress", *args, str(tmp_path / f"{name}.perco"), "--steps", "2",
                    "-o", str(tmp_path / f"{name}.png")]) == 0
    from perco_jax.images import load_image
    np.testing.assert_array_equal(load_image(tmp_path / "t.png"), load_image(tmp_path / "g.png"))
    # the same file as input and output is refused: truncate never overwrites what it cuts
    assert cli(["truncate", *args, str(tmp_path / "a.perco"), "--groups", "1", "-o", str(tmp_path / "a.perco")]) == 2
    assert "output other than the input" in capsys.readouterr().err


_FOLDERS = {}


def codec_folder(codec, tmp_path):
    """The codec saved once (the CLI loads folders)."""
    if id(codec) not in _FOLDERS:
        _FOLDERS[id(codec)] = codec.save(tmp_path / "codec")
    return _FOLDERS[id(codec)]


def test_rate_control_lands_at_or_under_the_budget_with_the_most_groups(codec, heldout):
    images, captions = heldout
    s = codec.num_groups()
    by_k = [codec.compress_batch(images, captions, groups=k) for k in range(s + 1)]
    lengths = np.array([[len(x) for x in streams] for streams in by_k])  # [S + 1, B]
    budget = int(np.median(lengths[s // 2]))
    for streams in (codec.compress_batch(images, captions, max_bytes=budget),
                    codec.truncate_batch(by_k[s], max_bytes=budget)):
        for i, x in enumerate(streams):
            assert len(x) <= budget
            k = s if rate_split(x)["groups_sent"] is None else rate_split(x)["groups_sent"]
            assert x == by_k[k][i]
            assert all(lengths[j, i] > budget for j in range(k + 1, s + 1))  # no larger prefix fits
    # target bpp: of each image's own size; with groups too, at most that many
    bpp = 8 * budget / (32 * 32)
    for x in codec.compress_batch(images, captions, target_bpp=bpp, groups=2):
        assert 8 * len(x) / (32 * 32) <= bpp and rate_split(x)["groups_sent"] in (0, 1, 2)
    budgets = [int(v) for v in lengths[s]]  # one per image: each fits whole
    assert codec.compress_batch(images, captions, max_bytes=budgets) == by_k[s]
    with pytest.raises(ValueError, match=r"image 0: its smallest stream .* takes \d+ bytes, over the budget of 5"):
        codec.compress_batch(images, captions, max_bytes=5)
    for bad, match in ((dict(groups=s + 1), "groups="), (dict(groups=-1), "groups="), (dict(max_bytes=0), "max_bytes"),
                       (dict(target_bpp=-1.0), "target_bpp"), (dict(max_bytes=50, target_bpp=1.0), "not both"),
                       (dict(max_bytes=[50]), "one per image")):
        with pytest.raises(ValueError, match=match):
            codec.compress_batch(images, captions, **bad)
    # a caption that alone does not fit: cut to its longest prefix of whole tokens that does
    k0 = lengths[0]
    budget = int(np.sort(k0)[len(k0) // 2]) - 1  # under about half of the images' header + caption
    with pytest.raises(ValueError, match="shorten_captions"):
        codec.compress_batch(images, captions, max_bytes=budget)
    streams = codec.compress_batch(images, captions, max_bytes=budget, shorten_captions=True)
    _, got, _ = codec.read_batch(streams)
    for i, (x, caption) in enumerate(zip(streams, got)):
        assert len(x) <= budget and captions[i].startswith(caption)
        if k0[i] <= budget:
            assert caption == captions[i] and x == codec.compress_batch(images[i:i + 1], captions[i:i + 1],
                                                                         max_bytes=budget)[0]
        else:
            assert len(caption) < len(captions[i])
    assert any(k0[i] > budget for i in range(len(images)))
    with pytest.raises(ValueError, match="over the budget of 9"):  # 10 bytes of framing with no caption at all
        codec.compress_batch(images, captions, max_bytes=9, shorten_captions=True)
    with pytest.raises(ValueError, match="needs a budget"):
        codec.compress_batch(images, captions, groups=1, shorten_captions=True)
    with pytest.raises(ValueError, match="no index groups"):
        codec.compress_batch(images, captions, schedule="uniform", groups=1)
    with pytest.raises(ValueError, match="integer entropy model"):
        codec.with_integer_model(None).compress_batch(images, captions, groups=1)


def test_groups_not_sent_are_filled_the_same_in_any_batch(codec, heldout):
    images, captions = heldout
    streams = codec.compress_batch(images, captions, groups=2)
    for t in (0.0, 1.0):
        _, _, together = codec.read_batch(streams, fill_temperature=t, seed=3)
        alone = np.concatenate([codec.read_batch([x], fill_temperature=t, seed=3)[2] for x in streams])
        np.testing.assert_array_equal(together, alone)
    # argmax fill: the model's most probable index given what came before, group by group
    groups = schedules.from_spec(codec.config.codec.schedule, *codec.grid)
    model, _ = codec.coding_model()
    _, _, filled = codec.read_batch(streams)
    context = codec.context(captions)
    for step in range(2, codec.num_groups()):
        t = entropy_coding.group_tables(model, filled, groups, step, context)
        np.testing.assert_array_equal(filled.reshape(len(streams), -1)[:, groups.ravel() == step], t.argmax(-1))
    sampled = [codec.read_batch(streams, fill_temperature=1.0, seed=s)[2] for s in range(3)]
    assert not all(np.array_equal(sampled[0], x) for x in sampled[1:])  # the seed draws the fill
    with pytest.raises(ValueError, match="fill_temperature"):
        codec.read_batch(streams, fill_temperature=-1.0)


def test_cut_or_corrupted_prefix_streams_end_in_errors(codec, heldout):
    images, captions = heldout
    s = codec.num_groups()
    streams = codec.compress_batch(images[:3], captions[:3], groups=s // 2) + codec.compress_batch(images[3:4], captions[3:4])
    key = codec.fingerprint
    for x in streams:
        header, caption, payload = bitstream.unpack(x, indices=None, model=codec.stream_model)
        body = x[:-4]
        # a payload cut inside a group (any shorter length, keeping a CRC of the bytes) fails the CRC
        # over the decoded indices: such a stream is an error, never fewer groups
        for n in range(len(payload)):
            cut = body[:len(body) - len(payload)] + payload[:n]
            for crc in (x[-4:], zlib.crc32(cut, zlib.crc32(key)).to_bytes(4, "little")):
                with pytest.raises(BitstreamError, match="CRC32 mismatch"):
                    codec.read_batch([cut + crc])
    rng = np.random.default_rng(5)
    errors = 0
    for trial in range(400):
        x = bytearray(streams[trial % len(streams)])
        if trial % 2:
            x = x[:rng.integers(0, len(x))]
        else:
            for _ in range(rng.integers(1, 4)):
                x[rng.integers(0, len(x))] ^= int(rng.integers(1, 256))
        try:
            codec.read_batch([bytes(x)])
        except BitstreamError:
            errors += 1
    assert errors == 400
    # a prefix stream that claims all S groups (or more) has no valid form: version 4 is the full stream
    header, caption, payload = bitstream.unpack(streams[0], indices=None, model=codec.stream_model)
    for k in (s, s + 3):
        bad = bitstream.pack(dataclasses.replace(header, groups_sent=k), caption, payload, indices=np.zeros(codec.grid),
                             model=codec.stream_model)
        with pytest.raises(BitstreamError, match=f"prefix stream of {k} index groups, its schedule has {s}"):
            codec.read_batch([bad])
