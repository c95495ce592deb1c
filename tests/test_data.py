"""Input pipelines: the synthetic captioned dataset, image folders with captions, TFDS COCO captions,
per-host sharding and exact resumption."""
import csv
import json
import time

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
try:  # TF stays on the host CPU, with small thread pools (the test machine is shared)
    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_inter_op_parallelism_threads(2)
    tf.config.threading.set_intra_op_parallelism_threads(1)
except RuntimeError:  # TF was initialised by an earlier test module
    pass

from perco_jax.data.coco import coco_builder  # noqa: E402
from perco_jax.data.folder import folder_examples, read_captions  # noqa: E402
from perco_jax.data.pipeline import default_data_config, make_dataset  # noqa: E402
from perco_jax.data.synthetic import (BACKGROUNDS, COLOURS, SHAPES, SIZES, VOCABULARY,  # noqa: E402
                                      synthetic_example, synthetic_scene)


def _config(batch_size=4, **data):
    config = ml_collections.ConfigDict(dict(batch_size=batch_size, data=default_data_config()))
    config.data.update(num_parallel_calls=2, num_threads=2, prefetch=1)
    config.data.update(data)
    return config


def _take(it, n):
    return [next(it) for _ in range(n)]


def _concat(batches, key):
    return np.concatenate([b[key] for b in batches])


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic():
    for index in (0, 1, 17, 10**9):
        a, ca = synthetic_example(index, seed=3, size=32)
        b, cb = synthetic_example(index, seed=3, size=32)
        assert ca == cb and np.array_equal(a, b)
        assert a.shape == (32, 32, 3) and a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
    images = [synthetic_example(i, 0, 32)[0] for i in range(20)]
    captions = [synthetic_example(i, 0, 32)[1] for i in range(20)]
    assert all(not np.array_equal(images[i], images[i + 1]) for i in range(19))
    assert len(set(captions)) >= 15
    other_seed = [synthetic_example(i, 1, 32)[1] for i in range(20)]
    assert sum(a != b for a, b in zip(captions, other_seed)) >= 15
    # the same scene at every size
    assert synthetic_example(5, 0, 64)[1] == synthetic_example(5, 0, 128)[1]
    with pytest.raises(ValueError, match="index"):
        synthetic_example(-1)


def test_synthetic_captions_describe_the_image():
    size = 64
    # scenes hold 1 to 3 shapes, and every count occurs
    assert {len(synthetic_scene(i, seed=0).shapes) for i in range(60)} == {1, 2, 3}
    for index in range(60):
        image, caption = synthetic_example(index, seed=0, size=size)
        scene = synthetic_scene(index, seed=0)
        assert set(caption.split()) <= VOCABULARY, caption
        assert caption.endswith(f"on a {scene.background} background")
        # the caption names exactly the drawn shapes
        nouns = [w for w in caption.split() if w in {"circle", "square", "triangle", "star"}]
        assert nouns == [s.kind for s in scene.shapes], (caption, scene.shapes)
        pixels = np.round(image * 255).reshape(-1, 3)
        # every colour word of the caption is drawn: some pixel has (nearly) that colour
        words = caption.split()
        for w in words[:words.index("on", len(words) - 4)]:
            if w in COLOURS:
                assert np.abs(pixels - COLOURS[w]).max(axis=1).min() <= 2, (index, caption, w)
        # each shape's centre has its colour, the corner the background's
        for s in scene.shapes:
            assert s.kind in SHAPES and s.size in SIZES and s.colour != scene.background
            assert f"{s.size} {s.colour} {s.kind}" in caption
            y, x = int(s.cy * size), int(s.cx * size)
            assert np.abs(np.round(image[y, x] * 255) - COLOURS[s.colour]).max() <= 2, (index, caption, s)
        assert np.array_equal(np.round(image[0, 0] * 255), BACKGROUNDS[scene.background])
        # the relation word matches the positions of the first two shapes
        if len(scene.shapes) >= 2:
            a, b = scene.shapes[:2]
            dx, dy = a.cx - b.cx, a.cy - b.cy
            expected = ("above" if dy < 0 else "below") if abs(dy) > abs(dx) else ("left of" if dx < 0 else "right of")
            assert f"{a.kind} {expected} a {b.size}" in caption, caption


def test_synthetic_is_fast():
    synthetic_example(0, 0, 64)
    t = time.perf_counter()
    for i in range(200):
        synthetic_example(i, 0, 64)
    assert (time.perf_counter() - t) / 200 < 2e-3


def test_synthetic_batches():
    it = make_dataset(_config(batch_size=6, image_size=32))
    batches = _take(it, 2)
    for k, b in enumerate(batches):
        assert set(b) == {"image", "caption", "index"}
        assert b["image"].shape == (6, 32, 32, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].min() < -0.5
        assert b["caption"].shape == (6,) and all(isinstance(c, str) and c for c in b["caption"])
        assert b["index"].dtype == np.int64 and list(b["index"]) == list(range(6 * k, 6 * k + 6))
        image, caption = synthetic_example(int(b["index"][2]), 0, 32)
        assert b["caption"][2] == caption and np.allclose(b["image"][2], image * 2 - 1)
    val = next(make_dataset(_config(batch_size=6, image_size=32), split="validation"))
    assert list(val["caption"]) != list(batches[0]["caption"])
    with pytest.raises(ValueError, match="split"):
        make_dataset(_config(), split="nope")


def test_synthetic_shards_and_resume():
    config = _config(batch_size=8, image_size=16)
    single = _take(make_dataset(config), 4)
    hosts = [_take(make_dataset(config, process_index=p, process_count=4), 4) for p in range(4)]
    for k in range(4):
        parts = [hosts[p][k] for p in range(4)]
        assert all(part["image"].shape[0] == 2 for part in parts)
        index = np.concatenate([part["index"] for part in parts])
        assert np.array_equal(index, single[k]["index"])  # disjoint, and the union is the single stream
        assert np.array_equal(np.concatenate([part["image"] for part in parts]), single[k]["image"])
        assert list(np.concatenate([part["caption"] for part in parts])) == list(single[k]["caption"])
    resumed = _take(make_dataset(config, start_index=16), 2)
    for a, b in zip(resumed, single[2:]):
        assert np.array_equal(a["index"], b["index"]) and np.array_equal(a["image"], b["image"])
        assert list(a["caption"]) == list(b["caption"])
    resumed_host = next(make_dataset(config, process_index=1, process_count=2, start_index=24))
    assert np.array_equal(resumed_host["index"], single[3]["index"][4:])


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="not divisible"):
        make_dataset(_config(batch_size=6), process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        make_dataset(_config(batch_size=4), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="data.source"):
        make_dataset(_config(source="imagenet"))


# ---------------------------------------------------------------- image folders


def _write_images(root, n=6):
    """Small PIL-made 'photos' of different sizes and modes (scikit-image is not installed)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        h, w = 24 + 6 * i, 40 - 3 * i
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * i)], -1)
        arr = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        name = [f"img{i}.jpg", f"img{i}.png", f"sub/img{i}.png"][i % 3]
        if i % 3 == 1:
            im = im.convert("L") if i % 2 else im.convert("RGBA")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / name)
        names.append(name)
    return names


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture()
def jsonl_folder(tmp_path):
    names = _write_images(tmp_path)
    keys = [("file", "caption"), ("image", "text"), ("path", "caption")]
    _write_jsonl(tmp_path / "captions.jsonl",
                 [{keys[i % 3][0]: n, keys[i % 3][1]: f"photo number {i}"} for i, n in enumerate(names)])
    return tmp_path


def test_folder_jsonl_batches(jsonl_folder):
    assert read_captions(jsonl_folder / "captions.jsonl")[1] == ("img1.png", "photo number 1")
    config = _config(batch_size=3, source="folder", folder=str(jsonl_folder), image_size=16)
    batches = _take(make_dataset(config), 4)
    for b in batches:
        assert b["image"].shape == (3, 16, 16, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["caption"].shape == (3,) and b["index"].dtype == np.int64
    captions = list(_concat(batches, "caption"))
    expected = {f"photo number {i}" for i in range(6)}
    assert set(captions[:6]) == expected and set(captions[6:]) == expected  # each epoch is a permutation
    assert captions[:6] != captions[6:12]  # reshuffled per epoch
    assert list(_concat(batches, "index")) == list(range(12))
    again = _take(make_dataset(config), 4)
    assert list(_concat(again, "caption")) == captions and np.array_equal(_concat(again, "image"), _concat(batches, "image"))
    reseeded = _take(make_dataset(_config(batch_size=3, source="folder", folder=str(jsonl_folder), image_size=16,
                                          seed=1)), 4)
    assert list(_concat(reseeded, "caption")) != captions


def test_folder_resize_and_centre_crop(tmp_path):
    from PIL import Image

    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)   # left and right quarters are cropped away
    arr[:, 60:] = (255, 0, 0)
    arr[:, 20:60] = (0, 255, 0)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    (tmp_path / "captions.csv").write_text('file,caption\nwide.png,"green, with red sides"\n')
    b = next(make_dataset(_config(batch_size=1, source="folder", folder=str(tmp_path), image_size=20)))
    image = (b["image"][0] + 1) / 2
    assert b["caption"][0] == "green, with red sides"
    assert image[..., 1].min() > 0.9 and image[..., 0].max() < 0.1


def test_folder_csv_shards_and_resume(tmp_path):
    names = _write_images(tmp_path / "images", n=5)
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text"])
        w.writerows([(n, f"a photo, {i}") for i, n in enumerate(names)])
    assert read_captions(tmp_path / "caps.csv")[0] == ("img0.jpg", "a photo, 0")
    config = _config(batch_size=4, source="folder", folder=str(tmp_path / "images"), captions=str(tmp_path / "caps.csv"),
                     image_size=8)
    single = _take(make_dataset(config), 4)
    hosts = [_take(make_dataset(config, process_index=p, process_count=2), 4) for p in range(2)]
    for k in range(4):
        for key in ("index", "image", "caption"):
            union = np.concatenate([hosts[0][k][key], hosts[1][k][key]])
            assert np.array_equal(union, single[k][key]), key
    for start in (8, 5):  # a whole number of batches, and an arbitrary example count
        resumed = _take(make_dataset(config, start_index=start), 2)
        for key in ("index", "image", "caption"):
            assert np.array_equal(_concat(resumed, key), _concat(single, key)[start:start + 8]), (start, key)


def test_read_captions_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        read_captions(tmp_path / "nothere.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "a.png", "caption": "ok"}\n\n{"file": "b.png", "caption": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: not valid JSON"):
        read_captions(bad)
    bad.write_text('{"file": "a.png", "caption": "ok"}\n{"file": "b.png"}\n')
    with pytest.raises(ValueError, match=r"line 2: no caption field"):
        read_captions(bad)
    badcsv = tmp_path / "bad.csv"
    badcsv.write_text("name,caption\na.png,x\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 1: the CSV header"):
        read_captions(badcsv)
    badcsv.write_text("file,caption\na.png,x\nb.png\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 3"):
        read_captions(badcsv)
    txt = tmp_path / "captions.txt"
    txt.write_text("a.png\tx\n")
    with pytest.raises(ValueError, match="unknown captions format"):
        read_captions(txt)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no images"):
        read_captions(empty)


def test_folder_bad_images_are_named(jsonl_folder):
    config = _config(batch_size=2, source="folder", folder=str(jsonl_folder), image_size=8)
    with open(jsonl_folder / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "missing_photo.jpg", "caption": "gone"}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing_photo.jpg"):
        make_dataset(config)
    _write_jsonl(jsonl_folder / "captions.jsonl", [{"file": "img0.jpg", "caption": "x"}, {"file": "scan.tiff", "caption": "y"}])
    (jsonl_folder / "scan.tiff").write_bytes(b"II*\x00")
    with pytest.raises(ValueError, match="scan.tiff"):
        folder_examples(jsonl_folder)
    (jsonl_folder / "broken.png").write_bytes(b"definitely not a png")
    _write_jsonl(jsonl_folder / "captions.jsonl", [{"file": "img0.jpg", "caption": "x"}, {"file": "broken.png", "caption": "y"}])
    with pytest.raises(ValueError, match="broken.png"):
        next(make_dataset(config))


# ---------------------------------------------------------------- TFDS


def test_coco_not_prepared_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)coco_captions.*not prepared.*tfds build coco_captions"):
        coco_builder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not prepared"):
        make_dataset(_config(source="coco", tfds_data_dir=str(tmp_path)))


def _fake_coco_builder_class():
    import tensorflow_datasets as tfds

    class FakeCocoCaptionsForTests(tfds.core.GeneratorBasedBuilder):
        """A 10-example stand-in with coco_captions' image and captions features."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": np.int64,
                "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(10):
                image = np.full((12 + i, 20, 3), 20 * i, np.uint8)
                yield i, {"image": image, "image/id": i,
                          "captions": {"text": [f"first caption {i}", f"second caption {i}"]}}

    return FakeCocoCaptionsForTests


def test_tfds_pipeline_with_a_prepared_builder(tmp_path):
    cls = _fake_coco_builder_class()
    cls(data_dir=str(tmp_path)).download_and_prepare()
    config = _config(batch_size=4, source="coco", tfds_data_dir=str(tmp_path), tfds_name="fake_coco_captions_for_tests",
                     image_size=8, shuffle_buffer=4)
    single = _take(make_dataset(config), 3)
    assert single[0]["image"].shape == (4, 8, 8, 3) and single[0]["image"].dtype == np.float32
    captions = list(_concat(single, "caption"))
    assert all(c.startswith("first caption ") for c in captions)
    assert len(set(captions[:10])) == 10  # one epoch sees every example once
    for b in single:  # the image is the one of the caption
        ids = [int(c.split()[-1]) for c in b["caption"]]
        assert np.allclose((b["image"] + 1) / 2 * 255, np.array(ids)[:, None, None, None] * 20, atol=0.5)
    hosts = [_take(make_dataset(config, process_index=p, process_count=2), 5) for p in range(2)]
    for k in range(2):  # within an epoch the processes read disjoint halves of the split
        assert set(_concat(hosts[0][:k + 1], "caption")).isdisjoint(_concat(hosts[1][:k + 1], "caption"))
    for p in range(2):  # resuming after 2 global batches continues each process's stream exactly
        resumed = _take(make_dataset(config, process_index=p, process_count=2, start_index=8), 3)
        for key in ("caption", "image", "index"):
            assert np.array_equal(_concat(resumed, key), _concat(hosts[p][2:], key)), (p, key)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        make_dataset(config, start_index=3)
    from perco_jax.data.pipeline import dataset_captions  # what `embed-text` embeds: each example's first

    assert sorted(dataset_captions(config)) == sorted(f"first caption {i}" for i in range(10))
