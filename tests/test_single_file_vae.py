"""The LDM-layout VAE bundled in original SD3 single-file checkpoints (`first_stage_model.*`): the
test builds that layout from a small random diffusers AutoencoderKL, proves it with diffusers' own
`convert_ldm_vae_checkpoint`, and checks parity of the loaded Flax model."""
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.numpy import save_file

from perco_jax.convert.common import ConversionError, DictSource
from perco_jax.convert.single_file_vae import LDMVAESource, infer_vae_config, load_single_file_vae
from perco_jax.convert.vae import vae_config_from_diffusers
from perco_jax.models.vae import AutoencoderKL
from tests.reference import randomize_, rel_err
from tests.test_vae import images, jax_outputs, torch_outputs

# SD3's layout at toy width: no quant convs, 32 groups (the group count is not stored in the file).
SMALL = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16, norm_num_groups=32,
             scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
PREFIX = "first_stage_model."


def to_ldm(state_dict, num_up):
    """Test-side inverse of the LDM -> diffusers renaming (attention projections back to 1x1 convs)."""
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", lambda m: ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", lambda m: f".mid.attn_1.{m[1]}."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", lambda m: ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
        (r"\.conv_norm_out\.", lambda m: ".norm_out."),
    ]
    out = {}
    for key, t in state_dict.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        if ".attn_1." in new and ".norm." not in new and new.endswith(".weight"):
            t = t.reshape(*t.shape, 1, 1)
        assert new not in out, new
        out[new] = t
    return out




def assert_parity(ours, theirs, tol=1e-4):
    for name, a, b in zip(("mean", "logvar", "decoded"), ours, theirs):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


def ldm_file(path, ref, extra=None):
    """An original-style single file: the LDM VAE under first_stage_model. plus dummy MM-DiT tensors."""
    ldm = to_ldm(ref.state_dict(), len(ref.config.up_block_types))
    tensors = {PREFIX + k: np.ascontiguousarray(v.numpy()) for k, v in ldm.items()}
    tensors["model.diffusion_model.x_embedder.proj.weight"] = np.zeros((8, 16, 2, 2), np.float32)
    tensors["model.diffusion_model.pos_embed"] = np.zeros((1, 4, 8), np.float32)
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


def assert_same_state_dict(got, want):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        g = got[k] if isinstance(got[k], torch.Tensor) else torch.from_numpy(np.array(got[k]))
        assert torch.equal(g, v), k


@pytest.fixture(scope="module")
def ref():
    return randomize_(TorchAutoencoderKL(**SMALL))


def test_test_layout_is_what_diffusers_converts(ref):
    """diffusers' own converter maps the test's LDM dict back to exactly the reference state dict."""
    ldm = {PREFIX + k: v for k, v in to_ldm(ref.state_dict(), 2).items()}
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in ldm  # the reversed order
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert_same_state_dict(convert_ldm_vae_checkpoint(ldm, dict(ref.config)), ref.state_dict())


def test_source_exposes_diffusers_keys(ref, tmp_path):
    source = LDMVAESource(ldm_file(tmp_path / "sd3.safetensors", ref))
    want = ref.state_dict()
    assert source.unused_keys == []
    assert {k: source.shape(k) for k in source.keys()} == {k: tuple(v.shape) for k, v in want.items()}
    assert_same_state_dict({k: source.get(k) for k in source.keys()}, want)


def test_parity_from_single_file(ref, tmp_path):
    path = ldm_file(tmp_path / "sd3.safetensors", ref,
                    extra={PREFIX + "loss.logvar": np.zeros((), np.float32)})  # a training leftover, ignored
    model, params = load_single_file_vae(path)
    assert model == AutoencoderKL(**vae_config_from_diffusers(SMALL))
    assert (model.scaling_factor, model.shift_factor, model.norm_num_groups) == (1.5305, 0.0609, 32)
    x = images()
    assert_parity(jax_outputs(model, params, x), torch_outputs(ref, x))


def test_variant_with_quant_convs_no_attention_and_config_override(tmp_path):
    """Quant convs, no mid-block attention, 2 resnets per block, 3 levels; the group count (not in the
    file) is given as an override."""
    cfg = dict(SMALL, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=4, norm_num_groups=8,
               use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False)
    ref = randomize_(TorchAutoencoderKL(**cfg), seed=1)
    ldm = {PREFIX + k: v for k, v in to_ldm(ref.state_dict(), 3).items()}
    assert_same_state_dict(convert_ldm_vae_checkpoint(ldm, dict(ref.config)), ref.state_dict())
    path = ldm_file(tmp_path / "old.safetensors", ref)
    model, params = load_single_file_vae(path, config={"norm_num_groups": 8})
    assert model == AutoencoderKL(**vae_config_from_diffusers(cfg))
    x = images(b=1, h=16, w=16, seed=1)
    assert_parity(jax_outputs(model, params, x), torch_outputs(ref, x))


def test_sd3_full_size_config_is_inferred():
    """SD3's published VAE, on the meta device: the inferred config is the module's default (SD3's)."""
    cfg = dict(SMALL, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        ref = TorchAutoencoderKL(**cfg)
    source = LDMVAESource(DictSource(to_ldm(ref.state_dict(), 4)))
    assert AutoencoderKL(**infer_vae_config(source)) == AutoencoderKL()
    assert {k: source.shape(k) for k in source.keys()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_errors(ref, tmp_path):
    only_dit = tmp_path / "dit_only.safetensors"
    save_file({"model.diffusion_model.x_embedder.proj.weight": np.zeros((8, 16, 2, 2), np.float32)}, str(only_dit))
    with pytest.raises(ConversionError, match=r"no 'first_stage_model\.\*' tensors.*does not bundle a VAE"):
        load_single_file_vae(only_dit)
    with pytest.raises(ConversionError, match="no such checkpoint file"):
        load_single_file_vae(tmp_path / "absent.safetensors")
    stray = ldm_file(tmp_path / "stray.safetensors", ref,
                     extra={PREFIX + "encoder.mid.attn_2.q.weight": np.zeros((64, 64, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected 1 tensor\(s\): encoder\.mid\.attn_2\.q\.weight"):
        load_single_file_vae(stray)
    with pytest.raises(ConversionError, match="mis-shaped"):
        load_single_file_vae(ldm_file(tmp_path / "sd3.safetensors", ref), config={"latent_channels": 4})
