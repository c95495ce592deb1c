"""The synthetic set's scene metrics and the equal-bits thumbnail baseline (perco_jax/eval/scenes.py)."""
import dataclasses

import numpy as np
import pytest

from perco_jax.data.synthetic import BACKGROUNDS, COLOURS, render_scene, synthetic_scene
from perco_jax.eval import metrics, scenes
from perco_jax.eval.datasets import SYNTHETIC_SEED

SCENES = [synthetic_scene(i, SYNTHETIC_SEED) for i in range(20)]


@pytest.mark.parametrize("size", [32, 64])
def test_originals_score_high(size):
    got = [scenes.scene_metrics(render_scene(s, size), s) for s in SCENES]
    assert set(got[0]) == set(scenes.SCENE_METRICS)
    assert np.mean([g["colours_present"] for g in got]) > 0.95
    assert np.mean([g["realism"] for g in got]) > 0.95
    assert all(0.9 < g["realism"] <= 1.0 for g in got)
    assert np.mean([g["realism"] for g in got]) < 1.0  # anti-aliased edges are mostly off the palette
    assert all(g["background_right"] == 1.0 for g in got)


def test_flat_and_noise_images_score_low():
    off_palette = np.full((32, 32, 3), (0.3, 0.6, 0.9), np.float32)  # no palette colour within 40/255
    assert scenes.colour_distance(off_palette[:1, :1], scenes.PALETTE).min() > scenes.TOLERANCE
    grey = np.full((32, 32, 3), 128 / 255, np.float32)  # the grey background, nothing drawn on it
    noise = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    for s in SCENES:
        assert scenes.scene_metrics(off_palette, s) == {"colours_present": 0.0, "realism": 0.0, "background_right": 0.0}
        flat = scenes.scene_metrics(grey, s)
        assert flat["colours_present"] == 0.0 and flat["realism"] == 1.0  # grey is a palette colour
        assert flat["background_right"] == float(s.background == "grey")
    noisy = [scenes.scene_metrics(noise, s) for s in SCENES]
    assert max(n["realism"] for n in noisy) < 0.35
    # (noise scatters enough pixels near every colour to pass "colours present": realism catches it)


def test_erasing_a_shape_drops_colours_present_to_the_right_fraction():
    checked = 0
    for i in range(200):
        s = synthetic_scene(i, SYNTHETIC_SEED)
        colours = {x.colour for x in s.shapes}
        if len(s.shapes) < 2 or len(colours) < len(s.shapes):
            continue  # wanted: two or three shapes of different colours
        for k in range(len(s.shapes)):
            erased = dataclasses.replace(s, shapes=s.shapes[:k] + s.shapes[k + 1:])
            got = scenes.scene_metrics(render_scene(erased, 32), s)
            assert got["colours_present"] == pytest.approx((len(colours) - 1) / len(colours))
            assert got["background_right"] == 1.0
        checked += 1
        if checked == 8:
            break
    assert checked == 8


def test_min_pixels_scale_with_the_image_area():
    s = next(s for s in SCENES if len(s.shapes) == 1)
    colour = np.array(COLOURS[s.shapes[0].colour], np.float32) / 255
    for side in (32, 64):
        image = np.tile(np.array(BACKGROUNDS[s.background], np.float32) / 255, (side, side, 1))
        need = scenes.MIN_PIXELS_AT_32 * side * side // 32 ** 2
        image.reshape(-1, 3)[:need - 1] = colour
        assert scenes.scene_metrics(image, s)["colours_present"] == 0.0
        image.reshape(-1, 3)[:need] = colour
        assert scenes.scene_metrics(image, s)["colours_present"] == 1.0


def test_thumbnail_levels_spend_at_most_log2_k_bits_a_pixel():
    assert [scenes.thumbnail_levels(k) for k in (8, 26, 27, 64, 256, 1000, 1023, 4096)] == [2, 2, 3, 4, 6, 10, 10, 16]
    for bad in (4, 7, 64.5):
        with pytest.raises(ValueError, match="at least 8 codes"):
            scenes.thumbnail_levels(bad)


def test_thumbnail_baseline_is_a_quantised_upsampled_thumbnail():
    for s in SCENES[:6]:
        image = render_scene(s, 32)
        thumb = scenes.thumbnail_baseline(image, 4, 64)
        assert thumb.shape == image.shape and thumb.dtype == np.float32
        assert 0.0 <= thumb.min() and thumb.max() <= 1.0
        p = metrics.image_psnr(image, thumb)
        assert np.isfinite(p) and 8.0 < p < 40.0
        assert metrics.image_psnr(image, image) > p  # (identical images: PSNR is capped, far above)
        finer = scenes.thumbnail_baseline(image, 8, 4096)  # more bits: closer to the original
        assert metrics.image_psnr(image, finer) > p
    # a flat image on the quantisation grid comes back unchanged
    flat = np.full((32, 32, 3), 1 / 3, np.float32)
    np.testing.assert_allclose(scenes.thumbnail_baseline(flat, 4, 64), flat, atol=1e-6)


def test_size_validation():
    s = SCENES[0]
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        scenes.scene_metrics(np.zeros((32, 32)), s)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        scenes.scene_metrics(np.zeros((32, 32, 4)), s)
    with pytest.raises(ValueError, match="not a multiple of the grid 4"):
        scenes.thumbnail_baseline(np.zeros((30, 32, 3)), 4, 64)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        scenes.thumbnail_baseline(np.zeros((32, 32)), 4, 64)
    with pytest.raises(ValueError, match="grid_side"):
        scenes.thumbnail_baseline(np.zeros((32, 32, 3)), 0, 64)
    image = render_scene(s, 32)
    with pytest.raises(ValueError, match=r"shape IoU \(reconstruction\): need an \[H, W, 3\]"):
        scenes.shape_iou(image, image[..., :2], s)
    with pytest.raises(ValueError, match=r"shape IoU \(original\): need an \[H, W, 3\]"):
        scenes.shape_iou(image[0], image, s)
    with pytest.raises(ValueError, match="one size"):
        scenes.shape_iou(image, image[:16], s)


def _two_squares():
    """(scene, original [8, 8, 3]): a red 2x2 square at rows 0-1, cols 0-1 and a blue one at rows 4-5,
    cols 4-5 on grey; the scene also names green, which the original does not show."""
    from perco_jax.data.synthetic import Scene, Shape

    shapes = tuple(Shape("square", c, "small", 0.5, 0.5, 0.1, 0.0) for c in ("red", "blue", "green"))
    original = np.tile(np.array(BACKGROUNDS["grey"], np.float32) / 255, (8, 8, 1))
    original[0:2, 0:2] = np.array(COLOURS["red"]) / 255
    original[4:6, 4:6] = np.array(COLOURS["blue"]) / 255
    return Scene("grey", shapes, "above"), original


def test_shape_iou_by_hand():
    scene, original = _two_squares()
    assert scenes.shape_iou(original, original, scene) == 1.0  # (green: not in the original, left out)
    moved = original.copy()  # red one column to the right: 2 of its 4 pixels still red, 6 red in all
    moved[0:2, 0:3] = np.array(BACKGROUNDS["grey"]) / 255
    moved[0:2, 1:3] = np.array(COLOURS["red"]) / 255
    assert scenes.shape_iou(original, moved, scene) == pytest.approx((2 / 6 + 1) / 2)
    moved[4:6, 4:6] = np.array(BACKGROUNDS["grey"]) / 255  # and blue blanked: IoU 0
    assert scenes.shape_iou(original, moved, scene) == pytest.approx((2 / 6 + 0) / 2)
    near = original + 35 / 255 * (original < 0.5)  # every pixel moved by 35/255: within the tolerance
    assert scenes.shape_iou(original, np.clip(near, 0, 1), scene) == 1.0
    blank = np.tile(np.array(BACKGROUNDS["grey"], np.float32) / 255, (8, 8, 1))
    assert scenes.shape_iou(blank, original, scene) is None  # the original shows no named colour
    got = scenes.scene_scores(original, moved, scene)
    assert tuple(got) == scenes.SCENE_SCORES
    assert got == {**scenes.scene_metrics(moved, scene), "shape_iou": pytest.approx(1 / 6)}


def test_shape_iou_of_drawn_scenes_and_their_thumbnails():
    for size in (32, 64):
        for s in SCENES:
            image = render_scene(s, size)
            assert scenes.shape_iou(image, image, s) == 1.0
            thumb = scenes.thumbnail_baseline(image, 4, 64)  # the equal-bits baseline of a 4x4 grid, K=64
            assert 0.0 <= scenes.shape_iou(image, thumb, s) < 0.9
    erasing = 0
    for s in SCENES:  # erasing the only shape of a colour: that colour scores 0, the others about 1
        colours = [x.colour for x in s.shapes]
        for k, x in enumerate(s.shapes):
            if colours.count(x.colour) > 1:
                continue
            erased = dataclasses.replace(s, shapes=s.shapes[:k] + s.shapes[k + 1:])
            got = scenes.shape_iou(render_scene(s, 64), render_scene(erased, 64), s)
            assert got == pytest.approx((len(set(colours)) - 1) / len(set(colours)), abs=0.02)
            erasing += 1
    assert erasing >= 10
