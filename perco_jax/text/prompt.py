"""SD3 prompt encoding, exactly as diffusers' `StableDiffusion3Pipeline.encode_prompt`:

  context = concat_seq( pad_to_T5_width( concat_ch(CLIP-L[-2], CLIP-G[-2]) ),  T5 )   [B, C + L_t5, D]
  pooled  = concat_ch( CLIP-L text_embeds, CLIP-G text_embeds )                       [B, P_l + P_g]

CLIP hidden states are the penultimate layer's (before the final layer norm); tokens are padded to
C = clip_max_length (SD3's 77; config text.clip_max_length) by each tokenizer's own pad token
(CLIP-L pads with EOS, OpenCLIP bigG with "!" = id 0). Without T5 the T5 part is zeros
[B, max_sequence_length, joint_attention_dim], as SD3 allows.
Tokenizers are transformers tokenizers loaded from local folders; encoders are Flax modules.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perco_jax.checkpoint import TOKENIZERS, load_tokenizer

CLIP_MAX_LENGTH = 77


class PromptEncoder:
    """Holds tokenizers and encoder modules; parameters stay in the caller's params dict under
    "text_encoder" (CLIP-L), "text_encoder_2" (CLIP-G) and "text_encoder_3" (T5, optional)."""

    def __init__(self, tokenizer, tokenizer_2, clip_l, clip_g, tokenizer_3=None, t5=None, *,
                 joint_attention_dim: int, clip_max_length: int = CLIP_MAX_LENGTH):
        if (tokenizer_3 is None) != (t5 is None):
            raise ValueError("T5 needs both its tokenizer and its encoder (or neither)")
        self.tokenizers = (tokenizer, tokenizer_2, tokenizer_3)
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.joint_attention_dim = joint_attention_dim
        self.clip_max_length = clip_max_length

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, clip_l, clip_g, t5=None, *, joint_attention_dim: int,
                    clip_max_length: int = CLIP_MAX_LENGTH) -> "PromptEncoder":
        """The encoder modules with the tokenizers of `folder`'s tokenizer/, tokenizer_2/ and (with
        T5) tokenizer_3/ (`checkpoint.TOKENIZERS`)."""
        tok_l, tok_g, tok_t5 = (Path(folder) / name for name in TOKENIZERS)
        return cls(load_tokenizer(tok_l), load_tokenizer(tok_g), clip_l, clip_g,
                   load_tokenizer(tok_t5) if t5 is not None else None, t5,
                   joint_attention_dim=joint_attention_dim, clip_max_length=clip_max_length)

    @classmethod
    def without_tokenizers(cls, clip_l, clip_g, t5=None, *, joint_attention_dim: int,
                           clip_max_length: int = CLIP_MAX_LENGTH) -> "PromptEncoder":
        """The encoder modules alone, for tracing `encode_tokens` on abstract token ids (compiling a
        program ahead of time, `train/compile.py`): `tokenize` raises."""
        marker = _NoTokenizer()
        return cls(marker, marker, clip_l, clip_g, marker if t5 is not None else None, t5,
                   joint_attention_dim=joint_attention_dim, clip_max_length=clip_max_length)

    def tokenize(self, prompts: Sequence[str], max_sequence_length: int = 256,
                 names: Sequence[str] = ("clip_l", "clip_g", "t5")) -> dict[str, np.ndarray]:
        """Token ids [B, clip_max_length] for each CLIP and [B, max_sequence_length] for T5 (if
        present), of the encoders in `names` only (each tokenizer call costs about a millisecond)."""
        prompts = list(prompts)
        tok_l, tok_g, tok_t5 = self.tokenizers
        ids = {}
        if "clip_l" in names:
            ids["clip_l"] = _ids(tok_l, prompts, self.clip_max_length)
        if "clip_g" in names:
            ids["clip_g"] = _ids(tok_g, prompts, self.clip_max_length)
        if tok_t5 is not None and "t5" in names:
            ids["t5"] = _ids(tok_t5, prompts, max_sequence_length, add_special_tokens=True)
        return ids

    @functools.cached_property
    def encode_tokens(self):
        """Jitted (params, ids, max_sequence_length) -> (context, pooled)."""
        def encode(params, ids, max_sequence_length: int):
            h_l, pooled_l = self.clip_l.apply({"params": params["text_encoder"]}, ids["clip_l"],
                                              method=self.clip_l.sd3_outputs)
            h_g, pooled_g = self.clip_g.apply({"params": params["text_encoder_2"]}, ids["clip_g"],
                                              method=self.clip_g.sd3_outputs)
            clip = jnp.concatenate([h_l, h_g], axis=-1)
            b = clip.shape[0]
            if self.t5 is not None:
                t5 = self.t5.apply({"params": params["text_encoder_3"]}, ids["t5"])
            else:
                t5 = jnp.zeros((b, max_sequence_length, self.joint_attention_dim), clip.dtype)
            if clip.shape[-1] > t5.shape[-1]:
                raise ValueError(f"CLIP width {clip.shape[-1]} exceeds the T5 / joint width {t5.shape[-1]}")
            clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
            context = jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1)
            return context, jnp.concatenate([pooled_l, pooled_g], axis=-1)

        return jax.jit(encode, static_argnames=("max_sequence_length",))

    def __call__(self, params: dict, prompts: Sequence[str], max_sequence_length: int = 256):
        ids = self.tokenize(prompts, max_sequence_length)
        return self.encode_tokens(params, ids, max_sequence_length=max_sequence_length)


class _NoTokenizer:
    """The tokenizer of an encoder built `without_tokenizers`: any use is an error."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError("this PromptEncoder was built without tokenizers (for compiling only)")


def _ids(tokenizer: Any, prompts: list[str], length: int, add_special_tokens: bool = True) -> np.ndarray:
    out = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=add_special_tokens, return_tensors="np")
    return np.asarray(out["input_ids"], np.int32)
