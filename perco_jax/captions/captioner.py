"""Image -> caption with a captioning model, and the caption `compress` sends for an image.

- `Captioner.load(folder)` runs a captioner through transformers (PyTorch, CPU or GPU) from a
  local checkpoint folder: BLIP-2 (`Blip2ForConditionalGeneration` + its processor), or any
  image-text-to-text model transformers can load (`AutoModelForImageTextToText`, or the older
  `AutoModelForVision2Seq`), including Molmo-style checkpoints that ship their own code (only
  with `trust_remote_code=True`, which runs that code: pass it only for checkpoints you trust).
  Decoding is greedy (deterministic), at most `max_new_tokens` tokens (32 as in PerCo), batched,
  with a progress bar, reading and extending a caption cache (`captions.cache`). Images are HWC
  uint8 RGB once read (`images.to_rgb8`); nothing is downloaded.
- `resolve_caption(...)`: what `compress` uses: the given caption, else a cached one, else the
  captioner's; a clear `CaptionError` when there is none of them.
- `caption_prompts(...)`: the prompt of each of several images, as `compress` and `evaluate` send it:
  the caller's captions, else `resolve_caption`'s, then the text mode (`text_modes`).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from perco_jax.captions.cache import CaptionCache, image_key
from perco_jax.captions.text_modes import apply_text_mode, parse_text_mode, truncation_tokenizer
from perco_jax.images import to_rgb8

DEFAULT_MAX_NEW_TOKENS = 32   # PerCo's caption budget
DEFAULT_BATCH_SIZE = 8


class CaptionError(ValueError):
    """No caption can be had (no caption, cache entry or captioner), or a captioner that cannot be used."""


# ----------------------------------------------------------------------------- the captioner

def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CaptionError(f"{folder} is not a transformers checkpoint folder (config.json: {e})") from e


def captioner_name(path: str | Path, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, prompt: str | None = None) -> str:
    """The default name of a captioner in the cache: folder name, decoding, token budget, prompt."""
    return f"{Path(path).name}:greedy:{int(max_new_tokens)}" + (f":{prompt}" if prompt else "")


def _from_pretrained(cls, folder: Path, dtype, **kwargs):
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    return cls.from_pretrained(folder, **{key: dtype}, **kwargs)


def _auto_model_classes():
    import transformers

    names = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
    return [getattr(transformers, n) for n in names if hasattr(transformers, n)]


class Captioner:
    """A captioning model with its processor; `captioner(images)` -> list of captions.

    Build with `Captioner.load(folder)`. `name` identifies the captioner in the caption cache
    (by default `captioner_name(folder, max_new_tokens, prompt)`).
    """

    def __init__(self, model, processor, *, kind: str, name: str, prompt: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE):
        if kind not in ("blip2", "auto", "molmo"):
            raise ValueError(f"unknown captioner kind {kind!r}")
        _check_positive(max_new_tokens, "max_new_tokens")
        _check_positive(batch_size, "batch_size")
        self.model = model
        self.processor = processor
        self.kind = kind
        self.name = name
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)

    @classmethod
    def load(cls, path: str | Path, *, kind: str | None = None, device: str | None = None, dtype=None,
             trust_remote_code: bool = False, prompt: str | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
             name: str | None = None) -> "Captioner":
        """Loads a captioner from a local checkpoint folder (never downloads).

        kind: "blip2" (Blip2ForConditionalGeneration + Blip2Processor), "auto" (any
        image-text-to-text model through the Auto classes) or None: "blip2" when config.json
        says model_type "blip-2", else "auto" (which becomes "molmo" for checkpoints with Molmo's
        own `generate_from_batch`). trust_remote_code: allow running code shipped in the folder
        (needed by Molmo; refused otherwise with a message saying so). device: "cuda" when
        available, else "cpu". dtype: a torch dtype or its name; float16 on CUDA, float32 on CPU.
        prompt: text the caption continues (BLIP-2) or the instruction (chat models; default
        "Describe this image in one sentence.").
        """
        try:
            import torch
            import transformers
        except ImportError as e:
            raise CaptionError(f"captioning needs PyTorch and transformers ({e}); install perco-jax[torch]") from e
        folder = Path(path)
        user_prompt = prompt
        if not folder.is_dir():
            raise CaptionError(f"no captioner checkpoint folder at {folder}")
        config = _read_config(folder)
        model_type = config.get("model_type", "")
        if kind is None:
            kind = "blip2" if model_type == "blip-2" else "auto"
        if kind not in ("blip2", "auto"):
            raise CaptionError(f"unknown captioner kind {kind!r} (blip2 or auto)")
        if config.get("auto_map") and not trust_remote_code and kind != "blip2":
            raise CaptionError(
                f"the captioner in {folder} ({model_type or 'unknown type'}) ships its own model code; "
                f"loading it runs that code: pass trust_remote_code=True (--trust-remote-code) if you "
                f"trust this checkpoint")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
        common = dict(local_files_only=True)
        try:
            if kind == "blip2":
                model = _from_pretrained(transformers.Blip2ForConditionalGeneration, folder, dtype, **common)
                try:
                    processor = transformers.Blip2Processor.from_pretrained(folder, **common)
                except (OSError, ValueError, TypeError):
                    processor = transformers.AutoProcessor.from_pretrained(folder, **common)
            else:
                common["trust_remote_code"] = trust_remote_code
                processor = transformers.AutoProcessor.from_pretrained(folder, **common)
                model, errors = None, []
                classes = _auto_model_classes()
                if trust_remote_code:
                    classes.append(transformers.AutoModelForCausalLM)  # Molmo registers itself here
                for auto in classes:
                    try:
                        model = _from_pretrained(auto, folder, dtype, **common)
                        break
                    except (ValueError, KeyError) as e:  # "unrecognized configuration class"
                        errors.append(f"{auto.__name__}: {e}")
                if model is None:
                    raise CaptionError(f"{folder} ({model_type}) is not an image-to-text model transformers "
                                       f"can load: " + "; ".join(errors))
                if hasattr(model, "generate_from_batch") and hasattr(processor, "process"):
                    kind = "molmo"
                if prompt is None:
                    prompt = "Describe this image in one sentence."
        except CaptionError:
            raise
        except (OSError, ValueError) as e:
            raise CaptionError(f"cannot load the captioner in {folder}: {e}") from e
        model.to(device).eval()
        if name is None:
            name = captioner_name(folder, max_new_tokens, user_prompt)
        return cls(model, processor, kind=kind, name=name, prompt=prompt, max_new_tokens=max_new_tokens,
                   batch_size=batch_size)

    # -- generation

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _generation_config(self, max_new_tokens: int):
        gc = copy.deepcopy(self.model.generation_config)
        gc.do_sample = False
        gc.num_beams = 1
        gc.num_return_sequences = 1
        gc.max_new_tokens = max_new_tokens
        return gc

    def _is_encoder_decoder(self) -> bool:
        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", None)
        return bool(getattr(cfg, "is_encoder_decoder", False) or getattr(text_cfg, "is_encoder_decoder", False))

    def _inputs(self, images: list[np.ndarray]):
        import torch

        proc = self.processor
        if self.kind == "blip2":
            texts = [self.prompt] * len(images) if self.prompt else None
        else:
            text = self.prompt or ""
            if getattr(proc, "chat_template", None):
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                text = proc.apply_chat_template(messages, add_generation_prompt=True)
            texts = [text] * len(images)
            tok = getattr(proc, "tokenizer", None)
            if tok is not None and not self._is_encoder_decoder():
                tok.padding_side = "left"  # batched decoder-only generation continues on the right
        kwargs = dict(images=list(images), return_tensors="pt")
        if texts is not None:
            kwargs.update(text=texts, padding=True)
        inputs = proc(**kwargs)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device))
                for k, v in inputs.items()}

    def _prompt_ids(self, inputs):
        """The token ids the decoder-only language model's output starts with (to strip)."""
        import torch

        if "input_ids" in inputs:
            return inputs["input_ids"]
        cfg = self.model.config
        if self.kind == "blip2" and getattr(cfg, "image_token_index", None) is not None:
            n = inputs["pixel_values"].shape[0]
            ids = [cfg.image_token_index] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]
            return torch.tensor([ids] * n, device=self.device)
        return None

    def _decode(self, out, inputs) -> list[str]:
        tok = getattr(self.processor, "tokenizer", self.processor)
        if not self._is_encoder_decoder():
            prompt = self._prompt_ids(inputs)
            if prompt is not None and out.shape[1] >= prompt.shape[1] and \
                    bool((out[:, :prompt.shape[1]] == prompt.to(out.device)).all()):
                out = out[:, prompt.shape[1]:]
        texts = tok.batch_decode(out, skip_special_tokens=True)
        return [clean_caption(t) for t in texts]

    def _generate_molmo(self, images: list[np.ndarray], max_new_tokens: int) -> list[str]:
        import torch

        from PIL import Image

        gc = self._generation_config(max_new_tokens)
        tok = self.processor.tokenizer
        captions = []
        for img in images:
            inputs = self.processor.process(images=[Image.fromarray(img)], text=self.prompt)
            inputs = {k: v.to(self.device).unsqueeze(0) for k, v in inputs.items()}
            if "images" in inputs and torch.is_floating_point(inputs["images"]):
                inputs["images"] = inputs["images"].to(next(self.model.parameters()).dtype)
            out = self.model.generate_from_batch(inputs, gc, tokenizer=tok)
            new = out[0, inputs["input_ids"].shape[1]:]
            captions.append(clean_caption(tok.decode(new, skip_special_tokens=True)))
        return captions

    def generate(self, images: Sequence[np.ndarray], max_new_tokens: int | None = None) -> list[str]:
        """Captions of one batch of HWC uint8 RGB images (one model call)."""
        import torch

        n_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        _check_positive(n_tokens, "max_new_tokens")
        images = [to_rgb8(im) for im in images]
        if not images:
            return []
        with torch.inference_mode():
            if self.kind == "molmo":
                return self._generate_molmo(images, n_tokens)
            inputs = self._inputs(images)
            out = self.model.generate(**inputs, generation_config=self._generation_config(n_tokens))
        return self._decode(out, inputs)

    def caption(self, images: Iterable, *, cache: CaptionCache | None = None, max_new_tokens: int | None = None,
                batch_size: int | None = None, progress: bool = True) -> list[str]:
        """Captions of images (paths, PIL images or arrays), in order, batched, with a progress bar.

        With a cache, images it holds (by this captioner's name) are not run through the model,
        and new captions are appended to it as each batch finishes.
        """
        from tqdm.auto import tqdm

        batch_size = self.batch_size if batch_size is None else batch_size
        _check_positive(batch_size, "batch_size")
        images = list(images)
        captions: list[str | None] = [None] * len(images)
        pending: list[tuple[int, str, np.ndarray]] = []
        bar = tqdm(total=len(images), desc=f"captioning ({self.name})", unit="img", disable=not progress)

        def flush():
            texts = self.generate([p[2] for p in pending], max_new_tokens)
            for (i, key, _), text in zip(pending, texts):
                captions[i] = text
                if cache is not None:
                    cache.put(key, text, self.name)
            bar.update(len(pending))
            pending.clear()

        try:
            for i, image in enumerate(images):
                rgb = to_rgb8(image)
                key = image_key(rgb)
                hit = cache.get(key, self.name) if cache is not None else None
                if hit is not None:
                    captions[i] = hit
                    bar.update(1)
                    continue
                pending.append((i, key, rgb))
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
        finally:
            bar.close()
        return captions  # type: ignore[return-value]

    def __call__(self, images, **kwargs) -> list[str]:
        return self.caption(images, **kwargs)


def _check_positive(n, what: str) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what} must be a positive integer, got {n!r}")


def clean_caption(text: str) -> str:
    """A generated caption with runs of whitespace (newlines included) made single spaces."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- for compress

def resolve_caption(image, *, caption: str | None = None, captioner: "Captioner | str | Path | None" = None,
                    cache: CaptionCache | str | Path | None = None, trust_remote_code: bool = False,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
    """The caption `compress` sends for an image.

    In order: `caption` when given (also ""), else a cached caption of the image (by this
    captioner when one is given, by any captioner otherwise), else the captioner's caption
    (added to the cache). CaptionError when there is none: no caption, no cache entry and no
    captioner. captioner may be a loaded Captioner or a checkpoint folder; cache a CaptionCache
    or a JSONL path.
    """
    if caption is not None:
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        return caption
    if isinstance(cache, (str, os.PathLike)):
        cache = CaptionCache(cache)
    if cache is not None:
        name = None
        if isinstance(captioner, Captioner):
            name = captioner.name
        elif captioner is not None:
            name = captioner_name(captioner, max_new_tokens)
        hit = cache.get(image_key(image), name)
        if hit is not None:
            return hit  # the captioner is not even loaded
    if captioner is None:
        where = f"{image}" if isinstance(image, (str, os.PathLike)) else "the image"
        raise CaptionError(
            f"no caption for {where}: give one (--caption TEXT), a captioner checkpoint folder "
            f"(--captioner PATH, e.g. a local BLIP-2 copy)" +
            (f", or a caption cache that holds this image ({cache.path} does not)" if cache is not None
             else ", or a caption cache that holds this image (--caption-cache FILE)") +
            "; or use --text-mode none to send no caption")
    if not isinstance(captioner, Captioner):
        captioner = Captioner.load(captioner, trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens)
    return captioner.caption([image], cache=cache, progress=False)[0]


def caption_prompts(images: Sequence, *, text_mode: str, tokenizers, captions: Sequence[str | None] | None = None,
                    captioner: "Captioner | str | Path | None" = None, cache: CaptionCache | str | Path | None = None,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, trust_remote_code: bool = False,
                    missing_ok: bool = False, progress: bool = False) -> list[tuple[str, str]]:
    """(prompt, caption source) of each image, as `compress` (and `evaluate`) send them.

    text_mode "none": ("", "none") for every image; nothing is looked up, loaded or checked. Else each
    image's caption is captions[i] when the caller has one (not None; source "given"), else
    `resolve_caption`'s: the cache's, then the captioner's (added to the cache), source "cache"
    without a captioner and "captioner" with one. An image with none: CaptionError (compress), or with
    missing_ok ("", "none") (evaluate). Then the text mode; truncate:N counts the tokens of
    `text_modes.truncation_tokenizer(tokenizers)` (a prompt encoder's (CLIP-L, CLIP-G, T5) tokenizers).

    images: paths, arrays, or functions of no arguments that return one (called only when the image
    is looked up). captioner: a loaded Captioner or a checkpoint folder (loaded once, only when a
    caption is missing); cache: a CaptionCache or a JSONL path. progress: a progress bar while a
    captioner captions.
    """
    mode, _ = parse_text_mode(text_mode)
    if mode == "none":
        return [("", "none")] * len(images)
    captions = [None] * len(images) if captions is None else list(captions)
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    found = [None if c is None else (c, "given") for c in captions]
    missing = [i for i, c in enumerate(captions) if c is None]
    if missing and (captioner is not None or cache is not None or not missing_ok):
        if captioner is not None and not isinstance(captioner, Captioner):
            captioner = Captioner.load(captioner, trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens)
        if cache is not None and not isinstance(cache, CaptionCache):
            cache = CaptionCache(cache)
        source = "cache" if captioner is None else "captioner"
        from tqdm.auto import tqdm

        for i in tqdm(missing, disable=not progress or captioner is None, desc=f"captioning ({source})", unit="img"):
            image = images[i]() if callable(images[i]) else images[i]
            try:
                found[i] = (resolve_caption(image, captioner=captioner, cache=cache, max_new_tokens=max_new_tokens),
                            source)
            except CaptionError:  # no captioner, and the cache does not hold this image
                if not missing_ok:
                    raise
    found = [("", "none") if f is None else f for f in found]
    if mode == "truncate":
        tokenizer = truncation_tokenizer(tokenizers)
        found = [(apply_text_mode(c, text_mode, tokenizer), s) for c, s in found]
    return found
