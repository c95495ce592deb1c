"""Stage 2: the entropy model learns the rate of the frozen stage-1 codec's indices.

Each step encodes the batch's images to index grids [B, g, g] with the stage-1 codec (EMA
params, deterministic: the latent mean, as `compress` does), draws a masking schedule and a
coding step per example from config.stage2.schedules (`training_mask`), and minimises the
cross-entropy in bits of the positions coded at that step (`masked_loss_bits`) - the rate the
range coder will achieve. With entropy_model.conditional, the model also sees the caption (dropped
to the empty prompt as in stage 1, so it also codes caption-less images): its T5 token ids, which
it embeds itself (entropy_model.caption_input "tokens": the embedding is trained here), or its SD3
text context ("context").

    batch = stage 1's batch: {"image": [B, H, W, 3] in [-1, 1]} + token ids or cached embeddings
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from perco_jax import build, parallel
from perco_jax.config import read_saved_config
from perco_jax.models.entropy_model import masked_loss_bits, training_mask
from perco_jax.codec.transforms import encode_images
from perco_jax.train.state import TrainState, ema_update, fresh_state, sharded_init, step_key
from perco_jax.train.step import TOKEN_KEYS

STAGE1_STATE_FIELDS = ("ema_decay", "trainable", "grad_accum_steps", "grad_clip", "num_train_steps",
                       "learning_rate", "warmup_steps", "lr_schedule", "weight_decay", "batch_size")

def check_stage1_config(config, stage1_workdir: Path) -> None:
    """ConfigError naming the fields where `config` differs from the stage-1 run's config.json."""
    path = Path(stage1_workdir) / "config.json"
    if not path.exists():
        raise build.ConfigError(f"stage1_workdir={stage1_workdir} holds no stage-1 run (no config.json)")
    ours, theirs = build.codec_identity(config.to_dict()), build.codec_identity(read_saved_config(path))
    diff = sorted(k for k in build.CODEC_SECTIONS if ours[k] != theirs[k])
    if diff:
        raise build.ConfigError(f"the config differs from the stage-1 run in {stage1_workdir} in {diff}: "
                                "stage 2 must use the codec it codes")


def inherit_autoencoder(config, stage1_workdir: str | Path):
    """`config`, with autoencoder_workdir taken from the stage-1 run's config.json when it leaves it
    empty for a learned autoencoder (stage 2 and export use the autoencoder stage 1 was trained on,
    so they need not be told it again)."""
    path = Path(stage1_workdir) / "config.json"
    if config.autoencoder != "patch" or config.autoencoder_workdir or not path.exists():
        return config
    out = config.copy_and_resolve_references()
    out.autoencoder_workdir = read_saved_config(path)["autoencoder_workdir"]
    return out


def restore_stage1(config, stage1_workdir: str | Path, mesh, rules) -> TrainState:
    """The latest stage-1 TrainState of stage1_workdir, restored onto `mesh`."""
    from perco_jax.train.checkpoints import restore_latest
    from perco_jax.train.step import init_state
    from perco_jax.train.state import make_optimizer

    stage1_workdir = Path(stage1_workdir)
    check_stage1_config(config, stage1_workdir)
    s1 = config.copy_and_resolve_references()
    s1.stage = 1
    # the optimisation fields shape the saved state (EMA or not, frozen parts' optimiser state):
    # take them from the stage-1 run, not from stage 2's
    saved = read_saved_config(stage1_workdir / "config.json")
    for k in STAGE1_STATE_FIELDS:
        if k in saved:
            s1[k] = saved[k]
    model = build.build_perco(s1)
    state = restore_latest(stage1_workdir, *init_state(s1, model, make_optimizer(s1), mesh, rules, abstract=True))
    if state is None:
        raise build.ConfigError(f"stage1_workdir={stage1_workdir} has no checkpoint yet: train stage 1 first")
    return state


def codec_params(state: TrainState) -> dict:
    """{"params", "vq"} of a stage-1 state as the codec uses them (the EMA params when kept)."""
    return {"params": state.inference_params, "vq": state.vq_state}


def init_state(config, model, tx, mesh, rules, abstract: bool = False):
    """(state, shardings): a fresh sharded stage-2 TrainState (vq_state None); abstract=True:
    its ShapeDtypeStructs, nothing allocated."""
    g = config.codec.grid_side
    ctx = (jnp.zeros((1, 1, model.context_dim)) if model.context_dim
           else jnp.zeros((1, 1), jnp.int32) if model.caption_vocab else None)

    def make(rng):
        k_init, k_state = jax.random.split(rng)
        x = jnp.zeros((1, g, g), jnp.int32)
        params = model.init(k_init, x, jnp.ones(x.shape, bool), ctx)["params"]
        return fresh_state(params, tx, config, None, k_state)

    return sharded_init(make, jax.random.PRNGKey(config.seed + 3), mesh, rules, abstract)


def make_train_step(entropy_model, codec_model, autoencoder, prompt_encoder, config, tx):
    """(state, batch, frozen, empty) -> (state, metrics); frozen = {"codec": codec_params(stage 1),
    "autoencoder": ..., "text": ...}. Metrics: loss = bits per index, bpp_indices."""
    groups = build.training_schedules(config)
    g = config.codec.grid_side
    bpp_per_bit = g * g / config.image_size ** 2
    max_len = config.text.max_sequence_length
    p_drop = float(config.text.caption_dropout)
    if entropy_model.caption_vocab and (prompt_encoder is None or prompt_encoder.tokenizers[2] is None):
        raise build.ConfigError("entropy_model.caption_input='tokens' reads the T5 tokenizer's ids, and this "
                                "run has no T5 tokenizer: use caption_input='context'")

    def train_step(state: TrainState, batch: dict, frozen: dict, empty: dict):
        b = batch["image"].shape[0]
        k_drop, k_mask = step_key(state, 0), step_key(state, 1)
        indices = parallel.map_batch_chunks(
            lambda x: encode_images(codec_model, autoencoder, frozen["codec"], frozen["autoencoder"], x),
            batch["image"], build.autoencoder_chunk(config))
        context = None
        drop = jax.random.uniform(k_drop, (b,)) < p_drop
        if entropy_model.context_dim:
            if "context" in batch:
                context = jnp.where(drop[:, None, None], empty["context"], batch["context"])
            else:
                tokens = {k: jnp.where(drop[:, None], empty[k], batch[k]) for k in TOKEN_KEYS if k in batch}
                context = prompt_encoder.encode_tokens(frozen["text"], tokens, max_sequence_length=max_len)[0]
            context = jax.lax.stop_gradient(context)
        elif entropy_model.caption_vocab:
            context = jnp.where(drop[:, None], empty["t5"], batch["t5"])
        mask, loss_mask = training_mask(k_mask, groups, b)

        def loss_fn(params):
            logits = entropy_model.apply({"params": params}, indices, mask, context)
            return masked_loss_bits(logits, indices, loss_mask)

        bits, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = None if state.ema_params is None else ema_update(state.ema_params, params, config.ema_decay)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        return new_state, {"loss": bits, "bits_per_index": bits, "bpp_indices": bits * bpp_per_bit,
                           "grad_norm": optax.global_norm(grads)}

    return train_step
