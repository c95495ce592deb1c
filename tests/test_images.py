"""perco_jax.images: the one behaviour every image input shares (compress, captioning, evaluate)."""
import jax
import numpy as np
import pytest
from PIL import Image

from perco_jax.captions.captioner import image_key
from perco_jax.codec.codec import prepare_image
from perco_jax.eval.clip_score import prepare as clip_prepare
from perco_jax.images import load_image, read_rgb8, resize, resize_rgb8, save_image, to_rgb8, to_rgb_float

RNG = np.random.default_rng(5)
RGB = RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)


def test_arrays_pil_images_and_files_give_the_same_pixels(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "rgb.png")
    rgba = np.concatenate([RGB, RNG.integers(0, 256, (9, 13, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    for image in (RGB, RGB.astype(np.float32) / 255, RGB.astype(np.float64) / 255, Image.fromarray(RGB),
                  tmp_path / "rgb.png", str(tmp_path / "rgb.png"),
                  tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA")):  # files / PIL: PIL drops alpha
        got = to_rgb8(image)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, RGB)
        np.testing.assert_array_equal(to_rgb_float(image) * 255, RGB.astype(np.float32))
    np.testing.assert_array_equal(read_rgb8(tmp_path / "rgb.png"), RGB)
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), RGB.astype(np.float32) / 255)
    grey = RGB[..., 0]
    for g in (grey, grey[..., None]):
        np.testing.assert_array_equal(to_rgb8(g), np.repeat(grey[..., None], 3, -1))
    floats = np.full((2, 2, 3), 0.25, np.float32)  # floats stay as given (not rounded to 8 bits) ...
    np.testing.assert_array_equal(to_rgb_float(floats), floats)
    assert (to_rgb8(floats) == 64).all()  # (63.75) ... unless 8 bits are asked for
    save_image(to_rgb_float(RGB), tmp_path / "back.png")
    np.testing.assert_array_equal(read_rgb8(tmp_path / "back.png"), RGB)


def test_bad_images_are_one_clear_error_everywhere(tmp_path):
    """RGBA arrays are refused (the caller chooses what transparent pixels look like), as are other
    shapes, dtypes and floats outside [0, 1]; the codec, the caption cache and CLIP agree."""
    rgba = np.concatenate([RGB, np.full((9, 13, 1), 255, np.uint8)], -1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    bad = {"alpha": rgba, "shape": np.zeros((4, 4, 2)), "dtype": np.zeros((4, 4, 3), np.int16),
           "\\[0, 1\\]": np.full((4, 4, 3), 1.5, np.float32), "finite": np.full((4, 4, 3), np.nan, np.float32),
           "got shape \\(1, 4, 4, 3\\)": np.zeros((1, 4, 4, 3)), "got shape \\(0, 4, 3\\)": np.zeros((0, 4, 3)),
           "bad.png is not a readable image": tmp_path / "bad.png"}
    for match, image in bad.items():
        for use in (to_rgb8, to_rgb_float, image_key, lambda x: prepare_image(x, 8), lambda x: clip_prepare(x, 8)):
            with pytest.raises(ValueError, match=match):
                use(image)


def test_resizes_are_bicubic_and_stay_in_range():
    x = RGB.astype(np.float32) / 255
    np.testing.assert_array_equal(resize(x, 9, 13), x)
    small = resize(x, 4, 6)  # shrinking: antialiased
    want = np.clip(np.asarray(jax.image.resize(x, (4, 6, 3), "bicubic", antialias=True)), 0, 1)
    np.testing.assert_array_equal(small, want)
    raw = np.asarray(jax.image.resize(x, (30, 31, 3), "bicubic"))
    assert raw.min() < 0 or raw.max() > 1  # bicubic overshoots on random pixels ...
    big = resize(x, 30, 31)
    assert big.dtype == np.float32
    np.testing.assert_array_equal(big, np.clip(raw, 0, 1))  # ... which resize clips
    np.testing.assert_array_equal(resize_rgb8(RGB, 5, 7),
                                  np.asarray(Image.fromarray(RGB).resize((7, 5), Image.BICUBIC)))
    np.testing.assert_array_equal(resize_rgb8(RGB, 9, 13), RGB)
    # the codec's RESIZE policy is this resize, mapped to [-1, 1]
    np.testing.assert_allclose(prepare_image(RGB, 8), resize(x, 8, 8) * 2 - 1, atol=0)
