"""Bitstream container and range coding: round trips, rate, and strict handling of bad input."""
import dataclasses
import math
import struct
import zlib

import numpy as np
import pytest

from tests.reference import time_limit
from perco_jax import schedules
from perco_jax.codec import bitstream as bs
from perco_jax.codec.errors import BitstreamError, CodingError
from perco_jax.codec import range_coding as rc

FP = bs.fingerprint({"model": "tiny", "grid": 4, "codebook_size": 64})
HEADER = bs.Header(fingerprint=FP, image_height=512, image_width=384, grid_h=16, grid_w=12,
                   codebook_size=1024, schedule="qlds", schedule_steps=8)   # version 2 (stand-alone)
# the model a version-3 stream expands against: native size 512x512, default schedule qlds:8
MODEL = dataclasses.replace(HEADER, version=3, image_width=512)
GRID = np.arange(16 * 12).reshape(16, 12) % 1024


def _v3_crc(body: bytes, indices=(), key: bytes = FP) -> bytes:
    """The CRC32 a version-3 stream ends with: keyed with the whole fingerprint, then its indices."""
    crc = zlib.crc32(np.asarray(indices, "<u4").tobytes(), zlib.crc32(body, zlib.crc32(key)))
    return body + struct.pack("<I", crc)


# ----------------------------------------------------------------------------- container

@pytest.mark.parametrize("caption", ["", "a photo of a cat on a red sofa", "猫がソファの上で寝ている 🐈‍⬛🛋️",
                                     "emoji only 😀😃😄😁", "x" * 5000, "tab\tnewline\nnul\0 é ß ∑"])
@pytest.mark.parametrize("coding", [bs.CAPTION_DEFLATE, bs.CAPTION_UTF8])
@pytest.mark.parametrize("version", [2, 3, 4, 5])
def test_pack_unpack_round_trip(caption, coding, version):
    header = dataclasses.replace(HEADER if version == 2 else MODEL, caption_coding=coding, version=version,
                                 groups_sent=2 if version == 5 else None)
    payload = bytes(range(256)) * 3
    data = bs.pack(header, caption, payload, indices=GRID, model=MODEL)
    assert data[:5] == b"PRCO\2" if version == 2 else data[0] == 0xA0 | version
    h, c, p = bs.unpack(data, indices=GRID, model=MODEL)
    assert (h, c, p) == (header, caption, payload)


def test_version_4_is_version_3_with_integer_tables():
    """Same layout and CRC rule; only the first byte (and so the CRC) differ; the mismatch message
    no longer blames the machine."""
    v3 = bs.pack(MODEL, "a cat", b"\7" * 10, indices=GRID, model=MODEL)
    v4 = bs.pack(dataclasses.replace(MODEL, version=bs.INTEGER_MODEL_VERSION), "a cat", b"\7" * 10, indices=GRID,
                 model=MODEL)
    assert (v3[0], v4[0]) == (0xA3, 0xA4) and v3[1:-4] == v4[1:-4]
    assert v4 == _v3_crc(v4[:-4], GRID)
    assert bs.unpack(v4, indices=GRID, model=MODEL)[0].version == 4
    with pytest.raises(BitstreamError, match="another integer entropy model"):
        bs.check_crc(v4, GRID + 1, model=MODEL)
    with pytest.raises(BitstreamError, match="decode it where it was encoded"):
        bs.check_crc(v3, GRID + 1, model=MODEL)


def test_version_5_is_version_4_with_the_count_of_groups_sent():
    """A prefix stream: version 4's layout, then the groups sent (a varint) before the caption length;
    it costs one byte for fewer than 128 groups. groups_sent belongs to version 5 alone."""
    v4h = dataclasses.replace(MODEL, version=bs.INTEGER_MODEL_VERSION, caption_coding=bs.CAPTION_UTF8)
    v4 = bs.pack(v4h, "a cat", b"\7" * 10, indices=GRID, model=MODEL)
    for k, extra in ((0, b"\0"), (3, b"\3"), (300, bytes([0xAC, 0x02]))):
        h = dataclasses.replace(v4h, version=bs.PREFIX_VERSION, groups_sent=k)
        v5 = bs.pack(h, "a cat", b"\7" * 10, indices=GRID, model=MODEL)
        assert v5 == _v3_crc(b"\xa5" + v4[1:4] + extra + v4[4:-4], GRID)
        assert bs.unpack(v5, indices=GRID, model=MODEL) == (h, "a cat", b"\7" * 10)
    for bad, match in ((dataclasses.replace(v4h, groups_sent=2), "version-5 field"),
                       (dataclasses.replace(v4h, version=5), "needs groups_sent"),
                       (dataclasses.replace(v4h, version=5, groups_sent=1 << 16), "needs groups_sent"),
                       (dataclasses.replace(v4h, version=5, groups_sent=1, schedule="uniform", schedule_steps=0),
                        "no index groups")):
        with pytest.raises(BitstreamError, match=match):
            bs.pack(bad, "a cat", b"", indices=GRID, model=MODEL)
    v5 = bs.pack(dataclasses.replace(v4h, version=5, groups_sent=1), "a cat", b"\7", indices=GRID, model=MODEL)
    for cut in range(1, len(v5)):
        with pytest.raises(BitstreamError):
            bs.unpack(v5[:cut], indices=GRID, model=MODEL)


def test_layout_and_overhead():
    data = bs.pack(HEADER, "", b"")
    # magic + version + fixed header + two one-byte varints + CRC (raw DEFLATE of "" is 2 bytes)
    assert len(data) == 4 + 1 + 27 + 1 + 2 + 1 + 4
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])
    # version 3, the common case (native size, default schedule): mark, tag, flags, caption
    # length, CRC: 9 bytes of framing
    header = dataclasses.replace(MODEL, caption_coding=bs.CAPTION_UTF8)
    data = bs.pack(header, "a cat", b"\7" * 100, indices=GRID, model=MODEL)
    assert data == _v3_crc(b"\xa3" + FP[:2] + bytes([bs.CAPTION_UTF8 << 2, 5]) + b"a cat" + b"\7" * 100, GRID)
    assert len(data) - 5 - 100 == 9 <= 10
    caption = "a photo of a cat"
    assert zlib.decompress(bs.encode_caption(caption, bs.CAPTION_DEFLATE), wbits=-15) == caption.encode()
    assert bs.smallest_caption_coding("a cat", codings=(bs.CAPTION_DEFLATE, bs.CAPTION_UTF8)) == bs.CAPTION_UTF8
    assert bs.smallest_caption_coding("a cat") == bs.CAPTION_ENGLISH
    assert bs.smallest_caption_coding("a cat " * 20) == bs.CAPTION_DEFLATE


def test_all_schedules_and_uniform_in_header():
    for name in (schedules.UNIFORM,) + schedules.SCHEDULES:
        steps = 5 if name in schedules.STEPPED else 0
        seed = 123 if name in ("random", "cosine") else 0
        for base in (HEADER, MODEL):
            header = dataclasses.replace(base, schedule=name, schedule_steps=steps, schedule_seed=seed)
            assert bs.unpack(bs.pack(header, "c", b"\1", model=MODEL), model=MODEL)[0] == header


@pytest.mark.parametrize("changes,extra", [
    ({}, 0),
    ({"schedule_steps": 12}, 2),                                            # id, steps
    ({"schedule": "checkerboard", "schedule_steps": 0}, 1),                 # id
    ({"schedule": schedules.UNIFORM, "schedule_steps": 0}, 1),
    ({"schedule": "random", "schedule_steps": 300, "schedule_seed": 65535}, 1 + 2 + 3),
    ({"schedule": "cosine", "schedule_steps": 8, "schedule_seed": 0}, 3),
    ({"image_height": 512, "image_width": 384}, 4),                         # two 2-byte varints
    ({"image_height": 1, "image_width": 65535}, 1 + 3),
    ({"image_height": 16, "image_width": 12, "schedule": "quincunx", "schedule_steps": 0}, 2 + 1),
    ({"flags": 0x81}, 1),
    ({"image_height": 2000, "schedule": "qlds", "schedule_steps": 1, "flags": 1, "caption_coding": 2}, 4 + 2 + 1),
])
def test_v3_long_forms_round_trip(changes, extra):
    """Only what differs from the model's common case is sent, and all of it comes back."""
    header = dataclasses.replace(MODEL, **changes)
    data = bs.pack(header, "a cat", b"\1\2\3", indices=GRID, model=MODEL)
    assert bs.unpack(data, indices=GRID, model=MODEL) == (header, "a cat", b"\1\2\3")
    stored = len(bs.encode_caption("a cat", header.caption_coding))
    assert len(data) - stored - 3 == 9 + extra


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _raises(data, match, **kw):
    with pytest.raises(BitstreamError, match=match):
        bs.unpack(data, **kw)


def test_strict_parsing_messages():
    good = bs.pack(HEADER, "a cat", b"\x01\x02\x03")
    _raises(b"GIF89a" + good[6:], "not a perco-jax bitstream")
    _raises(b"", "truncated")
    _raises(b"PR", "truncated")
    _raises(bytes([0xA0 | bs.VERSION + 1]) + good[5:], "newer")
    _raises(good[:4] + b"\0" + good[5:], "unsupported bitstream version 0")
    _raises(good[:4] + b"\3" + good[5:], "unsupported bitstream version 3")  # v3 is never "PRCO"
    _raises(b"\xa2" + good[5:], "not a perco-jax bitstream")
    for cut in (5, 20, 33, len(good) - 5, len(good) - 1):
        _raises(good[:cut], "truncated")
    _raises(good + b"\0", "trailing bytes")
    flipped = bytearray(good)
    flipped[-6] ^= 0x10
    _raises(bytes(flipped), "corrupted")
    _raises("not bytes", "bytes")
    # semantically invalid fields with a valid CRC
    body = bytearray(good[:-4])
    fixed = list(struct.unpack_from("<8sHHHHIBHHBB", body, 5))

    def with_fields(**changes):
        names = ["fp", "ih", "iw", "gh", "gw", "k", "sid", "steps", "seed", "cap", "flags"]
        values = fixed.copy()
        for key, v in changes.items():
            values[names.index(key)] = v
        b = bytearray(body)
        struct.pack_into("<8sHHHHIBHHBB", b, 5, *values)
        return _with_crc(bytes(b))

    _raises(with_fields(sid=99), "unknown masking schedule id 99")
    _raises(with_fields(ih=0), "image_height")
    _raises(with_fields(gw=0), "grid_w")
    _raises(with_fields(k=1), "codebook_size")
    _raises(with_fields(k=1 << 30), "codebook_size")
    _raises(with_fields(steps=0), "schedule_steps")
    _raises(with_fields(cap=7), "caption coding")
    # caption: invalid UTF-8 (stored raw) and invalid DEFLATE
    raw_header = dataclasses.replace(HEADER, caption_coding=bs.CAPTION_UTF8)
    b = bytearray(bs.pack(raw_header, "ab", b"")[:-4])
    b[33:35] = b"\xff\xfe"
    _raises(_with_crc(bytes(b)), "invalid UTF-8")
    b = bytearray(bs.pack(HEADER, "", b"")[:-4])
    _raises(_with_crc(bytes(b[:32]) + b"\x02\xff\xff" + b"\x00"), "DEFLATE")
    # length field pointing past the end, with a valid CRC
    _raises(_with_crc(bytes(b[:32]) + b"\x7f"), "points past the end")
    # non-minimal varint
    _raises(_with_crc(bytes(b[:32]) + b"\x80\x00" + b"\x00"), "non-minimal")


def test_strict_parsing_messages_v3():
    good = bs.pack(MODEL, "a cat", b"\x01\x02\x03", model=MODEL)
    prefix = b"\xa3" + FP[:2]

    def v3(rest: bytes, match):  # a stream with a valid (keyed) CRC: the parser has to find it
        _raises(_v3_crc(prefix + rest), match, model=MODEL)

    for cut in range(len(good)):  # the payload's end is implied: cuts into it fail the CRC
        _raises(good[:cut], "truncated" if cut < len(good) - 3 else "CRC32 mismatch", model=MODEL)
    _raises(good + b"\0", "CRC32 mismatch", model=MODEL)
    v3(b"\x20\x00", "unknown flag bits 0x20")
    v3(b"\x0c\x00", "unknown caption coding 3")
    v3(b"\x00\x05ab", "points past the end")
    v3(b"\x00\x80\x00", "non-minimal caption length")
    v3(b"\x00\x80", "truncated .inside the caption length")
    v3(b"\x01\x80\x04", "truncated .inside the image width")
    v3(b"\x01\x00\x05\x00", "image_height = 0")
    v3(b"\x01\x80\x80\x04\x01\x00", "image_height = 65536")
    v3(b"\x02\x63\x00", "unknown masking schedule id 99")
    v3(bytes([0x02, schedules.schedule_id("qlds")]), "truncated .inside the schedule steps")
    v3(bytes([0x02, schedules.schedule_id("random"), 8]), "truncated .inside the schedule seed")
    v3(bytes([0x02, schedules.schedule_id("qlds"), 0, 0]), "schedule_steps")
    v3(bytes([0x12, schedules.schedule_id("checkerboard")]), "truncated .no codec flags")
    # one encoding per header: a long form that says what the short form says is corruption
    v3(b"\x01\x80\x04\x80\x04\x00", "long form")                            # the native size
    v3(bytes([0x02, schedules.schedule_id("qlds"), 8, 0]), "long form")        # the default schedule
    v3(b"\x10\x00\x00", "long form")                                        # codec flags 0
    # the same bytes, canonical: they parse
    assert bs.unpack(_v3_crc(prefix + b"\x04\x00"), model=MODEL) == (
        dataclasses.replace(MODEL, caption_coding=bs.CAPTION_UTF8), "", b"")


def test_old_versions_still_read():
    """Streams written by the version-1 and -2 packer (bytes recorded from it) read, and the packer
    still writes them byte for byte."""
    v2 = bytes.fromhex("5052434f02771e177a434cb5c50002800110000c00000400000408000000010005612063617403010203a238759a")
    v1 = bytes.fromhex("5052434f01771e177a434cb5c50002800110000c00000400000408000000010005612063617403010203cc306dc3")
    header = dataclasses.replace(HEADER, caption_coding=bs.CAPTION_UTF8)
    assert bs.unpack(v2, indices=GRID) == (header, "a cat", b"\1\2\3")
    assert bs.unpack(v1) == (dataclasses.replace(header, version=1), "a cat", b"\1\2\3")
    assert bs.pack(header, "a cat", b"\1\2\3", indices=GRID) == v2
    assert bs.pack(dataclasses.replace(header, version=1), "a cat", b"\1\2\3") == v1
    with pytest.raises(BitstreamError, match="decoded indices"):
        bs.check_crc(v2, GRID + 1)


def test_crc_covers_the_decoded_indices():
    """Version 2: the CRC continues over the index grid, so indices decoded otherwise than encoded
    (a machine computing the entropy model's probabilities a rounding apart) are caught."""
    grid = np.arange(16 * 12).reshape(16, 12) % 1024
    data = bs.pack(HEADER, "a cat", b"\x01\x02", indices=grid)
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(grid.astype("<u4").tobytes(), zlib.crc32(data[:-4]))
    assert len(data) == len(bs.pack(HEADER, "a cat", b"\x01\x02"))  # no extra bytes
    assert bs.unpack(data, indices=grid)[1:] == ("a cat", b"\x01\x02")
    assert bs.unpack(data, indices=None)[1] == "a cat"  # not checked yet: the caller decodes first
    bs.check_crc(data, grid)
    other = grid.copy()
    other[3, 4] ^= 1
    with pytest.raises(BitstreamError, match="decoded indices"):
        bs.check_crc(data, other)
    with pytest.raises(BitstreamError, match="Codec.read_batch"):
        bs.unpack(data)  # read as a container without indices
    with pytest.raises(BitstreamError, match=r"\[0, 2\^32\)"):
        bs.pack(HEADER, "", b"", indices=[-1])
    # version 3: keyed with the whole fingerprint, then over the indices, no extra bytes either
    data = bs.pack(MODEL, "a cat", b"\x01\x02", indices=grid, model=MODEL)
    assert data == _v3_crc(data[:-4], grid)
    assert len(data) == len(bs.pack(MODEL, "a cat", b"\x01\x02", model=MODEL))
    assert bs.unpack(data, indices=grid, model=MODEL)[1:] == ("a cat", b"\x01\x02")
    assert bs.unpack(data, indices=None, model=MODEL)[1] == "a cat"
    bs.check_crc(data, grid, model=MODEL)
    with pytest.raises(BitstreamError, match="decoded indices"):
        bs.check_crc(data, other, model=MODEL)
    with pytest.raises(BitstreamError, match="Codec.read_batch"):
        bs.unpack(data, model=MODEL)


def test_pack_rejects_invalid_headers():
    with pytest.raises(BitstreamError, match="fingerprint"):
        bs.pack(dataclasses.replace(HEADER, fingerprint=b"short"), "", b"")
    with pytest.raises(BitstreamError, match="takes no steps"):
        bs.pack(dataclasses.replace(HEADER, schedule="checkerboard", schedule_steps=2), "", b"")
    with pytest.raises(BitstreamError, match="unknown schedule"):
        bs.pack(dataclasses.replace(HEADER, schedule="zigzag"), "", b"")
    with pytest.raises(BitstreamError, match="UTF-8"):
        bs.pack(HEADER, "bad surrogate \ud800", b"")
    with pytest.raises(BitstreamError, match="needs model="):
        bs.pack(MODEL, "", b"")
    with pytest.raises(BitstreamError, match="sends no grid_h"):
        bs.pack(dataclasses.replace(MODEL, grid_h=8), "", b"", model=MODEL)
    with pytest.raises(BitstreamError, match="sends no fingerprint"):
        bs.pack(dataclasses.replace(MODEL, fingerprint=bytes(8)), "", b"", model=MODEL)


def test_fingerprint():
    a = bs.fingerprint({"b": 1, "a": [1, 2.5, "x"], "c": {"d": None}})
    b = bs.fingerprint({"c": {"d": None}, "a": [1, 2.5, "x"], "b": 1})
    assert a == b and len(a) == 8
    assert bs.fingerprint({"b": 2}) != bs.fingerprint({"b": 1})
    assert bs.fingerprint({"k": np.int64(3), "v": np.arange(2)}) == bs.fingerprint({"k": 3, "v": [0, 1]})
    header, _, _ = bs.unpack(bs.pack(HEADER, "", b""))
    bs.check_fingerprint(header, FP)
    with pytest.raises(BitstreamError, match="different model/config"):
        bs.check_fingerprint(header, bs.fingerprint({"model": "other"}))


def test_v3_another_model_is_refused(monkeypatch):
    """The 2-byte tag gives the clear message; a model sharing the tag fails the keyed CRC."""
    data = bs.pack(MODEL, "a cat", b"\1", indices=GRID, model=MODEL)
    other = dataclasses.replace(MODEL, fingerprint=bs.fingerprint({"model": "other"}))
    assert other.fingerprint[:2] != FP[:2]
    for indices in (None, GRID):
        _raises(data, f"different model/config .fingerprint tag {FP[:2].hex()}, this model/config has "
                      f"{other.fingerprint.hex()}", indices=indices, model=other)
    same_tag = dataclasses.replace(MODEL, fingerprint=FP[:2] + bytes(6))
    _raises(data, "CRC32 mismatch.*another model/config", indices=GRID, model=same_tag)
    # without a model: the one registered with the stream's tag (a Codec registers itself)
    monkeypatch.setattr(bs, "_MODELS", {})
    _raises(data, "no codec loaded here has its fingerprint tag", indices=GRID)
    bs.register(MODEL)
    assert bs.unpack(data, indices=GRID)[1] == "a cat"
    bs.check_crc(data, GRID)
    bs.register(same_tag)
    _raises(data, "more than one codec", indices=GRID)


@pytest.mark.parametrize("version", [2, 3, 4])
def test_random_corruptions_never_escape(version):
    """As the codec reads: parse, decode the indices, check the CRC over them."""
    rng = np.random.default_rng(1234)
    symbols = rng.integers(0, 64, 40).astype(np.int32)
    model = dataclasses.replace(MODEL, grid_h=8, grid_w=5, codebook_size=64)
    header = dataclasses.replace(model, version=version, schedule=schedules.UNIFORM, schedule_steps=0)
    good = bs.pack(header, "a photo of a cat on a red sofa 🐈", rc.encode_uniform(symbols, 64),
                   indices=symbols, model=model)
    h, _, payload = bs.unpack(good, indices=symbols, model=model)
    np.testing.assert_array_equal(rc.decode_uniform(payload, h.grid_h * h.grid_w, h.codebook_size), symbols)
    outcomes = {"error": 0, "valid": 0}
    for trial in range(1000):
        data = bytearray(good)
        kind = trial % 4
        if kind == 0:    # bit flips
            for _ in range(rng.integers(1, 4)):
                pos = rng.integers(len(data))
                data[pos] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # byte changes
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(len(data))] = rng.integers(256)
        elif kind == 2:  # truncation
            data = data[:rng.integers(len(data))]
        else:            # insertion
            pos = rng.integers(len(data) + 1)
            data[pos:pos] = rng.integers(0, 256, rng.integers(1, 5)).astype(np.uint8).tobytes()
        with time_limit(0.5):
            try:
                header, caption, payload = bs.unpack(bytes(data), indices=None, model=model)
                decoded = rc.decode_uniform(payload, header.grid_h * header.grid_w, header.codebook_size)
                bs.check_crc(bytes(data), decoded, model=model)
                outcomes["valid"] += 1
            except BitstreamError:
                outcomes["error"] += 1
    # a corruption slipping past the CRC32 is a ~2^-32 event; none here
    assert outcomes["error"] == 1000


# ----------------------------------------------------------------------------- range coding

def _sample(rng, probs):
    cdf = np.cumsum(probs, axis=1)
    u = rng.random((len(probs), 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=1), probs.shape[1] - 1).astype(np.int32)


@pytest.mark.parametrize("k,concentration", [(2, 1.0), (64, 0.3), (1024, 0.05), (1024, 1.0)])
def test_range_coding_round_trip_and_rate(k, concentration):
    rng = np.random.default_rng(k)
    sizes = [1, 3, 17, 60, 0, 175]
    probs = [rng.dirichlet(np.full(k, concentration), size=n).astype(np.float32) for n in sizes]
    symbols = [_sample(rng, p) for p in probs]
    data = rc.encode_groups(symbols, probs)
    dec = rc.Decoder(data)
    for s, p in zip(symbols, probs):
        np.testing.assert_array_equal(dec.decode(p), s)
    bits = sum(rc.cross_entropy_bits(s, p) for s, p in zip(symbols, probs) if len(s))
    assert len(data) <= 1.01 * bits / 8 + 8, (len(data), bits / 8)
    assert len(data) >= math.floor(bits / 8) - 8


@pytest.mark.parametrize("k,concentration", [(4, 0.5), (64, 0.3), (1024, 0.05)])
def test_every_prefix_of_groups_is_a_cut_of_the_payload_about_a_byte_over_its_information(k, concentration):
    rng = np.random.default_rng(k)
    over = []
    for trial in range(40):
        sizes = [int(n) for n in rng.integers(0, 12, rng.integers(1, 9))]
        counts = [rc.quantize_counts(rng.dirichlet(np.full(k, concentration), size=n)) if n else
                  np.zeros((0, k), np.int64) for n in sizes]
        symbols = [_sample(rng, c.astype(np.float64)) if len(c) else np.zeros(0, np.int32) for c in counts]
        layers = rc.encode_layers(symbols, counts)
        full = rc.encode_counts(symbols, counts)
        assert len(layers) == len(sizes) + 1 and layers[0] == b"" and layers[-1] == full
        for j, part in enumerate(layers):
            assert full.startswith(part) and (j == 0 or len(part) >= len(layers[j - 1]))
            dec = rc.Decoder(part)
            for s, c in zip(symbols[:j], counts[:j]):
                np.testing.assert_array_equal(dec.decode_counts(c), s)
            if part:  # the shortest: one byte less no longer decodes those groups
                dec = rc.Decoder(part[:-1])
                assert not all(np.array_equal(dec.decode_counts(c), s) for s, c in zip(symbols[:j], counts[:j]))
            bits = sum(rc.count_bits(s, c) for s, c in zip(symbols[:j], counts[:j]) if len(s))
            if 0 < j < len(sizes):
                over.append(len(part) - bits / 8)
        # a cut of a cut is the cut of the whole (what `truncate` relies on)
        j = len(sizes) // 2
        assert rc.prefix_cuts(layers[j], symbols[:j], counts[:j]) == layers[:j + 1]
    assert -1 < np.mean(over) < 1.5, np.mean(over)
    with pytest.raises(ValueError, match="does not decode"):
        rc.prefix_cuts(b"", [np.array([1], np.int32)], [rc.quantize_counts(np.eye(k)[:1])])  # b"" reads as symbol 0


def test_quantized_table_is_exact():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(1000, 0.01), size=50).astype(np.float32)
    p[0] = 0.0                      # all-zero row: uniform
    p[1, :] = 0.0
    p[1, 7] = 1.0                   # one-hot: other symbols keep the floor
    t = rc.quantize_probabilities(p)
    counts = t * (1 << rc.PRECISION)
    np.testing.assert_array_equal(counts, np.round(counts))
    np.testing.assert_array_equal(counts.sum(1), 1 << rc.PRECISION)
    assert counts.min() >= 1
    assert (counts[0, 1:] == counts[0, 1]).all() and counts[0, 0] >= counts[0, 1]  # remainder to the first
    assert counts[1, 7] == (1 << rc.PRECISION) - 999
    np.testing.assert_array_equal(t, rc.quantize_probabilities(p.copy()))  # deterministic
    # a one-hot model codes a surprising symbol at <= PRECISION bits, and it still round trips
    data = rc.encode_groups([np.array([3], np.int32)], [p[1:2]])
    assert rc.Decoder(data).decode(p[1:2])[0] == 3
    with pytest.raises(ValueError):
        rc.quantize_probabilities(np.array([[0.5, np.nan]]))
    with pytest.raises(ValueError):
        rc.encode_groups([np.array([5], np.int32)], [np.full((1, 4), 0.25)])


def test_range_decoder_corruption_raises_coding_error_or_decodes():
    rng = np.random.default_rng(7)
    probs = [rng.dirichlet(np.full(256, 0.1), size=n).astype(np.float32) for n in (8, 32, 88)]
    symbols = [_sample(rng, p) for p in probs]
    good = rc.encode_groups(symbols, probs)
    errors = 0
    for trial in range(200):
        data = bytearray(good)
        if trial % 2:
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        else:
            data = data[:rng.integers(len(data))]
        with time_limit(0.5):
            try:
                dec = rc.Decoder(bytes(data))
                for p in probs:
                    out = dec.decode(p)
                    assert out.shape == (len(p),) and out.min() >= 0 and out.max() < 256
            except CodingError:
                errors += 1
    assert errors > 0  # constriction's own exceptions did occur and were converted
    assert issubclass(CodingError, BitstreamError)


@pytest.mark.parametrize("k", [2, 256, 1024, 1000, 3])
def test_uniform_coding(k):
    rng = np.random.default_rng(k)
    for n in (0, 1, 7, 64, 256):
        s = rng.integers(0, k, n).astype(np.int32)
        data = rc.encode_uniform(s, k)
        bits = math.ceil(math.log2(k))
        assert len(data) == math.ceil(n * bits / 8)
        if k & (k - 1) == 0:
            assert len(data) == math.ceil(n * math.log2(k) / 8)
        np.testing.assert_array_equal(rc.decode_uniform(data, n, k), s)
    with pytest.raises(CodingError, match="bytes"):
        rc.decode_uniform(data + b"\0", 256, k)
    if k == 1000:  # the unused codes 1000..1023 are corruption
        with pytest.raises(CodingError, match="index"):
            rc.decode_uniform(b"\xff\xc0", 1, k)
    with pytest.raises(ValueError):
        rc.encode_uniform(np.array([k]), k)
