"""Model FLOPs, for MFU (model FLOPs utilisation): counted from a traced program, and the MM-DiT's in
closed form.

    count_flops(fn, *args) -> int                     2 M N K of every matmul / convolution of fn
    mmdit_forward_flops(mmdit, batch, h, w, context_len) -> int    the same, by formula
    step_flops(config, batch=None, stage=None) -> StepFlops   one training step of stage 1 or 3

Stage 3 (few-step decoding, train/stage3.py) trains the MM-DiT with its step-size input. A shortcut
step adds the frozen stage-1 encoder coding the images and the self-consistency targets: two forward
passes of the student on the bootstrap examples, each on the (empty prompt, caption) pair of them.
A reflow step reads its (noise, latent, indices) couplings, so it is the student's forward and
backward alone; drawing the couplings once before training (the guided teacher sampler on every
coupling) is reported apart, as StepFlops.couplings.

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
            # (an input dilation, as a strided convolution's input gradient has, inserts zeros that
            # only 1 / prod(dilation) of the window's taps meet)
            dilated = math.prod(eqn.params.get("lhs_dilation") or (1,))
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * (math.prod(rhs) // out_features) // dilated
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
    timestep / pooled-text / context embedders (and the step-size embedder of a step-conditioned
    MM-DiT) and the output layer."""
    d, p = mmdit.inner_dim, mmdit.patch_size
    n, m = (height // p) * (width // p), context_len
    t = n + m
    f = 2 * n * d * p * p * (mmdit.in_channels + mmdit.extra_in_channels)
    f += 2 * (TIMESTEP_DIM * d + d * d) + 2 * (mmdit.pooled_projection_dim * d + d * d)
    if mmdit.step_conditioning:  # the few-step decoder's step-size embedder, an MLP like the timestep's
        f += 2 * (TIMESTEP_DIM * d + d * d)
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
    """Model FLOPs of one training step of `batch` examples (stage 1 or 3), and their parts."""
    batch: int
    step: int                  # the whole step (text encoders included unless precomputed)
    mmdit_forward: int         # the trained MM-DiT's forward, by formula (mmdit_forward_flops)
    trained_forward: int       # forward of the trained network (stage 1: hyper-encoder, VQ, MM-DiT;
                               # stage 3: the student's MM-DiT with its step input), counted
    autoencoder_forward: int   # the frozen VAE encoder (0 for a reflow step: its batch holds latents)
    text_forward: int          # the frozen text encoders (0 with text.cache or text.embeddings)
    stage: int = 1
    encoder_forward: int = 0   # stage 3: the frozen stage-1 hyper-encoder + VQ coding the batch
    target_forward: int = 0    # stage 3, shortcut: the self-consistency targets' forward passes
    couplings: int = 0         # stage 3, reflow: drawing all stage3.couplings once (not per step)

    @property
    def per_example(self) -> float:
        return self.step / self.batch

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "per_example": self.per_example}


def step_flops(config, batch: int | None = None, stage: int | None = None) -> StepFlops:
    """Model FLOPs of one training step of stage `stage` (default config.stage; 1 or 3) of `config`
    on `batch` examples (default the stage's batch size), counted from the jaxpr of the real step
    (`train/step.py`, `train/stage3.py`) traced on abstract inputs with rematerialisation and the
    VAE's chunks off and XLA's attention (the model FLOPs do not depend on the kernel), plus the
    frozen text encoders' forward unless the run uses precomputed embeddings (config.text.cache or
    config.text.embeddings): of the batch's captions, and in stage 3 of the empty prompt too, which
    its step encodes once per example."""
    from perco_jax import build

    stage = int(config.stage if stage is None else stage)
    if stage not in (1, 3):
        raise ValueError(f"step_flops: stage {stage} has no count (stages 1 and 3: the MM-DiT's training)")
    config = config.copy_and_resolve_references()
    config.stage = stage
    if stage == 3 and not config.stage1_workdir:
        config.stage1_workdir = "(flops: not read)"
    build.validate(config)
    config = build.stage_config(config)
    if batch is not None:
        config.batch_size = int(batch)
    config.remat = False
    # chunks change no FLOP, and the count traces the whole batch on one device, where a chunk
    # that divides each device's share need not divide the batch
    config.autoencoder_chunk = 0
    return (_stage1_flops if stage == 1 else _stage3_flops)(config, _Shapes(config))


class _Shapes:
    """What both stages' counts trace: the abstract stage-1 state, frozen autoencoder and inputs."""

    def __init__(self, config):
        from perco_jax import build, parallel
        from perco_jax.train.shapes import abstract_autoencoder
        from perco_jax.train.state import make_optimizer
        from perco_jax.train.step import init_state

        s1 = config.copy_and_resolve_references()
        s1.stage = 1
        self.b = b = int(config.batch_size)
        # XLA's attention: cuDNN's kernel hides its matmuls
        self.model = _xla_attention(build.build_perco(s1))
        self.autoencoder = build.build_autoencoder(config)
        self.mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
        self.rules = parallel.rules_from_config(config.sharding_rules)
        self.s1_state, _ = init_state(s1, self.model, make_optimizer(s1), self.mesh, self.rules, abstract=True)
        self.context_len = build.clip_max_length(config) + config.text.max_sequence_length  # CLIP's, then T5's
        self.side, self.channels = build.latent_geometry(config)
        f32 = jnp.float32
        self.image = jax.ShapeDtypeStruct((b, config.image_size, config.image_size, 3), f32)
        self.latent = jax.ShapeDtypeStruct((b, self.side, self.side, self.channels), f32)
        self.text = {"context": jax.ShapeDtypeStruct((b, self.context_len, config.mmdit.joint_attention_dim), f32),
                     "pooled": jax.ShapeDtypeStruct((b, config.mmdit.pooled_projection_dim), f32)}
        self.empty = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], f32) for k, v in self.text.items()}
        self.ae_params = nn.meta.unbox(abstract_autoencoder(config))

    def autoencoder_flops(self, n: int) -> int:
        """The frozen VAE encoder's forward on n images."""
        if not self.ae_params:
            return 0
        x = jax.ShapeDtypeStruct((n,) + self.image.shape[1:], self.image.dtype)
        ae = self.autoencoder
        return count_flops(lambda p, x: ae.apply({"params": p}, x, method=ae.encode), self.ae_params, x)

    def encoder_flops(self, codec: dict, n: int) -> int:
        """The frozen stage-1 hyper-encoder + VQ coding n latents, and the codes' lookup."""
        m = self.model
        x = jax.ShapeDtypeStruct((n,) + self.latent.shape[1:], self.latent.dtype)
        return count_flops(lambda c, x: m.apply(c, m.apply(c, x, method=m.encode)["indices"], method=m.lookup),
                           codec, x)


def _xla_attention(model):
    return model.clone(mmdit=model.mmdit.clone(attention_impl="xla"))


def _stage1_flops(config, sh: _Shapes) -> StepFlops:
    from perco_jax import build
    from perco_jax.train.state import make_optimizer
    from perco_jax.train.step import make_train_step

    b, model = sh.b, sh.model
    frozen = {"autoencoder": sh.ae_params, "text": {}}
    step = make_train_step(model, sh.autoencoder, None, config, make_optimizer(config))
    with jax.set_mesh(sh.mesh):
        step_count = count_flops(step, sh.s1_state, {"image": sh.image, **sh.text}, frozen, sh.empty)
    trained = count_flops(
        lambda params, vq, x, ctx, pooled: model.apply({"params": params, "vq": vq}, x, x, jnp.zeros((b,)), ctx, pooled,
                                                       train=True, mutable=["vq"], rngs={"vq": jax.random.PRNGKey(0)}),
        sh.s1_state.params, sh.s1_state.vq_state, sh.latent, sh.text["context"], sh.text["pooled"])
    ae = sh.autoencoder_flops(b)
    text = text_forward_flops(config, b) if build.text_encoders_in_step(config) else 0
    mmdit = mmdit_forward_flops(model.mmdit, b, sh.side, sh.side, sh.context_len)
    return StepFlops(batch=b, step=step_count + text, mmdit_forward=mmdit, trained_forward=trained,
                     autoencoder_forward=ae, text_forward=text)


def _stage3_flops(config, sh: _Shapes) -> StepFlops:
    from perco_jax import build
    from perco_jax.codec.transforms import few_step_codec, guided_latents
    from perco_jax.train import stage3
    from perco_jax.train.state import make_optimizer

    b, s3 = sh.b, config.stage3
    sds = jax.ShapeDtypeStruct
    student = _xla_attention(stage3.student_model(config))
    tx = make_optimizer(config)
    state, _ = stage3.init_state(config, student, tx, sh.mesh, sh.rules, abstract=True)
    codec = {"params": sh.s1_state.params, "vq": sh.s1_state.vq_state}  # the frozen stage-1 codec
    frozen = {"codec": codec, "autoencoder": sh.ae_params, "text": {}}
    g = config.codec.grid_side
    shortcut = s3.method == "shortcut"
    batch_in = ({"image": sh.image} if shortcut else
                {"noise": sh.latent, "latent": sh.latent, "indices": sds((b, g, g), jnp.int32)})
    step = stage3.make_train_step(student, sh.autoencoder, None, config, tx)
    with jax.set_mesh(sh.mesh):
        step_count = count_flops(step, state, {**batch_in, **sh.text}, frozen, sh.empty)
    codes = jax.eval_shape(lambda c, i: sh.model.apply(c, i, method=sh.model.lookup), codec, sds((1, g, g), jnp.int32))
    params = few_step_codec(codec, state.params["mmdit"])

    def student_forward(n: int) -> int:
        """The student's velocity on n examples (the z_l codes upsampled: no FLOPs)."""
        def fn(p, x, c, ctx, pooled):
            return student.apply(p, x, jnp.zeros((n,)), c, ctx, pooled, jnp.zeros((n,)), method=student.velocity)
        return count_flops(fn, params, sds((n,) + sh.latent.shape[1:], jnp.float32),
                           sds((n,) + codes.shape[1:], codes.dtype),
                           *(sds((n,) + v.shape[1:], v.dtype) for v in sh.text.values()))

    in_step = build.text_encoders_in_step(config)
    trained = student_forward(b)
    nb = int(round(b * float(s3.bootstrap_fraction))) if shortcut else 0
    # two half steps, each one pass on the (empty prompt, caption) pair of the nb examples
    targets = 2 * student_forward(2 * nb) if nb else 0
    ae = sh.autoencoder_flops(b) if shortcut else 0
    encoder = sh.encoder_flops(codec, b) if shortcut else count_flops(
        lambda c, i: sh.model.apply(c, i, method=sh.model.lookup), codec, batch_in["indices"])
    text = text_forward_flops(config, 2 * b) if in_step else 0  # the captions and the empty prompt, per example
    couplings = 0
    if not shortcut:  # stage3.couplings drawn once, stage3.batch_size at a time (the last batch full)
        bs = int(s3.batch_size)
        teacher = sh.model

        def sample(c, x, cond_ctx, cond_pooled, noise):
            z = teacher.apply(c, teacher.apply(c, x, method=teacher.encode)["indices"], method=teacher.lookup)
            return guided_latents(teacher, c, z, (cond_ctx, cond_pooled), (cond_ctx, cond_pooled), noise,
                                  jnp.float32(config.sample.guidance), steps=int(config.sample.steps),
                                  shift=float(config.scheduler_shift))

        draw = count_flops(sample, codec, sds((bs,) + sh.latent.shape[1:], jnp.float32),
                           *(sds((bs,) + v.shape[1:], v.dtype) for v in sh.text.values()),
                           sds((bs,) + sh.latent.shape[1:], jnp.float32))
        draw += sh.autoencoder_flops(bs) + (text_forward_flops(config, 2 * bs) if in_step else 0)
        couplings = -(-int(s3.couplings) // bs) * draw
    mmdit = mmdit_forward_flops(student.mmdit, b, sh.side, sh.side, sh.context_len)
    return StepFlops(batch=b, step=step_count + text, mmdit_forward=mmdit, trained_forward=trained,
                     autoencoder_forward=ae, text_forward=text, stage=3, encoder_forward=encoder,
                     target_forward=targets, couplings=couplings)


def text_forward_flops(config, batch: int) -> int:
    """Forward FLOPs of CLIP-L, CLIP-G (text.clip_max_length tokens, SD3's 77) and T5
    (max_sequence_length) on `batch` captions."""
    from perco_jax import build
    from perco_jax.train.shapes import abstract_text_encoders

    clip_l, clip_g, t5 = build.text_modules(config)
    abstract = nn.meta.unbox(abstract_text_encoders(config))  # {"CLIP-L", "CLIP-G", "T5": params}
    total, clip = 0, build.clip_max_length(config)
    for module, params, length, method in ((clip_l, abstract["CLIP-L"], clip, "sd3_outputs"),
                                           (clip_g, abstract["CLIP-G"], clip, "sd3_outputs"),
                                           (t5, abstract["T5"], config.text.max_sequence_length, None)):
        ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        fn = getattr(module, method) if method else None
        total += count_flops(lambda p, i, m=module, f=fn: m.apply({"params": p}, i, method=f), params, ids)
    return total
