"""transformers CLIP image tower (`vision_model.*` + `visual_projection`) -> Flax `CLIPVisionEncoder`.

Reads a CLIPModel / CLIPVisionModelWithProjection folder or state dict; every key and shape is
checked before any tensor is read (one ConversionError listing what is wrong).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.convert.common import ConversionError, Entry, TensorSource, convert_checked, flat_shapes
from perco_jax.convert.text_encoders import clip_layer_entries, linear_entries, norm_entries
from perco_jax.models.clip import ACTIVATIONS, CLIPVisionEncoder

VISION_FIELDS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "projection_dim",
                 "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps")


def vision_config_from_hf(cfg: Mapping) -> dict:
    """CLIPVisionEncoder kwargs from a CLIPConfig (its vision_config, projected to the top-level
    projection_dim) or a CLIPVisionConfig dict; missing fields take CLIPVisionConfig's defaults."""
    cfg = dict(cfg)
    if cfg.get("model_type") == "clip":
        vision = dict(cfg.get("vision_config") or {})
        if "projection_dim" in cfg:
            vision["projection_dim"] = cfg["projection_dim"]
        cfg = vision
    elif cfg.get("model_type") not in (None, "clip_vision_model"):
        raise ConversionError(f"expected a CLIP config (model_type 'clip' or 'clip_vision_model'), "
                              f"got {cfg.get('model_type')!r}")
    kw = {k: cfg[k] for k in VISION_FIELDS if k in cfg}
    if kw.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        raise ConversionError(f"unsupported hidden_act {kw['hidden_act']!r}")
    return kw


def vision_key_map(model: CLIPVisionEncoder) -> list[Entry]:
    v = "vision_model"
    e = [Entry(("patch_embedding", "kernel"), f"{v}.embeddings.patch_embedding.weight", "conv"),
         Entry(("class_embedding",), f"{v}.embeddings.class_embedding"),
         Entry(("position_embedding", "embedding"), f"{v}.embeddings.position_embedding.weight")]
    e += norm_entries(("pre_layrnorm",), f"{v}.pre_layrnorm")
    e += clip_layer_entries(v, model.num_hidden_layers)
    e += norm_entries(("post_layernorm",), f"{v}.post_layernorm")
    return e + linear_entries(("visual_projection",), "visual_projection", bias=False)


def vision_from_source(source: TensorSource, model: CLIPVisionEncoder, *, dtype=jnp.float32) -> dict:
    """Params of `model` from transformers keys; text-tower keys are ignored."""
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    shapes = flat_shapes(nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))["params"])
    ignore = [k for k in source.keys() if k.startswith(("text_model.", "text_projection")) or k == "logit_scale"
              or k.endswith("position_ids")]
    return convert_checked(vision_key_map(model), source, shapes, name="CLIP vision", ignore=ignore,
                           what="CLIP image tower (CLIPModel / CLIPVisionModelWithProjection)", dtype=dtype)
