"""The stage-1 training step: conditional flow matching on the autoencoder latent given z_l and the
caption (dropped to the empty prompt in `caption_dropout` of the examples), weighted towards
small objects by config.loss_detail (`flow.detail_weight`; 0 = SD3's plain loss), plus the VQ terms.

    batch = {"image": [B, H, W, 3] in [-1, 1], "clip_l": [B, C], "clip_g": [B, C], "t5": [B, L]}
    (C = text.clip_max_length, SD3's 77; L = text.max_sequence_length) or, with precomputed
    embeddings (text.cache: `text/cache.py`; text.embeddings: `text/store.py`), "context" [B, M, D]
    and "pooled" [B, P] instead of the token ids; `empty` is then {"context", "pooled"} of the
    empty prompt.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from perco_jax import build, flow, parallel
from perco_jax.models.vae import latents_from_moments, scale_latents
from perco_jax.train.state import TrainState, ema_update, fresh_state, sharded_init, step_key

TOKEN_KEYS = ("clip_l", "clip_g", "t5")


def make_train_step(model, autoencoder, prompt_encoder, config, tx):
    """(state, batch, frozen) -> (state, metrics); `frozen` = {"autoencoder": ..., "text": ...} params."""
    shift = (flow.resolution_shift(config.image_size, config.image_size)
             if config.sigma_sampling.resolution_shift else 1.0)
    max_len = config.text.max_sequence_length
    p_drop = float(config.text.caption_dropout)
    detail = float(config.loss_detail)

    def train_step(state: TrainState, batch: dict, frozen: dict, empty: dict):
        b = batch["image"].shape[0]
        k_vae, k_drop, k_sigma, k_noise, k_vq = (step_key(state, i) for i in range(5))
        mean, logvar = parallel.map_batch_chunks(
            lambda x: autoencoder.apply({"params": frozen["autoencoder"]}, x, method=autoencoder.encode),
            batch["image"], build.autoencoder_chunk(config))
        x0 = scale_latents(latents_from_moments(mean, logvar, k_vae), autoencoder.scaling_factor,
                           autoencoder.shift_factor)
        drop = jax.random.uniform(k_drop, (b,)) < p_drop
        if "context" in batch:  # precomputed: drop to the empty prompt's embeddings
            context = jnp.where(drop[:, None, None], empty["context"], batch["context"])
            pooled = jnp.where(drop[:, None], empty["pooled"], batch["pooled"])
        else:
            tokens = {k: jnp.where(drop[:, None], empty[k], batch[k]) for k in TOKEN_KEYS if k in batch}
            context, pooled = prompt_encoder.encode_tokens(frozen["text"], tokens, max_sequence_length=max_len)
        context, pooled = jax.lax.stop_gradient(context), jax.lax.stop_gradient(pooled)
        sigma = flow.sample_sigmas(k_sigma, b, scheme=config.sigma_sampling.scheme,
                                   mean=config.sigma_sampling.mean, std=config.sigma_sampling.std, shift=shift)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        x_t = flow.interpolate(x0, noise, sigma)

        def loss_fn(params):
            (v, q), updates = model.apply({"params": params, "vq": state.vq_state}, x0, x_t, sigma * 1000.0,
                                          context, pooled, train=True, mutable=["vq"], rngs={"vq": k_vq})
            fm = flow.flow_matching_loss(v, x0, noise, sigma, config.loss_weighting, detail)
            return fm + q["loss"], (fm, q, updates["vq"])

        (loss, (fm, q, vq_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, config.ema_decay)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                                  vq_state=vq_state)
        metrics = {"loss": loss, "flow_loss": fm, "vq_loss": q["loss"], "perplexity": q["perplexity"],
                   "codebook_usage": q["usage"], "grad_norm": optax.global_norm(grads)}
        return new_state, metrics

    return train_step


def init_variables(config, model, rng) -> dict:
    """Fresh variables {"params", "vq"} of a PerCo `model` (stage 1's, or stage 3's student)."""
    side, channels = build.latent_geometry(config)
    x = jnp.zeros((1, side, side, channels))
    return model.init({"params": rng, "vq": rng}, x, x, jnp.zeros((1,)),
                      jnp.zeros((1, 8, config.mmdit.joint_attention_dim)), jnp.zeros((1, config.mmdit.pooled_projection_dim)))


def init_state(config, model, tx, mesh, rules, abstract: bool = False):
    """(state, shardings): a fresh sharded stage-1 TrainState built by a jit with out_shardings
    (abstract=True: its ShapeDtypeStructs, nothing allocated)."""
    def make(rng):
        k_init, k_state = jax.random.split(rng)
        variables = init_variables(config, model, k_init)
        return fresh_state(variables["params"], tx, config, variables["vq"], k_state)

    return sharded_init(make, jax.random.PRNGKey(config.seed), mesh, rules, abstract)
