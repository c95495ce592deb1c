"""Evaluation metrics: PSNR; MS-SSIM against pytorch_msssim on real photos and random images;
FID against closed forms; KID against a direct implementation of the estimator; LPIPS in Flax
against a torchvision-layout PyTorch reference and (when installed) the `lpips` package itself."""
import functools
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from pytorch_msssim import ms_ssim as torch_ms_ssim
from safetensors.numpy import save_file
from skimage import data as skdata
from skimage import filters

from perco_jax.convert.common import ConversionError, flat_shapes, torch_shape
from perco_jax.convert.lpips import abstract_params, heads_key_map, load_lpips, lpips_params, trunk_key_map
from perco_jax.eval.metrics import feature_statistics, frechet_distance, kid, ms_ssim, psnr
from perco_jax.models.lpips import LPIPS, tap_channels
from tests.reference import randomize_, rel_err


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------- PSNR

def test_psnr_values():
    a = np.zeros((2, 8, 9, 3), np.float32)
    b = np.full_like(a, 0.1)
    b[1] = np.random.default_rng(0).uniform(0, 1, b[1].shape)
    got = np.asarray(jax.jit(psnr)(a, b))
    assert got.shape == (2,)
    np.testing.assert_allclose(got[0], 20.0, atol=1e-4)  # MSE 0.01
    np.testing.assert_allclose(got[1], 10 * np.log10(1 / np.mean(np.square(b[1].astype(np.float64)))), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(psnr(a * 255, b * 255, max_value=255.0)), got, rtol=1e-5)
    assert np.isinf(np.asarray(psnr(b, b))).all()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:, :4])


# ----------------------------------------------------------------------------- MS-SSIM

@functools.lru_cache(maxsize=None)
def photos(h=201, w=243):
    """Real photos (skimage.data), odd-sized crops in [0, 1]: [4, h, w, 3]."""
    gray = skdata.camera()
    return np.stack([skdata.astronaut()[:h, :w], skdata.coffee()[:h, :w], skdata.chelsea()[:h, :w],
                     np.repeat(gray[:h, :w, None], 3, axis=-1)]).astype(np.float32) / 255


def test_ms_ssim_matches_pytorch_msssim_on_photos():
    rng = np.random.default_rng(0)
    a = photos()
    b = np.stack([np.clip(a[0] + 0.05 * rng.standard_normal(a[0].shape), 0, 1),  # noise
                  filters.gaussian(a[1], sigma=2, channel_axis=-1),               # blur
                  np.round(a[2] * 8) / 8,                                          # coarse quantisation
                  np.roll(a[3], 3, axis=1)]).astype(np.float32)                   # misalignment
    got = np.asarray(jax.jit(ms_ssim)(a, b))
    want = torch_ms_ssim(nchw(a), nchw(b), data_range=1.0, size_average=False).numpy()
    assert got.shape == (4,)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert 0.5 < got.min() and got.max() < 0.99  # the distortions are visible, not saturated
    np.testing.assert_allclose(np.asarray(ms_ssim(a[:1], a[:1])), 1.0, atol=1e-6)


def test_ms_ssim_matches_pytorch_msssim_on_random_images():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (3, 163, 170, 3)).astype(np.float32)
    b = np.stack([rng.uniform(0, 1, a.shape[1:]),                    # independent noise
                  np.clip(a[1] + 0.1 * rng.standard_normal(a.shape[1:]), 0, 1),
                  1 - a[2]]).astype(np.float32)                       # anti-correlated: relu clips
    got = np.asarray(ms_ssim(a, b))
    want = torch_ms_ssim(nchw(a), nchw(b), data_range=1.0, size_average=False).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert got[1] > got[0]


def test_ms_ssim_rejects_small_or_mismatched_images():
    x = np.zeros((1, 160, 300, 3), np.float32)
    with pytest.raises(ValueError, match="larger than 160"):
        ms_ssim(x, x)
    with pytest.raises(ValueError, match="larger than 160"):
        ms_ssim(x.transpose(0, 2, 1, 3), x.transpose(0, 2, 1, 3))
    with pytest.raises(ValueError, match="NHWC"):
        ms_ssim(x[0], x[0])
    with pytest.raises(ValueError, match="differ in shape"):
        ms_ssim(x, x[:, :, :200])


# ----------------------------------------------------------------------------- FID

def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-10)
    # commuting, non-diagonal covariances: the same eigenvalues in a shared rotated basis
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(got, want, rtol=1e-8)
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s
    np.testing.assert_allclose(frechet_distance(1.0, 4.0, 3.0, 9.0), 4.0 + 1.0, rtol=1e-12)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + rng.normal(size=16)
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.T), rtol=1e-12)
    assert sigma.dtype == np.float64 and sigma.shape == (16, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    other = feature_statistics(feats + 0.5)
    np.testing.assert_allclose(frechet_distance(mu, sigma, *other), 16 * 0.25, rtol=1e-6)


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary"):  # not a covariance: negative eigenvalue
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="feature matrix"):
        feature_statistics(np.zeros((1, 5)))


# ----------------------------------------------------------------------------- KID

def direct_mmd2(x, y, degree=3, gamma=None, coef0=1.0):
    """The unbiased estimator written out pair by pair (within-sample terms over i != j)."""
    m, d = x.shape
    gamma = 1.0 / d if gamma is None else gamma

    def k(u, v):
        return (gamma * float(np.dot(u, v)) + coef0) ** degree

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_estimator():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(30, 5)), rng.normal(0.3, 1.2, size=(30, 5))
    # subsets as large as the sets: every subset is a permutation, the estimator is invariant to it
    mean, std = kid(f1, f2, num_subsets=3, subset_size=100)
    np.testing.assert_allclose(mean, direct_mmd2(f1, f2), rtol=1e-10)
    assert std < 1e-12
    # true subsets, drawn as documented: RandomState(seed), features1 then features2 per subset
    f1, f2 = rng.normal(size=(50, 4)), rng.normal(0.5, 1.0, size=(40, 4))
    kw = dict(degree=2, gamma=0.5, coef0=0.3)
    mean, std = kid(f1, f2, num_subsets=4, subset_size=20, seed=7, **kw)
    r = np.random.RandomState(7)
    vals = []
    for _ in range(4):
        x = f1[r.choice(50, 20, replace=False)]
        y = f2[r.choice(40, 20, replace=False)]
        vals.append(direct_mmd2(x, y, **kw))
    np.testing.assert_allclose([mean, std], [np.mean(vals), np.std(vals)], rtol=1e-10)
    assert std > 0


def test_kid_same_vs_shifted_distributions():
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(300, 64)), rng.normal(size=(300, 64))
    same, same_std = kid(f1, f2, num_subsets=20, subset_size=100)
    shifted, shifted_std = kid(f1, f2 + 0.3, num_subsets=20, subset_size=100)
    assert abs(same) < 0.02 and abs(same) < 2 * same_std  # zero within the estimator's noise
    assert shifted > 0.2 and shifted > 5 * shifted_std and shifted > 10 * abs(same)
    assert kid(f1, f2 + 1.0, num_subsets=5, subset_size=100)[0] > shifted  # grows with the shift
    with pytest.raises(ValueError, match="feature sizes differ"):
        kid(f1, f2[:, :4])


# ----------------------------------------------------------------------------- LPIPS

def torchvision_alexnet(classifier=False):
    """torchvision's AlexNet layout (models/alexnet.py), default init."""
    nn = torch.nn
    m = nn.Module()
    m.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    if classifier:
        m.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        m.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                                     nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 1000))
    return m


def torchvision_vgg16():
    """torchvision's VGG16 (configuration "D") feature layout."""
    nn = torch.nn
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    m = nn.Module()
    m.features = nn.Sequential(*layers)
    return m


TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}  # ReLUs after which LPIPS reads features
TRUNK_BUILDERS = {"alex": torchvision_alexnet, "vgg": torchvision_vgg16}


def torch_lpips(features, heads, x0, x1, taps):
    """LPIPS v0.1 in plain torch: scaling layer, taps, unit-normalise, squared diff, 1x1 head, mean."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # lpips.ScalingLayer's buffers
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def run(x):
        x, outs = (x - shift) / scale, []
        for i, layer in enumerate(features):
            x = layer(x)
            if i in taps:
                outs.append(x.clone())
        return outs

    with torch.no_grad():
        total = 0
        for f0, f1, w in zip(run(nchw(x0)), run(nchw(x1)), heads):
            n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + torch.nn.functional.conv2d((n0 - n1) ** 2, w).mean((2, 3))[:, 0]
    return total.numpy()


@functools.lru_cache(maxsize=None)
def jitted_lpips(net):
    model = LPIPS(net)
    return jax.jit(lambda p, a, b: model.apply({"params": p}, a, b))


def lpips_inputs(b=3, size=64, seed=0):
    """A real photo (astronaut, 8x8 block means) with a noisy copy, plus random pairs; [-1, 1]."""
    rng = np.random.default_rng(seed)
    photo = skdata.astronaut().astype(np.float32).reshape(size, 512 // size, size, 512 // size, 3).mean((1, 3))
    photo = photo / 127.5 - 1
    x0 = np.concatenate([photo[None], rng.uniform(-1, 1, (b - 1, size, size, 3))]).astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.2, x0.shape), -1, 1).astype(np.float32)
    x1[-1] = rng.uniform(-1, 1, x1[-1].shape)
    return x0, x1


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_torch_reference(net, tmp_path):
    trunk = randomize_(TRUNK_BUILDERS[net](), seed=1)
    g = torch.Generator().manual_seed(2)
    heads = [torch.rand((1, c, 1, 1), generator=g) for c in tap_channels(net)]
    x0, x1 = lpips_inputs()
    want = torch_lpips(trunk.features, heads, x0, x1, TAPS[net])
    # the trunk from a safetensors file, the heads from an in-memory state dict
    save_file({k: v.numpy() for k, v in trunk.state_dict().items()}, str(tmp_path / "trunk.safetensors"))
    params = lpips_params(tmp_path / "trunk.safetensors", {f"lin{i}.model.1.weight": w for i, w in enumerate(heads)},
                          net=net)
    got = np.asarray(jitted_lpips(net)(params, x0, x1))
    assert got.shape == (3,) and (got > 0).all()
    assert rel_err(got, want) < 1e-5, (got, want)
    np.testing.assert_allclose(np.asarray(jitted_lpips(net)(params, x0, x0)), 0.0, atol=1e-7)


class _NoDownload(AssertionError):
    pass


def _torchvision_stub(built):
    """A stand-in `torchvision` whose `models.alexnet` / `models.vgg16` build the layouts above;
    asking it for pretrained weights (a download) fails the test."""
    def factory(net):
        def build(pretrained=False, weights=None, **kwargs):
            if pretrained or weights is not None:
                raise _NoDownload(f"the lpips reference asked torchvision for pretrained {net} weights")
            model = torchvision_alexnet(classifier=True) if net == "alex" else torchvision_vgg16()
            built[net] = model
            return model
        return build

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.alexnet, tv.models.vgg16 = factory("alex"), factory("vgg")
    return tv


@pytest.fixture(scope="module")
def lpips_package():
    """The `lpips` package, its trunks built by the stub (the installed torchvision may not match
    this torch build) and every download path disabled. Yields (lpips module, built trunks)."""
    built = {}
    tv = _torchvision_stub(built)
    with pytest.MonkeyPatch.context() as mp:
        if "lpips" not in sys.modules:
            mp.setitem(sys.modules, "torchvision", tv)
            mp.setitem(sys.modules, "torchvision.models", tv.models)
        lpips = pytest.importorskip("lpips")
        mp.setattr(lpips.pretrained_networks, "tv", tv.models)

        def no_download(*args, **kwargs):
            raise _NoDownload("a download was attempted")

        mp.setattr(torch.hub, "load_state_dict_from_url", no_download)
        mp.setattr(torch.hub, "download_url_to_file", no_download)
        yield lpips, built


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_lpips_package(net, lpips_package, tmp_path):
    lpips, built = lpips_package
    ref = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    randomize_(ref.net, seed=3)  # the slices share their layers with built[net].features
    heads_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    torch.save(built[net].state_dict(), tmp_path / "trunk.pth")  # alexnet: with its classifier
    model, params = load_lpips(tmp_path / "trunk.pth", heads_file, net=net)
    x0, x1 = lpips_inputs(seed=4)
    with torch.no_grad():
        want = ref(nchw(x0), nchw(x1)).numpy().reshape(-1)
    got = np.asarray(jitted_lpips(net)(params, x0, x1))
    assert rel_err(got, want) < 1e-5, (got, want)
    np.testing.assert_array_equal(np.asarray(params["lin0"]["kernel"])[0, 0, :, 0],
                                  ref.lin0.model[1].weight.detach().numpy().reshape(-1))


def fake_state_dict(net, part, drop=(), extra=()):
    """Zeros of the shapes the converter expects for one file ('trunk' or 'heads')."""
    shapes = flat_shapes(abstract_params(net))
    entries = trunk_key_map(net) if part == "trunk" else heads_key_map(net)
    sd = {e.torch: np.zeros(torch_shape(e.kind, shapes[e.flax]), np.float32) for e in entries if e.torch not in drop}
    sd.update({k: np.zeros(1, np.float32) for k in extra})
    return sd


def test_lpips_conversion_errors(tmp_path):
    trunk, heads = fake_state_dict("alex", "trunk"), fake_state_dict("alex", "heads")
    params = lpips_params({**trunk, "classifier.1.weight": np.zeros((4096, 9216), np.float32)}, heads, net="alex")
    assert set(params) == {"trunk", "lin0", "lin1", "lin2", "lin3", "lin4"}
    assert params["lin1"]["kernel"].shape == (1, 1, 192, 1)

    with pytest.raises(ConversionError) as e:  # vgg heads with an alexnet trunk
        lpips_params(trunk, fake_state_dict("vgg", "heads"), net="alex")
    msg = str(e.value)
    assert "mis-shaped" in msg and "lin1.model.1.weight" in msg and "lpips linear heads (net='vgg')" in msg
    assert "trunk" not in msg.split("likely cause")[0]

    with pytest.raises(ConversionError) as e:  # one broken trunk and swapped heads: one error for both
        lpips_params(fake_state_dict("alex", "trunk", drop=("features.3.bias",), extra=("features.99.weight",)),
                     fake_state_dict("vgg", "trunk"), net="alex")
    msg = str(e.value)
    assert "missing 1 tensor(s): features.3.bias" in msg and "unexpected 1 tensor(s): features.99.weight" in msg
    assert "missing 5 tensor(s): lin0.model.1.weight" in msg and "torchvision vgg16 trunk (net='vgg')" in msg

    with pytest.raises(ConversionError, match="not found"):
        load_lpips(tmp_path / "nope.pth", tmp_path / "nope2.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable PyTorch state dict"):
        lpips_params(tmp_path / "junk.pth", heads, net="alex")
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        lpips_params(trunk, heads, net="squeeze")
