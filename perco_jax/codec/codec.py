"""compress / decompress of whole images with a trained codec (stage 1 + stage 2).

    Codec.load(folder).compress(image, caption)  -> bytes      (perco_jax.codec.bitstream)
    Codec.load(folder).decompress(bytes)         -> image [H, W, 3] float32 in [0, 1]

Image size policy: RESIZE. An image of any size H x W (RGB, or grey replicated to RGB) is
resized (bicubic, antialiased) to the model's square config.image_size, coded, decoded at
image_size and resized back to H x W (stored in the header), so the output has the input's
size; the aspect ratio is not kept inside the model. Crop beforehand for a centre-crop protocol.

Indices are coded under config.codec.schedule (or the schedule passed in) with the MIM entropy
model, or with fixed-length "uniform" coding. Determinism (see perco_jax/codec/entropy_coding.py):
both sides must build bit-identical coding tables, so that a stream decodes alone or with any
others. A codec with an integer entropy model (`integer_model`: version-4 streams) computes them
in integer arithmetic on the whole batch at once: the same tables whatever the batch, devices or
XLA flags. The float entropy model (version 3: a codec without one) runs on batches of exactly
codec.coding_batch_size images, unsharded, on both sides. The caption input is the captions' T5
token ids (entropy_model.caption_input "tokens": the tokenizer alone, exact anywhere) or their SD3
text context ("context"), which the float text encoders compute on chunks of exactly
coding_batch_size captions, unsharded, for either version (an integer model quantises it to int8:
exact only where the text encoders agree). The image encoder runs coding_batch_size images at a
time, sharded over the local devices when they divide it: its indices are sent, not recomputed.
The decoder (flow sampler + VAE) runs config.sample.batch_size images at a time (fewer: the next
power of two), sharded likewise: images may differ from a 1-device decode or another batch size by
float rounding only.

A codec folder is a perco-jax weights folder (perco_jax.checkpoint) with the components
"codec" (config = the run's whole config, completed on load (`config.complete`) when the folder
predates some of its fields; params {"params", "vq"}: the stage-1 EMA weights),
"entropy_model", "text" (the three SD3 text encoders; config = their module fields),
"autoencoder" (the SD3 VAE or the stage-0 patch autoencoder; absent for space-to-depth), the
tokenizers, and the fingerprint that bitstreams carry; "integer_entropy_model" when it writes
version-4 streams; "few_step" when it has stage 3's few-step decoder (its MM-DiT; config = its
method and the step counts it serves), which `decompress --steps N` uses for those N.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perco_jax import build, schedules
from perco_jax.config import complete
from perco_jax.codec import bitstream, entropy_coding, range_coding
from perco_jax.codec.bitstream import Header
from perco_jax.codec.errors import BitstreamError
from perco_jax.images import resize, to_rgb_float
from perco_jax.models.integer_entropy_model import IntegerEntropyModel

MAX_SIDE = 0xFFFF  # the header stores the original size as uint16


def prepare_image(image, size: int) -> np.ndarray:
    """An image (as `perco_jax.images` takes them: [H, W, 3] / [H, W, 1] / [H, W], float in [0, 1]
    or uint8, or a file; RGBA refused) -> [size, size, 3] float32 in [-1, 1] (the RESIZE policy).
    ValueError for anything else."""
    x = to_rgb_float(image)
    h, w = x.shape[:2]
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise ValueError(f"image size {h}x{w} is outside 1..{MAX_SIDE} pixels per side")
    return resize(x, size, size) * 2.0 - 1.0


def _digest(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint_of(config, codec_params, entropy_params, ae_params=None, integer_model=None) -> bytes:
    """The 8 bytes every bitstream carries: the codec's config sections + a digest of its weights
    (with the autoencoder's when it has learned ones, e.g. a stage-0 patch autoencoder)."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    identity = build.codec_identity(cfg)
    # Where files lay in training, not what the codec is: the stage-0 run (its weights are in the
    # digest) and precomputed text embeddings (the codec runs its own encoders). Left out, one codec
    # exported from two folders writes the same streams, and decodes them to the same images (each
    # image's decoding noise is seeded by its stream).
    identity.pop("autoencoder_workdir", None)
    if isinstance(identity.get("text"), dict):
        identity["text"].pop("embeddings", None)
    return bitstream.fingerprint({"config": identity, "entropy_model": cfg["entropy_model"],
                                  "codec": cfg["codec"],
                                  "weights": _digest([codec_params, entropy_params] + ([ae_params] if ae_params else []))}
                                 | ({"integer_entropy_model": integer_model.digest()} if integer_model is not None else {}))


def _module_fields(m) -> dict:
    out = {}
    for f in dataclasses.fields(m):
        if f.name in ("parent", "name"):
            continue
        v = getattr(m, f.name)
        out[f.name] = str(jnp.dtype(v)) if f.name == "dtype" else v
    return out


@dataclasses.dataclass(eq=False)
class Codec:
    config: ml_collections.ConfigDict
    codec_params: dict       # {"params", "vq"} of the stage-1 model
    entropy_params: dict     # the entropy model's params
    ae_params: dict          # the autoencoder's ({} for space-to-depth)
    text_params: dict        # {"text_encoder", "text_encoder_2", "text_encoder_3"}
    prompt_encoder: object   # perco_jax.text.PromptEncoder
    fingerprint: bytes
    few_step: Optional[dict] = None  # stage 3's decoder: {"params": its MM-DiT, "config": train.stage3.few_step_settings}
    integer_model: object = None     # the integer entropy model (integer_export; version-4 streams) or None

    def __post_init__(self):
        from perco_jax.codec.transforms import make_autoencoder_round_trip, make_decoder, make_encoder

        c = self.config
        self.model = build.build_perco(c)
        self.autoencoder = build.build_autoencoder(c)
        self.entropy_model = build.build_entropy_model(c)
        self.grid = (c.codec.grid_side, c.codec.grid_side)
        self.batch = int(c.codec.coding_batch_size)
        self._encode = make_encoder(self.model, self.autoencoder)
        self._round_trip = make_autoencoder_round_trip(self.autoencoder)
        self._apply = entropy_coding.make_apply_fn(self.entropy_model, {"params": self.entropy_params})
        self._integer = None if self.integer_model is None else entropy_coding.IntegerTables(self.integer_model)
        self._decode = make_decoder(self.model, self.autoencoder, self.prompt_encoder,
                                    max_sequence_length=c.text.max_sequence_length, shift=c.scheduler_shift)
        self._decode_few = None
        if self.few_step is not None:
            from perco_jax.models.perco import with_step_conditioning
            from perco_jax.codec.transforms import few_step_codec, make_few_step_decoder

            self._few_step_codec = few_step_codec(self.codec_params, self.few_step["params"])
            self._decode_few = make_few_step_decoder(with_step_conditioning(self.model), self.autoencoder,
                                                     self.prompt_encoder, max_sequence_length=c.text.max_sequence_length,
                                                     shift=c.scheduler_shift)
        side, channels = build.latent_geometry(c)
        self.latent_shape = (side, side, channels)
        bitstream.register(self.stream_model)  # (rate_split / unpack read this codec's streams alone)

    @property
    def stream_model(self) -> Header:
        """The header of this codec's common case, which version-3 streams leave out: fingerprint,
        index grid and K (never sent), native image size and default schedule (sent only when a
        stream's differ)."""
        c = self.config
        name, steps, seed = schedules.parse_spec(c.codec.schedule)
        version = bitstream.FLOAT_MODEL_VERSION if self.integer_model is None else bitstream.INTEGER_MODEL_VERSION
        return Header(version=version, fingerprint=self.fingerprint, image_height=c.image_size,
                      image_width=c.image_size, grid_h=self.grid[0], grid_w=self.grid[1],
                      codebook_size=c.codec.codebook_size, schedule=name, schedule_steps=steps,
                      schedule_seed=seed)

    # ------------------------------------------------------------------ construction

    def with_integer_model(self, qm: Optional[IntegerEntropyModel]) -> "Codec":
        """This codec with the integer entropy model qm (None: without one) and the fingerprint
        that covers it: it writes version-4 streams (version 3 without one)."""
        fp = fingerprint_of(self.config, self.codec_params, self.entropy_params, self.ae_params, qm)
        return dataclasses.replace(self, integer_model=qm, fingerprint=fp)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write this codec as a weights folder (`perco-jax compress --checkpoint FOLDER`)."""
        from perco_jax.checkpoint import TOKENIZERS, save_weights

        pe = self.prompt_encoder
        text_cfg = {"text_encoder": _module_fields(pe.clip_l), "text_encoder_2": _module_fields(pe.clip_g),
                    "text_encoder_3": _module_fields(pe.t5) if pe.t5 is not None else None,
                    "joint_attention_dim": pe.joint_attention_dim}
        components = {"codec": (self.config.to_dict(), self.codec_params),
                      "entropy_model": (self.config.entropy_model.to_dict(), self.entropy_params),
                      "text": (text_cfg, self.text_params)}
        if jax.tree_util.tree_leaves(self.ae_params):
            section = self.config.patch_autoencoder if self.config.autoencoder == "patch" else self.config.vae
            components["autoencoder"] = (section.to_dict(), self.ae_params)
        if self.few_step is not None:  # (not in the fingerprint: the bitstream does not depend on it)
            components["few_step"] = (self.few_step["config"], self.few_step["params"])
        if self.integer_model is not None:
            components["integer_entropy_model"] = (self.integer_model.config, self.integer_model.to_tree())
        with tempfile.TemporaryDirectory() as tmp:
            dirs = {}
            for name, tok in zip(TOKENIZERS, pe.tokenizers):
                if tok is not None:
                    tok.save_pretrained(str(Path(tmp) / name))
                    dirs[name] = Path(tmp) / name
            return save_weights(folder, components, extra_dirs=dirs,
                                metadata={"kind": "codec", "fingerprint": self.fingerprint.hex()})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Codec":
        """A codec folder written by `Codec.save` (CheckpointError if it is not one)."""
        from perco_jax.checkpoint import CheckpointError, load_weights, read_manifest
        from perco_jax.models.clip import CLIPTextEncoder
        from perco_jax.models.t5 import T5Encoder
        from perco_jax.text.prompt import PromptEncoder

        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest.get("metadata", {}).get("kind") != "codec":
            raise CheckpointError(f"{folder} is a weights folder but not a trained codec (write one with "
                                  "`perco-jax export` or `perco-jax demo`)")
        configs, params = load_weights(folder)
        config = ml_collections.ConfigDict(complete(configs["codec"]))  # (a folder may predate fields)
        tc = configs["text"]

        def module(kind, fields):
            return kind(**{k: (jnp.dtype(v) if k == "dtype" else tuple(v) if isinstance(v, list) else v)
                           for k, v in fields.items()})

        t5 = module(T5Encoder, tc["text_encoder_3"]) if tc.get("text_encoder_3") else None
        encoder = PromptEncoder.from_folder(folder, module(CLIPTextEncoder, tc["text_encoder"]),
                                            module(CLIPTextEncoder, tc["text_encoder_2"]), t5,
                                            joint_attention_dim=tc["joint_attention_dim"],
                                            clip_max_length=build.clip_max_length(config))
        fp = bytes.fromhex(manifest["metadata"]["fingerprint"])
        few = {"params": params["few_step"], "config": configs["few_step"]} if "few_step" in params else None
        integer = (IntegerEntropyModel.from_tree(configs["integer_entropy_model"], params["integer_entropy_model"])
                   if "integer_entropy_model" in params else None)
        return cls(config, params["codec"], params["entropy_model"], params.get("autoencoder", {}),
                   params["text"], encoder, fp, few, integer_model=integer)

    # ------------------------------------------------------------------ pieces

    def _chunks(self, n: int, size: Optional[int] = None):
        """Slices of 0..n in chunks of `size` (default: coding_batch_size)."""
        size = size or self.batch
        for start in range(0, n, size):
            yield slice(start, min(start + size, n))

    def _local_batch(self, tree, size: Optional[int] = None):
        """A chunk's arrays [size, ...] (default: coding_batch_size) split over this host's devices
        when there are several and they divide the chunk (else left for jit to place on one device)."""
        n_dev = jax.local_device_count()
        if n_dev == 1 or (size or self.batch) % n_dev:
            return tree
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        sharding = NamedSharding(Mesh(np.array(jax.local_devices()), ("data",)), P("data"))
        return jax.device_put(tree, sharding)

    def _per_chunk(self, fn, images, tail: tuple) -> np.ndarray:
        """fn applied to prepared images [B, S, S, 3] in chunks of the coding batch (padded): [B, *tail]."""
        images = np.asarray(images, np.float32)
        out = []
        for sl in self._chunks(images.shape[0]):
            x = self._local_batch(entropy_coding.pad_batch(images[sl], self.batch))
            out.append(np.asarray(fn(x))[: sl.stop - sl.start])
        return np.concatenate(out) if out else np.zeros((0,) + tail, np.float32)

    def encode_images(self, images) -> np.ndarray:
        """indices [B, g, g] int32 of prepared images [B, S, S, 3] in [-1, 1]."""
        return self._per_chunk(lambda x: self._encode(self.codec_params, self.ae_params, x), images,
                               self.grid).astype(np.int32)

    def autoencode(self, images) -> np.ndarray:
        """images [B, S, S, 3] in [0, 1] through the codec's autoencoder alone (encode, decode; no z_l,
        no sampler) from prepared images [B, S, S, 3] in [-1, 1]: the ceiling of what any latent the
        flow model draws can show."""
        return self._per_chunk(lambda x: self._round_trip(self.ae_params, x), images, np.shape(images)[1:])

    def context(self, captions: Sequence[str]):
        """The entropy model's caption input: the captions' T5 token ids [n, L] int32 (caption_input
        "tokens": the tokenizer alone, no float network), or their SD3 text context [n, L, D]
        ("context": computed on chunks of exactly coding_batch_size captions, padded with the empty
        prompt), or None (unconditional)."""
        captions = list(captions)
        if self.entropy_model.caption_vocab:
            if self.prompt_encoder.tokenizers[2] is None:
                raise ValueError("this codec's entropy model reads T5 token ids, and it has no T5 tokenizer")
            return self.prompt_encoder.tokenize(captions, self.config.text.max_sequence_length, names=("t5",))["t5"]
        if not self.entropy_model.context_dim:
            return None
        out = []
        for sl in self._chunks(len(captions)):
            chunk = captions[sl] + [""] * (self.batch - (sl.stop - sl.start))
            ctx, _ = self.prompt_encoder(self.text_params, chunk, self.config.text.max_sequence_length)
            out.append(np.asarray(ctx)[: sl.stop - sl.start])
        return jnp.asarray(np.concatenate(out))

    def _groups(self, spec: str):
        name, steps, seed = schedules.parse_spec(spec)
        return name, steps, seed, (None if name == schedules.UNIFORM else schedules.from_spec(spec, *self.grid))

    def coding_model(self, version: Optional[int] = None):
        """(the entropy_coding model, batch_size) that codes the payloads of bitstream `version`
        (default: the version this codec writes): the integer tables for version >= 4 (any batch),
        the float model in chunks of coding_batch_size before."""
        version = self.stream_model.version if version is None else version
        if version < bitstream.INTEGER_MODEL_VERSION:
            return self._apply, self.batch
        if self._integer is None:
            raise BitstreamError(f"a version-{version} stream is coded with an integer entropy model, which "
                                 "this codec does not have (export it again: integer_export)")
        return self._integer, None

    def encode_indices(self, indices, captions: Sequence[str], schedule: Optional[str] = None) -> list[bytes]:
        """Index payloads (no container) of indices [B, g, g] under `schedule` (default: the config's)."""
        name, _, _, groups = self._groups(schedule or self.config.codec.schedule)
        k = self.config.codec.codebook_size
        if groups is None:
            return [range_coding.encode_uniform(x.ravel(), k) for x in np.asarray(indices)]
        model, batch = self.coding_model()
        return entropy_coding.encode_indices(model, indices, groups, self.context(captions), batch_size=batch)

    def rate_bits(self, indices, captions: Sequence[str], schedule: str, version: Optional[int] = None) -> np.ndarray:
        """Model cross-entropy [B] in bits of indices [B, g, g] under `schedule` (no coding), with
        the coding tables of bitstream `version` (default: what this codec writes)."""
        name, _, _, groups = self._groups(schedule)
        if groups is None:
            return np.full(len(indices), float(range_coding.uniform_bits(self.config.codec.codebook_size)
                                               * self.grid[0] * self.grid[1]))
        model, batch = self.coding_model(version)
        return entropy_coding.rate_bits(model, indices, groups, self.context(captions), batch_size=batch)

    def num_groups(self, schedule: Optional[str] = None) -> int:
        """S, the number of index groups of a schedule spec (default: the codec's); ValueError for
        uniform coding, which has none."""
        spec = schedule or self.config.codec.schedule
        groups = self._groups(spec)[3]
        if groups is None:
            raise ValueError(f"schedule {spec!r} codes the indices uniformly: it has no index groups")
        return schedules.num_groups(groups)

    def sent_mask(self, header: Header) -> np.ndarray:
        """Which positions of the index grid [g, g] bool a stream with `header` sends: all of them,
        or for a prefix stream (version 5) those of its first groups_sent groups."""
        if header.groups_sent is None:
            return np.ones(self.grid, bool)
        return schedules.get_schedule(header.schedule, *self.grid, header.schedule_steps or None,
                                      header.schedule_seed) < header.groups_sent

    def _check_prefixes(self, spec: str) -> np.ndarray:
        """groups [g, g] of `spec`, for a prefix stream; ValueError where there can be none."""
        groups = self._groups(spec)[3]
        if groups is None:
            raise ValueError(f"schedule {spec!r} codes the indices uniformly: there are no index groups to send "
                             "a prefix of (use a masking schedule)")
        if self.integer_model is None:
            raise ValueError("prefix streams (groups / max_bytes / target_bpp) are cut from version-4 streams, which "
                             "need the codec's integer entropy model: export it (perco-jax export)")
        return groups

    def _budgets(self, sizes, max_bytes, target_bpp) -> list:
        """Bytes allowed per image (None: no limit) of max_bytes (an int, or one per image) or
        target_bpp (a float: floor(bpp * H * W / 8) of the image's own size)."""
        if max_bytes is not None and target_bpp is not None:
            raise ValueError("give max_bytes or target_bpp, not both")
        if target_bpp is not None:
            if not (isinstance(target_bpp, (int, float)) and target_bpp > 0):
                raise ValueError(f"target_bpp={target_bpp!r}: need a number > 0")
            return [int(target_bpp * h * w / 8) for h, w in sizes]
        if max_bytes is None:
            return [None] * len(sizes)
        budgets = [max_bytes] * len(sizes) if np.ndim(max_bytes) == 0 else list(max_bytes)
        if len(budgets) != len(sizes) or not all(isinstance(b, (int, np.integer)) and b >= 1 for b in budgets):
            raise ValueError(f"max_bytes={max_bytes!r}: need an integer >= 1, or one per image ({len(sizes)})")
        return budgets

    def _prefix_stream(self, header: Header, caption: str, grid, prefixes: Sequence[bytes], groups: np.ndarray,
                       most: Optional[int], budget: Optional[int]) -> Optional[bytes]:
        """The stream of the most index groups, at most `most` (None: all), that fits in `budget`
        bytes (None: any): version 4 when it sends all S groups, else version 5 (groups_sent = k),
        whose CRC covers the grid [g, g] with the positions not sent as 0. prefixes: the payloads of
        0, 1, ... groups (`entropy_coding.encode_prefixes`, `cut_prefixes`) of the schedule's groups
        [g, g]. None when not even 0 groups fit."""
        s = schedules.num_groups(groups)
        model = self.stream_model
        top = len(prefixes) - 1
        for k in range(top if most is None else min(int(most), top), -1, -1):
            h = dataclasses.replace(header, version=model.version if k == s else bitstream.PREFIX_VERSION,
                                    groups_sent=None if k == s else k)
            stream = bitstream.pack(h, caption, prefixes[k], indices=np.where(groups < k, grid, 0), model=model)
            if budget is None or len(stream) <= budget:
                return stream
        return None

    def _caption_bytes(self, header: Header, caption: str) -> int:
        """Bytes of the smallest stream of `caption` under `header`: no index group (version 5)."""
        h = dataclasses.replace(header, version=bitstream.PREFIX_VERSION, groups_sent=0,
                                caption_coding=bitstream.smallest_caption_coding(caption))
        return len(bitstream.pack(h, caption, b"", indices=np.zeros(self.grid, np.int64), model=self.stream_model))

    def _fitting_caption(self, header: Header, caption: str, budget: int) -> Optional[str]:
        """The caption's longest prefix of whole tokens (`text_modes.truncate_tokens`, T5's tokens)
        whose stream of no index group fits in `budget` bytes; None when not even the empty one does."""
        from perco_jax.captions.text_modes import truncate_tokens, truncation_tokenizer

        tok = truncation_tokenizer(self.prompt_encoder.tokenizers)
        for n in range(len(tok(caption, add_special_tokens=False, truncation=False)["input_ids"]), -1, -1):
            short = truncate_tokens(caption, n, tok)
            if self._caption_bytes(header, short) <= budget:
                return short
        return None

    # ------------------------------------------------------------------ compress

    def compress_batch(self, images: Sequence, captions: Optional[Sequence[str]] = None,
                       schedule: Optional[str] = None, *, groups: Optional[int] = None,
                       max_bytes=None, target_bpp: Optional[float] = None, shorten_captions: bool = False) -> list[bytes]:
        """One bitstream per image (any sizes; see the RESIZE policy); captions default to "".

        A prefix of the index groups instead of all of them (a codec with an integer entropy model
        and a masking schedule; docs/bitstream.md, version 5): groups=K sends the first K of the
        schedule's S groups (0 <= K <= S; K = S is the full stream). max_bytes (an int, or one per
        image) or target_bpp (of each image's own size) sends, per image, the most groups (at most
        `groups` when given too) whose whole stream fits. Where the header and caption alone do not
        fit: ValueError, or with shorten_captions the caption's longest prefix of whole T5 tokens
        that fits (and then the most groups that still do). The decoder predicts the groups not sent
        (`read_batch`)."""
        captions = [""] * len(images) if captions is None else [str(c) for c in captions]
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        spec = schedule or self.config.codec.schedule
        name, steps, seed, _ = self._groups(spec)
        sizes = [np.shape(im)[:2] for im in images]
        prefix = groups is not None or max_bytes is not None or target_bpp is not None
        if prefix:
            group_map = self._check_prefixes(spec)
            if groups is not None and not (isinstance(groups, (int, np.integer)) and 0 <= groups <= group_map.max() + 1):
                raise ValueError(f"groups={groups!r}: need an integer in [0, {group_map.max() + 1}] (the schedule "
                                 f"{spec!r} has {group_map.max() + 1} groups)")
            budgets = self._budgets(sizes, max_bytes, target_bpp)
        prepared = np.stack([prepare_image(im, self.config.image_size) for im in images]) if len(images) else \
            np.zeros((0,) + (self.config.image_size,) * 2 + (3,), np.float32)
        indices = self.encode_images(prepared)
        model = bitstream.register(self.stream_model)  # (the fingerprint may have changed since __init__)
        headers = [dataclasses.replace(model, image_height=int(h), image_width=int(w), schedule=name,
                                       schedule_steps=steps, schedule_seed=seed,
                                       caption_coding=bitstream.smallest_caption_coding(caption))
                   for (h, w), caption in zip(sizes, captions)]
        if not prefix:
            payloads = self.encode_indices(indices, captions, spec)
            return [bitstream.pack(header, caption, payload, indices=grid, model=model)  # (the CRC covers them)
                    for header, caption, payload, grid in zip(headers, captions, payloads, indices)]
        if shorten_captions and max_bytes is None and target_bpp is None:
            raise ValueError("shorten_captions needs a budget: max_bytes or target_bpp")
        coder, batch = self.coding_model()
        prefixes = entropy_coding.encode_prefixes(coder, indices, group_map, self.context(captions), batch_size=batch)
        out = [self._prefix_stream(h, c, grid, p, group_map, groups, b)
               for h, c, grid, p, b in zip(headers, captions, indices, prefixes, budgets)]
        over = [i for i, x in enumerate(out) if x is None]
        if over and shorten_captions:
            short = {i: self._fitting_caption(headers[i], captions[i], budgets[i]) for i in over}
            again = [i for i in over if short[i] is not None]
            if again:  # (another caption: the entropy model's tables change, so its groups are coded again)
                redone = entropy_coding.encode_prefixes(coder, indices[again], group_map,
                                                        self.context([short[i] for i in again]), batch_size=batch)
                for i, p in zip(again, redone):
                    h = dataclasses.replace(headers[i], caption_coding=bitstream.smallest_caption_coding(short[i]))
                    out[i] = self._prefix_stream(h, short[i], indices[i], p, group_map, groups, budgets[i])
        for i in over:
            if out[i] is None:
                raise ValueError(f"image {i}: its smallest stream (header and caption, no index group) takes "
                                 f"{self._caption_bytes(headers[i], captions[i])} bytes, over the budget of {budgets[i]}"
                                 + ("" if shorten_captions else " (shorten_captions: cut the caption to fit)"))
        return out

    def compress(self, image, caption: str = "", schedule: Optional[str] = None, **prefix) -> bytes:
        """compress_batch of one image (prefix: groups / max_bytes / target_bpp)."""
        return self.compress_batch([image], [caption], schedule, **prefix)[0]

    def truncate_batch(self, streams: Sequence[bytes], *, groups: Optional[int] = None, max_bytes=None,
                       target_bpp: Optional[float] = None) -> list[bytes]:
        """Streams cut to fewer index groups without the image: the most groups, at most `groups` and
        at most the stream's own, whose stream fits max_bytes / target_bpp (as compress_batch). Each
        cut is a prefix of the stream's payload (its last byte possibly one higher), byte for byte
        what compress_batch(..., groups=k) writes. It runs the entropy model (the decoder's S passes,
        then the encoder's) to find where the groups end: the payload does not store it."""
        streams = [bytes(s) for s in streams]
        if groups is None and max_bytes is None and target_bpp is None:
            raise ValueError("truncate needs groups, max_bytes or target_bpp")
        headers, captions, indices = self.read_batch(streams)
        budgets = self._budgets([(h.image_height, h.image_width) for h in headers], max_bytes, target_bpp)
        out: list = [None] * len(streams)
        by_spec: dict[tuple, list[int]] = {}
        for i, h in enumerate(headers):
            by_spec.setdefault((h.schedule, h.schedule_steps, h.schedule_seed), []).append(i)
        for (name, steps, seed), rows in by_spec.items():
            spec = schedules.spec_string(name, steps, seed)
            group_map = self._check_prefixes(spec)
            if headers[rows[0]].version < bitstream.INTEGER_MODEL_VERSION:
                raise ValueError(f"a version-{headers[rows[0]].version} stream has no prefixes (it is coded with the "
                                 "float entropy model): compress the image again with an exported codec")
            coder, batch = self.coding_model()
            payloads = [bitstream.unpack(streams[i], indices=None, model=self.stream_model)[2] for i in rows]
            sent = [headers[i].groups_sent for i in rows]
            sent = [schedules.num_groups(group_map) if k is None else k for k in sent]
            prefixes = entropy_coding.cut_prefixes(coder, payloads, indices[rows], group_map,
                                                   self.context([captions[i] for i in rows]), batch, sent)
            for i, p, k in zip(rows, prefixes, sent):
                most = k if groups is None else min(int(groups), k)
                out[i] = self._prefix_stream(dataclasses.replace(headers[i], version=self.stream_model.version,
                                                                 groups_sent=None),
                                             captions[i], indices[i], p, group_map, most, budgets[i])
                if out[i] is None:
                    raise ValueError(f"stream {i}: its smallest stream (header and caption, no index group) takes "
                                     f"{self._caption_bytes(headers[i], captions[i])} bytes, over the budget of "
                                     f"{budgets[i]}")
        return out

    def truncate(self, stream: bytes, **cut) -> bytes:
        """truncate_batch of one stream."""
        return self.truncate_batch([stream], **cut)[0]

    # ------------------------------------------------------------------ decompress

    def read_batch(self, streams: Sequence[bytes], *, fill_temperature: float = 0.0,
                   seed: int = 0) -> tuple[list[Header], list[str], np.ndarray]:
        """(headers, captions, indices [B, g, g]) of bitstreams; BitstreamError (a ValueError) on
        malformed, corrupted or foreign streams, and on indices that decode differently from the
        encoder's (the CRC covers them: see codec/bitstream.py). Reads every bitstream version.
        A prefix stream's groups not sent (`sent_mask`) are the entropy model's predictions, in
        schedule order (`entropy_coding.predict`: argmax at fill_temperature 0, else drawn from
        the generator of (seed, CRC32 of the stream): the same in any batch)."""
        if not fill_temperature >= 0:
            raise ValueError(f"fill_temperature={fill_temperature!r}: need a number >= 0")
        streams = [bytes(s) for s in streams]
        model = self.stream_model
        parsed = [bitstream.unpack(s, indices=None, model=model) for s in streams]  # (CRC checked once decoded)
        k = self.config.codec.codebook_size
        for header, _, _ in parsed:
            bitstream.check_fingerprint(header, self.fingerprint)
            if (header.grid_h, header.grid_w) != self.grid or header.codebook_size != k:
                raise BitstreamError(f"bitstream holds a {header.grid_h}x{header.grid_w} grid of K={header.codebook_size}, "
                                     f"this codec codes {self.grid[0]}x{self.grid[1]}, K={k}")
        indices = np.zeros((len(parsed),) + self.grid, np.int32)
        by_spec: dict[tuple, list[int]] = {}
        for i, (h, _, _) in enumerate(parsed):
            # (a prefix stream is coded as a version-4 one: they decode together)
            by_spec.setdefault((h.schedule, h.schedule_steps, h.schedule_seed,
                                min(h.version, bitstream.INTEGER_MODEL_VERSION)), []).append(i)
        for (name, steps, sched_seed, version), rows in by_spec.items():
            if name == schedules.UNIFORM:
                for i in rows:
                    indices[i] = range_coding.decode_uniform(parsed[i][2], self.grid[0] * self.grid[1], k).reshape(self.grid)
                continue
            groups = schedules.get_schedule(name, *self.grid, steps or None, sched_seed)
            s_all = schedules.num_groups(groups)
            sent = [s_all if parsed[i][0].groups_sent is None else parsed[i][0].groups_sent for i in rows]
            for i, k in zip(rows, sent):
                if parsed[i][0].groups_sent is not None and k >= s_all:
                    raise BitstreamError(f"corrupted bitstream: a prefix stream of {k} index groups, its schedule has "
                                         f"{s_all} (a stream of all of them is version {bitstream.INTEGER_MODEL_VERSION})")
            captions = [parsed[i][1] for i in rows]
            coder, batch = self.coding_model(version)
            indices[rows] = entropy_coding.decode_indices(
                coder, [parsed[i][2] for i in rows], self.grid, groups, self.context(captions), batch_size=batch,
                sent=sent, fill_temperature=fill_temperature, fill_seeds=[(seed, zlib.crc32(streams[i])) for i in rows])
        for s, (h, _, _), grid in zip(streams, parsed, indices):
            bitstream.check_crc(s, np.where(self.sent_mask(h), grid, 0), model=model)
        return [p[0] for p in parsed], [p[1] for p in parsed], indices

    @functools.cached_property
    def _empty_tokens(self) -> dict:
        """The empty prompt's token ids (the unconditional branch of guidance), tokenised once."""
        return self.prompt_encoder.tokenize([""], self.config.text.max_sequence_length)

    @property
    def few_step_counts(self) -> tuple[int, ...]:
        """The step counts the few-step decoder serves (none without one)."""
        return tuple(self.few_step["config"]["steps"]) if self.few_step is not None else ()

    def decode_images(self, indices, captions: Sequence[str], noise_ids=None, *, steps: Optional[int] = None,
                      guidance: Optional[float] = None, seed: int = 0, sampler: str = "auto",
                      stochastic: Optional[bool] = None, temperature: Optional[float] = None) -> np.ndarray:
        """images [B, S, S, 3] in [0, 1] from indices [B, g, g] and captions (the flow sampler);
        image j starts from the noise of (seed, noise_ids[j]) (default ids 0..B-1). sampler: "auto"
        (the few-step decoder for the step counts it serves, else the guided teacher sampler),
        "teacher" or "few_step" (whose guidance was fixed in training: `guidance` is not used).
        stochastic: the teacher's steps re-noise with fresh noise of (seed, noise_ids[j]) instead of
        following the Euler ODE (`flow.stochastic_sample`); default the config's sample.stochastic.
        temperature: the samplers' noise scale (`transforms.guided_latents`, `few_step_latents`);
        default the config's sample.temperature. The few-step decoder is always deterministic."""
        steps = int(steps or self.config.sample.steps)
        if sampler not in ("auto", "teacher", "few_step"):
            raise ValueError(f"sampler={sampler!r}: auto, teacher or few_step")
        if sampler == "few_step" and self._decode_few is None:
            raise ValueError("this codec has no few-step decoder (export it with a stage-3 run: --stage3)")
        few = sampler == "few_step" or (sampler == "auto" and steps in self.few_step_counts)
        decode, params = (self._decode_few, self._few_step_codec) if few else (self._decode, self.codec_params)
        guidance = jnp.float32(self.config.sample.guidance if guidance is None else guidance)
        stochastic = bool(self.config.sample.stochastic if stochastic is None else stochastic)
        temperature = jnp.float32(self.config.sample.temperature if temperature is None else temperature)
        if not temperature >= 0:
            raise ValueError(f"temperature={float(temperature)}: need a number >= 0")
        from perco_jax.codec.transforms import initial_noise, noise_keys

        n = len(captions)
        ids = np.arange(n) if noise_ids is None else noise_ids
        noise = np.asarray(initial_noise(seed, ids, self.latent_shape))
        keys = np.asarray(noise_keys(seed, ids)) if stochastic and not few else None
        empty = self._empty_tokens
        out = []
        # chunks of sample.batch_size; fewer images pad to the next power of two only (one image costs
        # one image's decode, and at most log2(batch_size) + 1 programs are compiled)
        size = min(int(self.config.sample.batch_size), 1 << max(n - 1, 0).bit_length())
        for sl in self._chunks(n, size):
            chunk = list(captions[sl]) + [""] * (size - (sl.stop - sl.start))
            tokens, idx, z, k = self._local_batch((
                self.prompt_encoder.tokenize(chunk, self.config.text.max_sequence_length),
                entropy_coding.pad_batch(np.asarray(indices[sl]), size),
                entropy_coding.pad_batch(noise[sl], size),
                None if keys is None else entropy_coding.pad_batch(keys[sl], size)), size)
            x = decode(params, {"autoencoder": self.ae_params, "text": self.text_params},
                       idx, tokens, empty, z, k, guidance, temperature, steps=steps)
            out.append(np.asarray(x)[: sl.stop - sl.start])
        side = self.config.image_size
        return np.concatenate(out) if out else np.zeros((0, side, side, 3), np.float32)

    def decompress_batch(self, streams: Sequence[bytes], *, steps: Optional[int] = None,
                         guidance: Optional[float] = None, seed: int = 0, sampler: str = "auto",
                         stochastic: Optional[bool] = None, temperature: Optional[float] = None,
                         fill_temperature: float = 0.0) -> list[np.ndarray]:
        """Images [H, W, 3] float32 in [0, 1], each at its original size. An image's sampler noise
        comes from (seed, CRC32 of its stream): the same stream and seed give the same image in
        any batch (up to float rounding). Options as `decode_images`'; fill_temperature: how a
        prefix stream's missing index groups are predicted (`read_batch`)."""
        headers, captions, indices = self.read_batch(streams, fill_temperature=fill_temperature, seed=seed)
        ids = [zlib.crc32(bytes(s)) for s in streams]
        images = self.decode_images(indices, captions, ids, steps=steps, guidance=guidance, seed=seed, sampler=sampler,
                                    stochastic=stochastic, temperature=temperature)
        out = []
        for h, im in zip(headers, images):
            if (h.image_height, h.image_width) != im.shape[:2]:
                im = resize(im, h.image_height, h.image_width)
            out.append(im)
        return out

    def decompress(self, stream: bytes, **kw) -> np.ndarray:
        return self.decompress_batch([stream], **kw)[0]


def rate_split(stream: bytes, model: Optional[Header] = None) -> dict:
    """Bytes of a bitstream split into caption, indices and container (all the framing: header
    fields, lengths, CRC), the pixels of its image, and the index groups it sends (groups_sent:
    None for all of them, k for a prefix stream). `model`: the codec's stream_model, which a
    version-3 stream needs (default: the codec loaded in this process with the stream's tag)."""
    header, caption, payload = bitstream.unpack(stream, indices=None, model=model)  # (sizes only: no decoding)
    cap = len(bitstream.encode_caption(caption, header.caption_coding))
    return {"total": len(stream), "caption": cap, "indices": len(payload),
            "container": len(stream) - cap - len(payload), "pixels": header.image_height * header.image_width,
            "groups_sent": header.groups_sent}
