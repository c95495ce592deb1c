"""SD3 VAE: parity with a small random diffusers AutoencoderKL, conversion / export round trips,
errors, the latent scaling helpers, and the space-to-depth autoencoder."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from perco_jax.convert.common import ConversionError, flat_shapes, torch_shape
from perco_jax.convert.vae import (abstract_params, load_vae, save_vae, vae_config_from_diffusers, vae_from_state_dict,
                                   vae_key_map)
from perco_jax.models.vae import (AutoencoderKL, SpaceToDepthAutoencoder, latents_from_moments, scale_latents,
                                  unscale_latents)
from tests.reference import randomize_, rel_err

SMALL = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16, norm_num_groups=8,
             scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def reference(seed=0, **overrides):
    return randomize_(TorchAutoencoderKL(**{**SMALL, **overrides}), seed=seed)


def images(b=2, h=48, w=64, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (b, h, w, 3)).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_outputs(ref, x):
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        return nhwc(dist.mean), nhwc(dist.logvar), nhwc(ref.decode(dist.mean).sample)


def jax_outputs(model, params, x):
    v = {"params": params}
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(v, x)
    out = jax.jit(lambda v, z: model.apply(v, z, method=model.decode))(v, mean)
    return mean, logvar, out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random reference saved with save_pretrained, and its outputs on a non-square batch."""
    ref = reference()
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    x = images()
    return ref, folder, x, torch_outputs(ref, x)


def assert_parity(ours, theirs, tol=1e-4):
    for name, a, b in zip(("mean", "logvar", "decoded"), ours, theirs):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


def test_parity_from_folder(saved):
    _, folder, x, want = saved
    model, params = load_vae(folder)
    assert (model.scaling_factor, model.shift_factor, model.downsample_factor) == (1.5305, 0.0609, 2)
    got = jax_outputs(model, params, x)
    assert got[0].shape == (2, 24, 32, 16) and got[2].shape == x.shape
    assert_parity(got, want)


def test_parity_quant_convs_and_no_attention():
    ref = reference(seed=1, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False,
                    block_out_channels=(32, 32), latent_channels=4)
    model, params = vae_from_state_dict(ref.config, ref.state_dict())
    assert model.use_quant_conv and model.use_post_quant_conv and not model.mid_block_add_attention
    x = images(b=1, h=32, w=32, seed=1)
    assert_parity(jax_outputs(model, params, x), torch_outputs(ref, x))


def test_params_are_logically_annotated_and_key_map_covers():
    model = AutoencoderKL(**{**vae_config_from_diffusers(SMALL), "use_quant_conv": True, "use_post_quant_conv": True})
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda l: isinstance(l, nn.Partitioned))
    assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
    names = [e.flax for e in vae_key_map(model)]
    assert sorted(names) == sorted(flat_shapes(abstract_params(model)))


def test_export_round_trip(saved, tmp_path):
    _, folder, x, want = saved
    model, params = load_vae(folder)
    out = save_vae(model, params, tmp_path / "exported")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["shift_factor"] == 0.0609
    again = TorchAutoencoderKL.from_pretrained(out).eval()
    for a, b in zip(torch_outputs(again, x), want):
        np.testing.assert_array_equal(a, b)
    _, params2 = load_vae(out)
    for (p, a), (q, b) in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(params2)):
        assert p == q
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_tensor_and_bad_folders(saved, tmp_path):
    _, folder, _, _ = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del sd["decoder.mid_block.attentions.0.to_k.weight"]
    save_file(sd, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing 1 tensor\(s\): decoder.mid_block.attentions.0.to_k.weight"):
        load_vae(broken)
    (broken / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json"):
        load_vae(broken)
    cfg = json.loads((folder / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(ConversionError, match="expected an AutoencoderKL config"):
        load_vae(broken)
    (broken / "config.json").write_text(json.dumps({**cfg, "latent_channels": 4}))
    with pytest.raises(ConversionError, match="mis-shaped"):
        load_vae(broken)


def test_scaling_helpers_match_the_pipeline():
    z = np.random.default_rng(0).normal(size=(2, 4, 4, 16)).astype(np.float32)
    scale, shift = 1.5305, 0.0609
    encoded = scale_latents(jnp.asarray(z), scale, shift)
    np.testing.assert_allclose(encoded, (z - shift) * scale, rtol=1e-6)  # SD3 img2img / inpaint
    np.testing.assert_allclose(unscale_latents(encoded, scale, shift), encoded / scale + shift, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(encoded, scale, shift), z, atol=1e-6)


def test_latents_from_moments():
    mean = jnp.ones((1, 2, 2, 4))
    logvar = jnp.full_like(mean, 2 * np.log(0.5))
    assert latents_from_moments(mean, logvar) is mean
    s = latents_from_moments(mean, logvar, jax.random.PRNGKey(0))
    np.testing.assert_allclose(s, mean + 0.5 * jax.random.normal(jax.random.PRNGKey(0), mean.shape), rtol=1e-6)


def test_space_to_depth():
    ae = SpaceToDepthAutoencoder(factor=4)
    x = jnp.asarray(images(b=2, h=16, w=8))
    mean, logvar = ae.apply({}, x, method=ae.encode)
    assert mean.shape == (2, 4, 2, 48) and ae.latent_channels == 48 and logvar.shape == mean.shape
    # Channel order (c, i, j) as torch's pixel_unshuffle.
    np.testing.assert_array_equal(nchw(mean).numpy(), torch.nn.functional.pixel_unshuffle(nchw(x), 4).numpy())
    np.testing.assert_array_equal(ae.apply({}, mean, method=ae.decode), x)
    assert ae.init(jax.random.PRNGKey(0), x) == {}
    assert (ae.scaling_factor, ae.shift_factor) == (1.0, 0.0)
    with pytest.raises(ValueError, match="not a multiple"):
        ae.apply({}, jnp.zeros((1, 10, 8, 3)), method=ae.encode)
    with pytest.raises(ValueError, match="not a multiple"):
        AutoencoderKL(block_out_channels=(32, 32), norm_num_groups=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 4, 3)))


def test_bfloat16_compute_stays_close(saved):
    _, folder, x, want = saved
    model, params = load_vae(folder, compute_dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    got = jax_outputs(model, params, x)
    assert all(g.dtype == jnp.float32 for g in got)
    assert rel_err(got[0], want[0]) < 5e-2 and rel_err(got[2], want[2]) < 5e-2


def test_sd3_full_size_shapes_match_diffusers():
    """SD3's published vae/config.json: every key and shape, on the meta device (nothing allocated)."""
    cfg = dict(SMALL, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        ref = TorchAutoencoderKL(**cfg)
    model = AutoencoderKL(**vae_config_from_diffusers(cfg))
    assert model == AutoencoderKL() and model.downsample_factor == 8  # the module's defaults are SD3's
    shapes = flat_shapes(abstract_params(model))
    ours = {e.torch: torch_shape(e.kind, shapes[e.flax]) for e in vae_key_map(model)}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
