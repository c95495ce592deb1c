"""Post-training quantisation of a codec's entropy model at export (bitstream version 4).

    qm = calibrate(codec)                  # an IntegerEntropyModel, from training images
    codec = codec.with_integer_model(qm)   # the codec that writes version-4 streams

(train.export.export_codec does both.) Calibration data: CALIBRATION_IMAGES images of the training split, their indices (the stage-1
encoder) and caption inputs (token ids or text contexts, `Codec.context`), each under the mask of a random coding step of the stage-2 training
schedules (`training_mask`), i.e. inputs like those the model codes. Measured rate cost on held-out
images: benchmarks/rate.py prints it per schedule.
"""
from __future__ import annotations

import jax
import numpy as np

from perco_jax import build
from perco_jax.codec import range_coding
from perco_jax.models import integer_entropy_model as iem
from perco_jax.models.entropy_model import training_mask

CALIBRATION_IMAGES = 256


def calibration_inputs(codec, n: int = CALIBRATION_IMAGES, seed: int = 0):
    """(indices [n, g, g], mask [n, g, g], caption input (token ids [n, L] int, context [n, L, C]
    float, or None)) of n training images."""
    from perco_jax.data.pipeline import make_dataset

    data = make_dataset(codec.config, split="train")
    images, captions = [], []
    while len(images) < n:
        batch = next(data)
        images += list(np.asarray(batch["image"]))
        captions += [str(c) for c in batch["caption"]]
    indices = codec.encode_images(np.stack(images[:n]))
    context = codec.context(captions[:n])
    mask, _ = training_mask(jax.random.key(seed), build.training_schedules(codec.config), n)
    return indices, np.asarray(mask), None if context is None else np.asarray(context)


def calibrate(codec, n: int = CALIBRATION_IMAGES, seed: int = 0) -> iem.IntegerEntropyModel:
    """The integer entropy model of `codec`'s float one, calibrated on n training images."""
    indices, mask, context = calibration_inputs(codec, n, seed)
    c = codec.config
    # a text context is as long as the prompt encoding (caption tokens: the model's max_caption)
    max_context = build.clip_max_length(c) + c.text.max_sequence_length if codec.entropy_model.context_dim else None
    return iem.quantize(codec.entropy_model, {"params": codec.entropy_params}, indices, mask, context,
                        precision=range_coding.PRECISION, max_context=max_context)
