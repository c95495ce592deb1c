"""An original single-file SD3 checkpoint that bundles everything (MM-DiT under
model.diffusion_model.*, VAE under first_stage_model.* in the LDM layout, text encoders under
text_encoders.{clip_l,clip_g,t5xxl}.transformer.*) converts to the same pipeline as the diffusers folder."""
import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import save_file

from perco_jax.cli import main as cli
from perco_jax.config import load_config
from perco_jax.sd3 import SD3Pipeline
from perco_jax.tiny_sd3 import save_tiny_sd3_pipeline
from tests.test_convert_transformer import to_original
from tests.test_single_file_vae import to_ldm

# Head widths, the VAE's group count, T5's relative max_distance and the scheduler shift are not
# stored in a single file: as in SD3, CLIP and T5 heads are 64 wide, the VAE has 32 groups,
# max_distance is 128 and the shift is 3.
HEAD64 = ["vae.block_out_channels=(32, 32, 32)", "vae.norm_num_groups=32", "clip_l.hidden_size=64", "clip_l.num_attention_heads=1", "clip_g.hidden_size=64",
          "clip_g.num_attention_heads=1", "t5.d_model=128", "t5.d_kv=64", "t5.num_heads=2",
          "mmdit.joint_attention_dim=128", "t5.relative_attention_max_distance=128",
          "scheduler_shift=3.0"]


def test_bundled_single_file_equals_diffusers(tmp_path):
    config = load_config("tiny", HEAD64)
    save_tiny_sd3_pipeline(tmp_path / "pipe", seed=2, config=config)
    ref = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe")
    sd = to_original(ref.transformer.state_dict(), config.mmdit.num_layers)
    n_up = len(config.vae.block_out_channels)
    sd.update({"first_stage_model." + k: v for k, v in to_ldm(ref.vae.state_dict(), n_up).items()})
    for which, enc in (("clip_l", ref.text_encoder), ("clip_g", ref.text_encoder_2), ("t5xxl", ref.text_encoder_3)):
        sd.update({f"text_encoders.{which}.transformer.{k}": v for k, v in enc.state_dict().items()})
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, tmp_path / "sd3_bundle.safetensors")

    assert cli(["convert", "--single-file", str(tmp_path / "sd3_bundle.safetensors"), "--tokenizers",
                str(tmp_path / "pipe"), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
    pipe = SD3Pipeline.load(tmp_path / "ckpt")
    latents = np.random.default_rng(1).standard_normal((1, 16, 16, 16)).astype(np.float32)
    prompt = "a small green triangle left of a big yellow star"
    with torch.no_grad():
        want = ref(prompt, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents),
                   output_type="np").images[0]
    got = pipe.generate(prompt, steps=4, guidance=5.0, latents=latents)[0]
    assert want.std() > 0.01
    assert np.abs(got - want).max() <= 2e-3
