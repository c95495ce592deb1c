"""The FID InceptionV3 in Flax against a plain-torch reference of pytorch-fid's network (torchvision's
layer names, FIDInceptionA/C/E_1/E_2 pooling), on random weights and batch-norm statistics; the
converter's errors; the FID / KID front end."""
import functools
import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import nn

from perco_jax.convert.common import ConversionError, flat_shapes, torch_shape
from perco_jax.convert.inception import abstract_variables, inception_variables, key_map, load_inception
from perco_jax.eval.fid import InceptionFeatures, fid_kid
from perco_jax.eval.metrics import feature_statistics, frechet_distance, kid
from perco_jax.models.inception import InceptionV3, resize_bilinear
from tests.reference import rel_err

# ----------------------------------------------------------------------------- torch reference


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x, fid):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features, fid):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x, self.fid))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7, fid):
        super().__init__()
        self.fid = fid
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool(x, self.fid))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """pool: 'avg_fid' (FIDInceptionE_1), 'max' (FIDInceptionE_2) or 'avg' (torchvision)."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = avg_pool(x, self.pool == "avg_fid")
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchInception(nn.Module):
    """pytorch-fid's `fid_inception_v3()` (fid=True) or torchvision's trunk (fid=False), with
    pytorch-fid's InceptionV3 forward: resize to 299 (bilinear), 2x - 1, ..., global average pool."""

    def __init__(self, fid=True, aux_logits=False):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32, fid)
        self.Mixed_5c = InceptionA(256, 64, fid)
        self.Mixed_5d = InceptionA(288, 64, fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, fid)
        self.Mixed_6c = InceptionC(768, 160, fid)
        self.Mixed_6d = InceptionC(768, 160, fid)
        self.Mixed_6e = InceptionC(768, 192, fid)
        if aux_logits:  # torchvision's auxiliary head (a checkpoint holds it; FID never uses it)
            self.AuxLogits = nn.Module()
            self.AuxLogits.conv0 = BasicConv2d(768, 128, kernel_size=1)
            self.AuxLogits.fc = nn.Linear(768, 1000)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg_fid" if fid else "avg")
        self.Mixed_7c = InceptionE(2048, "max" if fid else "avg")
        self.fc = nn.Linear(2048, 1008 if fid else 1000)

    def forward(self, x, resize=True):
        """x [B, 3, H, W] in [0, 1] -> (pool3 [B, 2048], logits)."""
        if resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool3 = x.mean((2, 3))
        return pool3, self.fc(pool3)


def randomize_inception_(model, seed=0):
    """Every weight and batch-norm statistic random, scaled so activations stay O(1) through the
    ~20 layers: He-scaled conv weights, BN scales near 1, nonzero means, variances in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(randn(m.weight.shape) * math.sqrt(2.0 / m.weight[0].numel()))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * randn(c))
                m.bias.copy_(0.2 * randn(c))
                m.running_mean.copy_(0.2 * randn(c))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(randn(m.weight.shape) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * randn(m.bias.shape))
    return model.eval()


@functools.lru_cache(maxsize=None)
def reference(fid=True, aux_logits=False):
    torch.manual_seed(0)
    return randomize_inception_(TorchInception(fid, aux_logits), seed=1 if fid else 2)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def run_reference(model, x, resize=True):
    with torch.no_grad():
        pool3, logits = model(nchw(x), resize=resize)
    return pool3.numpy(), logits.numpy()


def images(b, h, w, seed=0):
    """Smooth random images in [0, 1] (a coarse grid upsampled, plus a little noise)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 1, (b, 3, 6, 6)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).numpy().transpose(0, 2, 3, 1)
    return np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def jitted(variant, resize):
    model = InceptionV3(variant, resize_input=resize)
    return jax.jit(lambda v, x: model.apply(v, x, return_logits=True))


# ----------------------------------------------------------------------------- parity


def test_fid_inception_matches_torch_reference(tmp_path):
    ref = reference(fid=True)
    # the file as pytorch-fid distributes it: a torch-pickled state dict (with num_batches_tracked)
    torch.save(ref.state_dict(), tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    model, variables = load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth", resize_input=False)
    assert set(variables) == {"params", "batch_stats"}
    assert isinstance(model, InceptionV3) and model.variant == "fid" and not model.resize_input
    assert variables["params"]["fc"]["kernel"].shape == (2048, 1008)

    x = images(2, 75, 75)  # the smallest input: the 8x8 stages are 1x1, padding matters everywhere
    want, want_logits = run_reference(ref, x, resize=False)
    got, got_logits = jitted("fid", False)(variables, x)
    assert got.shape == (2, 2048) and got_logits.shape == (2, 1008)
    assert 0.1 < np.abs(want).mean() < 10 and np.std(want) > 0.1  # activations neither vanish nor blow up
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert rel_err(got_logits, want_logits) < 1e-5
    assert np.abs(want[0] - want[1]).max() > 0.1 * np.abs(want).max()  # the images are told apart


def test_resize_path_matches_torch_reference(tmp_path):
    """A non-square input resized to 299x299 as pytorch-fid does (F.interpolate bilinear); from a
    safetensors copy of the checkpoint. At 299 the last blocks see an 8x8 grid, so this is also the
    check of Mixed_7c's max pool (on the 1x1 grid of a 75x75 input max and average agree)."""
    ref = reference(fid=True)
    save_file({k: v.numpy() for k, v in ref.state_dict().items()}, str(tmp_path / "inception.safetensors"))
    variables = inception_variables(tmp_path / "inception.safetensors")
    x = images(1, 61, 113, seed=1)  # upsampled, unequally along the two axes
    want, _ = run_reference(ref, x, resize=True)
    got, _ = jitted("fid", True)(variables, x)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)

    big = images(2, 421, 350, seed=2)  # shrinking: two taps, no antialiasing
    want_big = F.interpolate(nchw(big), size=(299, 299), mode="bilinear", align_corners=False).numpy()
    got_big = np.asarray(resize_bilinear(big, 299)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got_big, want_big, atol=1e-6, rtol=0)


def test_torchvision_variant_matches_torch_reference():
    """torchvision's pooling (padding counted, average pool in Mixed_7c) and 1000 classes; its
    checkpoint's AuxLogits head is skipped."""
    ref = reference(fid=False, aux_logits=True)
    sd = ref.state_dict()
    assert any(k.startswith("AuxLogits.") for k in sd)
    variables = inception_variables(sd, variant="torchvision")
    x = images(2, 75, 75, seed=3)
    want, want_logits = run_reference(ref, x, resize=False)
    got, got_logits = jitted("torchvision", False)(variables, x)
    assert got_logits.shape == (2, 1000)
    assert rel_err(got, want) < 1e-5 and rel_err(got_logits, want_logits) < 1e-5
    # the pooling differs: the fid variant on the same weights gives other features
    fid_vars = inception_variables({k: v for k, v in sd.items() if not k.startswith(("AuxLogits.", "fc."))}
                                   | {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    assert rel_err(jitted("fid", False)(fid_vars, x)[0], want) > 1e-2


# ----------------------------------------------------------------------------- conversion errors


@functools.lru_cache(maxsize=None)
def fake_shapes(variant):
    return flat_shapes(abstract_variables(variant))


def fake_state_dict(variant="fid", drop=(), extra=None):
    """Zeros of the shapes the converter expects, minus `drop`, plus `extra`."""
    shapes = fake_shapes(variant)
    sd = {e.torch: np.zeros(torch_shape(e.kind, shapes[e.flax]), np.float32)
          for e in key_map(variant) if e.torch not in drop}
    sd.update(extra or {})
    return sd


def test_key_map_covers_the_model():
    entries = key_map("fid")
    assert len(entries) == 94 * 5 + 2  # 94 BasicConv2d (conv + 4 batch-norm tensors) and the fc head
    assert len({e.torch for e in entries}) == len(entries)
    assert {e.kind for e in entries if e.torch.endswith("conv.weight")} == {"conv"}
    assert [e.kind for e in entries if e.torch == "fc.weight"] == ["linear"]


def test_conversion_errors(tmp_path):
    bad = fake_state_dict(drop=("Mixed_6b.branch7x7_2.conv.weight",),
                          extra={"Mixed_5b.branch_pool.bn.running_var": np.zeros(31, np.float32),
                                 "Mixed_8a.conv.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ConversionError) as e:
        inception_variables(bad)
    msg = str(e.value)
    assert msg.count("\n") >= 3 and "pt_inception-2015-12-05" in msg  # one error, naming the expected file
    assert "missing 1 tensor(s): Mixed_6b.branch7x7_2.conv.weight" in msg
    assert "unexpected 1 tensor(s): Mixed_8a.conv.weight" in msg
    assert "Mixed_5b.branch_pool.bn.running_var: checkpoint (31,), model expects (32,)" in msg

    # torchvision's ImageNet checkpoint given for the FID network: says so, and how to load it
    tv = fake_state_dict("torchvision", extra={"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ConversionError) as e:
        inception_variables(tv)
    msg = str(e.value)
    assert "fc.weight: checkpoint (1000, 2048), model expects (1008, 2048)" in msg
    assert "unexpected 1 tensor(s): AuxLogits.fc.weight" in msg
    assert "inception_v3_google" in msg and "variant='torchvision'" in msg
    assert set(inception_variables(tv, variant="torchvision")) == {"params", "batch_stats"}

    with pytest.raises(ConversionError, match="DataParallel"):
        inception_variables({"module." + k: v for k, v in fake_state_dict().items()})
    with pytest.raises(ConversionError, match="not found"):
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable PyTorch state dict"):
        inception_variables(tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="unknown InceptionV3 variant"):
        inception_variables(fake_state_dict(), variant="imagenet")


# ----------------------------------------------------------------------------- FID / KID front end


def test_inception_features_chunks_and_inputs(tmp_path):
    ref = reference(fid=True)
    torch.save(ref.state_dict(), tmp_path / "pt_inception.pth")
    extract = InceptionFeatures.load(tmp_path / "pt_inception.pth", chunk_size=2, resize_input=False)
    x = images(3, 75, 75, seed=4)  # two chunks, the second padded
    got = extract(x)
    assert isinstance(got, np.ndarray) and got.shape == (3, 2048) and got.dtype == np.float32
    assert rel_err(got, run_reference(ref, x, resize=False)[0]) < 1e-5
    x8 = np.round(x * 255).astype(np.uint8)  # uint8 images are read as /255
    np.testing.assert_allclose(extract(x8), extract(x8.astype(np.float32) / 255), rtol=0, atol=1e-6)
    assert extract.compiled_shapes() == {(2, 75, 75, 3)}  # one compilation for every batch size
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extract(2 * x - 1)
    with pytest.raises(ValueError, match="B, H, W, 3"):
        extract(x[..., :1])
    with pytest.raises(ValueError, match="at least 75x75"):
        extract(x[:, :70])


def test_fid_kid():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(120, 16)), rng.normal(0.2, 1.1, size=(100, 16))
    out = fid_kid(real, fake, kid_subsets=10, kid_subset_size=50)
    assert out["fid"] == pytest.approx(frechet_distance(*feature_statistics(real), *feature_statistics(fake)))
    assert (out["kid"], out["kid_std"]) == pytest.approx(kid(real, fake, num_subsets=10, subset_size=50))
    assert fid_kid(real, real, kid_subsets=2, kid_subset_size=50)["fid"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="feature"):
        fid_kid(real, fake[:, :8])
