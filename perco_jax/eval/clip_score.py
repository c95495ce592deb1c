"""CLIP score of reconstructions against their captions, with a converted CLIP model in JAX.

    CLIPScorer.load(folder)(images [B, H, W, 3] uint8 or float in [0, 1], captions) -> [B]
    score = 100 * max(cos(image_embeds, text_embeds), 0)   (torchmetrics' CLIPScore, per image)

`folder` is a local transformers CLIPModel folder (config.json, model.safetensors, the tokenizer
and preprocessor_config.json), e.g. a copy of openai/clip-vit-large-patch14. Images are prepared
as the CLIP image processor does: shortest side resized to the crop size (PIL bicubic on 8-bit
RGB), centre crop, scaled to [0, 1] and normalised with the processor's mean / std.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perco_jax.convert.clip_vision import vision_config_from_hf, vision_from_source
from perco_jax.convert.common import ConversionError, SafetensorsSource, diffusers_weight_files
from perco_jax.convert.text_encoders import clip_config_from_hf, clip_from_source
from perco_jax.images import resize_rgb8, to_rgb8
from perco_jax.models.clip import CLIPTextEncoder, CLIPVisionEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def prepare(image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """An image -> [size, size, 3] float32 pixel values as CLIPImageProcessor makes them."""
    x = to_rgb8(image)
    h, w = x.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, int(h * s)), max(size, int(w * s))  # the processor floors the long side
    x = resize_rgb8(x, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[top:top + size, left:left + size].astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class CLIPScorer:
    def __init__(self, text_model: CLIPTextEncoder, text_params, vision_model: CLIPVisionEncoder, vision_params,
                 tokenizer, mean=CLIP_MEAN, std=CLIP_STD):
        self.text_model, self.vision_model, self.tokenizer = text_model, vision_model, tokenizer
        self.params = {"text": text_params, "vision": vision_params}
        self.mean, self.std = mean, std

        @jax.jit
        def score(params, pixels, ids):
            img = vision_model.apply({"params": params["vision"]}, pixels)
            txt = text_model.apply({"params": params["text"]}, ids)["text_embeds"].astype(jnp.float32)
            img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
            txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
            return 100.0 * jnp.maximum(jnp.sum(img * txt, axis=-1), 0.0)

        self._score = score

    @classmethod
    def load(cls, folder) -> "CLIPScorer":
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ConversionError(f"{folder} is not a transformers CLIP model folder (no config.json)")
        cfg = json.loads((folder / "config.json").read_text())
        text = CLIPTextEncoder(**clip_config_from_hf(cfg))
        vision = CLIPVisionEncoder(**vision_config_from_hf(cfg))
        source = SafetensorsSource(diffusers_weight_files(folder, "model"))
        mean, std = CLIP_MEAN, CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(text, clip_from_source(source, text), vision, vision_from_source(source, vision), tok, mean, std)

    def pixel_values(self, images: Sequence) -> np.ndarray:
        return np.stack([prepare(im, self.vision_model.image_size, self.mean, self.std) for im in images])

    def token_ids(self, captions: Sequence[str]) -> np.ndarray:
        n = self.text_model.max_position_embeddings
        out = self.tokenizer(list(captions), padding="max_length", max_length=n, truncation=True, return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)

    def __call__(self, images: Sequence, captions: Sequence[str]) -> np.ndarray:
        """CLIP scores [B] of images against captions (same length)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return np.asarray(self._score(self.params, self.pixel_values(images), self.token_ids(captions)))
