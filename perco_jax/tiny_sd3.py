"""A random tiny SD3 pipeline in diffusers format (PyTorch), built offline: the reference that
the conversion tests (tests/test_pipeline.py, test_single_file_pipeline.py, test_train.py's
pretrained run) and benchmarks/pipeline.py convert and compare against. Needs the torch extra.

    save_tiny_sd3_pipeline(folder, seed=0, with_t5=True, config=None) -> folder
"""
from __future__ import annotations

from pathlib import Path


def save_tiny_sd3_pipeline(folder: str | Path, seed: int = 0, with_t5: bool = True, config=None) -> Path:
    """A random StableDiffusion3Pipeline in the tiny config's shapes, saved as a diffusers folder.

    Every weight is drawn at random (diffusers zero-inits the adaLN gates, which would hide
    bugs), scaled by 1/sqrt(fan_in) so activations stay O(1).
    """
    import shutil

    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from perco_jax.checkpoint import TOKENIZERS, load_tokenizer
    from perco_jax.config import load_config
    from perco_jax.text.tiny_tokenizers import save_tokenizers

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
    save_tokenizers(tok_dir)
    toks = {n: load_tokenizer(tok_dir / n) for n in TOKENIZERS}
    if not with_t5:
        toks["tokenizer_3"] = None
    pipe = StableDiffusion3Pipeline(**parts, **toks)
    pipe.save_pretrained(str(folder))
    shutil.rmtree(tok_dir)
    return folder
