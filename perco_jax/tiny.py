"""Tiny stand-ins for what users bring from disk: tokenizers and a random SD3 pipeline in
diffusers format, built offline. The demo and the tests use them; nothing here is downloaded.
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
             "image picture cat dog house tree sky and with near").split()
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


def save_tiny_sd3_pipeline(folder: str | Path, seed: int = 0, with_t5: bool = True, config=None) -> Path:
    """A random StableDiffusion3Pipeline in the tiny config's shapes, saved as a diffusers folder.

    Every weight is drawn at random (diffusers zero-inits the adaLN gates, which would hide
    bugs), scaled by 1/sqrt(fan_in) so activations stay O(1).
    """
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from perco_jax.config import load_config

    config = config or load_config("tiny")
    folder = Path(folder)
    tok_dir = folder.with_name(folder.name + ".tokenizers")
    torch.manual_seed(seed)
    mm = config.mmdit.to_dict()
    mm.pop("extra_in_channels")
    # the codec's tiny config uses space-to-depth; an SD3 pipeline always has the VAE's latents
    mm.update(in_channels=config.vae.latent_channels, out_channels=config.vae.latent_channels)
    mm["qk_norm"] = mm["qk_norm"] or None
    vae = config.vae.to_dict()
    n_blocks = len(vae["block_out_channels"])
    parts = dict(
        transformer=SD3Transformer2DModel(**mm),
        vae=AutoencoderKL(**vae, down_block_types=("DownEncoderBlock2D",) * n_blocks,
                          up_block_types=("UpDecoderBlock2D",) * n_blocks),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**config.clip_l.to_dict())),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config.clip_g.to_dict())),
        text_encoder_3=T5EncoderModel(T5Config(**config.t5.to_dict())) if with_t5 else None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.scheduler_shift),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if parts[name] is None:
                continue
            for pname, p in parts[name].named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if p.ndim >= 2:
                    p.copy_(noise / max(1, p[0].numel()) ** 0.5)
                elif "norm" in pname and pname.endswith("weight"):
                    p.copy_(1 + 0.1 * noise)
                else:
                    p.copy_(0.05 * noise)
    from perco_jax.checkpoint import TOKENIZERS, load_tokenizer

    save_tokenizers(tok_dir)
    toks = {n: load_tokenizer(tok_dir / n) for n in TOKENIZERS}
    if not with_t5:
        toks["tokenizer_3"] = None
    pipe = StableDiffusion3Pipeline(**parts, **toks)
    pipe.save_pretrained(str(folder))
    import shutil

    shutil.rmtree(tok_dir)
    return folder
