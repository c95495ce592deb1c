"""The perco-jax bitstream: a small versioned container with strict parsing.

Versions 3 and 4 (what the codec writes) leave out everything the decoding model already knows;
versions 1 and 2 (a fixed 38-byte frame) are still read. All integers little-endian; varints are
unsigned LEB128 in their minimal form. docs/bitstream.md has the same layouts with the reasons.

Version 4 has the layout of version 3 with the first byte 0xA4 (_MARK | 4); what differs is the
payload's coding tables: a version-4 payload is coded under the integer entropy model's tables
(perco_jax.models.integer_entropy_model: bit-identical on any machine), a version-3 one under the
float model's quantised probabilities (same backend and software on both sides). The codec writes
4 when it holds an integer model, else 3 (`INTEGER_MODEL_VERSION`, `FLOAT_MODEL_VERSION`).

Version 3 (first byte 0xA3 = _MARK | 3: never b"P", so it cannot be taken for a "PRCO" stream):

    size  field
    1     0xA3
    2     fingerprint tag: the first TAG_BYTES bytes of the model's fingerprint (see `fingerprint`)
    1     flags: bit 0 SIZE (an image size follows, else the model's native size), bit 1 SCHEDULE
          (a schedule follows, else the model's default one), bits 2-3 caption coding, bit 4 FLAGS
          (a codec flags byte follows, else 0), bits 5-7 zero
    [2-6] SIZE: image_height, image_width (varints)
    [1-7] SCHEDULE: schedule id (uint8, see perco_jax.schedules), then schedule_steps (varint) for
          the stepped schedules, then schedule_seed (varint) for random / cosine
    [1]   FLAGS: the codec flags byte (nonzero)
    1-5   caption length L (varint)
    L     caption (see below)
    P     index payload: the rest of the stream up to the CRC (its length is implied)
    4     CRC32 keyed with the model's whole 8-byte fingerprint: over the fingerprint, every byte
          before the CRC, then the index grid the payload codes (uint32, row-major)

The model (a `Header` of its common case, Codec.stream_model: fingerprint, native image size,
index grid, codebook size, default schedule) is what the tag and flags expand against: grid and
codebook size are never sent, size and schedule only when they differ from the model's (each
field has one encoding: a long form equal to the short form is refused). Framing of the common
case: 1 + 2 + 1 + 1 + 4 = 9 bytes. A stream with another tag is refused as "made with a different
model/config"; another model sharing the 2-byte tag (a 2^-16 chance) fails the keyed CRC.

Versions 1 and 2 (magic b"PRCO", then the version byte; written only for stand-alone containers):

    offset  size  field
    0       4     magic b"PRCO"
    4       1     version (1 or 2)
    5       27    fixed header, struct "<8sHHHHIBHHBB":
                    fingerprint (8 bytes), image_height, image_width, grid_h, grid_w (uint16 each),
                    codebook_size (uint32), schedule id (uint8), schedule_steps, schedule_seed
                    (uint16 each), caption_coding, flags (uint8)
    32      1-5   caption length L (varint)
            L     caption
            1-5   payload length P (varint)
            P     index payload (range coded or uniform, see perco_jax.codec.range_coding)
            4     CRC32 of every byte before it, continued (version 2) over the index grid

Captions are raw DEFLATE (zlib, wbits=-15), plain UTF-8 or the English-text context model
(perco_jax.codec.caption_coding), per caption_coding.

Why the CRC covers the decoded indices (versions 2 and 3): entropy decoding recomputes the model's
probabilities, and another machine (accelerator, XLA version or flags) may compute them a rounding
apart, which can make the range decoder leave the encoder's path without any error. Covering the
indices turns that into a CRC mismatch at no cost in bytes; the price is that the check runs after
the indices are decoded (`unpack(data, indices=None)`, decode, then `check_crc`).

At ultra-low rates framing is a real part of the rate (~100 bytes per image at 0.003 bpp, 512²):
report bpp with it (`codec.rate_split`).

Parsing is strict: every malformed input raises `BitstreamError` (a ValueError) with a message
saying what is wrong (not a bitstream, newer version, truncated, length past the end, trailing
bytes, CRC mismatch, another model, invalid caption, unknown schedule, impossible sizes); nothing
else escapes and nothing loops on the input.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib

import numpy as np

from perco_jax import schedules
from perco_jax.codec import caption_coding
from perco_jax.codec.caption_coding import MAX_CAPTION_BYTES
from perco_jax.codec.errors import BitstreamError

MAGIC = b"PRCO"           # versions 1 and 2
VERSION = 5               # the newest version: the newest read here
FLOAT_MODEL_VERSION = 3   # what a codec with the float entropy model writes (tables from float probabilities)
INTEGER_MODEL_VERSION = 4  # what a codec with an integer entropy model writes (integer tables)
PREFIX_VERSION = 5        # a version-4 stream cut after its first groups_sent index groups
STANDALONE_VERSION = 2    # the newest one readable without the model (Header's default)
_MARK = 0xA0              # a version >= 3 stream starts with the byte _MARK | version
_FIXED = struct.Struct("<8sHHHHIBHHBB")
_CRC = struct.Struct("<I")
FINGERPRINT_BYTES = 8
TAG_BYTES = 2             # of the fingerprint, in version 3: enough for a clear "another model"

# version-3 flag bits: which fields are sent in their long form (the rest is the model's)
_F_SIZE, _F_SCHEDULE, _F_FLAGS = 0x01, 0x02, 0x10
_F_LONG = _F_SIZE | _F_SCHEDULE | _F_FLAGS
_CODING_SHIFT = 2         # bits 2-3: caption coding
_F_RESERVED = 0xE0
_SEEDED = ("random", "cosine")

CAPTION_DEFLATE = 0   # raw DEFLATE (no zlib header / checksum: the container has a CRC)
CAPTION_UTF8 = 1      # plain UTF-8 (for captions so short that DEFLATE would grow them)
CAPTION_ENGLISH = 2   # range coded under a static English context model (codec/caption_coding.py)
CAPTION_CODINGS = {CAPTION_DEFLATE: "deflate", CAPTION_UTF8: "utf8", CAPTION_ENGLISH: "english"}

MAX_CODEBOOK = 1 << 19        # = range_coding.MAX_ALPHABET
_U16 = 0xFFFF
_MAX_VARINT_BYTES = 5         # lengths < 2^35 (far above any real caption or payload)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Header:
    """What the decoder needs besides the caption and the payload.

    schedule: a name from perco_jax.schedules.SCHEDULES, or "uniform" (fixed-length coding).
    schedule_steps: the number of groups for stepped schedules (qlds, random, cosine; 1..65535),
    0 for the others. schedule_seed: the seed of random / cosine (0..65535), 0 for the others.
    caption_coding: one of CAPTION_CODINGS (see `smallest_caption_coding`). flags: 8 bits for
    the codec, not interpreted here. version: what `pack` writes; 3 and up need the model (see
    `pack`), so the default is STANDALONE_VERSION. groups_sent: version 5 only (None before): how many
    index groups of the schedule the payload holds, fewer than the schedule has (0..65535; the codec
    checks it against the schedule).
    """
    version: int = STANDALONE_VERSION
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
    groups_sent: int | None = None


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
    # (no grid <= image size check: under the RESIZE policy any original size 1..65535 is coded)
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
    if header.schedule in _SEEDED:
        need(_is_int(header.schedule_seed) and 0 <= header.schedule_seed <= _U16,
             f"schedule_seed must be in [0, {_U16}], got {header.schedule_seed!r}")
    else:
        need(header.schedule_seed == 0,
             f"schedule {header.schedule!r} takes no seed, schedule_seed must be 0 (got {header.schedule_seed!r})")
    need(header.caption_coding in CAPTION_CODINGS,
         f"unknown caption coding {header.caption_coding!r} (known: "
         + ", ".join(f"{k}={v}" for k, v in CAPTION_CODINGS.items()) + ")")
    need(_is_int(header.flags) and 0 <= header.flags <= 0xFF, f"flags = {header.flags!r}, must fit in 8 bits")
    if header.version == PREFIX_VERSION:
        need(_is_int(header.groups_sent) and 0 <= header.groups_sent <= _U16,
             f"a version-{PREFIX_VERSION} stream needs groups_sent in [0, {_U16}], got {header.groups_sent!r}")
        need(header.schedule != schedules.UNIFORM, "a uniform-coded stream has no index groups to cut")
    else:
        need(header.groups_sent is None,
             f"groups_sent is a version-{PREFIX_VERSION} field, this header is version {header.version}")


# ----------------------------------------------------------------------------- varints

def varint(n: int) -> bytes:
    """The LEB128 bytes of n >= 0 (7 bits a byte, low first; the top bit says more follow)."""
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
    """(value, new position) of the varint field `what` at pos; it must end before `end`."""
    value = 0
    for k in range(_MAX_VARINT_BYTES):
        if pos + k >= end:
            raise BitstreamError(f"bitstream truncated (inside the {what})")
        byte = data[pos + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            if byte == 0 and k > 0:
                raise BitstreamError(f"corrupted bitstream (non-minimal {what})")
            return value, pos + k + 1
    raise BitstreamError(f"corrupted bitstream ({what} field longer than {_MAX_VARINT_BYTES} bytes)")


def _read_byte(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    if pos >= end:
        raise BitstreamError(f"bitstream truncated (no {what})")
    return data[pos], pos + 1


def _take(data: bytes, pos: int, n: int, end: int, what: str) -> tuple[bytes, int]:
    """(the n bytes of field `what` at pos, new position); they must end by `end`."""
    if n > end - pos:
        raise BitstreamError(f"bitstream truncated or corrupted: the {what} length ({n} bytes) "
                             f"points past the end of the data ({end - pos} bytes left)")
    return data[pos:pos + n], pos + n


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


def decode_caption(stored: bytes, coding: int) -> str:
    """Inverse of encode_caption: the caption of the stored bytes; BitstreamError if they are not
    a caption under `coding` (corrupted, too long, invalid UTF-8, unknown coding)."""
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


# ----------------------------------------------------------------------------- models

_MODELS: dict[bytes, Header] = {}  # full fingerprint -> model header (see `register`)


def register(model: Header) -> Header:
    """Records `model` (a codec's `stream_model`) so that `unpack`, `check_crc` and `rate_split`
    read version-3 streams with its fingerprint tag when no model is passed; returns it.
    (Codec does this for itself: a process reads the streams of the codecs it has loaded.)"""
    validate(model)
    _MODELS[model.fingerprint] = model
    return model


def _other_model(theirs: str, ours: bytes) -> BitstreamError:
    return BitstreamError(
        f"bitstream was made with a different model/config (fingerprint {theirs}, this model/config has "
        f"{bytes(ours).hex()}); decode it with the checkpoint and config that encoded it")


def _model_for(data: bytes, model) -> Header:
    """The model a version-3 stream expands against: `model` if given (its tag must be the
    stream's), else the registered one with the stream's tag."""
    tag = data[1:1 + TAG_BYTES]
    if model is not None:
        if model.fingerprint[:TAG_BYTES] != tag:
            raise _other_model(f"tag {tag.hex()}", model.fingerprint)
        return model
    found = [m for fp, m in _MODELS.items() if fp[:TAG_BYTES] == tag]
    if len(found) != 1:
        raise BitstreamError(
            f"a version-3 bitstream leaves out what its model fixes, and {'no' if not found else 'more than one'} "
            f"codec loaded here has its fingerprint tag {tag.hex()}: read it with the codec that made it "
            f"(Codec.read_batch, or model=codec.stream_model)")
    return found[0]


def _spec(h: Header) -> tuple:
    return h.schedule, h.schedule_steps, h.schedule_seed


def _long_forms(h: Header, model: Header) -> int:
    """The version-3 flag bits of the fields `h` sends: those that differ from the model's."""
    return ((_F_SIZE if (h.image_height, h.image_width) != (model.image_height, model.image_width) else 0)
            | (_F_SCHEDULE if _spec(h) != _spec(model) else 0) | (_F_FLAGS if h.flags else 0))


def _check_model_of(header: Header, model) -> Header:
    if model is None:
        raise BitstreamError(f"version {header.version} leaves out what the model fixes: pack needs "
                             "model= (the codec's stream_model)")
    validate(model)
    for name in ("fingerprint", "grid_h", "grid_w", "codebook_size"):
        if getattr(header, name) != getattr(model, name):
            raise BitstreamError(f"version {header.version} sends no {name}: the header's "
                                 f"({getattr(header, name)!r}) must be the model's ({getattr(model, name)!r})")
    return model


# ----------------------------------------------------------------------------- container

def _crc(body: bytes, version: int, indices, key: bytes = b"") -> int:
    """CRC32 of key + body (+ the index grid, version >= 2); the key is empty before version 3."""
    crc = zlib.crc32(body, zlib.crc32(key))
    if version >= 2:
        grid = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).ravel())
        if grid.size and (grid.min() < 0 or grid.max() > 0xFFFFFFFF):
            raise BitstreamError("indices must be in [0, 2^32)")
        crc = zlib.crc32(grid.astype("<u4").tobytes(), crc)
    return crc


def _frame_v12(h: Header, stored: bytes, payload: bytes) -> bytes:
    fixed = _FIXED.pack(h.fingerprint, h.image_height, h.image_width, h.grid_h, h.grid_w, h.codebook_size,
                        schedules.schedule_id(h.schedule), h.schedule_steps, h.schedule_seed,
                        h.caption_coding, h.flags)
    return b"".join([MAGIC, bytes([h.version]), fixed, varint(len(stored)), stored,
                     varint(len(payload)), payload])


def _schedule_bytes(h: Header) -> bytes:
    return (bytes([schedules.schedule_id(h.schedule)])
            + (varint(h.schedule_steps) if h.schedule in schedules.STEPPED else b"")
            + (varint(h.schedule_seed) if h.schedule in _SEEDED else b""))


def _frame_v3(h: Header, stored: bytes, payload: bytes, model: Header) -> bytes:
    long = _long_forms(h, model)
    parts = [bytes([_MARK | h.version]), model.fingerprint[:TAG_BYTES],
             bytes([long | h.caption_coding << _CODING_SHIFT])]
    if long & _F_SIZE:
        parts += [varint(h.image_height), varint(h.image_width)]
    if long & _F_SCHEDULE:
        parts.append(_schedule_bytes(h))
    if long & _F_FLAGS:
        parts.append(bytes([h.flags]))
    if h.version == PREFIX_VERSION:
        parts.append(varint(h.groups_sent))
    return b"".join(parts + [varint(len(stored)), stored, payload])  # (payload: up to the CRC)


def pack(header: Header, caption: str, payload: bytes, indices=(), model: Header | None = None) -> bytes:
    """The bitstream bytes of (header, caption, payload) in header.version; BitstreamError on
    invalid inputs. `indices`: the index grid [grid_h, grid_w] the payload codes, which the CRC
    also covers (the codec passes it; () for a container without one). `model` (version 3 only):
    the header of the model's common case (Codec.stream_model); header's fingerprint, grid and
    codebook size must be its, and its image size and schedule are sent only where they differ."""
    validate(header)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"payload must be bytes, got {type(payload).__name__}")
    stored = encode_caption(caption, header.caption_coding)
    if header.version < 3:
        body = _frame_v12(header, stored, bytes(payload))
        return body + _CRC.pack(_crc(body, header.version, indices))
    model = _check_model_of(header, model)
    body = _frame_v3(header, stored, bytes(payload), model)
    return body + _CRC.pack(_crc(body, header.version, indices, model.fingerprint))


def _version(data: bytes) -> int:
    """The version of a stream, from its first bytes; BitstreamError if it is not one we read."""
    if data and data[0] & 0xF0 == _MARK and data[0] & 0x0F >= 3:
        if data[0] & 0x0F > VERSION:
            raise BitstreamError(f"bitstream version {data[0] & 0x0F} is newer than this perco-jax reads "
                                 f"(up to {VERSION}); upgrade perco-jax")
        return data[0] & 0x0F
    if data[:4] != MAGIC:
        if len(data) < 4 and MAGIC.startswith(data):
            raise BitstreamError(f"bitstream truncated ({len(data)} bytes)")
        raise BitstreamError("not a perco-jax bitstream (bad magic bytes)")
    if len(data) < 5:
        raise BitstreamError("bitstream truncated (no version byte)")
    if data[4] not in (1, 2):
        raise BitstreamError(f"unsupported bitstream version {data[4]} (a \"PRCO\" stream is version 1 or 2)")
    return data[4]


def check_crc(data: bytes, indices=(), model: Header | None = None) -> None:
    """BitstreamError unless the stream's CRC32 matches its bytes (and, version >= 2, `indices`,
    the index grid decoded from it; and, version 3, the full fingerprint of `model` / of the
    registered model with the stream's tag)."""
    data = bytes(data)
    version = _version(data)
    if len(data) < (1 + TAG_BYTES if version >= 3 else 5) + _CRC.size:
        raise BitstreamError(f"bitstream truncated ({len(data)} bytes)")
    key = _model_for(data, model).fingerprint if version >= 3 else b""
    if _crc(data[:-_CRC.size], version, indices, key) == _CRC.unpack_from(data, len(data) - _CRC.size)[0]:
        return
    other = " (or made with another model/config whose fingerprint starts alike)" if version >= 3 else ""
    if version >= INTEGER_MODEL_VERSION and np.size(indices):
        raise BitstreamError(
            f"bitstream CRC32 mismatch over its bytes and decoded indices: the stream is corrupted{other}, or "
            "it was coded under another integer entropy model (its coding tables are the same on every machine)")
    if version >= 2 and np.size(indices):
        raise BitstreamError(
            f"bitstream CRC32 mismatch over its bytes and decoded indices: the stream is corrupted{other}, or "
            "this machine's entropy model computed other probabilities than the encoder's (another "
            "accelerator, XLA version or XLA flags) and the indices decoded wrongly; decode it where "
            "it was encoded")
    raise BitstreamError(f"corrupted bitstream (CRC32 mismatch){other}" + (
        "; a codec stream's CRC also covers its decoded indices: read it with Codec.read_batch"
        if version >= 2 else ""))


def _unpack_v12(data: bytes, version: int, indices) -> tuple[Header, str, bytes]:
    end = len(data) - _CRC.size  # everything but the CRC
    pos = 5
    if pos + _FIXED.size > end:
        raise BitstreamError(f"bitstream truncated ({len(data)} bytes, the header alone needs "
                             f"{pos + _FIXED.size + 2 + _CRC.size})")
    (fp, ih, iw, gh, gw, k, sid, steps, seed, caption_coding, flags) = _FIXED.unpack_from(data, pos)
    pos += _FIXED.size
    fields = {}
    for what in ("caption", "payload"):
        n, pos = _read_varint(data, pos, end, f"{what} length")
        fields[what], pos = _take(data, pos, n, end, what)
    if pos != end:
        raise BitstreamError(f"{end - pos} trailing bytes after the end of the bitstream")
    if version < 2 or indices is not None:
        check_crc(data, () if indices is None else indices)
    header = Header(version=version, fingerprint=fp, image_height=ih, image_width=iw, grid_h=gh,
                    grid_w=gw, codebook_size=k, schedule=_schedule_name(sid), schedule_steps=steps,
                    schedule_seed=seed, caption_coding=caption_coding, flags=flags)
    validate(header)
    return header, decode_caption(fields["caption"], caption_coding), fields["payload"]


def _schedule_name(sid: int) -> str:
    try:
        return schedules.schedule_name(sid)
    except ValueError as e:
        raise BitstreamError(f"invalid bitstream header: {e}") from e


def _read_schedule(data: bytes, pos: int, end: int) -> tuple[dict, int]:
    """(the schedule fields of a version-3 long-form schedule at pos, new position)."""
    sid, pos = _read_byte(data, pos, end, "schedule id")
    fields = {"schedule": _schedule_name(sid), "schedule_steps": 0, "schedule_seed": 0}
    if fields["schedule"] in schedules.STEPPED:
        fields["schedule_steps"], pos = _read_varint(data, pos, end, "schedule steps")
    if fields["schedule"] in _SEEDED:
        fields["schedule_seed"], pos = _read_varint(data, pos, end, "schedule seed")
    return fields, pos


def _unpack_v3(data: bytes, indices, model) -> tuple[Header, str, bytes]:
    end = len(data) - _CRC.size  # everything but the CRC
    if end < 2 + TAG_BYTES + 1:
        raise BitstreamError(f"bitstream truncated ({len(data)} bytes, a version-3 stream has at least "
                             f"{2 + TAG_BYTES + 1 + _CRC.size})")
    model = _model_for(data, model)
    flags = data[1 + TAG_BYTES]
    if flags & _F_RESERVED:
        raise BitstreamError(f"corrupted bitstream (unknown flag bits {flags & _F_RESERVED:#04x})")
    fields = {"caption_coding": flags >> _CODING_SHIFT & 3, "flags": 0}
    pos = 2 + TAG_BYTES
    if flags & _F_SIZE:
        fields["image_height"], pos = _read_varint(data, pos, end, "image height")
        fields["image_width"], pos = _read_varint(data, pos, end, "image width")
    if flags & _F_SCHEDULE:
        schedule, pos = _read_schedule(data, pos, end)
        fields.update(schedule)
    if flags & _F_FLAGS:
        fields["flags"], pos = _read_byte(data, pos, end, "codec flags")
    if _version(data) == PREFIX_VERSION:
        fields["groups_sent"], pos = _read_varint(data, pos, end, "groups sent")
    n, pos = _read_varint(data, pos, end, "caption length")
    stored, pos = _take(data, pos, n, end, "caption")
    if indices is not None:
        check_crc(data, indices, model)
    header = dataclasses.replace(model, version=_version(data), **fields)
    validate(header)
    if _long_forms(header, model) != flags & _F_LONG:  # one encoding per header
        raise BitstreamError("corrupted bitstream (a field in its long form where the short form applies)")
    return header, decode_caption(stored, header.caption_coding), data[pos:end]


def unpack(data: bytes, indices=(), model: Header | None = None) -> tuple[Header, str, bytes]:
    """(header, caption, payload) of a bitstream; BitstreamError for anything malformed.

    `indices`: the index grid the (version >= 2) CRC also covers; () for a container packed
    without one; None skips the CRC check of a version-2/3 stream, whose indices are not decoded
    yet (the caller runs `check_crc(data, indices)` once they are). `model`: what a version-3
    stream expands against (Codec.stream_model; default: the registered model with the stream's
    fingerprint tag); a stream of another model is refused. Versions 1 and 2 ignore it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"a bitstream is bytes, got {type(data).__name__}")
    data = bytes(data)
    version = _version(data)
    if version >= 3:
        return _unpack_v3(data, indices, model)
    return _unpack_v12(data, version, indices)


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
        raise _other_model(header.fingerprint.hex(), expected)
