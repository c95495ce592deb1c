"""Train state and optimiser: AdamW with warm-up + schedule, clipping, accumulation, masking, EMA."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from perco_jax import parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimiser steps taken (micro-steps with accumulation)
    params: Any              # {"mmdit", "hyper_encoder", "vq"} trainable and frozen parameters
    opt_state: Any
    ema_params: Any          # EMA of params (same tree), or None when ema_decay == 0
    vq_state: Any            # the VQ's EMA codebook statistics (collection "vq")
    rng: jax.Array           # base key; step s uses fold_in(rng, s), so resuming is exact

    @property
    def inference_params(self):
        """The params to run, evaluate or export: the EMA when the run keeps one (ema_decay > 0), else params."""
        return self.ema_params if self.ema_params is not None else self.params


def learning_rate_schedule(config) -> optax.Schedule:
    warmup = max(1, int(config.warmup_steps))
    if config.lr_schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup),
                                     optax.constant_schedule(config.learning_rate)], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                              max(warmup + 1, int(config.num_train_steps)),
                                              end_value=config.learning_rate * 0.1)


def trainable_label(path: tuple[str, ...], trainable: str) -> str:
    """"train" or "freeze" for a parameter path; the codec's own networks always train, as do the
    MM-DiT's patch embedding (it holds the new z_l input columns) and stage 3's new step embedder."""
    if path[0] != "mmdit" or trainable == "all" or path[1] in ("pos_embed", "step_embedder_1", "step_embedder_2"):
        return "train"
    if trainable == "attention_mlp":
        return "train" if any(p.startswith(("attn", "ff")) for p in path[1:]) else "freeze"
    return "freeze"  # "frozen"


def make_optimizer(config) -> optax.GradientTransformation:
    def keys(kp):
        return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)

    def labels(params):  # a function, so it serves boxed (init) and plain (update) trees alike
        return jax.tree_util.tree_map_with_path(lambda kp, _: trainable_label(keys(kp), config.trainable), params)
    adamw = optax.chain(optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
                        optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.999,
                                    weight_decay=config.weight_decay))
    tx = optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx


def ema_update(ema, params, decay: float):
    return jax.tree_util.tree_map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def step_key(state: TrainState, name: int) -> jax.Array:
    """The key of this step for one use (`name`), independent of how the run was resumed."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), name)


def count_params(tree) -> int:
    return int(sum(jnp.size(x) for x in jax.tree_util.tree_leaves(tree)))


def fresh_state(params, tx, config, vq_state, rng) -> TrainState:
    """A step-0 TrainState of `params` (EMA = params when config.ema_decay > 0)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if config.ema_decay > 0 else None, vq_state=vq_state, rng=rng)


def sharded_init(make, rng, mesh, rules, abstract: bool = False):
    """(state, shardings) of make(rng) (a boxed TrainState), built by one jit with the shardings of
    its logical axes on `mesh`; abstract=True: its ShapeDtypeStructs, nothing allocated."""
    shapes = jax.eval_shape(make, rng)
    shardings = parallel.param_shardings(shapes, mesh, rules)
    if abstract:
        return nn.meta.unbox(shapes), shardings
    state = jax.jit(lambda r: nn.meta.unbox(make(r)), out_shardings=shardings)(rng)
    return state, shardings
