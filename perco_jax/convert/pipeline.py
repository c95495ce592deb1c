"""Whole-pipeline conversion into a perco-jax weights folder (see `perco_jax.checkpoint`); such a
folder loads back as an `SD3Pipeline` (`perco_jax.sd3`).

Sources:
  * a diffusers SD3 pipeline folder (model_index.json; transformer, vae, text_encoder,
    text_encoder_2, optional text_encoder_3, tokenizer folders, scheduler config);
  * a diffusers transformer/ folder alone;
  * an original single-file checkpoint: the transformer, plus the VAE (first_stage_model.*) and the
    text encoders (text_encoders.{clip_l,clip_g,t5xxl}.transformer.*) when the file bundles them;
    tokenizers then come from `tokenizers=` (a folder holding tokenizer/, tokenizer_2/, tokenizer_3/).
Everything is checked and converted in memory before anything is written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from perco_jax.checkpoint import TEXT_ENCODERS, TOKENIZERS, load_tokenizer, save_weights
from perco_jax.convert.common import ConversionError, SafetensorsSource, TensorSource
from perco_jax.convert.single_file_vae import load_single_file_vae
from perco_jax.convert.text_encoders import (T5_EMBED_KEYS, clip_config_from_hf, clip_config_to_hf,
                                             clip_from_source, load_clip, load_t5, t5_config_from_hf,
                                             t5_config_to_hf, t5_from_source)
from perco_jax.convert.transformer import config_to_diffusers, load_transformer
from perco_jax.convert.vae import load_vae, vae_config_to_diffusers
from perco_jax.models.clip import CLIPTextEncoder
from perco_jax.models.t5 import T5Encoder

PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}  # not stored in a single file
DEFAULT_SHIFT = 3.0


def convert_to_folder(*, out: str | os.PathLike, diffusers: str | None = None, single_file: str | None = None,
                      tokenizers: str | None = None, extra_in_channels: int = 0,
                      progress: bool = True) -> Path:
    """Convert, check, then write `out`. Returns the folder written."""
    if (diffusers is None) == (single_file is None):
        raise ConversionError("give exactly one of a diffusers folder or a single file")
    if diffusers is not None:
        path = Path(diffusers)
        if (path / "model_index.json").exists():
            components, meta, tok_root = _from_pipeline_folder(path, extra_in_channels, progress)
        else:
            model, params = load_transformer(path, extra_in_channels=extra_in_channels, progress=progress)
            components, meta, tok_root = {"transformer": (config_to_diffusers(model), params)}, {}, None
    else:
        components, meta = _from_single_file(Path(single_file), extra_in_channels, progress)
        tok_root = None
    if tokenizers is not None:
        tok_root = Path(tokenizers)
    tok_dirs = _tokenizer_dirs(tok_root, components) if tok_root is not None else {}
    return save_weights(out, components, metadata=meta, extra_dirs=tok_dirs)


def _from_pipeline_folder(path: Path, extra: int, progress: bool):
    index = json.loads((path / "model_index.json").read_text())
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise ConversionError(f"{path} is a {cls!r} folder, not a Stable Diffusion 3 pipeline")
    required = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    missing = [c for c in required if not (path / c).is_dir()]
    if missing:
        raise ConversionError(f"{path} lacks the SD3 component folder(s) {missing}")
    if (path / "text_encoder_3").is_dir() != (path / "tokenizer_3").is_dir():
        raise ConversionError(f"{path}: text_encoder_3 and tokenizer_3 must both be present or both absent")
    model, params = load_transformer(path / "transformer", extra_in_channels=extra, progress=progress)
    components = {"transformer": (config_to_diffusers(model), params)}
    vae, vparams = load_vae(path / "vae", progress=progress)
    components["vae"] = (vae_config_to_diffusers(vae), vparams)
    for name in ("text_encoder", "text_encoder_2"):
        m, p, cfg = load_clip(path / name, progress=progress)
        components[name] = ({**cfg, **clip_config_to_hf(m)}, p)
    if (path / "text_encoder_3").is_dir():
        m, p, cfg = load_t5(path / "text_encoder_3", progress=progress)
        components["text_encoder_3"] = ({**cfg, **t5_config_to_hf(m)}, p)
    meta = {"scheduler": {"shift": _scheduler_shift(path)}}
    return components, meta, path


def _scheduler_shift(path: Path) -> float:
    f = path / "scheduler" / "scheduler_config.json"
    if not f.exists():
        return DEFAULT_SHIFT
    cfg = json.loads(f.read_text())
    if cfg.get("use_dynamic_shifting"):
        raise ConversionError(f"{f}: dynamic shifting is not SD3's scheduler (not supported)")
    return float(cfg.get("shift", 1.0))


def _tokenizer_dirs(root: Path, components: dict) -> dict[str, Path]:
    """Tokenizer folders to copy, checked against the converted text encoders' vocabularies."""
    dirs = {}
    for tok, enc in zip(TOKENIZERS, TEXT_ENCODERS):
        d = root / tok
        if enc not in components:
            continue
        if not d.is_dir():
            raise ConversionError(f"no {tok}/ folder in {root} for {enc}")
        try:
            n = len(load_tokenizer(d))
        except Exception as e:  # transformers raises many types for unreadable tokenizer files
            raise ConversionError(f"{d} is not a readable tokenizer: {e}") from e
        vocab = components[enc][0]["vocab_size"]
        if n > vocab:
            raise ConversionError(f"tokenizer mismatch: {d} has {n} tokens but {enc} has only {vocab} "
                                  "embeddings (tokenizer and text encoder from different models?)")
        dirs[tok] = d
    return dirs


# ----------------------------------------------------------------------------- single files

def _from_single_file(path: Path, extra: int, progress: bool):
    model, params = load_transformer(path, extra_in_channels=extra, progress=progress)
    components = {"transformer": (config_to_diffusers(model), params)}
    probe = SafetensorsSource([path])
    keys = probe.keys()
    if any(k.startswith("first_stage_model.") for k in keys):
        vae, vparams = load_single_file_vae(path, progress=progress)
        components["vae"] = (vae_config_to_diffusers(vae), vparams)
    for name, which in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        prefix = f"text_encoders.{which}.transformer."
        if any(k.startswith(prefix) for k in keys):
            src = SafetensorsSource([path], prefix=prefix)
            m = CLIPTextEncoder(**clip_config_from_hf(_infer_clip_config(src, CLIP_ACT[which])))
            components[name] = (clip_config_to_hf(m), clip_from_source(src, m, progress=progress))
    prefix = "text_encoders.t5xxl.transformer."
    if any(k.startswith(prefix) for k in keys):
        src = SafetensorsSource([path], prefix=prefix)
        m = T5Encoder(**t5_config_from_hf(_infer_t5_config(src)))
        components["text_encoder_3"] = (t5_config_to_hf(m), t5_from_source(src, m, progress=progress))
    return components, {"scheduler": {"shift": DEFAULT_SHIFT}}


def _infer_clip_config(src: TensorSource, act: str, head_dim: int = 64) -> dict:
    """A CLIP text config from tensor shapes (heads assume the 64-wide heads of CLIP-L and bigG)."""
    vocab, hidden = src.shape("text_model.embeddings.token_embedding.weight")
    layers = 1 + max(int(k.split(".")[3]) for k in src.keys() if k.startswith("text_model.encoder.layers."))
    return dict(model_type="clip_text_model", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=src.shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
                projection_dim=src.shape("text_projection.weight")[0], num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // head_dim),
                max_position_embeddings=src.shape("text_model.embeddings.position_embedding.weight")[0],
                hidden_act=act, eos_token_id=2)


def _infer_t5_config(src: TensorSource) -> dict:
    embed = next((k for k in T5_EMBED_KEYS if k in src), None)
    if embed is None:
        raise ConversionError("bundled T5 has no token embedding (shared.weight)")
    vocab, d_model = src.shape(embed)
    q = src.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in src
    wi = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    buckets, heads = src.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    layers = 1 + max(int(k.split(".")[2]) for k in src.keys() if k.startswith("encoder.block."))
    return dict(model_type="t5", vocab_size=vocab, d_model=d_model, d_kv=q // heads, num_heads=heads,
                d_ff=src.shape(wi)[0], num_layers=layers, relative_attention_num_buckets=buckets,
                feed_forward_proj="gated-gelu" if gated else "relu")
