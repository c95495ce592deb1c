"""Captions: the English-text caption coder (bitstream caption coding 2), the captioner run through
transformers (a tiny random BLIP-2 built here), the caption cache and the text configurations."""
import dataclasses
import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.reference import time_limit
from perco_jax.captions import captioner as cap, text_modes
from perco_jax.captions.cache import CaptionCache, image_key
from perco_jax.codec import bitstream as bs
from perco_jax.codec.errors import BitstreamError
from perco_jax.codec import caption_coding as cc

DATA = Path(__file__).parent / "data" / "captions.txt"
CAPTIONS = DATA.read_text(encoding="utf-8").splitlines()
HEADER = bs.Header(fingerprint=bs.fingerprint({"test": "captions"}), image_height=512, image_width=512,
                   grid_h=16, grid_w=16, codebook_size=256)

UNICODE = [
    "",
    "a",
    " ",
    "A photo of a cat on a red sofa.",
    "猫がソファの上で寝ている 🐈‍⬛🛋️",
    "一只猫坐在窗台上，看着外面的雨。",
    "고양이가 창가에 앉아 있다",
    "emoji only 😀😃😄😁👩🏽‍🚀🏳️‍🌈",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0334\u0322a\u0300\u0301l\u0327g\u0316o\u0489",
    "Ελληνικά, русский, العربية, עברית, हिन्दी, ไทย",
    "tab\tnewline\nnul\0 bell\a del\x7f é ß ∑ \ufeff \U0010ffff \ue000",
    "x" * 5000,
    "A dog running on the beach. " * 400,      # 11 KB of English
    "\U0001F600" * 600,
]




def _deflate(text: str) -> int:
    return len(bs.encode_caption(text, bs.CAPTION_DEFLATE))


# ----------------------------------------------------------------------------- the caption coder

def test_data_and_corpus():
    assert len(CAPTIONS) == 200 and len(set(CAPTIONS)) == 200 and all(c.strip() == c and c for c in CAPTIONS)
    corpus = cc.corpus_lines(cc.read_corpus())
    assert len(corpus) >= 500
    # the model is not built from the test set
    assert not set(CAPTIONS) & {line.decode() for line in corpus}
    assert hashlib.sha256(cc.read_corpus()).hexdigest() == cc.CORPUS_SHA256


def test_coding_is_pinned():
    # changing the corpus or the model's constants changes every coded caption: that needs a new
    # caption coding id (old bitstreams must keep decoding)
    assert cc.encode_text("A cat sitting on a red sofa next to a window.").hex() == "1600fe96650391"
    assert cc.encode_text("").hex() == "fff4"
    assert (cc.ORDER, cc.DISCOUNT, cc.BETA, cc.P_MAX) == (5, 0.75, 1.0, 0.9375)
    assert bs.CAPTION_CODINGS == {0: "deflate", 1: "utf8", 2: "english"}


@pytest.mark.parametrize("text", UNICODE, ids=range(len(UNICODE)))
def test_round_trip_unicode(text):
    data = cc.encode_text(text)
    assert cc.decode_text(data) == text
    assert bs.decode_caption(bs.encode_caption(text, bs.CAPTION_ENGLISH), bs.CAPTION_ENGLISH) == text
    coding = bs.smallest_caption_coding(text)
    header = dataclasses.replace(HEADER, caption_coding=coding)
    assert bs.unpack(bs.pack(header, text, b"\1\2"))[1] == text
    h2 = dataclasses.replace(HEADER, caption_coding=bs.CAPTION_ENGLISH)
    assert bs.unpack(bs.pack(h2, text, b""))[1] == text


def test_round_trip_random_strings():
    rng = np.random.default_rng(8)
    texts = []
    for n in (1, 2, 3, 7, 30, 200, 1500):
        raw = rng.integers(0, 256, n).astype(np.uint8).tobytes()
        texts.append(raw.decode("utf-8", errors="replace"))          # random bytes as text
        cps = rng.integers(0, 0x110000, max(1, n // 4))
        texts.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))  # no surrogates
        pool = list("abc xyz.,!?ÉçЖ中😀\u0301\u200d") + ["the ", "a photo of "]
        texts.append("".join(pool[i] for i in rng.integers(0, len(pool), n)))
    texts.append(("A dog. " * 3000)[:cc.MAX_CAPTION_BYTES])           # long, and at the size limit
    texts.append("\U0001F3F3\uFE0F\u200D\U0001F308" * 40)             # emoji ZWJ sequences
    texts.append("a\u0300" * 300)                                     # combining marks
    for text in texts:
        assert cc.decode_text(cc.encode_text(text)) == text, text[:40]
        assert bs.decode_caption(bs.encode_caption(text, bs.CAPTION_ENGLISH), bs.CAPTION_ENGLISH) == text
    big = "x" * (cc.MAX_CAPTION_BYTES + 1)
    with pytest.raises(BitstreamError, match="at most"):
        bs.encode_caption(big, bs.CAPTION_ENGLISH)


def test_beats_deflate_on_real_captions(capsys):
    utf8 = [len(c.encode("utf-8")) for c in CAPTIONS]
    deflate = [_deflate(c) for c in CAPTIONS]
    english = [len(bs.encode_caption(c, bs.CAPTION_ENGLISH)) for c in CAPTIONS]
    smallest = [len(bs.encode_caption(c, bs.smallest_caption_coding(c))) for c in CAPTIONS]
    with capsys.disabled():
        print(f"\nbytes per caption over {len(CAPTIONS)} captions (mean): utf8 {np.mean(utf8):.2f}, "
              f"deflate {np.mean(deflate):.2f}, english {np.mean(english):.2f}, smallest {np.mean(smallest):.2f}; "
              f"english = {8 * sum(english) / sum(utf8):.2f} bits per UTF-8 byte")
    assert sum(english) < sum(deflate)
    assert sum(english) < 0.4 * sum(deflate)           # measured: about 0.25
    assert sum(e < d for e, d in zip(english, deflate)) == len(CAPTIONS)
    assert all(bs.smallest_caption_coding(c) == bs.CAPTION_ENGLISH for c in CAPTIONS)


def test_smallest_never_expands():
    rng = np.random.default_rng(2)
    randoms = [rng.integers(0, 256, n).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
               for n in (1, 5, 50, 500)]
    for text in CAPTIONS + UNICODE + randoms + ["a cat", "a cat " * 20]:
        best = bs.smallest_caption_coding(text)
        size = len(bs.encode_caption(text, best))
        plain = len(text.encode("utf-8"))
        assert size <= min(plain, _deflate(text)) + 2
        assert size <= plain
        assert size == min(len(bs.encode_caption(text, c)) for c in bs.CAPTION_CODINGS)
    # the choice can be restricted (e.g. to the codings older decoders know)
    assert bs.smallest_caption_coding("a cat", codings=(bs.CAPTION_DEFLATE, bs.CAPTION_UTF8)) == bs.CAPTION_UTF8
    assert bs.smallest_caption_coding("a cat") == bs.CAPTION_ENGLISH


def _corrupt(rng, data: bytes, kind: int) -> bytes:
    d = bytearray(data)
    if kind == 0:    # bit flips
        for _ in range(rng.integers(1, 3)):
            if d:
                d[rng.integers(len(d))] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # byte changes
        for _ in range(rng.integers(1, 3)):
            if d:
                d[rng.integers(len(d))] = rng.integers(256)
    elif kind == 2:  # truncation
        d = d[:rng.integers(len(d))] if d else d
    elif kind == 3:  # insertion
        pos = rng.integers(len(d) + 1)
        d[pos:pos] = rng.integers(0, 256, rng.integers(1, 4)).astype(np.uint8).tobytes()
    else:            # random bytes
        d = bytearray(rng.integers(0, 256, rng.integers(0, 40)).astype(np.uint8).tobytes())
    return bytes(d)


def test_corrupted_captions_raise_bitstream_error_only():
    rng = np.random.default_rng(88)
    coded = [bs.encode_caption(c, bs.CAPTION_ENGLISH) for c in CAPTIONS[::5]] + \
            [bs.encode_caption(t, bs.CAPTION_ENGLISH) for t in UNICODE[:11]]
    outcomes = {"error": 0, "valid": 0, "unchanged": 0}
    for trial in range(1500):
        good = coded[trial % len(coded)]
        data = _corrupt(rng, good, trial % 5)
        if data == good:
            outcomes["unchanged"] += 1
            continue
        with time_limit(2.0):
            try:
                text = bs.decode_caption(data, bs.CAPTION_ENGLISH)
                assert isinstance(text, str)
                assert bs.encode_caption(text, bs.CAPTION_ENGLISH) == data   # canonical
                outcomes["valid"] += 1
            except BitstreamError:
                outcomes["error"] += 1
    # A good entropy coder leaves little redundancy: most byte strings are the coding of some
    # text. The canonical-form check rejects most corruptions (measured about 80%); the rest
    # decode to another caption, and it is the container's CRC32 that catches them.
    assert outcomes["error"] >= 0.6 * (outcomes["error"] + outcomes["valid"]), outcomes
    header = dataclasses.replace(HEADER, caption_coding=bs.CAPTION_ENGLISH)
    for trial in range(300):
        good = coded[trial % len(coded)]
        data = _corrupt(rng, good, trial % 5)
        body = bs.pack(header, "", b"\7")[:32] + bs.varint(len(data)) + data + bs.varint(1) + b"\7"
        with time_limit(2.0):
            try:   # with the CRC recomputed over the corrupted caption: BitstreamError or a caption
                assert isinstance(bs.unpack(body + struct.pack("<I", zlib.crc32(body)))[1], str)
            except BitstreamError:
                pass
            stream = bytearray(bs.pack(header, bs.decode_caption(good, bs.CAPTION_ENGLISH), b"\7"))
            stream[33 + rng.integers(len(good))] ^= 1 << int(rng.integers(8))
            with pytest.raises(BitstreamError, match="CRC32"):      # as sent: the CRC catches it
                bs.unpack(bytes(stream))


def test_decoding_is_bounded_and_strict():
    # data that never decodes an END stops at the bound derived from its length, quickly
    for data in (b"", b"\0", b"\0" * 20, b"\x80" + b"\0" * 5):
        with time_limit(1.0), pytest.raises(BitstreamError, match="without an end|not the coding"):
            cc.decode(data)
    assert cc.max_symbols(0) < 3000 and cc.max_symbols(10 ** 6) == cc.MAX_CAPTION_BYTES + 1
    # the bound holds for the densest real codings: a long greedy (most probable) continuation
    m = cc.model()
    hist, out = (cc.BOS,) * cc.ORDER, []
    for _ in range(6000):
        p = m.probabilities(hist)
        p[cc.END] = 0
        s = int(np.argmax(p))
        out.append(s)
        hist = hist[1:] + (s,)
    for n in (10, 100, 1000, 6000):
        data = cc.encode(bytes(out[:n]))
        assert n + 1 <= cc.max_symbols(len(data))
        assert cc.decode(data) == bytes(out[:n])
    # non-canonical codings are refused: trailing bytes, untrimmed
    data = cc.encode_text(CAPTIONS[0])
    for bad in (data + b"\0", data + b"\1", cc.encode(CAPTIONS[0].encode(), trim=False)):
        if bad != data:
            with pytest.raises(BitstreamError, match="not the coding"):
                cc.decode(bad)
    # invalid UTF-8 decoded by the model is a BitstreamError too
    with pytest.raises(BitstreamError, match="UTF-8"):
        bs.decode_caption(cc.encode(b"\xff\xfe"), bs.CAPTION_ENGLISH)
    with pytest.raises(BitstreamError, match="unknown caption coding"):
        bs.encode_caption("a", 3)


# ----------------------------------------------------------------------------- text modes

def test_text_modes_pure(tmp_path):
    from transformers import AutoTokenizer

    from perco_jax.text.tiny_tokenizers import save_t5_tokenizer

    caption = "A red car parked in front of a small house, next to a tree."
    assert text_modes.apply_text_mode(caption, "none") == ""
    assert text_modes.apply_text_mode(caption, "full") == caption
    assert text_modes.apply_text_mode(caption, "truncate:3") == "A red car"      # no tokenizer: words
    assert text_modes.apply_text_mode(caption, "truncate", n_tokens=2) == "A red"
    assert text_modes.apply_text_mode(caption, "truncate:0") == ""
    assert text_modes.apply_text_mode(caption, "truncate:1000") == caption
    t5 = AutoTokenizer.from_pretrained(save_t5_tokenizer(tmp_path / "t5"), local_files_only=True)
    ids = t5(caption, add_special_tokens=False)["input_ids"]
    for n in range(1, len(ids)):
        out = text_modes.apply_text_mode(caption, f"truncate:{n}", t5)
        assert caption.startswith(out) and out == out.strip()        # a prefix: case and spacing kept
        assert len(t5(out, add_special_tokens=False)["input_ids"]) <= n
        # = the first n tokens decoded back to text (T5 decoding only differs in spaces)
        assert out.replace(" ", "") == t5.decode(ids[:n], skip_special_tokens=True).replace(" ", "")
    assert text_modes.apply_text_mode(caption, "truncate:4", t5) == "A red"       # "▁", "A", "▁red", "▁"
    assert text_modes.apply_text_mode(caption, f"truncate:{len(ids)}", t5) == caption
    byte_level = _byte_level_tokenizer()                                     # one token per byte
    for n in (1, 5, 9, 20):
        assert text_modes.apply_text_mode(caption, f"truncate:{n}", byte_level) == caption[:n].strip()
    for bad in ("half", "truncate", "truncate:x", "truncate:-1", "full:3", 3):
        with pytest.raises(ValueError):
            text_modes.apply_text_mode(caption, bad)
    with pytest.raises(ValueError, match="disagrees"):
        text_modes.apply_text_mode(caption, "truncate:3", n_tokens=4)
    assert text_modes.parse_text_mode(" Truncate:7 ") == ("truncate", 7)


# ----------------------------------------------------------------------------- captioner

def _images():
    try:
        from skimage import data
        return [data.astronaut(), data.coffee(), data.chelsea()]
    except ImportError:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(3)]


def _byte_level_tokenizer():
    """An OPT-style byte-level BPE tokenizer with no merges (one token per byte), built offline."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                         unk_token="<unk>")


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    """A tiny random BLIP-2 (ViT + Q-Former + OPT) with its processor, saved like a hub folder."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    folder = tmp_path_factory.mktemp("blip2")
    tok = _byte_level_tokenizer()
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tok, num_query_tokens=4)
    image_token = tok.convert_tokens_to_ids("<image>")
    text = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                     max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2,
                     pad_token_id=1)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=text.to_dict(), num_query_tokens=4, image_token_index=image_token)
    model = Blip2ForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # O(1) random weights (as perco_jax.tiny_sd3): captions depend on the image
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(2 * noise / max(1, p[0].numel()) ** 0.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _count_generate(captioner):
    calls = []
    original = captioner.model.generate

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs["generation_config"].max_new_tokens, out.shape))
        return out
    captioner.model.generate = counting
    return calls


def test_blip2_captioner(blip2_folder):
    images = _images()
    c1 = cap.Captioner.load(blip2_folder, device="cpu", batch_size=2)
    assert c1.kind == "blip2" and c1.max_new_tokens == 32 and c1.name == f"{blip2_folder.name}:greedy:32"
    calls = _count_generate(c1)
    first = c1.caption(images, progress=False)
    assert len(calls) == 2                                    # batches of 2 + 1
    assert all(isinstance(t, str) for t in first) and len(set(first)) == 3   # one caption per image
    assert first == c1.caption(images, progress=False, batch_size=3)   # batching changes nothing
    c2 = cap.Captioner.load(blip2_folder, device="cpu")
    assert c2.caption(images, progress=False) == first        # deterministic across loads
    calls = _count_generate(c2)
    for n in (1, 5):
        short = c2.caption(images, max_new_tokens=n, progress=False)
        assert all(s == cap.clean_caption(s) and len(s.encode()) <= 3 * n for s in short)
        n_tokens, shape = calls[-1]
        assert n_tokens == n and shape[1] <= 4 + 1 + n          # query tokens + BOS + new tokens
    # the generic image-text-to-text path (Auto classes, a prompt) on the same checkpoint
    auto = cap.Captioner.load(blip2_folder, kind="auto", device="cpu", max_new_tokens=6)
    outs = auto.caption(images, progress=False)
    assert auto.kind == "auto" and all(isinstance(t, str) for t in outs)
    assert outs == auto.caption(images, progress=False)


def test_caption_cache(blip2_folder, tmp_path):
    images = _images()
    path = tmp_path / "captions.jsonl"
    captioner = cap.Captioner.load(blip2_folder, device="cpu", max_new_tokens=8)
    calls = _count_generate(captioner)
    first = captioner.caption(images, cache=CaptionCache(path), progress=False)
    assert len(calls) == 1 and len(path.read_text().splitlines()) == 3
    again = captioner.caption(images, cache=CaptionCache(path), progress=False)   # reloaded from disk
    assert again == first and len(calls) == 1                 # no second model call
    # a cut-off last line (a crash while writing) is skipped, the rest is kept
    with open(path, "a") as f:
        f.write('{"key": "abc", "capt')
    cache = CaptionCache(path)
    assert len(cache) == 3
    entry = json.loads(path.read_text().splitlines()[0])
    assert entry == {"key": image_key(images[0]), "caption": first[0], "captioner": captioner.name}
    # resolve_caption: given caption > cached caption > captioner; never loads when cached
    assert cap.resolve_caption(images[1], caption="given", cache=cache) == "given"
    assert cap.resolve_caption(images[1], cache=cache) == first[1]
    unloadable = tmp_path / "not_there" / blip2_folder.name   # same name: the cache answers
    assert cap.resolve_caption(images[1], cache=path, captioner=unloadable, max_new_tokens=8) == first[1]
    assert cap.resolve_caption(images[2], cache=cache, captioner=captioner) == first[2]
    assert len(calls) == 1
    fresh = np.full((20, 30, 3), 7, np.uint8)
    assert isinstance(cap.resolve_caption(fresh, cache=cache, captioner=captioner), str)
    assert len(calls) == 2 and CaptionCache(path).get(image_key(fresh)) is not None
    with pytest.raises(cap.CaptionError, match="no caption for"):
        cap.resolve_caption(np.zeros((8, 8, 3), np.uint8), cache=cache)
    with pytest.raises(cap.CaptionError, match="--captioner"):
        cap.resolve_caption(np.zeros((8, 8, 3), np.uint8))


def test_caption_prompts_for_compress_and_evaluate(tmp_path):
    """caption_prompts: the caller's captions, else the cache; a missing one is an error (compress) or
    ("", "none") (evaluate, missing_ok); then the text mode, truncate:N in T5's tokens else CLIP-L's."""
    images = [np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30)]
    path = tmp_path / "cache.jsonl"
    CaptionCache(path).put(image_key(images[1]), "a cached grey square", "someone")
    loaded = []

    def lazy(i):  # an image drawn only when it is looked up
        return lambda: loaded.append(i) or images[i]

    byte_level = _byte_level_tokenizer()  # one token per byte
    words = (None, None, None)            # no tokenizer: truncate:N counts words
    got = cap.caption_prompts([lazy(0), lazy(1), lazy(2)], text_mode="full", tokenizers=words,
                              captions=["given", None, None], cache=path, missing_ok=True)
    assert got == [("given", "given"), ("a cached grey square", "cache"), ("", "none")] and loaded == [1, 2]
    with pytest.raises(cap.CaptionError, match="no caption for"):
        cap.caption_prompts(images, text_mode="full", tokenizers=words, cache=path)
    with pytest.raises(cap.CaptionError, match="--caption-cache"):  # nothing to look in either
        cap.caption_prompts(images[2:], text_mode="full", tokenizers=words)
    assert cap.caption_prompts(images[2:], text_mode="full", tokenizers=words, missing_ok=True) == [("", "none")]
    assert cap.caption_prompts(images, text_mode="none", tokenizers=words, captions=["x"]) == [("", "none")] * 3
    assert cap.caption_prompts(images[1:2], text_mode="truncate:2", tokenizers=words, cache=path) == \
        [("a cached", "cache")]
    assert cap.caption_prompts(images[1:2], text_mode="truncate:3", tokenizers=(byte_level, None, None),
                               cache=path) == [("a c", "cache")]                  # CLIP-L's when no T5
    assert cap.caption_prompts(images[1:2], text_mode="truncate:3", tokenizers=(None, None, byte_level),
                               cache=path) == [("a c", "cache")]                  # T5's when there is one
    assert text_modes.truncation_tokenizer(("clip-l", "clip-g", "t5")) == "t5"
    assert text_modes.truncation_tokenizer(("clip-l", "clip-g", None)) == "clip-l"
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        cap.caption_prompts(images, text_mode="full", tokenizers=words, captions=["a", "b"])


def test_image_key(tmp_path):
    from perco_jax.images import save_image

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    save_image(rgb / 255.0, tmp_path / "x.png")
    key = image_key(rgb)
    assert image_key(tmp_path / "x.png") == key == image_key(rgb.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="alpha"):  # an RGBA array: refused, as compress does (perco_jax.images)
        image_key(np.concatenate([rgb, np.full((17, 23, 1), 255, np.uint8)], -1))
    assert image_key(rgb[:, :-1]) != key and image_key(rgb.reshape(23, 17, 3)) != key
    assert image_key(rgb[..., 0]) == image_key(np.repeat(rgb[..., :1], 3, -1))
    with pytest.raises(ValueError):
        image_key(np.zeros((4, 4, 2)))


def test_load_errors(tmp_path):
    with pytest.raises(cap.CaptionError, match="no captioner checkpoint"):
        cap.Captioner.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(cap.CaptionError, match="config.json"):
        cap.Captioner.load(tmp_path / "empty")
    remote = tmp_path / "molmo"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "molmo", "auto_map": {
        "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"}}))
    with pytest.raises(cap.CaptionError, match="trust_remote_code"):
        cap.Captioner.load(remote)
