"""The evaluation driver (perco_jax/eval/evaluate.py and the eval/ modules it drives: datasets,
networks, results, published, plots, sweep, command) end to end on a handful of small images with a
tiny codec and tiny random metric networks: files, CSV columns, bpp = 8 * stream bytes / pixels,
resuming, skipped metrics and their reasons, sweeps, the data specs and the `evaluate` subcommand.

The codec is the session's briefly trained tiny codec (tests/conftest.py).
"""
import argparse
import csv
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from perco_jax.codec.codec import Codec
from perco_jax.eval import command, datasets, plots, published, results
from perco_jax.eval import evaluate as ev
from perco_jax.images import load_image, save_image
from perco_jax.models.lpips import TRUNKS, Conv
from tests.test_captions import blip2_folder  # noqa: F401  (the tiny BLIP-2 captioner fixture)
from tests.test_clip_score import clip_folder  # noqa: F401  (the tiny CLIP model fixture)
from tests.test_segmentation import segformer  # noqa: F401  (the tiny SegFormer fixture)

# the session's quick codec: one pytest-xdist process trains it (see tests/conftest.py)
pytestmark = pytest.mark.xdist_group("tiny_codecs")


CODEC = ["mmdit.num_layers=2", "text.max_sequence_length=8", "codec.coding_batch_size=2", "sample.steps=2",
         "entropy_model.width=32", "entropy_model.depth=1"]


@pytest.fixture(scope="module")
def codec(trained_codec):
    """(codec folder, Codec): the session's tiny codec (tests/conftest.py)."""
    return trained_codec[1], trained_codec[2]


SIZES = {"a": (32, 32), "b": (40, 56), "c": (36, 36), "d": (24, 20), "e": (168, 176)}  # b: wide; d: tiny; e: MS-SSIM
CAPTIONS = {"a.png": "a red circle", "b.png": "two squares, ünïcödé"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([yy, xx, 0.5 + 0.3 * np.sin(6 * xx)], -1)
        save_image(np.clip(base + 0.05 * rng.standard_normal((h, w, 3)), 0, 1), d / f"{name}.png")
    (d / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n"
                                              for f, c in CAPTIONS.items()), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random AlexNet trunk + heads in the torchvision / lpips layouts, as .safetensors files."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("lpips")
    rng = np.random.default_rng(1)
    trunk, channels, cin = {}, [], 3
    for stage in TRUNKS["alex"]:
        for layer in stage:
            if isinstance(layer, Conv):
                fan_in = cin * layer.kernel ** 2
                trunk[f"features.{layer.index}.weight"] = (rng.standard_normal(
                    (layer.features, cin, layer.kernel, layer.kernel)) * np.sqrt(2 / fan_in)).astype(np.float32)
                trunk[f"features.{layer.index}.bias"] = np.zeros(layer.features, np.float32)
                cin = layer.features
        channels.append(cin)
    heads = {f"lin{i}.model.1.weight": rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32)
             for i, c in enumerate(channels)}
    save_file(trunk, str(d / "trunk.safetensors"))
    save_file(heads, str(d / "heads.safetensors"))
    return d / "trunk.safetensors", d / "heads.safetensors"


def channel_means(images):
    """A stand-in for the InceptionV3 feature extractor: [B, H, W, 3] -> [B, 3]."""
    return np.asarray(images).mean(axis=(1, 2))


class Calls:
    """Counts (and passes on) a codec's compress_batch / decompress_batch calls and their images."""

    def __init__(self, codec, monkeypatch):
        self.compressed, self.decompressed = 0, 0
        compress, decompress = codec.compress_batch, codec.decompress_batch

        def c(images, *a, **k):
            self.compressed += len(images)
            return compress(images, *a, **k)

        def d(streams, *a, **k):
            self.decompressed += len(streams)
            return decompress(streams, *a, **k)

        monkeypatch.setattr(codec, "compress_batch", c)
        monkeypatch.setattr(codec, "decompress_batch", d)


def assert_same_rows(got, want):
    """Per-image rows equal, the image metrics up to float rounding: `decompress_batch` gives a stream
    the same image in any batch up to float rounding, which may move a pixel across a rounding step."""
    image_metrics = {"psnr", "ms_ssim", "lpips", "clip_score"}
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in image_metrics} == {
            k: v for k, v in w.items() if k not in image_metrics}
        for k in image_metrics & set(w):
            assert (g[k] == "") == (w[k] == "") and (w[k] == "" or float(g[k]) == pytest.approx(float(w[k]), rel=1e-3))


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_evaluate_writes_results_with_real_rates_and_resumes(codec, folder, lpips_files, tmp_path, monkeypatch):
    _, c = codec
    out = tmp_path / "out"
    weights = {"lpips_trunk": lpips_files[0], "lpips_heads": lpips_files[1], "inception": channel_means}
    calls = Calls(c, monkeypatch)
    summary = ev.evaluate(c, f"folder:{folder}", out, metrics_weights=weights, batch_size=3, progress=False)
    assert calls.compressed == calls.decompressed == len(SIZES)
    for f in ("per_image.csv", "summary.json", "rd.png", "run.json", "setting.json"):
        assert (out / f).is_file(), f
    columns, rows = read_csv(out / "per_image.csv")
    assert tuple(columns) == results.CSV_COLUMNS
    assert [r["name"] for r in rows] == sorted(SIZES)
    for r in rows:
        h, w = SIZES[r["name"]]
        stream = (out / "streams" / f"{r['name']}.perco").read_bytes()
        assert (int(r["height"]), int(r["width"])) == (h, w)
        assert int(r["bytes"]) == len(stream)
        assert float(r["bpp"]) == pytest.approx(8 * len(stream) / (h * w), rel=1e-12)
        parts = float(r["bpp_caption"]) + float(r["bpp_indices"]) + float(r["bpp_container"])
        assert parts == pytest.approx(float(r["bpp"]), rel=1e-12)
        assert r["caption"] == CAPTIONS.get(f"{r['name']}.png", "")
        assert r["caption_source"] == ("file" if f"{r['name']}.png" in CAPTIONS else "none")
        _, caps, _ = c.read_batch([stream])  # the caption really is in the stream
        assert caps == [r["caption"]]
        assert load_image(out / "recon" / f"{r['name']}.png").shape == (h, w, 3)
        assert np.isfinite(float(r["psnr"]))
        assert (r["ms_ssim"] != "") == (min(h, w) > 160)
        assert (r["lpips"] != "") == (r["name"] != "d")  # 24x20 is too small for AlexNet's taps
        assert all(r[m] == "" for m in results.SCENE_COLUMNS)  # scene metrics: synthetic data only
    assert float(rows[0]["bpp_caption"]) > float(rows[2]["bpp_caption"])  # "a" has a caption, "c" none

    saved = json.loads((out / "summary.json").read_text())
    assert saved["num_images"] == len(SIZES)
    assert saved["mean"]["bpp"] == pytest.approx(np.mean([float(r["bpp"]) for r in rows]))
    assert saved["mean"]["ms_ssim"] == pytest.approx(float(rows[4]["ms_ssim"]))
    assert np.isfinite(saved["fid"]) and np.isfinite(saved["kid"])
    assert {"ms_ssim", "lpips"} <= set(saved["partial"])
    assert {"clip_score", "miou"} <= set(saved["skipped"]) and "fid" not in saved["skipped"]
    assert saved["files"]["plot"] == "rd.png"
    assert saved["scene"] is None and saved["psnr_gain_over_thumbnail"] is None and ev.format_scene_summary(saved) == ""
    assert summary["mean"] == saved["mean"]

    # a rerun skips everything; losing one reconstruction redoes it only, from the saved stream
    ev.evaluate(c, f"folder:{folder}", out, metrics_weights=weights, batch_size=3, progress=False)
    assert calls.compressed == calls.decompressed == len(SIZES)
    (out / "recon" / "c.png").unlink()
    ev.evaluate(c, f"folder:{folder}", out, metrics_weights=weights, batch_size=3, progress=False)
    assert calls.compressed == len(SIZES)
    assert calls.decompressed == len(SIZES) + 1
    _, again = read_csv(out / "per_image.csv")
    assert_same_rows(again, rows)  # the same noise for c (decoded alone now, in a batch of 3 before)

    with pytest.raises(ValueError, match="guidance"):  # another setting into the same folder
        ev.evaluate(c, f"folder:{folder}", out, guidance=5.0, progress=False)
    assert json.loads((out / "setting.json").read_text())["temperature"] == c.config.sample.temperature
    with pytest.raises(ValueError, match="temperature"):
        ev.evaluate(c, f"folder:{folder}", out, temperature=0.5, progress=False)
    # a setting.json written before the temperature existed meant 1: it resumes at 1
    setting = json.loads((out / "setting.json").read_text())
    del setting["temperature"]
    (out / "setting.json").write_text(json.dumps(setting))
    ev.evaluate(c, f"folder:{folder}", out, metrics_weights=weights, temperature=1.0, batch_size=3, progress=False)
    assert calls.decompressed == len(SIZES) + 1


def _subset(folder, tmp_path, names, captions=None):
    """A folder with copies of some of `folder`'s images (and a captions.jsonl {file: caption})."""
    small = tmp_path / "small"
    small.mkdir()
    for name in names:
        (small / f"{name}.png").write_bytes((folder / f"{name}.png").read_bytes())
    if captions:
        (small / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": t}) + "\n"
                                                      for f, t in captions.items()))
    return small


def test_skipped_metrics_say_why(codec, folder, tmp_path, monkeypatch):
    _, c = codec
    small = _subset(folder, tmp_path, ("a", "b"))
    import perco_jax.eval

    monkeypatch.setitem(sys.modules, "perco_jax.eval.fid", None)  # as if fid.py were missing
    monkeypatch.delattr(perco_jax.eval, "fid", raising=False)
    summary = ev.evaluate(c, f"folder:{small}", tmp_path / "out", metrics_weights={"inception": "incept.pth"},
                          progress=False)
    skipped = summary["skipped"]
    assert set(skipped) >= {"ms_ssim", "lpips", "fid", "kid", "clip_score", "miou"}
    assert "160" in skipped["ms_ssim"] and "lpips-trunk" in skipped["lpips"]
    assert "not available" in skipped["fid"] and summary["fid"] is None
    _, rows = read_csv(tmp_path / "out" / "per_image.csv")
    assert [(r["ms_ssim"], r["lpips"]) for r in rows] == [("", ""), ("", "")]
    none = ev.evaluate(c, f"folder:{small}", tmp_path / "out2", progress=False)
    assert "no InceptionV3 weights" in none["skipped"]["fid"]
    with pytest.raises(ValueError, match="both weights"):
        ev.evaluate(c, f"folder:{small}", tmp_path / "out3", metrics_weights={"lpips_trunk": "t.pth"})


def test_cli_sweep_with_published_points(codec, folder, tmp_path, monkeypatch, capsys):
    path, c = codec
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    for name in ("a", "b", "c"):
        (kodak / f"{name}.png").write_bytes((folder / f"{name}.png").read_bytes())
    published_csv = tmp_path / "published.csv"  # made-up points (only the overlay is under test)
    published_csv.write_text("# test rows\nmethod,dataset,resolution,protocol,bpp,psnr,exactness,source\n"
                             "X,kodak,full,kodak-full,0.01,20,table,test\nX,kodak,full,kodak-full,0.05,22,figure,test\n"
                             "Y,coco30k,512x512,coco30k-512,0.02,30,table,test\n")
    monkeypatch.setattr(Codec, "load", classmethod(lambda cls, folder: c))  # the fixture's (compiled) codec
    calls = Calls(c, monkeypatch)
    parser = argparse.ArgumentParser(prog="perco-jax")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "sweep"
    args = parser.parse_args(["evaluate", "--checkpoint", str(path), "--data", f"kodak:{kodak}", "--out", str(out),
                              "--guidance", "1", "2.5", "--steps", "2", "--quiet", "--published", str(published_csv)])
    assert args.fn is command.run and args.guidance == [1.0, 2.5] and args.lpips_net == "alex"
    assert args.fn(args) == 0
    assert "bpp=" in capsys.readouterr().out
    assert calls.compressed == 3 and calls.decompressed == 6  # streams shared by the settings
    combined = json.loads((out / "summary.json").read_text())
    assert [s["dir"] for s in combined["settings"]] == ["guidance=1_steps=2", "guidance=2.5_steps=2"]
    for s in combined["settings"]:
        assert s["published_points"] == 2
        for f in ("per_image.csv", "summary.json", "rd.png"):
            assert (out / s["dir"] / f).is_file()
    columns, table = read_csv(out / "sweep.csv")
    assert [float(t["guidance"]) for t in table] == [1.0, 2.5] and "bpp" in columns
    assert (out / "rd.png").is_file() and combined["files"]["plot"] == "rd.png"
    assert "no perception metric" in combined["skipped"]["dp_plot"]  # no LPIPS / Inception weights given


def test_synthetic_scenes_get_scene_metrics_and_the_thumbnail_baseline(codec, tmp_path, monkeypatch, capsys):
    from perco_jax.data.synthetic import render_scene, synthetic_scene
    from perco_jax.eval import scenes

    path, c = codec
    out = tmp_path / "syn"
    calls = Calls(c, monkeypatch)
    summary = ev.evaluate(c, "synthetic:6", out, progress=False, batch_size=4)
    assert calls.compressed == calls.decompressed == 6
    columns, rows = read_csv(out / "per_image.csv")
    assert tuple(columns) == results.CSV_COLUMNS and set(results.SCENE_COLUMNS) <= set(columns)
    size, g, k = c.config.image_size, c.grid[0], c.config.codec.codebook_size
    for i, r in enumerate(rows):
        scene = synthetic_scene(i, datasets.SYNTHETIC_SEED)
        assert r["name"] == f"scene_{i:05d}" and r["caption"] == scene.caption
        assert (int(r["height"]), int(r["width"])) == (size, size)
        recon = load_image(out / "recon" / f"{r['name']}.png")
        original = render_scene(scene, size)
        for m, v in scenes.scene_scores(original, recon, scene).items():
            assert float(r[m]) == pytest.approx(v)
        thumb = ev.quantise(scenes.thumbnail_baseline(original, g, k))
        for m, v in scenes.scene_scores(original, thumb, scene).items():
            assert float(r[f"thumb_{m}"]) == pytest.approx(v)
        mse = np.mean((original.astype(np.float64) - thumb) ** 2)
        assert float(r["thumb_psnr"]) == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)
        assert float(r["thumb_psnr"]) < 40
    saved = json.loads((out / "summary.json").read_text())
    assert saved["data"] == f"synthetic:6:{datasets.SYNTHETIC_SEED}" and saved["protocol"]["size"] == size
    for m in results.SCENE_COLUMNS:
        assert saved["mean"][m] == pytest.approx(np.mean([float(r[m]) for r in rows])) and saved["count"][m] == 6
    assert saved["psnr_gain_over_thumbnail"] == pytest.approx(saved["mean"]["psnr"] - saved["mean"]["thumb_psnr"])
    assert saved["scene"]["thumbnail"] == {"grid_side": g, "levels_per_channel": scenes.thumbnail_levels(k),
                                           "bits": g * g * 3 * np.log2(scenes.thumbnail_levels(k)),
                                           "index_bits_uniform": g * g * np.log2(k)}
    assert saved["scene"]["originals"]["background_right"] == 1.0 and saved["scene"]["originals"]["realism"] > 0.9
    assert saved["scene"]["originals"]["shape_iou"] == 1.0
    # the learned autoencoder alone (its own encode / decode, 8-bit), independently of Codec.autoencode's batching
    originals = np.stack([render_scene(synthetic_scene(i, datasets.SYNTHETIC_SEED), size) for i in range(6)])
    mean, _ = c.autoencoder.apply({"params": c.ae_params}, jnp.asarray(originals * 2 - 1), method=c.autoencoder.encode)
    trip = np.asarray(c.autoencoder.apply({"params": c.ae_params}, mean, method=c.autoencoder.decode))
    trip = [ev.quantise(t / 2 + 0.5) for t in trip]
    ae = saved["scene"]["autoencoder"]
    assert ae["psnr"] == pytest.approx(np.mean([10 * np.log10(1 / np.mean((o.astype(np.float64) - t) ** 2))
                                                for o, t in zip(originals, trip)]), abs=1e-3)
    for m in scenes.SCENE_SCORES:
        assert ae[m] == pytest.approx(np.mean([
            scenes.scene_scores(o, t, synthetic_scene(i, datasets.SYNTHETIC_SEED))[m]
            for i, (o, t) in enumerate(zip(originals, trip))]))
    assert ae["psnr"] > saved["mean"]["thumb_psnr"] + 5  # the trained autoencoder keeps far more than 96 bits
    assert summary["mean"] == saved["mean"]
    table = ev.format_scene_summary(saved)
    assert "thumbnail 4x4, 96 bits" in table and "originals" in table and "PSNR gain over the thumbnail" in table
    assert table.splitlines()[0].split()[-2:] == ["shape", "IoU"]
    (line,) = [ln for ln in table.splitlines() if "autoencoder alone (the ceiling)" in ln]
    assert line.split()[-5:] == [f"{ae['psnr']:.2f}"] + [f"{ae[m]:.3f}" for m in scenes.SCENE_SCORES]
    (line,) = [ln for ln in table.splitlines() if ln.strip().startswith("thumbnail")]
    assert line.split()[-1] == f"{saved['mean']['thumb_shape_iou']:.3f}"
    (line,) = [ln for ln in table.splitlines() if ln.strip().startswith("originals")]
    assert line.split()[-1] == "1.000"
    del saved["scene"]["autoencoder"]  # a summary written before the ceiling was measured: no row
    assert "autoencoder alone" not in ev.format_scene_summary(saved)

    # the CLI prints the table; resuming into the same folder codes nothing again
    monkeypatch.setattr(Codec, "load", classmethod(lambda cls, folder: c))
    parser = argparse.ArgumentParser(prog="perco-jax")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", "--checkpoint", str(path), "--data", "synthetic:6", "--out", str(out),
                              "--quiet"])
    capsys.readouterr()
    assert args.fn(args) == 0
    assert calls.compressed == calls.decompressed == 6
    printed = capsys.readouterr().out
    assert table in printed
    run = json.loads((out / "run.json").read_text())
    assert run["caption_sources"] == {r["name"]: "scene" for r in rows}
    old = {k: v for k, v in run.items() if k not in ("captions_file", "captioner", "caption_cache", "caption_sources")}
    (out / "run.json").write_text(json.dumps(old))  # results written before the caption sources were recorded
    ev.evaluate(c, "synthetic:6", out, progress=False)
    assert calls.compressed == calls.decompressed == 6  # resumed: nothing coded again
    # rows written before shape IoU existed are decoded again (from the saved streams), to the same numbers
    columns, rows = read_csv(out / "per_image.csv")
    results.write_rows(out / "per_image.csv", rows, [c for c in columns if "shape_iou" not in c])
    # in the first call's batches: another batch composition may move a pixel across a rounding step
    ev.evaluate(c, "synthetic:6", out, progress=False, batch_size=4)
    assert (calls.compressed, calls.decompressed) == (6, 12)
    assert read_csv(out / "per_image.csv")[1] == rows
    with pytest.raises(ValueError, match="multiple of 4"):  # no equal-bits thumbnail at 30x30
        ev.evaluate(c, "synthetic:2", tmp_path / "odd", size=30, progress=False)


def test_synthetic_data_spec():
    from perco_jax.data.synthetic import render_scene, synthetic_scene

    ds = datasets.parse_data("synthetic:3:7")
    assert ds.kind == "synthetic" and ds.spec == "synthetic:3:7" and ds.size is None
    assert [it.caption for it in ds.items] == [synthetic_scene(i, 7).caption for i in range(3)]
    assert all(it.path is None for it in ds.items)
    with pytest.raises(ValueError, match="size"):  # evaluate fills in the codec's size
        ds.load(ds.items[0])
    at = datasets.parse_data("synthetic:12", size=16)
    assert at.spec == f"synthetic:12:{datasets.SYNTHETIC_SEED}" and at.items[11].name == "scene_00011"
    np.testing.assert_array_equal(at.load(at.items[2]), render_scene(synthetic_scene(2, datasets.SYNTHETIC_SEED), 16))
    for bad in ("synthetic:0", "synthetic:x", "synthetic:3:-1", "synthetic:2:1.5"):
        with pytest.raises(ValueError, match="synthetic:N"):
            datasets.parse_data(bad)
    with pytest.raises(ValueError, match="8 pixels"):
        datasets.parse_data("synthetic:2", size=4)


def test_data_specs_and_protocols(tmp_path):
    imgs = tmp_path / "coco" / "train2017"
    imgs.mkdir(parents=True)
    save_image(np.full((30, 50, 3), 0.5), imgs / "x1.jpg")
    save_image(np.full((40, 20, 3), 0.25), imgs / "x2.png")
    (tmp_path / "coco" / "captions.jsonl").write_text(json.dumps({"file": "train2017/x2.png", "caption": "grey"}) + "\n")
    filelist = tmp_path / "coco" / "list.txt"
    filelist.write_text("# COCO-30k\ntrain2017/x1.jpg\n\ntrain2017/x2.png\n")
    ds = datasets.parse_data(f"coco30k:{filelist}")
    assert [it.name for it in ds.items] == ["x1", "x2"] and [it.caption for it in ds.items] == ["", "grey"]
    assert ds.size == 512 and ds.load(ds.items[0]).shape == (512, 512, 3)
    cropped = datasets.parse_data(f"coco30k:{filelist}", size=16, center_crop=True)
    assert cropped.load(cropped.items[1]).shape == (16, 16, 3)
    kodak = datasets.parse_data(f"kodak:{imgs}")
    assert kodak.size is None and kodak.load(kodak.items[0]).shape == (30, 50, 3)
    x = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    np.testing.assert_array_equal(datasets.preprocess(x, center_crop=True), x[:, 1:5].astype(np.float32) / 255.0)
    for bad in ("imagenet:x", "folder:", "kodak"):
        with pytest.raises(ValueError, match="data spec"):
            datasets.parse_data(bad)
    with pytest.raises(FileNotFoundError):
        datasets.parse_data(f"folder:{tmp_path / 'nope'}")
    filelist.write_text("train2017/missing.png\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        datasets.parse_data(f"coco30k:{filelist}")


def test_published_csv_holds_the_issue_17_points_with_sources_and_exactness():
    rows = published.load_published()
    header = next(ln for ln in published.PUBLISHED_CSV.read_text().splitlines() if not ln.startswith("#"))
    assert tuple(header.split(",")) == published.PUBLISHED_COLUMNS
    assert len(rows) == 31
    assert {r["method"] for r in rows} == {"PerCo", "PerCo (SD)", "PerCoV2", "MS-ILLM", "SD v2.1 autoencoder"}
    protocols = {"coco30k-512": ("coco30k", "512x512"), "kodak-full": ("kodak", "full"),
                 "clic2020-full:diffeic": ("clic2020", "full"), "clic2020-full:ms-illm": ("clic2020", "full")}
    for r in rows:
        assert (r["dataset"], r["resolution"]) == protocols[r["protocol"]]
        assert r["exactness"] in published.EXACTNESS and r["source"]
        if r["exactness"] == "figure":  # read off a plot: the uncertainty is given
            assert "±" in r["source"] and r["protocol"] == "coco30k-512"
        assert (r["bpp"] is None) == (r["method"] == "SD v2.1 autoencoder")
        assert bool(r["image"]) == ("Fig. 2" in r["source"])
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["protocol"], r["image"]), []).append(r)
    coco = by[("PerCo", "coco30k-512", "")]
    assert [r["bpp"] for r in coco] == [0.0041, 0.0080, 0.0121, 0.0335, 0.0528, 0.0957, 0.127]
    assert (coco[3]["ms_ssim"], coco[3]["lpips"], coco[3]["fid"], coco[3]["kid"]) == \
        (0.710, 0.242, 2.60, 0.00052)
    sd = by[("PerCo (SD)", "coco30k-512", "")]
    assert [r["bpp"] for r in sd] == [0.0037, 0.0042, 0.0114, 0.0329, 0.0525, 0.0954, 0.1266]
    assert (sd[-1]["ms_ssim"], sd[-1]["lpips"], sd[-1]["fid"], sd[-1]["kid"]) == (0.855, 0.140, 1.22, 0.00011)
    (ae,) = by[("SD v2.1 autoencoder", "coco30k-512", "")]
    assert (ae["ms_ssim"], ae["lpips"], ae["fid"], ae["kid"]) == (0.931, 0.065, 0.64, 0.00006)
    kodak = by[("PerCo (SD)", "kodak-full", "")]
    assert [(r["bpp"], r["lpips"], r["ms_ssim"], r["psnr"], r["dists"], r["fid"]) for r in kodak] == [
        (0.12614, 0.14326, 0.84650, 22.787, 0.0796, None), (0.03239, 0.29650, 0.67396, 19.528, 0.1607, None)]
    clic = by[("PerCo (SD)", "clic2020-full:diffeic", "")]
    assert [(r["bpp"], r["fid"], r["kid"]) for r in clic] == [(0.12575, 7.102, 0.00043), (0.03200, 16.024, 0.00222)]
    assert [(r["bpp"], r["psnr"]) for r in by[("MS-ILLM", "kodak-full", "")]] == [(0.04435, 24.73), (0.08061, 25.92)]
    assert [(r["bpp"], r["fid"], r["kid"]) for r in by[("MS-ILLM", "clic2020-full:ms-illm", "")]] == [
        (0.03462, 6.272, 0.00104), (0.06328, 4.479, 0.00082)]
    per_image = {(r["method"], r["image"]): r["bpp"] for r in rows if r["image"]}
    assert per_image == {("PerCoV2", "kodim10"): 0.00308, ("PerCoV2", "kodim21"): 0.00360,
                         ("PerCoV2", "kodim13"): 0.00378, ("PerCoV2", "kodim07"): 0.00351,
                         ("PerCo (SD)", "kodim10"): 0.00339, ("PerCo (SD)", "kodim21"): 0.00388,
                         ("PerCo (SD)", "kodim13"): 0.00406, ("PerCo (SD)", "kodim07"): 0.00372}


def test_published_csv_validation(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("method,dataset,resolution,bpp,source\nX,kodak,full,0.1,s\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        published.load_published(bad)
    bad.write_text("method,dataset,protocol,bpp,exactness,source\nX,kodak,kodak-full,0.1,guess,s\n")
    with pytest.raises(ValueError, match="exactness"):
        published.load_published(bad)
    bad.write_text("method,dataset,protocol,bpp,exactness,source\nX,kodak,kodak-full,lots,table,s\n")
    with pytest.raises(ValueError, match="not a number"):
        published.load_published(bad)


def _plotted(monkeypatch):
    """The figures plot_rd draws (captured from plots.panels)."""
    figs, panels = [], plots.panels

    def capture(mpl, n):
        fig, axes = panels(mpl, n)
        figs.append(fig)
        return fig, axes

    monkeypatch.setattr(plots, "panels", capture)
    return figs


def test_rd_plot_shows_one_protocol_names_sources_and_hollows_figure_points(tmp_path, monkeypatch):
    figs = _plotted(monkeypatch)
    rows = published.load_published()
    ours = {"psnr": 20.0, "ms_ssim": 0.5, "lpips": 0.4, "fid": 5.0, "kid": 0.001}
    series = [{"label": "ours", "points": [(0.01, ours)]}]
    for protocol in ("coco30k-512", "kodak-full", "clic2020-full:ms-illm", "clic2020-full:diffeic"):
        assert plots.plot_rd(tmp_path / "rd.png", series, rows, protocol) is None
        fig = figs[-1]
        legend = fig.legends[0]
        labels = [t.get_text() for t in legend.get_texts()]
        want = {published.published_label(r) + (", no bpp" if r["bpp"] is None else "")
                for r in rows if r["protocol"] == protocol and not r["image"]}
        assert labels[0] == "ours" and set(labels[1:]) == want
        for label, handle in list(zip(labels, legend.legend_handles))[1:]:
            if "no bpp" not in label:
                assert (handle.get_markerfacecolor() == "none") == ("read from a figure" in label)
        allowed = {r["bpp"] for r in rows if r["protocol"] == protocol and not r["image"]} | {0.01}
        for ax in fig.axes:  # every point drawn is ours or of this protocol
            for line in ax.get_lines():
                xs = set(np.atleast_1d(line.get_xdata()).tolist())
                assert xs <= allowed or xs <= {0, 1}, (protocol, xs)  # (axhline spans x in axes units)
    assert "PerCo (Nikolai10/PerCo, read from a figure)" in [t.get_text() for t in figs[0].legends[0].get_texts()]
    assert "MS-ILLM (facebookresearch/NeuralCompression, table)" in [t.get_text() for t in figs[1].legends[0].get_texts()]
    assert datasets.data_protocol(datasets.Dataset("kodak:x", "kodak", [])) == "kodak-full"
    assert datasets.data_protocol(datasets.Dataset("coco30k:x", "coco30k", [], size=512)) == "coco30k-512"
    assert datasets.data_protocol(datasets.Dataset("coco30k:x", "coco30k", [], size=512, center_crop=True)) == "coco30k-512-crop"


def test_text_modes_split_the_rate_between_caption_and_indices(codec, folder, tmp_path):
    _, c = codec
    small = _subset(folder, tmp_path, ("a",), {"a.png": "a red circle"})
    from perco_jax.codec import bitstream

    got = {}
    for mode in ("full", "none", "truncate:1"):
        ev.evaluate(c, f"folder:{small}", tmp_path / mode, progress=False, text_mode=mode)
        _, rows = read_csv(tmp_path / mode / "per_image.csv")
        got[mode] = (bitstream.unpack((tmp_path / mode / "streams" / "a.perco").read_bytes(), indices=None)[1],
                     float(rows[0]["bpp_caption"]), float(rows[0]["bpp_indices"]))
    assert [got[m][0] for m in ("full", "none", "truncate:1")] == ["a red circle", "", "a"]
    assert got["none"][1] < got["truncate:1"][1] < got["full"][1]
    assert all(got[m][2] > 0 for m in got)  # the indices are sent in every mode
    with pytest.raises(ValueError, match="text mode"):  # another text mode into the same folder
        ev.evaluate(c, f"folder:{small}", tmp_path / "full", progress=False, text_mode="none")
    with pytest.raises(ValueError, match="text mode"):
        ev.evaluate(c, f"folder:{small}", tmp_path / "x", progress=False, text_mode="half")


def test_clip_score_for_captioned_images(codec, folder, clip_folder, tmp_path):
    _, c = codec
    small = _subset(folder, tmp_path, ("a", "c"), {"a.png": "a red circle"})
    summary = ev.evaluate(c, f"folder:{small}", tmp_path / "out", metrics_weights={"clip": str(clip_folder[0])},
                          progress=False)
    _, rows = read_csv(tmp_path / "out" / "per_image.csv")
    by_name = {r["name"]: r for r in rows}
    from perco_jax.eval.clip_score import CLIPScorer

    recon = load_image(tmp_path / "out" / "recon" / "a.png")
    want = float(CLIPScorer.load(clip_folder[0])([recon], ["a red circle"])[0])
    assert float(by_name["a"]["clip_score"]) == pytest.approx(want, abs=1e-4)
    assert by_name["c"]["clip_score"] == ""  # no caption, no CLIP score
    assert "no caption" in summary["partial"]["clip_score"]
    assert "clip_score" not in summary["skipped"]


def test_miou_between_segmentations_of_originals_and_reconstructions(codec, folder, segformer, tmp_path):
    from perco_jax.eval.segmentation import Segmenter, miou_dataset

    _, c = codec
    small = _subset(folder, tmp_path, ("a", "c"))
    summary = ev.evaluate(c, f"folder:{small}", tmp_path / "out", metrics_weights={"segmentation": str(segformer[0])},
                          progress=False)
    seg = Segmenter.load(segformer[0])
    pairs = [(seg.segment(load_image(small / f"{n}.png")[None])[0],
              seg.segment(load_image(tmp_path / "out" / "recon" / f"{n}.png")[None])[0]) for n in ("a", "c")]
    assert summary["miou"] == pytest.approx(miou_dataset(pairs, seg.num_classes), abs=1e-9)
    assert 0.0 <= summary["miou_image_mean"] <= 1.0 and "miou" not in summary["skipped"]


def _cli(args):
    parser = argparse.ArgumentParser(prog="perco-jax")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["evaluate", *map(str, args)])
    return parsed.fn(parsed)


def test_kodak_per_image_rates_next_to_perco_v2(codec, folder, tmp_path, monkeypatch, capsys):
    from perco_jax.captions import captioner as cap

    path, c = codec
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    for src, dst in (("a", "kodim10"), ("c", "kodim07"), ("b", "other")):
        (kodak / f"{dst}.png").write_bytes((folder / f"{src}.png").read_bytes())
    (kodak / "captions.jsonl").write_text(json.dumps({"file": "other.png", "caption": "ignored"}) + "\n")
    cache = cap.CaptionCache(tmp_path / "cache.jsonl")
    cache.put(cap.image_key(kodak / "kodim10.png"), "a cached caption", "someone")
    monkeypatch.setattr(Codec, "load", classmethod(lambda cls, folder: c))
    out = tmp_path / "out"
    assert _cli(["--checkpoint", path, "--data", f"kodak:{kodak}", "--out", out, "--quiet", "--captions", "none",
                 "--caption-cache", tmp_path / "cache.jsonl"]) == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    _, rows = read_csv(out / "per_image.csv")
    bpp = {r["name"]: float(r["bpp"]) for r in rows}
    table = {e["image"]: e for e in summary["kodak_per_image"]}
    assert sorted(table) == ["kodim07", "kodim10", "kodim13", "kodim21"]
    assert table["kodim10"] == {"image": "kodim10", "ours": pytest.approx(bpp["kodim10"]), "PerCoV2": 0.00308,
                                "PerCo (SD)": 0.00339}
    assert table["kodim07"]["ours"] == pytest.approx(bpp["kodim07"]) and table["kodim13"]["ours"] is None
    text = published.format_kodak_per_image(summary["kodak_per_image"])
    assert text in printed.out and "PerCoV2" in text and f"{bpp['kodim10']:.5f}" in text
    assert summary["published_protocol"] == "kodak-full" and summary["published_points"] == 4
    # --captions none: the captions file is not read; the cache gives kodim10's caption
    assert {r["name"]: (r["caption"], r["caption_source"]) for r in rows} == {
        "kodim07": ("", "none"), "kodim10": ("a cached caption", "cache"), "other": ("", "none")}
    assert printed.err.count("without a caption") == 1 and "2 of 3 images" in printed.err


def test_captions_from_files_and_a_cache_and_one_line_for_the_rest(codec, folder, tmp_path, capsys):
    from perco_jax.captions import captioner as cap

    _, c = codec
    small = _subset(folder, tmp_path, ("a", "b", "c"))  # no captions file beside them
    cache_path = tmp_path / "cache.jsonl"
    cap.CaptionCache(cache_path).put(cap.image_key(small / "a.png"), "a cached circle", "some captioner")
    out = tmp_path / "out"
    summary = ev.evaluate(c, f"folder:{small}", out, caption_cache=cache_path, progress=False)
    err = capsys.readouterr().err
    note = "2 of 3 images were coded without a caption (b, c): 2 found none in the captions file, caption cache or " \
           "captioner given (give --captioner DIR, --caption-cache FILE or --captions FILE)"
    assert err.strip() == note
    _, rows = read_csv(out / "per_image.csv")
    assert [(r["caption"], r["caption_source"]) for r in rows] == [("a cached circle", "cache"), ("", "none"),
                                                                    ("", "none")]
    _, caps, _ = c.read_batch([(out / "streams" / "a.perco").read_bytes()])
    assert caps == ["a cached circle"]
    run = json.loads((out / "run.json").read_text())
    assert run["caption_sources"] == {"a": "cache", "b": "none", "c": "none"}
    assert run["caption_cache"] == str(cache_path.resolve()) and run["captioner"] is None
    assert summary["captions"]["sources"] == {"cache": 1, "none": 2} and summary["captions"]["note"] == note
    assert summary["captions"]["per_image"] == run["caption_sources"]
    ev.evaluate(c, f"folder:{small}", out, caption_cache=cache_path, progress=False)  # resumes (same identity)
    with pytest.raises(ValueError, match="caption"):  # the same folder without the cache is another run
        ev.evaluate(c, f"folder:{small}", out, progress=False)

    # a captions file given explicitly (matched by file name) comes before the cache
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"file": "a.png", "caption": "from the file"}) + "\n"
                    + json.dumps({"file": "b.png", "caption": "b from the file"}) + "\n")
    both = ev.evaluate(c, f"folder:{small}", tmp_path / "both", captions=mine, caption_cache=cache_path,
                       progress=False)
    assert both["captions"]["per_image"] == {"a": "file", "b": "file", "c": "none"}
    none = ev.evaluate(c, f"folder:{small}", tmp_path / "none", captions=mine, progress=False, text_mode="none")
    assert none["captions"]["sources"] == {"none": 3}
    assert capsys.readouterr().err.splitlines()[-1] == "all 3 images were coded without a caption (--text-mode none)"
    with pytest.raises(FileNotFoundError, match="captions file"):
        datasets.parse_data(f"folder:{small}", captions=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="own captions"):
        datasets.parse_data("synthetic:2", captions=mine)
    assert [it.caption_source for it in datasets.parse_data("synthetic:2", captions="none").items] == ["", ""]


def test_captions_from_a_captioner_are_cached_and_not_made_again(codec, folder, blip2_folder, tmp_path, monkeypatch):
    from perco_jax.captions import captioner as cap

    _, c = codec
    small = _subset(folder, tmp_path, ("a", "c"), {"a.png": "a red circle"})
    want = cap.Captioner.load(blip2_folder, device="cpu").caption([small / "c.png"], progress=False)[0]
    assert want  # (the tiny random BLIP-2 writes something)
    calls = []
    generate = cap.Captioner.generate

    def counting(self, images, *a, **k):
        calls.append(len(images))
        return generate(self, images, *a, **k)

    monkeypatch.setattr(cap.Captioner, "generate", counting)
    out = tmp_path / "out"
    summary = ev.evaluate(c, f"folder:{small}", out, captioner=str(blip2_folder), progress=False)
    _, rows = read_csv(out / "per_image.csv")
    assert [(r["caption"], r["caption_source"]) for r in rows] == [("a red circle", "file"), (want, "captioner")]
    assert calls == [1]  # only c, which has no caption in the file
    assert summary["captions"]["captioner"] == f"{blip2_folder.name}:greedy:32" and summary["captions"]["note"] is None
    cached = cap.CaptionCache(out / ev.CAPTION_CACHE)
    assert cached.get(cap.image_key(small / "c.png"), summary["captions"]["captioner"]) == want
    ev.evaluate(c, f"folder:{small}", out, captioner=str(blip2_folder), progress=False)
    assert calls == [1]  # resumed: the cache answers
    with pytest.raises(ValueError, match="caption"):  # another captioner setting is another run
        ev.evaluate(c, f"folder:{small}", out, captioner=str(blip2_folder), caption_tokens=5, progress=False)


def test_prefix_sweep_of_stream_groups(codec, tmp_path, monkeypatch, capsys):
    from perco_jax.codec.codec import rate_split

    path, c = codec
    s = c.num_groups()
    want = [0, s // 2, s]
    out = tmp_path / "prefix"
    calls = Calls(c, monkeypatch)
    figs = _plotted(monkeypatch)
    summary = ev.evaluate(c, "synthetic:3", out, groups=[s, 0, s // 2], progress=False)  # (any order)
    assert calls.compressed == calls.decompressed == 3 * len(want)
    assert summary["prefix"] == {"groups": want, "num_groups": s, "fill_temperature": 0.0,
                                 "schedule": c.config.codec.schedule}
    assert [x["groups"] for x in summary["settings"]] == want
    assert json.loads((out / "run.json").read_text())["groups"] == want
    for k in want:
        sub = out / f"groups={k}"
        for f in ("per_image.csv", "summary.json", "setting.json", "rd.png"):
            assert (sub / f).is_file(), (k, f)
        assert json.loads((sub / "setting.json").read_text())["groups"] == k
        for r in read_csv(sub / "per_image.csv")[1]:
            assert (sub / "recon" / f"{r['name']}.png").is_file()
            stream = (sub / "streams" / f"{r['name']}.perco").read_bytes()  # each K: its own streams
            assert rate_split(stream)["groups_sent"] == (None if k == s else k)
            assert int(r["bytes"]) == len(stream)
    columns, table = read_csv(out / "prefix.csv")
    assert columns[:2] == ["groups", "dir"] and {"shape_iou", "thumb_shape_iou", "colours_present"} <= set(columns)
    assert [int(t["groups"]) for t in table] == want and [t["dir"] for t in table] == [f"groups={k}" for k in want]
    bpp = [float(t["bpp"]) for t in table]
    assert bpp[0] < bpp[1] < bpp[2]  # more groups sent, more bits
    assert bpp == [pytest.approx(x["mean"]["bpp"]) for x in summary["settings"]]
    assert len({t["thumb_psnr"] for t in table}) == 1 and all(t["shape_iou"] != "" for t in table)
    assert summary["files"] == {"table": "prefix.csv", "plot": "prefix.png"} and (out / "prefix.png").is_file()
    assert json.loads((out / "summary.json").read_text())["prefix"] == summary["prefix"]
    (fig,) = [f for f in figs if len(f.axes) == 3]  # prefix.png: PSNR, colours present, shape IoU
    assert [ax.get_ylabel() for ax in fig.axes] == ["PSNR (dB) ↑", "colours present ↑", "shape IoU ↑"]
    assert fig.axes[0].get_xscale() == "linear"
    assert "equal-bits thumbnail (96 bits)" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert [t.get_text() for t in fig.axes[0].texts] == [f"K={k}" for k in want]

    # K = S is the plain evaluation, byte for byte
    plain = tmp_path / "plain"
    ev.evaluate(c, "synthetic:3", plain, progress=False)
    for f in (plain / "streams").iterdir():
        assert (out / f"groups={s}" / "streams" / f.name).read_bytes() == f.read_bytes()
    assert read_csv(plain / "per_image.csv")[1] == read_csv(out / f"groups={s}" / "per_image.csv")[1]

    # the CLI resumes it (nothing coded again) and prints a line per K and the scene table
    monkeypatch.setattr(Codec, "load", classmethod(lambda cls, folder: c))
    capsys.readouterr()
    assert _cli(["--checkpoint", path, "--data", "synthetic:3", "--out", out, "--quiet",
                 "--groups", *want, "--fill-temperature", "0"]) == 0
    assert calls.compressed == calls.decompressed == 3 * len(want) + 3
    printed = capsys.readouterr().out
    for k, x in zip(want, summary["settings"]):
        assert f"groups={k} fill_temperature=0 guidance=" in printed
        assert f"codec ({k} groups, guidance" in printed
    assert ev.format_scene_summary(summary) in printed
    with pytest.raises(ValueError, match="differs in groups"):  # other groups into the same folder
        ev.evaluate(c, "synthetic:3", out, groups=[0, s], progress=False)
    with pytest.raises(ValueError, match="differs in fill_temperature"):
        ev.evaluate(c, "synthetic:3", out, groups=want, fill_temperature=0.5, progress=False)


def test_prefix_sweep_refuses_bad_groups(codec, tmp_path):
    _, c = codec
    s = c.num_groups()
    out = tmp_path / "bad"
    for bad, match in (([s + 1], rf"groups \[{s + 1}\]: each K must be a whole number .* in 0\.\.{s}"),
                       ([-1], "whole number"), ([1.5], "whole number"), ([True], "whole number"),
                       ([2, 0, 2], r"groups \[2\] given more than once"), ([], "at least one")):
        with pytest.raises(ValueError, match=match):
            ev.evaluate(c, "synthetic:2", out, groups=bad, progress=False)
    with pytest.raises(ValueError, match="does not combine with a guidance / steps sweep"):
        ev.evaluate(c, "synthetic:2", out, groups=[0], sweep={"guidance": [1, 2]}, progress=False)
    with pytest.raises(ValueError, match="needs groups"):
        ev.evaluate(c, "synthetic:2", out, fill_temperature=0.5, progress=False)
    with pytest.raises(ValueError, match=r"fill_temperature=-1.*>= 0"):
        ev.evaluate(c, "synthetic:2", out, groups=[0], fill_temperature=-1, progress=False)
    assert not out.exists()  # refused before anything is written
