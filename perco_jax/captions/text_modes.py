"""Text modes: the text configurations compared in the seed, applied to a caption before coding.

    TEXT_MODES = ("none", "full", "truncate:N")
    apply_text_mode(caption, mode, tokenizer) -> prompt: "none" (the empty prompt), "full" (the
        caption), "truncate:N" (the caption's first N tokens of a tokenizer, e.g. SD3's T5)
    truncation_tokenizer(tokenizers) -> the tokenizer truncate:N counts in for a prompt encoder

Pure functions of strings (and a transformers tokenizer for truncate:N).
"""
from __future__ import annotations

TEXT_MODES = ("none", "full", "truncate:N")


def parse_text_mode(mode: str, n_tokens: int | None = None) -> tuple[str, int | None]:
    """("none" | "full" | "truncate", N or None) of a text mode; ValueError naming the valid ones.

    "truncate:N" truncates to N tokens; "truncate" takes N from n_tokens (if both are given
    they must agree).
    """
    if not isinstance(mode, str):
        raise ValueError(f"text mode must be a string ({', '.join(TEXT_MODES)}), got {mode!r}")
    name, sep, arg = mode.strip().partition(":")
    name = name.strip().lower()
    if name in ("none", "full") and not sep:
        return name, None
    if name == "truncate":
        n = n_tokens
        if sep:
            try:
                n = int(arg)
            except ValueError:
                raise ValueError(f"text mode {mode!r}: N in truncate:N must be an integer") from None
            if n_tokens is not None and n_tokens != n:
                raise ValueError(f"text mode {mode!r} disagrees with n_tokens={n_tokens}")
        if n is None or isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"text mode {mode!r} needs a token count N >= 0 (truncate:N)")
        return "truncate", int(n)
    raise ValueError(f"unknown text mode {mode!r} (known: {', '.join(TEXT_MODES)})")


def truncation_tokenizer(tokenizers):
    """The tokenizer whose tokens truncate:N counts, of a prompt encoder's (CLIP-L, CLIP-G, T5)
    tokenizers: SD3's T5 tokenizer when the encoder has one, else CLIP-L's."""
    return tokenizers[2] if tokenizers[2] is not None else tokenizers[0]


def truncate_tokens(caption: str, n: int, tokenizer=None) -> str:
    """The caption's first n tokens as text.

    With a fast (Rust) transformers tokenizer: the longest prefix of the caption that ends where
    one of its tokens ends and tokenizes to at most n tokens (normally what the first n tokens
    cover; shorter where a token's span would re-tokenize to more, e.g. a lone sentencepiece "▁").
    Being a prefix of the caption, it keeps the caption's case and spacing. With a slow
    tokenizer: the first n token ids decoded back to text. With no tokenizer: the first n
    whitespace-separated words. Special tokens (BOS / EOS) are not counted; the result is stripped.
    """
    if isinstance(n, bool) or int(n) != n:
        raise ValueError(f"token count must be an integer, got {n!r}")
    if n <= 0 or not caption:
        return ""
    if tokenizer is None:
        return " ".join(caption.split()[:n])

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        if len(enc["input_ids"]) <= n:
            return caption.strip()
        for end in sorted({b for _, b in enc["offset_mapping"][:n] if b > 0}, reverse=True):
            prefix = caption[:end].strip()
            if count(prefix) <= n:
                return prefix
        return ""
    ids = tokenizer(caption, add_special_tokens=False, truncation=False)["input_ids"]
    if len(ids) <= n:
        return caption.strip()
    return tokenizer.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def apply_text_mode(caption: str, mode: str, tokenizer=None, n_tokens: int | None = None) -> str:
    """The prompt sent for a caption under a text configuration (pure function).

    "none": "" (the empty prompt; z_g costs only the container's caption field); "full": the
    caption unchanged; "truncate:N" (or "truncate" with n_tokens=N): the first N tokens of
    `tokenizer` (see `truncate_tokens`; SD3's T5 or CLIP tokenizer are the natural choice).
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    name, n = parse_text_mode(mode, n_tokens)
    if name == "none":
        return ""
    if name == "full":
        return caption
    return truncate_tokens(caption, n, tokenizer)
