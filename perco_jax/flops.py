"""Model FLOPs, for MFU (model FLOPs utilisation): counted from a traced program, and the MM-DiT's in
closed form.

    count_flops(fn, *args) -> int                     2 M N K of every matmul / convolution of fn
    mmdit_forward_flops(mmdit, batch, h, w, context_len) -> int    the same, by formula
    step_flops(config, batch=None) -> StepFlops       one stage-1 training step of `config`

Model FLOPs follow the usual MFU convention (PaLM, appendix B): the multiply-adds of the matmuls and
convolutions the model needs, attention's QK^T and AV included, counted as 2 FLOPs each; not the
recomputation that rematerialisation adds, nor elementwise work. The arguments of `count_flops` may
be jax.ShapeDtypeStructs: tracing allocates nothing, so SD3.5-large's step is counted on a laptop.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
from flax import linen as nn

from perco_jax.models.mmdit import MMDiT

TIMESTEP_DIM = 256  # mmdit.timestep_embedding's width: the input of timestep_embedder_1


def count_flops(fn, *args) -> int:
    """FLOPs (2 per multiply-add) of the dot_generals and convolutions in the jaxpr of fn(*args),
    through nested jits, remat, custom derivatives, scans (times their length) and conds (the
    costliest branch). A while loop has no static trip count: ValueError."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def jaxpr_flops(jaxpr: jcore.Jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            # each output element takes (input features / groups) x kernel window multiply-adds
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * (math.prod(rhs) // out_features)
        elif name == "scan":
            total += int(eqn.params["length"]) * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "while":
            raise ValueError("count_flops: a while loop has no static trip count; count its body and "
                             "multiply by the number of iterations")
        else:
            for value in eqn.params.values():
                if isinstance(value, jcore.ClosedJaxpr):
                    total += jaxpr_flops(value.jaxpr)
                elif isinstance(value, jcore.Jaxpr):
                    total += jaxpr_flops(value)
    return total


def mmdit_forward_flops(mmdit: MMDiT, batch: int, height: int, width: int, context_len: int) -> int:
    """The MM-DiT forward's FLOPs by formula, on latents [batch, height, width, C] and a context of
    `context_len` tokens. Per example, with D = width, N image tokens, M context tokens, T = N + M:
    each block 2 D^2 (6 + 6) for the adaLN modulations, 2 T D 3D for q k v, 4 T^2 D for attention,
    2 T D^2 for the output projections and 16 T D^2 for the MLPs; the last block has no context
    queries / output / MLP (its attention is N x T), an SD3.5 dual-attention block adds an
    image-only attention (3 D modulations, 8 N D^2 + 4 N^2 D); plus the patch embedding, the
    timestep / pooled-text / context embedders and the output layer."""
    d, p = mmdit.inner_dim, mmdit.patch_size
    n, m = (height // p) * (width // p), context_len
    t = n + m
    f = 2 * n * d * p * p * (mmdit.in_channels + mmdit.extra_in_channels)
    f += 2 * (TIMESTEP_DIM * d + d * d) + 2 * (mmdit.pooled_projection_dim * d + d * d)
    f += 2 * m * mmdit.joint_attention_dim * d
    dual = set(mmdit.dual_attention_layers)
    for i in range(mmdit.num_layers):
        last = i == mmdit.num_layers - 1
        f += 2 * d * (9 if i in dual else 6) * d + 2 * d * (2 if last else 6) * d
        queries = n if last else t
        f += 2 * n * d * 3 * d + 2 * m * d * (2 if last else 3) * d  # q k v (no context q in the last)
        f += 4 * queries * t * d                                     # QK^T and AV
        f += 2 * queries * d * d                                     # output projections
        f += 16 * queries * d * d                                    # MLPs (4 D hidden)
        if i in dual:
            f += 8 * n * d * d + 4 * n * n * d
    f += 2 * d * 2 * d + 2 * n * d * p * p * mmdit.out_channels
    return batch * f


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one stage-1 training step of `batch` examples, and their parts."""
    batch: int
    step: int                  # the whole step (text encoders included unless precomputed)
    mmdit_forward: int         # the MM-DiT forward, by formula (mmdit_forward_flops)
    trained_forward: int       # forward of the trained network (hyper-encoder, VQ, MM-DiT), counted
    autoencoder_forward: int   # the frozen VAE encoder
    text_forward: int          # the frozen text encoders (0 with text.cache or text.embeddings)

    @property
    def per_example(self) -> float:
        return self.step / self.batch

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "per_example": self.per_example}


def step_flops(config, batch: int | None = None) -> StepFlops:
    """Model FLOPs of one stage-1 training step of `config` on `batch` examples (default
    config.batch_size), counted from the jaxpr of the real step (`train/step.py`) traced on
    abstract inputs with rematerialisation off and XLA's attention (the model FLOPs do not depend
    on the kernel), plus the frozen text encoders' forward unless the run uses precomputed
    embeddings (config.text.cache or config.text.embeddings)."""
    from perco_jax import build, parallel
    from perco_jax.plan import abstract_autoencoder
    from perco_jax.train.state import make_optimizer
    from perco_jax.train.step import init_state, make_train_step

    config = config.copy_and_resolve_references()
    config.stage = 1
    build.validate(config)
    config = build.stage_config(config)
    b = int(batch or config.batch_size)
    config.batch_size = b
    config.remat = False
    model = build.build_perco(config)
    model = model.clone(mmdit=model.mmdit.clone(attention_impl="xla"))  # (cuDNN's kernel hides its matmuls)
    autoencoder = build.build_autoencoder(config)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    state, _ = init_state(config, model, make_optimizer(config), mesh, parallel.rules_from_config(config.sharding_rules),
                          abstract=True)
    size, length = config.image_size, config.text.max_sequence_length
    context_len = 77 + length  # CLIP's 77 tokens, then T5's
    sds = jax.ShapeDtypeStruct
    f32 = jnp.float32
    batch_in = {"image": sds((b, size, size, 3), f32),
                "context": sds((b, context_len, config.mmdit.joint_attention_dim), f32),
                "pooled": sds((b, config.mmdit.pooled_projection_dim), f32)}
    empty = {"context": sds((1,) + batch_in["context"].shape[1:], f32),
             "pooled": sds((1,) + batch_in["pooled"].shape[1:], f32)}
    ae_params = nn.meta.unbox(abstract_autoencoder(config))
    frozen = {"autoencoder": ae_params, "text": {}}
    step = make_train_step(model, autoencoder, None, config, make_optimizer(config))
    with jax.set_mesh(mesh):
        step_count = count_flops(step, state, batch_in, frozen, empty)
    side, channels = build.latent_geometry(config)
    latent = sds((b, side, side, channels), f32)
    trained = count_flops(
        lambda params, vq, x, ctx, pooled: model.apply({"params": params, "vq": vq}, x, x, jnp.zeros((b,)), ctx, pooled,
                                                       train=True, mutable=["vq"], rngs={"vq": jax.random.PRNGKey(0)}),
        state.params, state.vq_state, latent, batch_in["context"], batch_in["pooled"])
    ae = 0
    if ae_params:
        ae = count_flops(lambda p, x: autoencoder.apply({"params": p}, x, method=autoencoder.encode),
                         ae_params, batch_in["image"])
    text = text_forward_flops(config, b) if build.text_encoders_in_step(config) else 0
    mmdit = mmdit_forward_flops(model.mmdit, b, side, side, context_len)
    return StepFlops(batch=b, step=step_count + text, mmdit_forward=mmdit, trained_forward=trained,
                     autoencoder_forward=ae, text_forward=text)


def text_forward_flops(config, batch: int) -> int:
    """Forward FLOPs of CLIP-L, CLIP-G (77 tokens) and T5 (max_sequence_length) on `batch` captions."""
    from perco_jax import build
    from perco_jax.plan import abstract_text_encoders

    clip_l, clip_g, t5 = build.text_modules(config)
    abstract = nn.meta.unbox(abstract_text_encoders(config))  # {"CLIP-L", "CLIP-G", "T5": params}
    total = 0
    for module, params, length, method in ((clip_l, abstract["CLIP-L"], 77, "sd3_outputs"),
                                           (clip_g, abstract["CLIP-G"], 77, "sd3_outputs"),
                                           (t5, abstract["T5"], config.text.max_sequence_length, None)):
        ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        fn = getattr(module, method) if method else None
        total += count_flops(lambda p, i, m=module, f=fn: m.apply({"params": p}, i, method=f), params, ids)
    return total
