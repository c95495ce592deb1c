"""Whole SD3 pipeline: a small random diffusers StableDiffusion3Pipeline (tiny tokenizers built
offline), converted with `perco-jax convert`, sampled with `perco-jax generate` from the same
latents, gives diffusers' image; prompt encoding equals `encode_prompt`; bad folders fail clearly."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from perco_jax.cli import main as cli
from perco_jax.convert import ConversionError
from perco_jax.convert.pipeline import convert_to_folder
from perco_jax.sd3 import SD3Pipeline
from perco_jax.tiny_sd3 import save_tiny_sd3_pipeline
from tests.reference import rel_err

PROMPT = "a large red circle above a small blue square"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    save_tiny_sd3_pipeline(root / "pipe", seed=0)
    assert cli(["convert", "--diffusers", str(root / "pipe"), "--out", str(root / "ckpt"), "--quiet"]) == 0
    return root


def test_encode_prompt_matches_diffusers(tiny):
    ref = StableDiffusion3Pipeline.from_pretrained(tiny / "pipe")
    pipe = SD3Pipeline.load(tiny / "ckpt")
    prompts = [PROMPT, "", "a green triangle on a grey background with a tiny yellow star near it"]
    for max_len in (256, 12):  # 12: T5 truncation
        with torch.no_grad():
            c, _, p, _ = ref.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                           max_sequence_length=max_len)
        ours_c, ours_p = pipe.encode_prompts(prompts, max_len)
        assert rel_err(ours_c, c.numpy()) <= 1e-4 and rel_err(ours_p, p.numpy()) <= 1e-4


@pytest.mark.parametrize("guidance,steps", [(4.5, 6), (1.0, 3)])
def test_generate_matches_diffusers(tiny, tmp_path, guidance, steps):
    ref = StableDiffusion3Pipeline.from_pretrained(tiny / "pipe")
    latents = np.random.default_rng(0).standard_normal((1, 16, 16, 12)).astype(np.float32)  # non-square
    np.save(tmp_path / "latents.npy", latents)
    with torch.no_grad():
        want = ref(PROMPT, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(latents), height=64, width=48, output_type="np").images[0]
    out = tmp_path / "img.npy"
    assert cli(["generate", "--checkpoint", str(tiny / "ckpt"), "--prompt", PROMPT, "--negative-prompt",
                "blurry", "--steps", str(steps), "--guidance", str(guidance), "--latents",
                str(tmp_path / "latents.npy"), "--out", str(out)]) == 0
    got = np.load(out)
    assert got.shape == want.shape == (64, 48, 3)
    assert want.std() > 0.01  # a non-trivial image
    assert np.abs(got - want).max() <= 2e-3


def test_generate_png_from_seed(tiny, tmp_path):
    out = tmp_path / "img.png"
    assert cli(["generate", "--checkpoint", str(tiny / "ckpt"), "--prompt", PROMPT, "--steps", "2",
                "--seed", "3", "--out", str(out)]) == 0
    from perco_jax.images import load_image
    img = load_image(out)
    assert img.shape == (64, 64, 3)  # sample_size 16 x VAE factor 4


def test_pipeline_without_t5(tmp_path):
    save_tiny_sd3_pipeline(tmp_path / "pipe", seed=1, with_t5=False)
    convert_to_folder(diffusers=str(tmp_path / "pipe"), out=tmp_path / "ckpt", progress=False)
    ref = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe", text_encoder_3=None, tokenizer_3=None)
    pipe = SD3Pipeline.load(tmp_path / "ckpt")
    with torch.no_grad():
        c, _, p, _ = ref.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    ours_c, ours_p = pipe.encode_prompts([PROMPT])
    assert rel_err(ours_c, c.numpy()) <= 1e-4 and rel_err(ours_p, p.numpy()) <= 1e-4
    assert np.all(np.asarray(ours_c)[:, 77:] == 0)


def test_bad_pipeline_folders(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny / "pipe", bad)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ConversionError, match="not a Stable Diffusion 3 pipeline"):
        convert_to_folder(diffusers=str(bad), out=tmp_path / "o", progress=False)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    shutil.rmtree(bad / "vae")
    with pytest.raises(ConversionError, match="vae"):
        convert_to_folder(diffusers=str(bad), out=tmp_path / "o", progress=False)
    shutil.copytree(tiny / "pipe" / "vae", bad / "vae")
    shutil.rmtree(bad / "tokenizer")  # tokenizer from another model: T5's in CLIP-L's place
    shutil.copytree(tiny / "pipe" / "tokenizer_3", bad / "tokenizer")
    cfg = json.loads((bad / "text_encoder" / "config.json").read_text())
    cfg["vocab_size"] = 100
    (bad / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError):
        convert_to_folder(diffusers=str(bad), out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # nothing partial written
    # the CLI turns these into one line on stderr and exit code 2
    assert cli(["convert", "--diffusers", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


def test_tokenizer_mismatch_is_named(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny / "pipe", bad)
    shutil.rmtree(bad / "tokenizer_3")  # CLIP's 514-token tokenizer for a 140-token T5
    shutil.copytree(tiny / "pipe" / "tokenizer", bad / "tokenizer_3")
    with pytest.raises(ConversionError, match="tokenizer mismatch"):
        convert_to_folder(diffusers=str(bad), out=tmp_path / "o", progress=False)
