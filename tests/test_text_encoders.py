"""CLIP / T5 text encoders: parity with small random transformers models, conversion / export round
trips, T5's relative position buckets, and conversion errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from safetensors.numpy import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                          T5EncoderModel)
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from perco_jax.convert.common import ConversionError
from perco_jax.convert.text_encoders import (clip_from_state_dict, load_clip, load_t5, save_clip, save_t5,
                                             t5_from_state_dict)
from perco_jax.models.t5 import relative_position_bucket
from tests.reference import randomize_, rel_err

VOCAB = 1000
CLIP_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=77, bos_token_id=VOCAB - 2, pad_token_id=1)
# CLIP-L style (legacy eos_token_id == 2: pooled at the argmax id, padded with EOS) and OpenCLIP
# bigG style (pooled at the first eos_token_id, padded with 0).
CLIP_L = dict(CLIP_SMALL, hidden_act="quick_gelu", eos_token_id=2)
CLIP_G = dict(CLIP_SMALL, hidden_act="gelu", eos_token_id=VOCAB - 1, num_hidden_layers=2)
T5_SMALL = dict(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128)


def clip_ids(lengths, total=77, pad=None, seed=0):
    """Rows BOS, random tokens, EOS (= VOCAB - 1), then `pad` (EOS if None) up to `total`."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        body = rng.integers(2, VOCAB - 2, n).tolist()
        row = [VOCAB - 2] + body + [VOCAB - 1]
        rows.append(row + [VOCAB - 1 if pad is None else pad] * (total - len(row)))
    return np.asarray(rows, np.int32)


def torch_clip(ref, ids, mask=None):
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), attention_mask=None if mask is None else torch.from_numpy(mask),
                  output_hidden_states=True)
    return {"hidden_states": [h.numpy() for h in out.hidden_states], "last_hidden_state": out.last_hidden_state.numpy(),
            "text_embeds": out.text_embeds.numpy()}


def assert_clip_parity(ours, theirs, tol=1e-4):
    assert len(ours["hidden_states"]) == len(theirs["hidden_states"])
    for i, (a, b) in enumerate(zip(ours["hidden_states"], theirs["hidden_states"])):
        assert rel_err(a, b) <= tol, ("hidden_states", i, rel_err(a, b))
    for k in ("last_hidden_state", "text_embeds"):
        assert rel_err(ours[k], theirs[k]) <= tol, (k, rel_err(ours[k], theirs[k]))


@pytest.fixture(scope="module", params=["clip_l", "clip_g"])
def clip_saved(request, tmp_path_factory):
    cfg = CLIP_L if request.param == "clip_l" else CLIP_G
    ref = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return request.param, ref, folder


def test_clip_parity_from_folder(clip_saved):
    name, ref, folder = clip_saved
    model, params, cfg = load_clip(folder)
    assert cfg["eos_token_id"] == model.eos_token_id and model.hidden_act == ref.config.hidden_act
    # Batch of 3 padded after EOS to 77 (CLIP-L pads with EOS, bigG with 0); one row is empty.
    ids = clip_ids([5, 20, 0], pad=None if name == "clip_l" else 0)
    want = torch_clip(ref, ids)
    got = jax.jit(model.apply)({"params": params}, ids)
    assert got["text_embeds"].shape == (3, 24) and got["last_hidden_state"].shape == (3, 77, 32)
    assert_clip_parity(got, want)
    h, pooled = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.sd3_outputs))(params, ids)
    assert rel_err(h, want["hidden_states"][-2]) <= 1e-4 and rel_err(pooled, want["text_embeds"]) <= 1e-4


def test_clip_eos_pooling_rules():
    """Legacy (eos_token_id == 2) pools at the (first) argmax id; otherwise at the first
    eos_token_id, whatever ids are larger or repeat it later."""
    legacy = clip_ids([4, 9], total=16, pad=None)
    modern = np.zeros((2, 16), np.int32)
    modern[0, :6] = [998, 700, 800, 500, 999, 500]
    modern[1, :4] = [998, 3, 999, 500]
    for cfg, ids, where in ((CLIP_L, legacy, [5, 10]), (dict(CLIP_G, eos_token_id=500), modern, [3, 3])):
        ref = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), seed=2)
        model, params = clip_from_state_dict(ref.config.to_dict(), ref.state_dict())
        np.testing.assert_array_equal(np.asarray(model.eos_index(ids)), where)
        got = model.apply({"params": params}, ids)
        assert rel_err(got["text_embeds"], torch_clip(ref, ids)["text_embeds"]) <= 1e-4


def test_clip_attention_mask():
    ref = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), seed=3)
    model, params = clip_from_state_dict(ref.config.to_dict(), ref.state_dict())
    ids = clip_ids([3, 10], total=20, pad=0)
    mask = (np.arange(20)[None] <= np.array([[4], [11]])).astype(np.int64)
    assert_clip_parity(model.apply({"params": params}, ids, mask), torch_clip(ref, ids, mask))


def test_clip_from_whole_clip_model():
    """A CLIPModel folder's text tower and text_projection (vision weights ignored)."""
    cfg = CLIPConfig(text_config={k: v for k, v in CLIP_G.items() if k != "projection_dim"},
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=32, patch_size=16),
                     projection_dim=16)
    ref = randomize_(CLIPModel(cfg), seed=4)
    model, params = clip_from_state_dict(cfg.to_dict(), ref.state_dict())
    ids = clip_ids([6, 2], total=12, pad=0)
    with torch.no_grad():
        pooled = ref.text_model(torch.from_numpy(ids).long()).pooler_output
        want = ref.text_projection(pooled).numpy()
    assert model.projection_dim == 16
    assert rel_err(model.apply({"params": params}, ids)["text_embeds"], want) <= 1e-4


def test_clip_export_round_trip(clip_saved, tmp_path):
    _, ref, folder = clip_saved
    model, params, cfg = load_clip(folder)
    out = save_clip(model, params, tmp_path / "exported", config=cfg)
    back, info = CLIPTextModelWithProjection.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert back.config.eos_token_id == ref.config.eos_token_id and back.config.hidden_act == ref.config.hidden_act
    sd = ref.state_dict()
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k].numpy(), err_msg=k)


# ----------------------------------------------------------------------------- T5

def t5_ids(lengths, total, seed=0):
    """Rows of random tokens, EOS (1), then padding (0)."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(2, VOCAB, n).tolist() + [1] + [0] * (total - n - 1) for n in lengths]
    return np.asarray(rows, np.int32)


def torch_t5(ref, ids, mask=None):
    with torch.no_grad():
        return ref(torch.from_numpy(ids).long(),
                   attention_mask=None if mask is None else torch.from_numpy(mask)).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def t5_saved(tmp_path_factory):
    ref = randomize_(T5EncoderModel(T5Config(**T5_SMALL)), seed=5)
    folder = tmp_path_factory.mktemp("t5")
    ref.save_pretrained(folder)
    return ref, folder


def test_t5_parity_from_folder(t5_saved):
    ref, folder = t5_saved
    model, params, cfg = load_t5(folder)
    assert model.feed_forward_proj == "gated-gelu" and cfg["model_type"] == "t5"
    ids = t5_ids([7, 30, 45], total=48)  # > max_exact and log-spaced buckets
    got = jax.jit(model.apply)({"params": params}, ids)
    assert got.shape == (3, 48, 32)
    assert rel_err(got, torch_t5(ref, ids)) <= 1e-4
    mask = (ids != 0).astype(np.int64)
    mask[:, 0] = 1
    assert rel_err(model.apply({"params": params}, ids, mask), torch_t5(ref, ids, mask)) <= 1e-4


def test_t5_relu_and_tied_embedding_keys():
    """Plain relu FFN (original T5); the state dict holds both tied copies of the table, or only
    encoder.embed_tokens.weight."""
    ref = randomize_(T5EncoderModel(T5Config(**dict(T5_SMALL, feed_forward_proj="relu", num_layers=3))), seed=6)
    sd = ref.state_dict()
    assert "shared.weight" in sd and "encoder.embed_tokens.weight" in sd
    ids = t5_ids([5, 12], total=16)
    want = torch_t5(ref, ids)
    model, params = t5_from_state_dict(ref.config.to_dict(), sd)
    assert rel_err(model.apply({"params": params}, ids), want) <= 1e-4
    only_encoder = {k: v for k, v in sd.items() if k != "shared.weight"}
    model, params = t5_from_state_dict(ref.config.to_dict(), only_encoder)
    assert rel_err(model.apply({"params": params}, ids), want) <= 1e-4


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 64)])
def test_t5_relative_position_buckets(num_buckets, max_distance):
    n = 300
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    want = TorchT5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=num_buckets,
                                                      max_distance=max_distance).numpy()
    np.testing.assert_array_equal(relative_position_bucket(n, n, num_buckets, max_distance), want)


def test_t5_export_round_trip(t5_saved, tmp_path):
    ref, folder = t5_saved
    model, params, cfg = load_t5(folder)
    out = save_t5(model, params, tmp_path / "exported", config=cfg)
    back, info = T5EncoderModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sd = ref.state_dict()
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k].numpy(), err_msg=k)


# ----------------------------------------------------------------------------- errors

def test_missing_tensor_is_named(clip_saved, t5_saved, tmp_path):
    _, _, clip_folder = clip_saved
    _, t5_folder = t5_saved
    for folder, drop, load in ((clip_folder, "text_model.encoder.layers.1.mlp.fc2.weight", load_clip),
                               (t5_folder, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                load_t5)):
        broken = tmp_path / folder.name
        broken.mkdir()
        sd = load_file(str(folder / "model.safetensors"))
        del sd[drop]
        save_file(sd, str(broken / "model.safetensors"))
        (broken / "config.json").write_text((folder / "config.json").read_text())
        with pytest.raises(ConversionError, match="missing 1 tensor") as e:
            load(broken)
        assert drop in str(e.value)


def test_bad_folders_and_wrong_architecture(clip_saved, t5_saved, tmp_path):
    _, _, clip_folder = clip_saved
    _, t5_folder = t5_saved
    with pytest.raises(ConversionError, match="no such"):
        load_clip(tmp_path / "nowhere")
    with pytest.raises(ConversionError, match="no config.json"):
        load_t5(tmp_path)
    with pytest.raises(ConversionError, match="got 't5'"):
        load_clip(t5_folder)
    with pytest.raises(ConversionError, match="expected a T5 config"):
        load_t5(clip_folder)
    # A CLIPTextModel (no projection) folder: the missing tensor and the reason.
    cfg = json.loads((clip_folder / "config.json").read_text())
    sd = {k: v for k, v in load_file(str(clip_folder / "model.safetensors")).items() if k != "text_projection.weight"}
    with pytest.raises(ConversionError, match="CLIPTextModel, not a CLIPTextModelWithProjection"):
        clip_from_state_dict(cfg, sd)
    # T5 weights with a config claiming the other feed-forward.
    cfg = json.loads((t5_folder / "config.json").read_text())
    with pytest.raises(ConversionError, match="gated"):
        t5_from_state_dict(dict(cfg, feed_forward_proj="relu"), load_file(str(t5_folder / "model.safetensors")))


# ----------------------------------------------------------------------------- dtypes, sharding axes

def test_half_precision_compute_and_logical_axes():
    """bfloat16 compute stays close to float32; every parameter carries logical axes."""
    clip_ref = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), seed=7)
    t5_ref = randomize_(T5EncoderModel(T5Config(**T5_SMALL)), seed=8)
    ids_c, ids_t = clip_ids([3, 8], total=16, pad=0), t5_ids([4, 11], total=16)
    for make, ref, ids, want in ((clip_from_state_dict, clip_ref, ids_c, torch_clip(clip_ref, ids_c)["text_embeds"]),
                                 (t5_from_state_dict, t5_ref, ids_t, torch_t5(t5_ref, ids_t))):
        model, params = make(ref.config.to_dict(), ref.state_dict(), dtype=jnp.bfloat16)
        out = model.apply({"params": params}, ids)
        out = out["text_embeds"] if isinstance(out, dict) else out
        assert out.dtype == jnp.bfloat16 and rel_err(np.asarray(out, np.float32), want) <= 5e-2
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


# ----------------------------------------------------------------------------- prompt encoder of a folder

def test_prompt_encoder_from_folder_reads_the_folders_tokenizers(tmp_path):
    """PromptEncoder.from_folder: tokenizer/ and tokenizer_2/ always, tokenizer_3/ only with T5;
    the ids are those of the tokenizers read directly."""
    from perco_jax.build import text_modules
    from perco_jax.checkpoint import TOKENIZERS, load_tokenizer
    from perco_jax.config import load_config
    from perco_jax.text.prompt import PromptEncoder
    from perco_jax.text.tiny_tokenizers import save_tokenizers

    folder = save_tokenizers(tmp_path / "tok")
    clip_l, clip_g, t5 = text_modules(load_config("tiny"))
    caption = ["a red circle above a blue square"]
    with_t5 = PromptEncoder.from_folder(folder, clip_l, clip_g, t5, joint_attention_dim=32, clip_max_length=12)
    direct = [load_tokenizer(folder / name) for name in TOKENIZERS]
    ids = with_t5.tokenize(caption, max_sequence_length=16)
    for key, tok, length in zip(("clip_l", "clip_g", "t5"), direct, (12, 12, 16)):
        want = tok(caption, padding="max_length", max_length=length, truncation=True, return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(ids[key], want)
    assert with_t5.clip_max_length == 12 and with_t5.joint_attention_dim == 32
    only = with_t5.tokenize(caption, max_sequence_length=16, names=("t5",))  # (the entropy model's input)
    assert list(only) == ["t5"]
    np.testing.assert_array_equal(only["t5"], ids["t5"])
    without = PromptEncoder.from_folder(folder, clip_l, clip_g, joint_attention_dim=32)
    assert without.tokenizers[2] is None and without.t5 is None and "t5" not in without.tokenize(caption)
    with pytest.raises(OSError):  # a folder without the tokenizers
        PromptEncoder.from_folder(tmp_path / "empty", clip_l, clip_g, joint_attention_dim=32)


def test_tiny_t5_tokenizer_fits_every_synthetic_caption(tmp_path):
    """The tiny T5 vocabulary has every word a synthetic caption can contain as one piece (none
    spelled letter by letter), so every caption and its end token fit the tiny config's T5 length."""
    from transformers import AutoTokenizer

    from perco_jax.config import load_config
    from perco_jax.data.synthetic import VOCABULARY, synthetic_example
    from perco_jax.text.tiny_tokenizers import save_t5_tokenizer

    tok = AutoTokenizer.from_pretrained(str(save_t5_tokenizer(tmp_path / "t5")))
    assert len(tok) == load_config("tiny").t5.vocab_size
    for word in VOCABULARY:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    longest = max(len(tok(synthetic_example(i, 7, 32)[1])["input_ids"]) for i in range(500))
    assert longest <= load_config("tiny").text.max_sequence_length
