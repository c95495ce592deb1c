"""The tiny preset's tokenizers, built offline (nothing is downloaded): a character-level CLIP
tokenizer (514 tokens, for CLIP-L and bigG) and a small Unigram T5 tokenizer (140 tokens), written
as the tokenizer/, tokenizer_2/, tokenizer_3/ folders of a weights folder. `build.build_text` uses
them for the tiny config's random text encoders; `tiny_sd3` puts them in its random SD3 pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def save_clip_tokenizer(folder: str | Path, pad_with_eos: bool = True) -> Path:
    """A character-level CLIPTokenizer (no merges; 514 tokens). CLIP-L pads with EOS,
    OpenCLIP bigG with "!" (id 0), as SD3's two tokenizers do."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        pad_token="<|endoftext|>" if pad_with_eos else "!", model_max_length=77)
    tok.save_pretrained(str(folder))
    return folder


def save_t5_tokenizer(folder: str | Path) -> Path:
    """A small sentencepiece-style (Unigram) T5 tokenizer: pad 0, eos 1, unk 2, common caption
    words as whole pieces and single letters as the fallback."""
    import string

    from transformers import T5TokenizerFast

    folder = Path(folder)
    words = ("a an the of on in above below left right big small large tiny red green blue yellow "
             "white black grey gray orange purple circle square triangle star background photo "
             "image picture cat dog house tree sky and with near brown pink").split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in words]
    vocab += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    tok.save_pretrained(str(folder))
    return folder


def save_tokenizers(folder: str | Path) -> Path:
    """The three tiny tokenizers under `folder` as tokenizer/ (CLIP-L), tokenizer_2/ (bigG) and
    tokenizer_3/ (T5), the layout of a weights folder (`checkpoint.TOKENIZERS`)."""
    from perco_jax.checkpoint import TOKENIZERS

    folder = Path(folder)
    tok_l, tok_g, tok_t5 = TOKENIZERS
    save_clip_tokenizer(folder / tok_l, pad_with_eos=True)
    save_clip_tokenizer(folder / tok_g, pad_with_eos=False)
    save_t5_tokenizer(folder / tok_t5)
    return folder
