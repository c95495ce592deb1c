"""mIoU between segmentations: the segmenter gives transformers' own labels (tiny random SegFormer and
Mask2Former saved to a folder), and the mIoU conventions are checked on hand-computed examples."""
import numpy as np
import pytest
import torch

from perco_jax.eval.segmentation import (MIoUAccumulator, SegmentationError, Segmenter, confusion_matrix,
                                         image_mious, miou, miou_dataset, miou_per_image, segmentation_miou)
from tests.reference import randomize_

NUM_LABELS = 5
SIZE = (80, 96)


def _segformer_processor(**kwargs):
    import transformers

    # transformers 5 keeps the torchvision-free backend under its own name; older ones have one class.
    cls = getattr(transformers, "SegformerImageProcessorPil", None) or transformers.SegformerImageProcessor
    return cls(**kwargs)


@pytest.fixture(scope="module")
def segformer(tmp_path_factory):
    """(folder, reference model, reference processor) of a tiny random SegFormer with 5 labels."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    folder = tmp_path_factory.mktemp("segformer")
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=16, num_labels=NUM_LABELS)
    torch.manual_seed(0)
    model = randomize_(SegformerForSemanticSegmentation(config), seed=0, std=0.5)
    model.save_pretrained(folder)
    processor = _segformer_processor(size={"height": 64, "width": 64})
    processor.save_pretrained(folder)
    return folder, model, processor


def _photos() -> np.ndarray:
    """[3, 80, 96, 3] uint8: scikit-image's bundled photos (subsampled, cropped) if installed, else noise."""
    try:
        from skimage import data
        ims = [data.astronaut(), data.coffee(), data.chelsea()]
        return np.stack([im[::3, ::3][:SIZE[0], :SIZE[1]] for im in ims])
    except ImportError:
        return np.random.default_rng(0).integers(0, 256, (3,) + SIZE + (3,), dtype=np.uint8)


def _reference(model, processor, images) -> list[np.ndarray]:
    """transformers run directly: processor -> model -> post_process_semantic_segmentation."""
    inputs = processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    maps = processor.post_process_semantic_segmentation(out, target_sizes=[im.shape[:2] for im in images])
    return [m.numpy() for m in maps]


# ----------------------------------------------------------------------------- the segmenter

def test_segment_shapes_dtypes_determinism(segformer):
    seg = Segmenter.load(segformer[0], device="cpu")
    assert seg.kind == "semantic" and seg.num_classes == NUM_LABELS and len(seg.id2label) == NUM_LABELS
    images = _photos()
    labels = seg.segment(images)
    assert labels.shape == (3,) + SIZE and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < NUM_LABELS
    assert len(np.unique(labels)) >= 2  # the random model does not paint everything one class
    np.testing.assert_array_equal(seg.segment(images), labels)                     # deterministic
    np.testing.assert_array_equal(seg.segment(images, batch_size=1), labels)       # batching changes nothing
    np.testing.assert_array_equal(seg.segment(images.astype(np.float32) / 255.0), labels)  # float in [0, 1]
    assert seg.segment(images[:0]).shape == (0,) + SIZE
    with pytest.raises(SegmentationError, match=r"\[B, H, W, 3\]"):
        seg.segment(images[0])
    with pytest.raises(ValueError, match="batch_size"):
        seg.segment(images, batch_size=0)


def test_labels_equal_transformers_model_and_processor(segformer):
    folder, model, processor = segformer
    seg = Segmenter.load(folder, device="cpu")
    images = _photos()
    want = _reference(model, processor, images)
    np.testing.assert_array_equal(seg.segment(images), np.stack(want))
    # the same by hand: the logits resized bilinearly to the image size, then argmax
    with torch.no_grad():
        logits = model(**processor(images=list(images), return_tensors="pt")).logits
        by_hand = torch.nn.functional.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False).argmax(1)
    np.testing.assert_array_equal(np.stack(want), by_hand.numpy())
    # a processor without post_process_semantic_segmentation: done on the logits here, same labels
    seg.post_processor = object()
    np.testing.assert_array_equal(seg.segment(images), np.stack(want))
    seg = Segmenter.load(folder, device="cpu")
    # images of different sizes: each map at its own size, as transformers gives it
    mixed = [images[0], images[1][:50, :70], images[2][:64, :40]]
    got = seg.segment_list(mixed, batch_size=2)
    for g, w, im in zip(got, _reference(model, processor, mixed), mixed):
        assert g.shape == im.shape[:2]
        np.testing.assert_array_equal(g, w)


def test_universal_checkpoint_mask2former(tmp_path):
    import transformers
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=swin, num_labels=NUM_LABELS, hidden_dim=32, feature_size=32,
                               mask_feature_size=32, num_queries=6, encoder_layers=1, decoder_layers=2,
                               dim_feedforward=32, encoder_feedforward_dim=32, num_attention_heads=2)
    torch.manual_seed(0)
    model = randomize_(Mask2FormerForUniversalSegmentation(config), seed=2, std=1.0)  # not one class everywhere
    model.save_pretrained(tmp_path)
    cls = getattr(transformers, "Mask2FormerImageProcessorPil", None) or transformers.Mask2FormerImageProcessor
    processor = cls(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32)
    processor.save_pretrained(tmp_path)
    seg = Segmenter.load(tmp_path, device="cpu")
    assert seg.kind == "universal" and seg.num_classes == NUM_LABELS
    images = _photos()
    labels = seg.segment(images)
    assert labels.shape == (3,) + SIZE and labels.dtype == np.int32 and len(np.unique(labels)) >= 2
    np.testing.assert_array_equal(labels, np.stack(_reference(model, processor, images)))


def test_not_a_segmentation_checkpoint_raises_clear_errors(segformer, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SegformerModel

    with pytest.raises(SegmentationError, match="no segmentation checkpoint folder"):
        Segmenter.load(tmp_path / "missing")
    with pytest.raises(SegmentationError, match="config.json"):
        Segmenter.load(tmp_path)
    clip = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                                     image_size=32, patch_size=8)).save_pretrained(clip)
    with pytest.raises(SegmentationError, match="not a semantic-segmentation checkpoint"):
        Segmenter.load(clip)
    # a backbone-only SegFormer: the segmentation head would be random
    folder, model, processor = segformer
    backbone = tmp_path / "backbone"
    SegformerModel(model.config).save_pretrained(backbone)
    processor.save_pretrained(backbone)
    with pytest.raises(SegmentationError, match="lacks .* weights"):
        Segmenter.load(backbone)
    assert Segmenter.load(backbone, strict=False).num_classes == NUM_LABELS
    # the model without its image processor
    no_proc = tmp_path / "no_processor"
    model.save_pretrained(no_proc)
    with pytest.raises(SegmentationError, match="image processor"):
        Segmenter.load(no_proc)


# ----------------------------------------------------------------------------- mIoU

def test_miou_identical_and_disjoint():
    a = np.random.default_rng(0).integers(0, 4, (2, 7, 9))
    assert miou(a, a, 4) == 1.0
    assert miou(a, (a + 1) % 4, 4) == 0.0   # every pixel disagrees
    assert miou(np.zeros((3, 3), int), np.ones((3, 3), int), 2) == 0.0


def test_miou_hand_computed_3x3():
    a = np.array([[0, 0, 1],
                  [0, 1, 1],
                  [2, 2, 2]])
    b = np.array([[0, 1, 1],
                  [0, 1, 1],
                  [2, 2, 0]])
    # class 0: a at (0,0) (0,1) (1,0), b at (0,0) (1,0) (2,2): intersection 2, union 4 -> 1/2
    # class 1: a at (0,2) (1,1) (1,2), b adds (0,1): intersection 3, union 4 -> 3/4
    # class 2: a at (2,0) (2,1) (2,2), b at (2,0) (2,1): intersection 2, union 3 -> 2/3
    # class 3: in neither map -> left out.  mIoU = (1/2 + 3/4 + 2/3) / 3 = 23/36
    assert miou(a, b, 4) == pytest.approx(23 / 36, abs=1e-12)
    assert miou(b, a, 4) == pytest.approx(23 / 36, abs=1e-12)   # symmetric
    conf = confusion_matrix(a, b, 4)
    assert conf.sum() == 9 and conf.trace() == 7 and conf[0, 1] == 1 and conf[2, 0] == 1


def test_dataset_and_per_image_conventions_differ():
    # pair 1 agrees on class 0 everywhere; pair 2 is all 1 against all 2
    p1 = (np.zeros((2, 2), int), np.zeros((2, 2), int))
    p2 = (np.ones((2, 2), int), np.full((2, 2), 2))
    pairs = [p1, p2]
    np.testing.assert_array_equal(image_mious(pairs, 3), [1.0, 0.0])
    assert miou_per_image(pairs, 3) == pytest.approx(0.5)          # (1 + 0) / 2
    assert miou_dataset(pairs, 3) == pytest.approx(1 / 3)          # IoU_0 = 1, IoU_1 = IoU_2 = 0
    # pairs of different sizes; the dataset convention pools pixels like one stacked batch
    rng = np.random.default_rng(1)
    big = (rng.integers(0, 3, (6, 5)), rng.integers(0, 3, (6, 5)))
    small = (rng.integers(0, 3, (2, 3)), rng.integers(0, 3, (2, 3)))
    pooled = miou(np.concatenate([big[0].ravel(), small[0].ravel()]),
                  np.concatenate([big[1].ravel(), small[1].ravel()]), 3)
    assert miou_dataset([big, small], 3) == pytest.approx(pooled)
    acc = MIoUAccumulator(3)
    assert acc.add(*big) == pytest.approx(miou(*big, 3))
    acc.add(*small)
    assert acc.dataset() == pytest.approx(pooled) and len(acc) == 2
    assert acc.per_image() == pytest.approx((miou(*big, 3) + miou(*small, 3)) / 2)


def test_ignore_index():
    a = np.array([[0, 255],
                  [1, 1]])
    b = np.array([[0, 0],
                  [1, 255]])
    # only (0,0) (0 vs 0) and (1,0) (1 vs 1) count: b's class 0 at (0,1) and a's class 1 at (1,1) are ignored
    assert miou(a, b, 2, ignore_index=255) == 1.0
    assert confusion_matrix(a, b, 2, ignore_index=255).sum() == 2
    with pytest.raises(ValueError, match="label 255, outside"):
        miou(a, b, 2)
    all_ignored = np.full((2, 2), 255)
    assert np.isnan(miou(all_ignored, b, 2, ignore_index=255))
    pairs = [(a, b), (all_ignored, b)]
    assert miou_per_image(pairs, 2, ignore_index=255) == 1.0   # the pair with nothing counted is left out
    assert miou_dataset(pairs, 2, ignore_index=255) == 1.0


def test_miou_input_errors():
    with pytest.raises(ValueError, match="shape"):
        miou(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(ValueError, match="integer"):
        miou(np.zeros((2, 2)), np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="num_classes"):
        miou(np.zeros((2, 2), int), np.zeros((2, 2), int), 0)
    with pytest.raises(ValueError, match="label -1"):
        miou(np.full((2, 2), -1), np.zeros((2, 2), int), 2)


# ----------------------------------------------------------------------------- the metric

def test_segmentation_miou(segformer):
    seg = Segmenter.load(segformer[0], device="cpu", batch_size=2)
    originals = list(_photos())
    same = segmentation_miou(seg, originals, originals)
    assert same["miou"] == 1.0 and same["miou_image_mean"] == 1.0 and same["per_image"] == [1.0] * 3
    assert same["num_images"] == 3 and same["num_classes"] == NUM_LABELS
    recons = [np.ascontiguousarray(im[::-1]) for im in originals]      # a "reconstruction" upside down
    recons[1] = recons[1].astype(np.float32) / 255.0                    # floats in [0, 1] are taken too
    got = segmentation_miou(seg, iter(originals), iter(recons))         # streamed
    la, lb = seg.segment(np.stack(originals)), seg.segment(np.stack([originals[0][::-1], originals[1][::-1],
                                                                      originals[2][::-1]]))
    pairs = list(zip(la, lb))
    assert got["miou"] == pytest.approx(miou_dataset(pairs, NUM_LABELS))
    assert got["miou_image_mean"] == pytest.approx(miou_per_image(pairs, NUM_LABELS))
    np.testing.assert_allclose(got["per_image"], image_mious(pairs, NUM_LABELS))
    assert 0.0 <= got["miou"] < 1.0
    with pytest.raises(ValueError, match="fewer originals"):
        segmentation_miou(seg, originals[:2], recons)
    with pytest.raises(ValueError, match="80x96 but the reconstruction 80x90"):
        segmentation_miou(seg, originals, [r[:, :90] for r in recons])
