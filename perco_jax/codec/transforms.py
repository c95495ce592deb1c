"""The codec's two halves as jitted functions: images -> indices (`make_encoder`), and
indices + caption -> image by the rectified-flow sampler (`make_decoder`), or by the few-step
decoder of stage 3 (`make_few_step_decoder`):

    codes [B, g, g, d] (from VQ.lookup of the decoded indices), caption tokens, noise [B, h, w, C]
      -> Euler steps of the MM-DiT velocity (CFG on the caption, z_l in both branches; or
         stochastic steps that re-noise with fresh noise: sample.stochastic; the noise scaled by
         sample.temperature; few-step: N steps of the step-conditioned MM-DiT, one pass each,
         guidance trained in)
      -> unscale -> autoencoder.decode -> image [B, H, W, 3] in [0, 1]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from perco_jax import flow
from perco_jax.models.vae import latents_from_moments, scale_latents, unscale_latents


def image_latents(autoencoder, ae_params, images: jax.Array) -> jax.Array:
    """The flow's latents [B, h, w, C] (scaled) of images [B, H, W, 3] in [-1, 1]. Deterministic:
    the autoencoder's latent mean (no posterior sample)."""
    mean, logvar = autoencoder.apply({"params": ae_params}, images, method=autoencoder.encode)
    return scale_latents(latents_from_moments(mean, logvar), autoencoder.scaling_factor, autoencoder.shift_factor)


def encode_images(model, autoencoder, codec: dict, ae_params, images: jax.Array) -> jax.Array:
    """indices [B, g, g] int32 of images [B, H, W, 3] in [-1, 1]; codec = {"params", "vq"} of a
    stage-1 model. Deterministic: the autoencoder's latent mean (no posterior sample)."""
    return model.apply(codec, image_latents(autoencoder, ae_params, images), method=model.encode)["indices"]


def latent_images(autoencoder, ae_params, latents: jax.Array) -> jax.Array:
    """Scaled latents [B, h, w, C] (as the flow model sees them) -> images [B, H, W, 3] in [0, 1]."""
    z = unscale_latents(latents, autoencoder.scaling_factor, autoencoder.shift_factor)
    images = autoencoder.apply({"params": ae_params}, z, method=autoencoder.decode)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def make_autoencoder_round_trip(autoencoder):
    """Jitted (ae_params, images [B, H, W, 3] in [-1, 1]) -> images [B, H, W, 3] in [0, 1] through the
    autoencoder alone (encode to the latent mean, decode): the best any latent the flow model draws can do."""
    return jax.jit(lambda ae_params, images: latent_images(autoencoder, ae_params,
                                                           image_latents(autoencoder, ae_params, images)))


def make_encoder(model, autoencoder):
    """Jitted (codec {"params", "vq"}, ae_params, images [B, H, W, 3] in [-1, 1]) -> indices [B, g, g]."""
    return jax.jit(lambda codec, ae_params, images: encode_images(model, autoencoder, codec, ae_params, images))


def noise_keys(seed: int, ids) -> jax.Array:
    """The sampler's keys [n, 2] uint32 of n images with ids [n] (uint32): image j's is
    fold_in(key(seed), ids[j]), so its noise depends on its id, not on the others decoded with it
    (the codec uses the CRC of the image's bitstream)."""
    ids = jnp.asarray(np.asarray(ids, np.uint32))
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(ids)


def initial_noise(seed: int, ids, latent_shape) -> jax.Array:
    """The sampler's starting noise [n, h, w, C] for n images with ids [n]: normal draws of their
    `noise_keys`."""
    return jax.vmap(lambda k: jax.random.normal(k, tuple(latent_shape), jnp.float32))(noise_keys(seed, ids))


def text_context(prompt_encoder, text_params, tokens, *, max_sequence_length: int):
    """(context [B, L, D], pooled [B, P]) of token ids, or of precomputed {"context", "pooled"}."""
    if "context" in tokens:
        return tokens["context"], tokens["pooled"]
    return prompt_encoder.encode_tokens(text_params, tokens, max_sequence_length=max_sequence_length)


def guided_latents(model, codec, codes, cond, uncond, noise, guidance, *, steps: int, shift: float,
                   keys=None, temperature=1.0) -> jax.Array:
    """The teacher sampler: latents [B, h, w, C] from noise [B, h, w, C] by `steps` Euler steps of
    the guided velocity v_u + guidance (v_c - v_u), z_l codes [B, g, g, d] in both branches;
    cond / uncond = (context [B, L, D], pooled [B, P]) of the caption and of the empty prompt.
    keys [B, 2] (`noise_keys`): stochastic steps instead (`flow.stochastic_sample`, config
    sample.stochastic); None: the deterministic Euler ODE (stage 3's couplings need it).
    temperature (config sample.temperature) scales the sampler's noise: the starting noise and
    every fresh draw of the stochastic steps (1: the trained distribution; lower draws closer to
    the model's most likely image: on the tiny codec 0.3 gave +0.5 dB PSNR, see docs/evaluation.md)."""
    noise = temperature * noise
    context = jnp.concatenate([uncond[0], cond[0]])
    pooled = jnp.concatenate([uncond[1], cond[1]])
    codes2 = jnp.concatenate([codes, codes])

    def velocity(x, t):
        return model.apply(codec, x, t, codes2, context, pooled, method=model.velocity)

    sigmas, timesteps = flow.sigma_schedule(steps, shift)
    if keys is not None:
        return flow.stochastic_sample(flow.guided(velocity, guidance), noise, keys, jnp.asarray(sigmas),
                                      jnp.asarray(timesteps), temperature)
    return flow.euler_sample(flow.guided(velocity, guidance), noise, jnp.asarray(sigmas), jnp.asarray(timesteps))


def few_step_codec(codec: dict, mmdit_params) -> dict:
    """{"params", "vq"} of the few-step decoder: the stage-1 codec with the student's MM-DiT params."""
    return {"params": dict(codec["params"], mmdit=mmdit_params), "vq": codec["vq"]}


def few_step_latents(student, codec, codes, cond, noise, *, steps: int, shift: float, temperature=1.0) -> jax.Array:
    """The few-step decoder: latents [B, h, w, C] from noise by `steps` steps of the step-conditioned
    model (`models.perco.with_step_conditioning`; codec params with its MM-DiT), conditional pass
    only: stage 3 trained the caption's guidance into it. temperature scales the starting noise, as
    the teacher's (`guided_latents`; on the tiny codec's 1-step decoder 0.3 gave +1.3 dB PSNR)."""
    noise = temperature * noise
    def velocity(x, t, d):
        return student.apply(codec, x, t, codes, cond[0], cond[1], d, method=student.velocity)

    return flow.few_step_sample(velocity, noise, steps, shift)


def _decoder(model, autoencoder, prompt_encoder, max_sequence_length: int, sample):
    """Jitted (codec, frozen, indices, tokens, empty_tokens, noise, keys, guidance, temperature, *, steps)
    -> images [B, H, W, 3] in [0, 1], with sample(codec, codes, cond, uncond, noise, keys, guidance,
    temperature, steps) -> latents."""
    def decode(codec, frozen, indices, tokens, empty_tokens, noise, keys, guidance, temperature, *, steps: int):
        b = indices.shape[0]
        codes = model.apply(codec, indices, method=model.lookup)
        cond = text_context(prompt_encoder, frozen["text"], tokens, max_sequence_length=max_sequence_length)
        empty = {k: jnp.broadcast_to(v, (b,) + v.shape[1:]) for k, v in empty_tokens.items()}
        uncond = text_context(prompt_encoder, frozen["text"], empty, max_sequence_length=max_sequence_length)
        latents = sample(codec, codes, cond, uncond, noise, keys, guidance, temperature, steps)
        return latent_images(autoencoder, frozen["autoencoder"], latents)

    return jax.jit(decode, static_argnames=("steps",))


def make_decoder(model, autoencoder, prompt_encoder, *, max_sequence_length: int, shift: float = 1.0):
    """Jitted (codec {"params", "vq"}, frozen {"autoencoder", "text"}, indices [B, g, g], tokens,
    empty_tokens, noise [B, h, w, C], keys [B, 2] or None (stochastic or Euler steps, see
    `guided_latents`), guidance, temperature, *, steps) -> images [B, H, W, 3] in [0, 1]."""
    return _decoder(model, autoencoder, prompt_encoder, max_sequence_length,
                    lambda codec, codes, cond, uncond, noise, keys, guidance, temperature, steps: guided_latents(
                        model, codec, codes, cond, uncond, noise, guidance, steps=steps, shift=shift, keys=keys,
                        temperature=temperature))


def make_few_step_decoder(student, autoencoder, prompt_encoder, *, max_sequence_length: int, shift: float = 1.0):
    """make_decoder's signature for the few-step decoder (`few_step_latents`): codec = {"params"
    with the student's MM-DiT, "vq"}; empty_tokens, keys and guidance are not used (one
    deterministic pass per step)."""
    return _decoder(student, autoencoder, prompt_encoder, max_sequence_length,
                    lambda codec, codes, cond, uncond, noise, keys, guidance, temperature, steps: few_step_latents(
                        student, codec, codes, cond, noise, steps=steps, shift=shift, temperature=temperature))

