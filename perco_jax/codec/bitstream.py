"""The perco-jax bitstream: a small versioned container with strict parsing.

Layout (all integers little-endian):

    offset  size  field
    0       4     magic b"PRCO"
    4       1     version (this module writes and reads VERSION; newer ones are refused)
    5       27    fixed header, struct "<8sHHHHIBHHBB":
                    fingerprint (8 bytes: the model/config that made it, see `fingerprint`),
                    image_height, image_width, grid_h, grid_w (uint16 each),
                    codebook_size (uint32), schedule id (uint8, see perco_jax.schedules),
                    schedule_steps, schedule_seed (uint16 each), caption_coding, flags (uint8)
    32      1-5   caption length L (unsigned LEB128 varint, minimal form)
            L     caption: raw DEFLATE (zlib, wbits=-15), plain UTF-8 or the English-text
                  context model (perco_jax.codec.caption_coding), per caption_coding
            1-5   payload length P (varint)
            P     index payload (range coded or uniform, see perco_jax.codec.range_coding)
            4     CRC32 of every byte before it, continued (version >= 2) over the index grid the
                  payload codes (uint32 little-endian, row-major)

Why the CRC covers the decoded indices: entropy decoding recomputes the model's probabilities, and
another machine (accelerator, XLA version or flags) may compute them a rounding apart, which can
make the range decoder leave the encoder's path without any error. Covering the indices turns that
into a CRC mismatch at no cost in bytes; the price is that the check of a version-2 stream runs
after its indices are decoded (`unpack(data, indices=None)`, decode, then `check_crc`). Version 1
(CRC of the bytes alone) is still read.

At ultra-low rates these 38+ bytes of framing are a real part of the rate: report bpp with them.

Parsing is strict: every malformed input raises `BitstreamError` (a ValueError) with a message
saying what is wrong (not a bitstream, newer version, truncated, length past the end, trailing
bytes, CRC mismatch, invalid caption, unknown schedule, impossible sizes); nothing else escapes
and nothing loops on the input.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib

import numpy as np

from perco_jax import schedules

MAGIC = b"PRCO"
VERSION = 2
_FIXED = struct.Struct("<8sHHHHIBHHBB")
_CRC = struct.Struct("<I")
FINGERPRINT_BYTES = 8

CAPTION_DEFLATE = 0   # raw DEFLATE (no zlib header / checksum: the container has a CRC)
CAPTION_UTF8 = 1      # plain UTF-8 (for captions so short that DEFLATE would grow them)
CAPTION_ENGLISH = 2   # range coded under a static English context model (codec/caption_coding.py)
CAPTION_CODINGS = {CAPTION_DEFLATE: "deflate", CAPTION_UTF8: "utf8", CAPTION_ENGLISH: "english"}

MAX_CAPTION_BYTES = 1 << 16   # decoded UTF-8; SD3's encoders read a few hundred tokens at most
MAX_CODEBOOK = 1 << 19        # = range_coding.MAX_ALPHABET
_U16 = 0xFFFF
_MAX_VARINT_BYTES = 5         # lengths < 2^35 (far above any real caption or payload)


class BitstreamError(ValueError):
    """A bitstream that is not valid for this decoder (with a message saying why)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Header:
    """What the decoder needs besides the caption and the payload.

    schedule: a name from perco_jax.schedules.SCHEDULES, or "uniform" (fixed-length coding).
    schedule_steps: the number of groups for stepped schedules (qlds, random, cosine; 1..65535),
    0 for the others. schedule_seed: the seed of random / cosine (0..65535), 0 for the others.
    caption_coding: one of CAPTION_CODINGS (see `smallest_caption_coding`). flags: 8 bits for
    the codec, not interpreted here.
    """
    version: int = VERSION
    fingerprint: bytes
    image_height: int
    image_width: int
    grid_h: int
    grid_w: int
    codebook_size: int
    schedule: str = schedules.UNIFORM
    schedule_steps: int = 0
    schedule_seed: int = 0
    caption_coding: int = CAPTION_DEFLATE
    flags: int = 0


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate(header: Header) -> None:
    """Raises BitstreamError if the header's fields are impossible or out of range."""
    def need(cond, msg):
        if not cond:
            raise BitstreamError(f"invalid bitstream header: {msg}")

    need(_is_int(header.version) and 1 <= header.version <= VERSION,
         f"version {header.version!r} (supported: 1..{VERSION})")
    need(isinstance(header.fingerprint, bytes) and len(header.fingerprint) == FINGERPRINT_BYTES,
         f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {header.fingerprint!r}")
    for name in ("image_height", "image_width", "grid_h", "grid_w"):
        v = getattr(header, name)
        need(_is_int(v) and 1 <= v <= _U16, f"{name} = {v!r}, must be in [1, {_U16}]")
    need(header.grid_h <= header.image_height and header.grid_w <= header.image_width,
         f"index grid {header.grid_h}x{header.grid_w} is larger than the image "
         f"{header.image_height}x{header.image_width}")
    need(_is_int(header.codebook_size) and 2 <= header.codebook_size <= MAX_CODEBOOK,
         f"codebook_size = {header.codebook_size!r}, must be in [2, {MAX_CODEBOOK}]")
    known = (schedules.UNIFORM,) + schedules.SCHEDULES
    need(header.schedule in known, f"unknown schedule {header.schedule!r} (known: {', '.join(known)})")
    if header.schedule in schedules.STEPPED:
        need(_is_int(header.schedule_steps) and 1 <= header.schedule_steps <= _U16,
             f"schedule {header.schedule!r} needs schedule_steps in [1, {_U16}], got {header.schedule_steps!r}")
    else:
        need(header.schedule_steps == 0,
             f"schedule {header.schedule!r} takes no steps, schedule_steps must be 0 (got {header.schedule_steps!r})")
    if header.schedule in ("random", "cosine"):
        need(_is_int(header.schedule_seed) and 0 <= header.schedule_seed <= _U16,
             f"schedule_seed must be in [0, {_U16}], got {header.schedule_seed!r}")
    else:
        need(header.schedule_seed == 0,
             f"schedule {header.schedule!r} takes no seed, schedule_seed must be 0 (got {header.schedule_seed!r})")
    need(header.caption_coding in CAPTION_CODINGS,
         f"unknown caption coding {header.caption_coding!r} (known: "
         + ", ".join(f"{k}={v}" for k, v in CAPTION_CODINGS.items()) + ")")
    need(_is_int(header.flags) and 0 <= header.flags <= 0xFF, f"flags = {header.flags!r}, must fit in 8 bits")


# ----------------------------------------------------------------------------- varints

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """(value, new position) of the varint at pos; it must end before `end`."""
    value = 0
    for k in range(_MAX_VARINT_BYTES):
        if pos + k >= end:
            raise BitstreamError(f"bitstream truncated (inside the {what} length)")
        byte = data[pos + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            if byte == 0 and k > 0:
                raise BitstreamError(f"corrupted bitstream (non-minimal {what} length)")
            return value, pos + k + 1
    raise BitstreamError(f"corrupted bitstream ({what} length field longer than {_MAX_VARINT_BYTES} bytes)")


# ----------------------------------------------------------------------------- captions

def encode_caption(caption: str, coding: int) -> bytes:
    """Caption bytes as stored under `coding` (one of CAPTION_CODINGS)."""
    if not isinstance(caption, str):
        raise BitstreamError(f"caption must be a str, got {type(caption).__name__}")
    try:
        raw = caption.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BitstreamError(f"caption cannot be encoded as UTF-8: {e}") from e
    if len(raw) > MAX_CAPTION_BYTES:
        raise BitstreamError(f"caption is {len(raw)} bytes of UTF-8, at most {MAX_CAPTION_BYTES} allowed")
    if coding == CAPTION_UTF8:
        return raw
    if coding == CAPTION_DEFLATE:
        comp = zlib.compressobj(level=9, method=zlib.DEFLATED, wbits=-15, memLevel=9)
        return comp.compress(raw) + comp.flush()
    if coding == CAPTION_ENGLISH:
        from perco_jax.codec import caption_coding  # imports this module: not at the top
        return caption_coding.encode(raw)
    raise BitstreamError(f"unknown caption coding {coding!r}")


def smallest_caption_coding(caption: str, codings=None) -> int:
    """The caption coding that stores `caption` in the fewest bytes.

    codings: the ids to choose from (default: all of CAPTION_CODINGS); ties go to the lowest id
    (DEFLATE, then UTF-8, then the English model).
    """
    codings = tuple(CAPTION_CODINGS) if codings is None else tuple(codings)
    if not codings:
        raise ValueError("no caption codings to choose from")
    sizes = {c: len(encode_caption(caption, c)) for c in codings}
    return min(sizes, key=lambda c: (sizes[c], c))


def _decode_caption(stored: bytes, coding: int) -> str:
    if coding == CAPTION_DEFLATE:
        d = zlib.decompressobj(wbits=-15)
        try:
            # max_length bounds the output: a few corrupted bytes cannot inflate to gigabytes
            raw = d.decompress(stored, MAX_CAPTION_BYTES + 1)
        except zlib.error as e:
            raise BitstreamError(f"corrupted caption (invalid DEFLATE data: {e})") from e
        if len(raw) > MAX_CAPTION_BYTES:
            raise BitstreamError(f"caption inflates to more than {MAX_CAPTION_BYTES} bytes")
        if not d.eof or d.unused_data or d.unconsumed_tail:
            raise BitstreamError("corrupted caption (DEFLATE stream incomplete or with extra bytes)")
    elif coding == CAPTION_ENGLISH:
        from perco_jax.codec import caption_coding  # imports this module: not at the top
        # raises CodingError (a BitstreamError); output bounded by MAX_CAPTION_BYTES and len(stored)
        raw = caption_coding.decode(stored)
    elif coding == CAPTION_UTF8:
        raw = stored
        if len(raw) > MAX_CAPTION_BYTES:
            raise BitstreamError(f"caption is more than {MAX_CAPTION_BYTES} bytes")
    else:
        raise BitstreamError(f"unknown caption coding {coding!r}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BitstreamError(f"corrupted caption (invalid UTF-8: {e})") from e


# ----------------------------------------------------------------------------- container

def _crc(body: bytes, version: int, indices) -> int:
    crc = zlib.crc32(body)
    if version >= 2:
        grid = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).ravel())
        if grid.size and (grid.min() < 0 or grid.max() > 0xFFFFFFFF):
            raise BitstreamError("indices must be in [0, 2^32)")
        crc = zlib.crc32(grid.astype("<u4").tobytes(), crc)
    return crc


def pack(header: Header, caption: str, payload: bytes, indices=()) -> bytes:
    """The bitstream bytes of (header, caption, payload); BitstreamError on invalid inputs.
    `indices`: the index grid [grid_h, grid_w] the payload codes, which the CRC also covers (the
    codec passes it; () for a container without one)."""
    validate(header)
    if header.version != VERSION:
        raise BitstreamError(f"this perco-jax writes bitstream version {VERSION} only, got {header.version}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"payload must be bytes, got {type(payload).__name__}")
    stored = encode_caption(caption, header.caption_coding)
    body = b"".join([
        MAGIC, bytes([header.version]),
        _FIXED.pack(header.fingerprint, header.image_height, header.image_width, header.grid_h,
                    header.grid_w, header.codebook_size, schedules.schedule_id(header.schedule),
                    header.schedule_steps, header.schedule_seed, header.caption_coding, header.flags),
        _varint(len(stored)), stored, _varint(len(payload)), bytes(payload)])
    return body + _CRC.pack(_crc(body, header.version, indices))


def check_crc(data: bytes, indices=()) -> None:
    """BitstreamError unless the stream's CRC32 matches its bytes (and, version >= 2, `indices`,
    the index grid decoded from it)."""
    data = bytes(data)
    if len(data) < 5 + _CRC.size:
        raise BitstreamError(f"bitstream truncated ({len(data)} bytes)")
    version = data[4]
    if _crc(data[:-_CRC.size], version, indices) == _CRC.unpack_from(data, len(data) - _CRC.size)[0]:
        return
    if version >= 2 and np.size(indices):
        raise BitstreamError(
            "bitstream CRC32 mismatch over its bytes and decoded indices: the stream is corrupted, or "
            "this machine's entropy model computed other probabilities than the encoder's (another "
            "accelerator, XLA version or XLA flags) and the indices decoded wrongly; decode it where "
            "it was encoded")
    raise BitstreamError("corrupted bitstream (CRC32 mismatch)" + (
        "; a codec stream's CRC also covers its decoded indices: read it with Codec.read_batch"
        if version >= 2 else ""))


def unpack(data: bytes, indices=()) -> tuple[Header, str, bytes]:
    """(header, caption, payload) of a bitstream; BitstreamError for anything malformed.

    `indices`: the index grid the (version >= 2) CRC also covers; () for a container packed
    without one; None skips the CRC check of a version-2 stream, whose indices are not decoded
    yet (the caller runs `check_crc(data, indices)` once they are)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"a bitstream is bytes, got {type(data).__name__}")
    data = bytes(data)
    if data[:4] != MAGIC:
        if len(data) < 4 and MAGIC.startswith(data):
            raise BitstreamError(f"bitstream truncated ({len(data)} bytes)")
        raise BitstreamError("not a perco-jax bitstream (bad magic bytes)")
    if len(data) < 5:
        raise BitstreamError("bitstream truncated (no version byte)")
    version = data[4]
    if version > VERSION:
        raise BitstreamError(f"bitstream version {version} is newer than this perco-jax reads "
                             f"(up to {VERSION}); upgrade perco-jax")
    if version < 1:
        raise BitstreamError(f"unsupported bitstream version {version}")
    end = len(data) - _CRC.size  # everything but the CRC
    pos = 5
    if pos + _FIXED.size > end:
        raise BitstreamError(f"bitstream truncated ({len(data)} bytes, the header alone needs "
                             f"{pos + _FIXED.size + 2 + _CRC.size})")
    (fp, ih, iw, gh, gw, k, sid, steps, seed, caption_coding, flags) = _FIXED.unpack_from(data, pos)
    pos += _FIXED.size
    fields = {}
    for what in ("caption", "payload"):
        n, pos = _read_varint(data, pos, end, what)
        if n > end - pos:
            raise BitstreamError(f"bitstream truncated or corrupted: the {what} length ({n} bytes) "
                                 f"points past the end of the data ({end - pos} bytes left)")
        fields[what] = data[pos:pos + n]
        pos += n
    if pos != end:
        raise BitstreamError(f"{end - pos} trailing bytes after the end of the bitstream")
    if version < 2 or indices is not None:
        check_crc(data, () if indices is None else indices)
    try:
        schedule = schedules.schedule_name(sid)
    except ValueError as e:
        raise BitstreamError(f"invalid bitstream header: {e}") from e
    header = Header(version=version, fingerprint=fp, image_height=ih, image_width=iw, grid_h=gh,
                    grid_w=gw, codebook_size=k, schedule=schedule, schedule_steps=steps,
                    schedule_seed=seed, caption_coding=caption_coding, flags=flags)
    validate(header)
    return header, _decode_caption(fields["caption"], caption_coding), fields["payload"]


# ----------------------------------------------------------------------------- fingerprints

def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot fingerprint an object of type {type(obj).__name__}")


def fingerprint(obj) -> bytes:
    """First 8 bytes of sha256 of the canonical JSON (sorted keys, no spaces) of a config dict.

    Accepts dicts/lists of JSON values, numpy scalars and arrays, and ml_collections ConfigDicts.
    """
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).digest()[:FINGERPRINT_BYTES]


def check_fingerprint(header: Header, expected: bytes) -> None:
    """Raises BitstreamError if the bitstream was made with another model/config than `expected`."""
    if header.fingerprint != expected:
        raise BitstreamError(
            f"bitstream was made with a different model/config (fingerprint {header.fingerprint.hex()}, "
            f"this model/config has {bytes(expected).hex()}); decode it with the checkpoint and config "
            f"that encoded it")
