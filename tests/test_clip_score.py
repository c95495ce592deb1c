"""CLIP score: the converted image tower equals transformers' on the same pixels, and the whole
score (preprocessing, tokenizer, both towers) equals transformers' CLIPModel + processor."""
import numpy as np
import pytest
import torch

from perco_jax.convert.common import ConversionError
from perco_jax.eval.clip_score import CLIPScorer
from perco_jax.text.tiny_tokenizers import save_clip_tokenizer
from tests.reference import randomize_, rel_err


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, hidden_act="quick_gelu"),
        projection_dim=16)
    torch.manual_seed(0)
    model = randomize_(CLIPModel(config).eval())
    model.save_pretrained(folder)
    save_clip_tokenizer(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            (rng.random((50, 36, 3)) * 255).astype(np.uint8)]


def test_image_tower_matches_transformers(clip_folder):
    folder, ref = clip_folder
    scorer = CLIPScorer.load(folder)
    pixels = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(scorer.vision_model.apply({"params": scorer.params["vision"]}, pixels))
    with torch.no_grad():
        theirs = ref.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    theirs = getattr(theirs, "image_embeds", getattr(theirs, "pooler_output", theirs))
    assert rel_err(ours, np.asarray(theirs)) < 1e-5


def test_clip_score_matches_transformers_model_and_processor(clip_folder):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    folder, ref = clip_folder
    scorer = CLIPScorer.load(folder)
    images, captions = _images(), ["a red circle", "two blue squares on grey", ""]
    ours = scorer(images, captions)
    proc, tok = CLIPImageProcessor.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    pixel_values = proc(images=images, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(scorer.pixel_values(images), pixel_values.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = ref(input_ids=ids["input_ids"], pixel_values=pixel_values)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    want = (100 * (img * txt).sum(-1)).clamp(min=0).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
    assert ours.shape == (3,) and (ours >= 0).all()


def test_wrong_folder_and_inputs_raise_clear_errors(clip_folder, tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        CLIPScorer.load(tmp_path)
    scorer = CLIPScorer.load(clip_folder[0])
    with pytest.raises(ValueError, match="captions"):
        scorer(_images(), ["one"])
    with pytest.raises(ValueError, match="RGB"):
        scorer([np.zeros((8, 8, 4), np.uint8)], ["x"])
