"""mIoU between the semantic segmentations of originals and reconstructions.

How well a reconstruction keeps the image's semantics is measured by segmenting the original and
the reconstruction with the same model and comparing the two label maps by mIoU, the original's
map taking the place of the ground truth (Agustsson et al. 2019; PerCo). The segmentation model is
any local transformers checkpoint (PyTorch, CPU or GPU; nothing is downloaded):

    seg = Segmenter.load(folder)                  # SegFormer, UperNet, BEiT, DPT, Mask2Former, ...
    labels = seg.segment(images)                  # [B, H, W, 3] uint8 or float in [0, 1] -> [B, H, W] int32
    result = segmentation_miou(seg, originals, reconstructions)
    result["miou"]                                # the headline number (dataset convention, below)

Models: checkpoints of `AutoModelForSemanticSegmentation` (SegFormer, UperNet, BEiT, DPT,
MobileViT, ...: per-pixel class logits) and of `AutoModelForUniversalSegmentation` (Mask2Former,
MaskFormer, OneFormer: mask + class queries, combined into per-class scores by the image
processor's `post_process_semantic_segmentation`). Images are prepared by the folder's image
processor (`AutoImageProcessor`; `AutoProcessor` for OneFormer, which also takes the task text
"semantic"), and the label map of each image is its processor's `post_process_semantic_segmentation`
at the image's own size (scores resized bilinearly, then argmax); a processor without one gets the
same done here on the model's `logits`. So the labels are exactly what transformers' model +
processor give; in particular transformers' Mask2Former / MaskFormer post-processing first resizes
the mask logits to 384 x 384 whatever the input's aspect ratio, and that is kept. Labels are the
model's class ids (`Segmenter.num_classes` of them, names in `Segmenter.id2label`).

mIoU conventions. For a set of pairs of label maps (a_i, b_i) and classes c = 0 .. C-1:

    I_c = #{pixels p : a(p) = c and b(p) = c}      U_c = #{pixels p : a(p) = c or b(p) = c}
    IoU_c = I_c / U_c       mIoU = mean of IoU_c over the classes with U_c > 0

  (a class that appears in neither map is left out; a class that appears in only one has IoU 0).
  With ignore_index, a pixel where either map holds ignore_index is left out of every count.

  dataset convention (`miou_dataset`, the "miou" of `segmentation_miou`): I_c and U_c are summed
      over all pixels of all images first, then IoU_c and their mean are taken once. This is how
      semantic-segmentation benchmarks score a model (mmsegmentation's IoU metric, the ADE20K and
      Cityscapes evaluation scripts): large images and frequent classes weigh more, and a class
      missing from most images still counts once.
  per-image convention (`miou_per_image`, the "miou_image_mean" of `segmentation_miou`): the mIoU
      of each pair by itself (`miou`, over the classes present in that pair), then the plain mean
      over the pairs (a pair with no counted pixel, all ignored, is left out).

  The two differ as soon as images differ in which classes they hold: e.g. one pair that agrees
  on class 0 everywhere and one pair where the maps are all 1 and all 2: per image 1 and 0, mean
  0.5; over the dataset IoU_0 = 1, IoU_1 = IoU_2 = 0, mIoU 1/3.

`miou(a, b)` on arrays of any (equal) shape pools all their pixels, so on stacked batches
[B, H, W] it is the dataset convention over that batch. `MIoUAccumulator` does both conventions
incrementally (one confusion matrix, C x C, no label maps kept), for streaming large sets.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from perco_jax.images import to_rgb8

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
UNIVERSAL_TYPES = ("mask2former", "maskformer", "oneformer")   # mask-classification models (post-processed)
_OPTIONAL_MISSING = ("num_batches_tracked",)                   # buffers whose absence changes nothing


class SegmentationError(ValueError):
    """A folder that is not a usable semantic-segmentation checkpoint, or images it cannot take."""


# ----------------------------------------------------------------------------- mIoU

def _labels(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: label maps must hold integer class ids, got dtype {arr.dtype}")
    return arr


def confusion_matrix(labels_a, labels_b, num_classes: int, ignore_index: Optional[int] = None) -> np.ndarray:
    """[C, C] int64 counts: entry (i, j) = number of pixels with labels_a == i and labels_b == j.

    labels_a, labels_b: integer arrays of the same shape (any number of dimensions). Pixels where
    either map equals ignore_index are not counted; any other label outside [0, num_classes)
    raises ValueError.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    a, b = _labels(labels_a, "labels_a"), _labels(labels_b, "labels_b")
    if a.shape != b.shape:
        raise ValueError(f"the two label maps differ in shape: {a.shape} vs {b.shape}")
    a, b = a.reshape(-1).astype(np.int64), b.reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = (a != ignore_index) & (b != ignore_index)
        a, b = a[keep], b[keep]
    for x, name in ((a, "labels_a"), (b, "labels_b")):
        bad = (x < 0) | (x >= num_classes)
        if bad.any():
            raise ValueError(f"{name} holds label {int(x[bad][0])}, outside [0, {num_classes})"
                             + ("" if ignore_index is None else f" and not the ignore_index {ignore_index}"))
    c = int(num_classes)
    return np.bincount(a * c + b, minlength=c * c).reshape(c, c)


def iou_per_class(confusion) -> np.ndarray:
    """[C] float64 IoU of each class from a confusion matrix; NaN for classes in neither map."""
    conf = np.asarray(confusion, np.float64)
    inter = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - inter
    out = np.full(inter.shape, np.nan)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def miou_from_confusion(confusion) -> float:
    """Mean IoU over the classes with a non-zero union; NaN when nothing was counted."""
    iou = iou_per_class(confusion)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def miou(labels_a, labels_b, num_classes: int, ignore_index: Optional[int] = None) -> float:
    """mIoU of two label maps of the same shape, all their pixels pooled (see the module docstring).

    Mean over the classes present in either map of |a = c and b = c| / |a = c or b = c|: 1.0 for
    identical maps, 0.0 when no pixel agrees; NaN when no pixel is counted (all ignored, or empty).
    On stacked maps [B, H, W] this is the dataset convention over the batch.
    """
    return miou_from_confusion(confusion_matrix(labels_a, labels_b, num_classes, ignore_index))


class MIoUAccumulator:
    """Both mIoU conventions over a stream of pairs of label maps, without keeping the maps.

        acc = MIoUAccumulator(num_classes)
        for a, b in pairs: acc.add(a, b)          # returns that pair's mIoU
        acc.dataset(), acc.per_image(), acc.per_image_values
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.per_image_values: list[float] = []

    def add(self, labels_a, labels_b) -> float:
        """Adds one pair of maps (e.g. [H, W] each); returns its own mIoU (NaN if nothing counted)."""
        conf = confusion_matrix(labels_a, labels_b, self.num_classes, self.ignore_index)
        self.confusion += conf
        value = miou_from_confusion(conf)
        self.per_image_values.append(value)
        return value

    def __len__(self) -> int:
        return len(self.per_image_values)

    def dataset(self) -> float:
        """Dataset convention: IoU from intersections and unions summed over every pair added."""
        return miou_from_confusion(self.confusion)

    def per_image(self) -> float:
        """Per-image convention: the mean of the pairs' own mIoUs (pairs with nothing counted left out)."""
        vals = np.asarray(self.per_image_values, np.float64)
        vals = vals[~np.isnan(vals)]
        return float(vals.mean()) if vals.size else float("nan")

    def iou_per_class(self) -> np.ndarray:
        return iou_per_class(self.confusion)


def _pairs(pairs) -> list:
    pairs = list(pairs)
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise ValueError(f"pair {i}: expected (labels_a, labels_b), got {type(p).__name__}")
    return pairs


def miou_dataset(pairs: Iterable, num_classes: int, ignore_index: Optional[int] = None) -> float:
    """Dataset-convention mIoU of pairs (labels_a, labels_b) (maps of a pair share a shape; pairs
    may differ): per-class intersections and unions summed over all pairs, then averaged once."""
    acc = MIoUAccumulator(num_classes, ignore_index)
    for a, b in _pairs(pairs):
        acc.add(a, b)
    return acc.dataset()


def image_mious(pairs: Iterable, num_classes: int, ignore_index: Optional[int] = None) -> np.ndarray:
    """[N] float64: `miou` of each pair by itself (NaN for a pair with no counted pixel)."""
    return np.asarray([miou(a, b, num_classes, ignore_index) for a, b in _pairs(pairs)], np.float64)


def miou_per_image(pairs: Iterable, num_classes: int, ignore_index: Optional[int] = None) -> float:
    """Per-image-convention mIoU: the mean over pairs of each pair's own `miou` (NaN pairs left out)."""
    acc = MIoUAccumulator(num_classes, ignore_index)
    for a, b in _pairs(pairs):
        acc.add(a, b)
    return acc.per_image()


# ----------------------------------------------------------------------------- images

def _rgb8(image, what: str = "image") -> np.ndarray:
    """One image (any `perco_jax.images` accepts: [H, W, 3] uint8, or floats in [0, 1] rounded to
    8 bits) as [H, W, 3] uint8; SegmentationError naming `what` otherwise."""
    try:
        return to_rgb8(image)
    except ValueError as e:
        raise SegmentationError(f"{what}: {e}") from e


# ----------------------------------------------------------------------------- the segmenter

def _read_config(folder: Path) -> dict:
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SegmentationError(f"{folder} is not a transformers checkpoint folder (config.json: {e})") from e
    if not isinstance(cfg, dict):
        raise SegmentationError(f"{folder}/config.json is not a JSON object")
    return cfg


def _supported_types() -> str:
    try:
        from transformers.models.auto import modeling_auto as m

        sem = ", ".join(m.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES)
        uni = ", ".join(m.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES)
        return f" (semantic: {sem}; universal: {uni})"
    except (ImportError, AttributeError):
        return ""


class Segmenter:
    """A transformers semantic-segmentation model with its processor: images -> label maps.

    Build with `Segmenter.load(folder)`. kind: "semantic" (per-pixel logits), "universal"
    (Mask2Former / MaskFormer) or "oneformer" (universal, with the task text "semantic").
    """

    def __init__(self, model, processor, *, kind: str, name: str = "segmenter",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if kind not in ("semantic", "universal", "oneformer"):
            raise ValueError(f"unknown segmenter kind {kind!r}")
        _check_batch_size(batch_size)
        self.model, self.processor, self.kind, self.name = model, processor, kind, name
        self.batch_size = int(batch_size)
        # OneFormer's AutoProcessor wraps the image processor (which does the post-processing).
        self.post_processor = getattr(processor, "image_processor", processor)

    @classmethod
    def load(cls, path, device: Optional[str] = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
             strict: bool = True) -> "Segmenter":
        """Loads a semantic-segmentation checkpoint from a local folder (never downloads).

        The folder is what `save_pretrained` writes: config.json, the weights and the image
        processor's preprocessor_config.json. Semantic-segmentation models load through
        `AutoModelForSemanticSegmentation`, Mask2Former / MaskFormer / OneFormer checkpoints
        (model_type, or an architecture named ...ForUniversalSegmentation /
        ...ForInstanceSegmentation) through `AutoModelForUniversalSegmentation`. device: "cuda"
        when available, else "cpu"; the model runs in float32, in eval mode. strict: refuse a
        checkpoint whose weights lack part of the model (e.g. a backbone-only checkpoint whose
        segmentation head would be random); strict=False only logs a warning.
        SegmentationError for anything else that makes the folder unusable.
        """
        try:
            import torch
            import transformers
        except ImportError as e:
            raise SegmentationError(f"segmentation needs PyTorch and transformers ({e}); "
                                    "install perco-jax[torch]") from e
        folder = Path(path)
        if not folder.is_dir():
            raise SegmentationError(f"no segmentation checkpoint folder at {folder}")
        config = _read_config(folder)
        model_type = str(config.get("model_type", "") or "")
        archs = [str(a) for a in (config.get("architectures") or [])]
        universal = model_type in UNIVERSAL_TYPES or any(
            a.endswith(("ForUniversalSegmentation", "ForInstanceSegmentation")) for a in archs)
        autos = [getattr(transformers, n, None) for n in
                 (("AutoModelForUniversalSegmentation", "AutoModelForSemanticSegmentation") if universal else
                  ("AutoModelForSemanticSegmentation", "AutoModelForUniversalSegmentation"))]
        model, info, errors, loaded_by = None, None, [], ""
        for auto in [a for a in autos if a is not None]:
            try:
                model, info = auto.from_pretrained(folder, local_files_only=True, output_loading_info=True)
                loaded_by = auto.__name__
                break
            except (ValueError, KeyError) as e:  # "Unrecognized configuration class ..."
                errors.append(f"{auto.__name__}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            except OSError as e:  # no / unreadable weights
                raise SegmentationError(f"cannot load the segmentation model in {folder}: {e}") from e
        if model is None:
            raise SegmentationError(
                f"{folder} ({model_type or 'no model_type'}) is not a semantic-segmentation checkpoint that "
                f"transformers can load{_supported_types()}: " + "; ".join(errors))
        missing = sorted(k for k in (info or {}).get("missing_keys", ()) if not k.endswith(_OPTIONAL_MISSING))
        if missing:
            msg = (f"{folder}: the checkpoint lacks {len(missing)} weights of {type(model).__name__} "
                   f"(e.g. {', '.join(missing[:4])}); they would be random (a backbone-only or classification "
                   f"checkpoint?)")
            if strict:
                raise SegmentationError(msg + "; pass strict=False to use it anyway")
            logger.warning("%s", msg)
        if model_type == "oneformer":
            kind = "oneformer"
        else:
            kind = "universal" if loaded_by == "AutoModelForUniversalSegmentation" else "semantic"
        try:
            if kind == "oneformer":
                processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            else:
                processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise SegmentationError(f"{folder} has no usable image processor (preprocessor_config.json, as "
                                    f"`save_pretrained` of the model's image processor writes it): {e}") from e
        post = getattr(processor, "image_processor", processor)
        if kind != "semantic" and not hasattr(post, "post_process_semantic_segmentation"):
            raise SegmentationError(f"{folder}: the image processor {type(post).__name__} has no "
                                    f"post_process_semantic_segmentation, needed for a {model_type} model")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device=device, dtype=torch.float32).eval()
        return cls(model, processor, kind=kind, name=folder.name, batch_size=batch_size)

    # -- properties

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        """Number of class ids the model predicts (labels are in [0, num_classes))."""
        cfg = self.model.config
        return int(getattr(cfg, "num_labels", None) or len(cfg.id2label))

    @property
    def id2label(self) -> dict:
        return {int(k): v for k, v in getattr(self.model.config, "id2label", {}).items()}

    # -- running

    def _run(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Label maps of one batch of uint8 images (one model call); images may differ in size."""
        import torch

        kwargs = dict(images=list(images), return_tensors="pt")
        if self.kind == "oneformer":
            kwargs["task_inputs"] = ["semantic"] * len(images)
        inputs = self.processor(**kwargs)
        inputs = {k: (v.to(self.device, torch.float32) if torch.is_floating_point(v) else v.to(self.device))
                  for k, v in inputs.items() if torch.is_tensor(v)}
        sizes = [tuple(int(s) for s in im.shape[:2]) for im in images]
        with torch.no_grad():
            outputs = self.model(**inputs)
            post = getattr(self.post_processor, "post_process_semantic_segmentation", None)
            if post is not None:
                maps = post(outputs, target_sizes=sizes)
            else:
                maps = [torch.nn.functional.interpolate(outputs.logits[i:i + 1], size=s, mode="bilinear",
                                                        align_corners=False)[0].argmax(dim=0)
                        for i, s in enumerate(sizes)]
        out = []
        for m, s in zip(maps, sizes):
            m = m.detach().cpu().numpy().astype(np.int32)
            if m.shape != s:
                raise SegmentationError(f"the segmentation of a {s[0]}x{s[1]} image came back as {m.shape}")
            out.append(m)
        return out

    def segment_list(self, images: Iterable, batch_size: Optional[int] = None) -> list[np.ndarray]:
        """Label maps [H_i, W_i] int32 of images [H_i, W_i, 3] (uint8 or float in [0, 1]) of any sizes,
        in order; images of equal size are batched together, batch_size at a time."""
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_batch_size(batch_size)
        images = [_rgb8(im, f"image {i}") for i, im in enumerate(images)]
        out: list = [None] * len(images)
        by_shape: dict = {}
        for i, im in enumerate(images):
            by_shape.setdefault(im.shape, []).append(i)
        for idx in by_shape.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                for i, m in zip(chunk, self._run([images[i] for i in chunk])):
                    out[i] = m
        return out

    def segment(self, images, batch_size: Optional[int] = None) -> np.ndarray:
        """Label maps [B, H, W] int32 (class ids of `id2label`) of images [B, H, W, 3], uint8 or float
        in [0, 1] (floats are rounded to 8 bits first, as the processors expect), at the input size.
        Deterministic; runs under torch.no_grad, batch_size images per model call."""
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise SegmentationError(f"segment: expected a batch of RGB images [B, H, W, 3], got shape {x.shape} "
                                    "(segment_list takes images of different sizes)")
        if x.shape[0] == 0:
            return np.zeros((0,) + x.shape[1:3], np.int32)
        return np.stack(self.segment_list(list(x), batch_size))

    def __call__(self, images, batch_size: Optional[int] = None) -> np.ndarray:
        return self.segment(images, batch_size)


def _check_batch_size(n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"batch_size must be a positive integer, got {n!r}")


# ----------------------------------------------------------------------------- the metric

def segmentation_miou(segmenter: Segmenter, originals: Iterable, reconstructions: Iterable, *,
                      ignore_index: Optional[int] = None, batch_size: Optional[int] = None,
                      progress: bool = False) -> dict:
    """mIoU between the segmentations of originals and their reconstructions.

    originals, reconstructions: equally long sequences (or iterables, consumed batch_size pairs
    at a time, so large sets can stream from disk) of images [H, W, 3], uint8 or float in [0, 1];
    a reconstruction has its original's size, pairs may differ in size. Both are segmented by
    `segmenter`; the original's map plays the ground truth (the metric is symmetric anyway).

    Returns {"miou": dataset convention, "miou_image_mean": per-image convention,
    "per_image": [each pair's mIoU], "iou_per_class": [C] (None for classes in neither map),
    "num_images": N, "num_classes": C, "segmenter": its name} (see the module docstring for the
    conventions). NaN values (nothing counted) are reported as NaN floats.
    """
    batch_size = segmenter.batch_size if batch_size is None else batch_size
    _check_batch_size(batch_size)
    acc = MIoUAccumulator(segmenter.num_classes, ignore_index)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = None
        try:
            total = len(originals)  # type: ignore[arg-type]
        except TypeError:
            pass
        bar = tqdm(total=total, desc=f"mIoU ({segmenter.name})", unit="img")
    end = object()
    pairs = itertools.zip_longest(originals, reconstructions, fillvalue=end)
    try:
        while True:
            chunk = list(itertools.islice(pairs, batch_size))
            if not chunk:
                break
            n = len(acc)
            for j, (o, r) in enumerate(chunk):
                if o is end or r is end:
                    raise ValueError(f"{'fewer' if o is end else 'more'} originals than reconstructions "
                                     f"(they differ at image {n + j})")
            orig = [_rgb8(o, f"original {n + j}") for j, (o, _) in enumerate(chunk)]
            rec = [_rgb8(r, f"reconstruction {n + j}") for j, (_, r) in enumerate(chunk)]
            for j, (o, r) in enumerate(zip(orig, rec)):
                if o.shape != r.shape:
                    raise ValueError(f"image {n + j}: the original is {o.shape[0]}x{o.shape[1]} but the "
                                     f"reconstruction {r.shape[0]}x{r.shape[1]}")
            labels = segmenter.segment_list(orig + rec, batch_size)
            for a, b in zip(labels[:len(orig)], labels[len(orig):]):
                acc.add(a, b)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    iou = acc.iou_per_class()
    return {"miou": acc.dataset(), "miou_image_mean": acc.per_image(), "per_image": list(acc.per_image_values),
            "iou_per_class": [None if np.isnan(v) else float(v) for v in iou], "num_images": len(acc),
            "num_classes": acc.num_classes, "segmenter": segmenter.name}
