"""MM-DiT conversion: diffusers folders (single / sharded), original single files, export, errors,
and the full-size configs' shapes against diffusers (meta device, nothing allocated)."""
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from perco_jax.config import load_config
from perco_jax.convert import ConversionError, load_transformer, save_transformer
from perco_jax.convert.common import flat_shapes, torch_shape
from perco_jax.convert.transformer import abstract_params, transformer_key_map
from perco_jax.models.mmdit import mmdit_from_config
from tests.reference import rel_err
from tests.test_mmdit import SD3_STYLE, SD35_STYLE, inputs, reference, run_ours, run_ref


def to_original(sd, num_layers):
    """diffusers keys -> Stability's single-file layout (fused qkv, (shift, scale) adaLN order)."""
    sd = {k: v.clone() for k, v in sd.items()}
    out = {}
    P = "model.diffusion_model."

    def swap(x):
        scale, shift = x.chunk(2, 0)
        return torch.cat([shift, scale], 0)

    simple = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
              "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
              "context_embedder": "context_embedder", "proj_out": "final_layer.linear"}
    for k, v in list(sd.items()):
        for a, b in simple.items():
            if k == a or k.startswith(a + "."):
                out[P + b + k[len(a):]] = v
    for s in ("weight", "bias"):
        out[P + f"final_layer.adaLN_modulation.1.{s}"] = swap(sd[f"norm_out.linear.{s}"])
    block = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.to_out.0": "x_block.attn2.proj", "attn.norm_q": "x_block.attn.ln_q",
             "attn.norm_k": "x_block.attn.ln_k", "attn.norm_added_q": "context_block.attn.ln_q",
             "attn.norm_added_k": "context_block.attn.ln_k", "attn2.norm_q": "x_block.attn2.ln_q",
             "attn2.norm_k": "x_block.attn2.ln_k", "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
             "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2"}
    for i in range(num_layers):
        t = f"transformer_blocks.{i}."
        for s in ("weight", "bias"):
            for a, b in block.items():
                if t + a + "." + s in sd:
                    v = sd[t + a + "." + s]
                    if a == "norm1_context.linear" and i == num_layers - 1:
                        v = swap(v)
                    out[P + f"joint_blocks.{i}.{b}.{s}"] = v
            for a, names, which in (("attn", "to_q to_k to_v", "x_block"),
                                    ("attn", "add_q_proj add_k_proj add_v_proj", "context_block"),
                                    ("attn2", "to_q to_k to_v", "x_block")):
                parts = [sd.get(f"{t}{a}.{n}.{s}") for n in names.split()]
                if parts[0] is not None:
                    out[P + f"joint_blocks.{i}.{which}.{a}.qkv.{s}"] = torch.cat(parts, 0)
    return out


@pytest.fixture(scope="module")
def sd35_ref():
    return reference(SD35_STYLE, seed=3)


def test_sharded_diffusers_folder(tmp_path, sd35_ref):
    sd35_ref.save_pretrained(tmp_path / "transformer", max_shard_size="200KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    model, params = load_transformer(tmp_path / "transformer")
    args = inputs(SD35_STYLE, 2, 8, 6)
    assert rel_err(run_ours(model, params, *args), run_ref(sd35_ref, *args)) <= 1e-4


# Without QK-norm the head width is not stored in the tensors; SD3 uses 64, as the reader assumes.
SD3_HEAD64 = dict(SD3_STYLE, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128)


@pytest.mark.parametrize("cfg", [SD3_HEAD64, SD35_STYLE])
def test_single_file_checkpoint(tmp_path, cfg):
    ref = reference(cfg, seed=4)
    sd = ref.state_dict()
    orig = to_original(sd, cfg["num_layers"])
    # our test-side layout is what diffusers' own single-file converter reads
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in orig.items()})
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    orig["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)  # other components are ignored
    save_file({k: v.contiguous() for k, v in orig.items()}, tmp_path / "sd3.safetensors")
    model, params = load_transformer(tmp_path / "sd3.safetensors")
    assert model.num_layers == cfg["num_layers"] and model.qk_norm == cfg.get("qk_norm")
    args = inputs(cfg, 2, 8, 8)
    assert rel_err(run_ours(model, params, *args), run_ref(ref, *args)) <= 1e-4


def test_export_round_trip_is_exact(tmp_path, sd35_ref):
    sd35_ref.save_pretrained(tmp_path / "a")
    model, params = load_transformer(tmp_path / "a", extra_in_channels=3)
    params = jax.tree_util.tree_map(lambda x: x + 0.01, params)  # exported values, not the originals
    save_transformer(model, params, tmp_path / "b")
    exported = SD3Transformer2DModel.from_pretrained(tmp_path / "b").eval()
    assert exported.config.in_channels == SD35_STYLE["in_channels"] + 3
    model2, params2 = load_transformer(tmp_path / "b")
    assert model2 == model
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lat, t, ctx, pooled = inputs(SD35_STYLE, 1, 8, 8)
    lat = np.concatenate([lat, np.ones((1, 3, 8, 8), np.float32)], 1)
    assert rel_err(run_ours(model, params, lat, t, ctx, pooled),
                   run_ref(exported, lat, t, ctx, pooled)) <= 1e-4


def _write(folder, sd, cfg):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(dict(cfg, _class_name="SD3Transformer2DModel")))


def test_missing_and_misshaped_tensors_are_named(tmp_path, sd35_ref):
    sd = dict(sd35_ref.state_dict())
    del sd["transformer_blocks.1.attn.to_k.weight"]
    sd["proj_out.bias"] = torch.zeros(5)
    sd["some.stray.weight"] = torch.zeros(2)
    _write(tmp_path / "bad", sd, SD35_STYLE)
    with pytest.raises(ConversionError) as e:
        load_transformer(tmp_path / "bad")
    msg = str(e.value)
    assert "transformer_blocks.1.attn.to_k.weight" in msg and "missing" in msg
    assert "proj_out.bias" in msg and "some.stray.weight" in msg


def test_wrong_family_gets_a_hint(tmp_path, sd35_ref):
    sd35_ref.save_pretrained(tmp_path / "t")
    with pytest.raises(ConversionError, match="qk_norm=rms_norm.*but the model has"):
        load_transformer(tmp_path / "t", config=SD3_STYLE)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        load_transformer(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConversionError, match="safetensors"):
        load_transformer(tmp_path / "x.safetensors")
    with pytest.raises(ConversionError, match="no such"):
        load_transformer(tmp_path / "nope")


@pytest.mark.parametrize("preset,params_m", [("sd3_medium", 2028), ("sd35_medium", 2243), ("sd35_large", 8057)])
def test_full_size_shapes_equal_diffusers(preset, params_m):
    cfg = load_config(preset).mmdit.to_dict()
    model = mmdit_from_config(cfg)
    shapes = flat_shapes(abstract_params(model))
    kw = {k: v for k, v in cfg.items() if k != "extra_in_channels"}
    kw["qk_norm"] = kw["qk_norm"] or None
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**kw)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.named_parameters()}
    for e in transformer_key_map(model):
        assert torch_shape(e.kind, shapes[e.flax]) == ref_shapes.pop(e.torch), e
    assert not ref_shapes  # every diffusers parameter is covered
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == sum(p.numel() for p in ref.parameters())
    assert round(n / 1e6) == pytest.approx(params_m, abs=2)
