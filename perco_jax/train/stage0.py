"""Stage 0: the learned autoencoder (config.autoencoder = "patch"), trained once on the images and
then frozen, as SD3's VAE is; and `autoencoder_params`, the frozen autoencoder of later stages.

The step minimises w (|x - D(E(x) + n)| + (x - D(E(x) + n))^2) + latent_l2 * E(x)^2 with a little
Gaussian noise n (latent_noise) on the raw latents, so the decoder tolerates the flow sampler's
small errors and the latent keeps a bounded scale. w = `flow.detail_weight(x, loss_detail)`, the
weighting stage 1 gives latent positions, here on pixels (1 with loss_detail 0): a small object's
few pixels get a small share of a uniform loss, and the tiny autoencoder learned to blur small
shapes into their background. The latent statistics that `encode` normalises
with ("latent_mean", "latent_std" in the params, see models/patch_autoencoder.py) are running
averages (decay stats_decay) of each batch's per-channel mean and standard deviation, updated by
the step itself, so they are part of the checkpoint and a resumed run is exact.

    batch = {"image": [B, H, W, 3] in [-1, 1]} (captions are not used)
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import logging
import jax.numpy as jnp
import optax
from flax import linen as nn

from perco_jax import build
from perco_jax.config import read_saved_config
from perco_jax.flow import detail_weight
from perco_jax.train.state import TrainState, ema_update, fresh_state, sharded_init, step_key

STATS = ("latent_mean", "latent_std")


def init_state(config, autoencoder, tx, mesh, rules, abstract: bool = False):
    """(state, shardings): a fresh sharded stage-0 TrainState (vq_state None); abstract=True: its
    ShapeDtypeStructs, nothing allocated."""
    f = autoencoder.downsample_factor

    def make(rng):
        k_init, k_state = jax.random.split(rng)
        params = autoencoder.init(k_init, jnp.zeros((1, f, f, 3)))["params"]
        return fresh_state(params, tx, config, None, k_state)

    return sharded_init(make, jax.random.PRNGKey(config.seed + 2), mesh, rules, abstract)


def make_train_step(autoencoder, config, tx):
    """(state, batch, frozen, empty) -> (state, metrics); frozen and empty are not used (the loop's
    one signature). Metrics: loss, psnr of the noisy-latent reconstruction, latent_std."""
    s0 = config.stage0
    noise_std, l2, decay = float(s0.latent_noise), float(s0.latent_l2), float(s0.stats_decay)
    detail = float(config.stage0.loss_detail)

    def train_step(state: TrainState, batch: dict, frozen: dict, empty: dict):
        x = batch["image"]

        def loss_fn(params):
            z = autoencoder.apply({"params": params}, x, method=autoencoder.encode_raw)
            noisy = z + noise_std * jax.random.normal(step_key(state, 0), z.shape, z.dtype)
            y = autoencoder.apply({"params": params}, noisy, method=autoencoder.decode_raw)
            mse = jnp.mean((y - x) ** 2)
            err = jnp.abs(y - x) + (y - x) ** 2
            if detail:
                err = err * detail_weight(x, detail)
            return jnp.mean(err) + l2 * jnp.mean(z ** 2), (mse, z)

        (loss, (mse, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        z = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1])
        # the first step sets the statistics; later steps average them
        d = jnp.where(state.step == 0, 0.0, decay)
        stats = {"latent_mean": d * state.params["latent_mean"] + (1 - d) * z.mean(0),
                 "latent_std": d * state.params["latent_std"] + (1 - d) * z.std(0)}
        params = dict(params, **stats)
        ema = state.ema_params
        if ema is not None:
            ema = dict(ema_update(ema, params, config.ema_decay), **stats)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        # (images span [-1, 1]: a range of 2)
        return new_state, {"loss": loss, "psnr": 10 * jnp.log10(4.0 / mse), "latent_std": jnp.mean(stats["latent_std"]),
                           "grad_norm": optax.global_norm(grads)}

    return train_step


def autoencoder_params(config, autoencoder) -> dict:
    """The frozen autoencoder's params for stages 1 and 2: none for space-to-depth; the converted
    VAE of config.pretrained for sd3_vae; the stage-0 run in config.autoencoder_workdir (its EMA
    params) for patch. Without either, a random autoencoder (with a warning: such a codec can
    only test the mechanics)."""
    if config.autoencoder == "space_to_depth":
        return {}
    f = autoencoder.downsample_factor
    if config.autoencoder == "patch" and config.autoencoder_workdir:
        return _restore_stage0(config, autoencoder)
    if config.autoencoder == "patch" or not config.pretrained:
        logging.warning("autoencoder=%s with neither autoencoder_workdir nor pretrained: a random frozen "
                        "autoencoder (train stage 0 first for a codec that reconstructs)", config.autoencoder)
        # jitted (the same values): op by op, the SD3 VAE's random init took 16-17 s on 2 CPU cores, jitted 9-10
        init = jax.jit(autoencoder.init)
        return nn.meta.unbox(init(jax.random.PRNGKey(config.seed + 2), jnp.zeros((1, f, f, 3))))["params"]
    from perco_jax.checkpoint import load_weights

    return load_weights(config.pretrained, ["vae"])[1]["vae"]


def _restore_stage0(config, autoencoder) -> dict:
    from perco_jax import parallel
    from perco_jax.train.checkpoints import restore_latest
    from perco_jax.train.state import make_optimizer

    workdir = Path(config.autoencoder_workdir)
    saved = workdir / "config.json"
    if not saved.exists():
        raise build.ConfigError(f"autoencoder_workdir={workdir} holds no stage-0 run (no config.json): train "
                                "stage 0 first (perco-jax train --config.stage=0)")
    theirs = read_saved_config(saved)
    diff = [k for k in ("image_size", "patch_autoencoder")
            if json.loads(json.dumps(config.to_dict()[k])) != theirs.get(k)]
    if diff:
        raise build.ConfigError(f"the config differs from the stage-0 run in {workdir} in {diff}: the frozen "
                                "autoencoder must be the one stage 0 trained")
    c0 = config.copy_and_resolve_references()
    c0.stage = 0
    c0 = build.stage_config(c0)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    abstract, shardings = init_state(c0, autoencoder, make_optimizer(c0), mesh, parallel.rules_from_config([]),
                                     abstract=True)
    state = restore_latest(workdir, abstract, shardings)
    if state is None:
        raise build.ConfigError(f"autoencoder_workdir={workdir} has no stage-0 checkpoint: train stage 0 first "
                                "(perco-jax train --config.stage=0)")
    return jax.device_get(state.inference_params)
