"""Export: finished training runs -> a self-contained `Codec` (`perco-jax export`).

    codec = export_codec(config, stage1_workdir, stage2_workdir)   # + stage3_workdir: few-step decoder
    codec.save(folder)                                             # Codec.load(folder) reads it back

The codec itself never imports the training code: this module restores the runs' checkpoints and
hands plain params to `Codec`.
"""
from __future__ import annotations

from pathlib import Path
import jax

from perco_jax import build, parallel
from perco_jax.codec import integer_export
from perco_jax.codec.codec import Codec, fingerprint_of
from perco_jax.train import stage2
from perco_jax.train.checkpoints import restore_latest
from perco_jax.train.stage0 import autoencoder_params
from perco_jax.train.stage3 import restore_few_step
from perco_jax.train.state import make_optimizer


def export_codec(config, stage1_workdir, stage2_workdir, stage3_workdir=None, integer: bool = True) -> Codec:
    """The codec of a finished stage-1 run and the stage-2 run trained on it (and the few-step
    decoder of a stage-3 run on it, when given). integer: with the integer entropy model,
    quantised here from the float one (integer_export.calibrate), so it writes version-4 streams.
    ConfigError when a run has no checkpoint or does not match `config`."""
    config = stage2.inherit_autoencoder(config.copy_and_resolve_references(), stage1_workdir)
    build.validate(config)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    rules = parallel.rules_from_config(config.sharding_rules)
    codec = stage2.codec_params(stage2.restore_stage1(config, stage1_workdir, mesh, rules))
    c2 = config.copy_and_resolve_references()
    c2.stage = 2  # the entropy model's state is stage 2's
    c2 = build.stage_config(c2)
    em = build.build_entropy_model(c2)
    abstract, shardings = stage2.init_state(c2, em, make_optimizer(c2), mesh, rules, abstract=True)
    s2 = restore_latest(Path(stage2_workdir), abstract, shardings)
    if s2 is None:
        raise build.ConfigError(f"{stage2_workdir} has no stage-2 checkpoint: train stage 2 first")
    entropy = s2.inference_params
    encoder, text_params = build.build_text(config, stage1_workdir)
    ae = autoencoder_params(config, build.build_autoencoder(config))
    codec, entropy, ae, text_params = jax.device_get((codec, entropy, ae, text_params))
    few = None if stage3_workdir is None else restore_few_step(config, stage3_workdir)
    out = Codec(config, codec, entropy, ae, text_params, encoder, fingerprint_of(config, codec, entropy, ae), few)
    return out.with_integer_model(integer_export.calibrate(out)) if integer else out
