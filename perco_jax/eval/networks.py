"""The metric networks an evaluation uses, from `metrics_weights` (local files only): LPIPS, the FID
InceptionV3, CLIP, a segmenter; each one not given is recorded as skipped with the reason."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import numpy as np

WEIGHT_KEYS = ("lpips_trunk", "lpips_heads", "lpips_net", "inception", "clip", "segmentation")


@dataclasses.dataclass
class Networks:
    """The loaded metric networks (None: not given) and {metric: why} for those skipped."""
    lpips: Optional[Callable] = None      # (a, b) [1, H, W, 3] in [0, 1] -> [1]
    lpips_fits: Optional[Callable] = None  # (h, w) -> whether every LPIPS tap is non-empty
    features: Optional[Callable] = None   # images [B, H, W, 3] in [0, 1] -> [B, D]
    clip: Optional[Callable] = None       # (images, captions) -> CLIP scores [B]
    segmenter: Optional[object] = None    # perco_jax.eval.segmentation.Segmenter
    skipped: dict = dataclasses.field(default_factory=dict)
    real_features: Optional[np.ndarray] = None  # cached over the settings of a sweep


def _lpips_fits(net: str, params) -> Callable:
    """(h, w) -> True when the LPIPS trunk's five taps are non-empty for an h x w image (AlexNet's
    stride-4 stem and 3x3 pools need about 31 px per side)."""
    import functools

    import jax
    import jax.numpy as jnp

    from perco_jax.models.lpips import FeatureTrunk

    trunk = FeatureTrunk(net)

    @functools.lru_cache(maxsize=None)
    def fits(h: int, w: int) -> bool:
        taps = jax.eval_shape(lambda x: trunk.apply({"params": params["trunk"]}, x),
                              jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
        return all(min(t.shape[1:3]) > 0 for t in taps)

    return fits


def load_networks(weights: Mapping) -> Networks:
    """Networks from metrics_weights ({WEIGHT_KEYS: file or folder}); ValueError for an unknown key or
    half of LPIPS's two files."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(WEIGHT_KEYS))
    if unknown:
        raise ValueError(f"unknown metrics_weights keys {unknown}; expected some of {list(WEIGHT_KEYS)}")
    nets = Networks()
    trunk, heads = weights.get("lpips_trunk"), weights.get("lpips_heads")
    if bool(trunk) != bool(heads):
        raise ValueError("LPIPS needs both weights files: the torchvision trunk (lpips_trunk / --lpips-trunk) "
                         "and the lpips package's linear heads (lpips_heads / --lpips-heads)")
    if trunk:
        import jax

        from perco_jax.convert.lpips import load_lpips

        net = weights.get("lpips_net") or "alex"
        model, params = load_lpips(trunk, heads, net)
        apply = jax.jit(lambda p, a, b: model.apply({"params": p}, a * 2.0 - 1.0, b * 2.0 - 1.0))
        nets.lpips = lambda a, b: apply(params, a, b)
        nets.lpips_fits = _lpips_fits(net, params)
    else:
        nets.skipped["lpips"] = ("no LPIPS weights given (metrics_weights lpips_trunk + lpips_heads, "
                                 "or --lpips-trunk / --lpips-heads)")
    if weights.get("clip"):
        from perco_jax.eval.clip_score import CLIPScorer

        nets.clip = CLIPScorer.load(weights["clip"])
    else:
        nets.skipped["clip_score"] = "no CLIP model given (metrics_weights clip, or --clip DIR)"
    if weights.get("segmentation"):
        from perco_jax.eval.segmentation import Segmenter

        nets.segmenter = Segmenter.load(weights["segmentation"])
    else:
        nets.skipped["miou"] = "no segmentation model given (metrics_weights segmentation, or --segmentation DIR)"
    inception = weights.get("inception")
    if callable(inception):
        nets.features = inception
    elif inception:
        try:
            from perco_jax.eval import fid
            nets.features = fid.InceptionFeatures.load(inception)
        except (ImportError, AttributeError) as e:
            reason = f"the FID InceptionV3 (perco_jax.eval.fid.InceptionFeatures) is not available: {e}"
            nets.skipped.update(fid=reason, kid=reason)
    else:
        reason = "no InceptionV3 weights given (metrics_weights inception, or --inception)"
        nets.skipped.update(fid=reason, kid=reason)
    return nets
