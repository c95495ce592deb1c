"""Activation memory of one training step per device: an estimate from the config's shapes (the
memory plan's activation rows, `plan.make_plan`).

    activations(config, b, tensor, attention, text_gather) -> [(row name, bytes per device)]

Notation: b = per-device batch = batch / (data * fsdp), s = bytes of
config.dtype, t = the tensor axis, which splits heads and MLP widths). Stage 1, the MM-DiT with
L layers, width D, H heads, N = (latent side / patch)^2 image tokens and M = CLIP length (SD3: 77)
+ T5 length context tokens, T = N + M:
  one block      A = b * [ s * (7 T D + 12 T D / t) + 8 q l T D / t + S ]
                 (7 T D: norms, modulated inputs, attention projection, gated residuals, MLP output;
                 12 T D / t: q, k, v, attention output, MLP hidden before and after GELU; 8 q l T D / t
                 with QK RMS-norm (q = 1): q and k in float32, kept for the norms' backward, l = 2 on
                 TPU where heads of 64 fill 128-lane tiles (else 1); S = ceil(H / t) T^2 (4 + s):
                 float32 attention logits and the probabilities, 0 with a fused (flash) attention
                 kernel; an SD3.5 dual-attention block adds the same terms for the image tokens alone)
  with remat     L b T D s (every block's saved inputs) + A (one block recomputed, its cotangents taking
                 the buffers of the activations they consume: `mmdit.recompute_in_order` runs each
                 block's backward right after its recomputation; at the peak of SD3.5-large's step
                 on v5p at 40 a chip one block's buffers measure about 27 GiB, A = 21.7: the splash
                 kernel's lane-padded inputs are most of the rest, docs/training.md)
  without        sum of all blocks' A + A
  plus           the hyper-encoder's saved activations (ResNet blocks at the latent side and below),
                 the embeddings / output / latents / noise, and the batch (images float32, text context)
  frozen         the frozen forward passes (no saved activations), the larger of the VAE encoder
                 (3 feature maps at full resolution, or its mid-block attention, whose logits the
                 splash kernel does not store) and the text
                 encoders (3 MLP-width tensors + attention logits per layer; none with
                 config.text.cache). They finish before the trained network starts, so the total is
                 batch + FSDP buffers + max(frozen forward passes, the training pass).
Stage 3, the few-step decoder: stage 1's MM-DiT terms (the hyper-encoder runs forward only); the
shortcut method's self-consistency targets are two guided forward passes of the MM-DiT on 2 x
bootstrap_fraction x b examples before the training pass, counted among the frozen forward passes
as one block's working set (no saved activations). The reflow method's batch is its couplings
(float32 noise and latent [b, h, w, C], indices [b, g, g]) and the text inputs: no VAE or
hyper-encoder runs in its step.
Stage 2, the entropy model (no remat; n = g^2 grid tokens + M context tokens if conditional,
width w, MLP ratio r): per block b [ s (6 n w + (4 + 2 r) n w / t) + ceil(H / t) n^2 (4 + s) ],
all blocks + one for the cotangents, plus logits b g^2 K * 4 bytes * 3; the frozen forward passes
(VAE encoder, the stage-1 hyper-encoder, text encoders) count as in stage 1.

With fsdp > 1, a block's params are all-gathered before use and its gradients reduce-scattered
after: 2 x the largest block's params with the fsdp axis undone (the text encoders' largest layer
is added to their forward working set).
"""
from __future__ import annotations

import jax.numpy as jnp

from perco_jax import build
from perco_jax.models.attention import IMPLEMENTATIONS

# the row of the frozen forward passes, which finish before the training pass (the plan takes the
# larger of the two), and the prefixes of the rows that live throughout the step
FROZEN_FORWARD = "frozen forward passes (run first; peak = max)"
ALWAYS = ("batch", "FSDP")


def _text_forward_peak(config, b: int, s: int, t: int) -> int:
    """Largest per-layer working set of the frozen text encoders' forward passes."""
    peaks, clip = [], build.clip_max_length(config)
    for sec, n, ff, d, h in (
            (config.clip_l, clip, config.clip_l.intermediate_size, config.clip_l.hidden_size,
             config.clip_l.num_attention_heads),
            (config.clip_g, clip, config.clip_g.intermediate_size, config.clip_g.hidden_size,
             config.clip_g.num_attention_heads),
            (config.t5, config.text.max_sequence_length, config.t5.d_ff, config.t5.d_model, config.t5.num_heads)):
        peaks.append(b * (n * (3 * ff * s // t + 3 * d * 4) + -(-h // t) * n * n * (4 + s)))
    return max(peaks)


def _vae_encoder_peak(config, b: int, s: int, fused: bool) -> int:
    """3 feature maps at full resolution, or the mid-block attention: its float32 logits and
    probabilities unless `fused` (the splash kernel), and 4 maps at the latent side; for the images
    of one encoder pass (config.autoencoder_chunk a device, else all b), plus all b's moments."""
    if config.autoencoder != "sd3_vae":
        return 0
    chans = tuple(config.vae.block_out_channels)
    img, lat = config.image_size, config.image_size // 2 ** (len(chans) - 1)
    chunk = build.autoencoder_chunk(config)
    per_pass = min(b, chunk) if chunk > 0 else b  # images in one encoder pass (parallel.map_batch_chunks)
    moments = b * lat * lat * 2 * config.vae.latent_channels * s  # every pass's output, kept
    return moments + per_pass * max(3 * img * img * chans[0] * s,
                                    (0 if fused else lat ** 4 * (4 + s)) + 4 * lat * lat * chans[-1] * s)


def _hyper_encoder(config, b: int, s: int, saved: bool) -> int:
    """Saved activations (training) or the forward working set of the hyper-encoder. Saved: 2 maps
    a ResnetBlock (+ 1 a stage) at each stage's side, and 5 at the grid side, as XLA:TPU keeps them
    (the GroupNorm / SiLU outputs are fused and recomputed): stage 1 less stage 3 of
    `sd3_medium-*-v5p-128` at 352 a chip is 4.7 GiB in the compiler and 4.8 in the plan (this term
    5.3 GiB; at 6 maps a block it was 12.5)."""
    from perco_jax.models.hyper_encoder import num_stages

    side, _ = build.latent_geometry(config)
    he, g = config.hyper_encoder, config.codec.grid_side
    w = he.width
    if not saved:
        return 3 * b * side * side * w * s
    # rematerialised blocks (hyper_encoder.remat) keep their inputs, and the downsample its input
    per_stage, total = (he.depth + 1, 0) if he.get("remat") else (2 * he.depth + 1, side * side * w * s)
    for k in range(num_stages(side, g)):
        total += per_stage * (side // 2 ** k) ** 2 * w * s
    total += 5 * g * g * w * s + (g ** 4 * (4 + s) if he.attention else 0)
    return b * total


def _qk_norm_bytes(mm, attention: str) -> int:
    """Bytes per element of q's (T x D) that the QK RMS-norms keep (0 without them): q and k in
    float32, which the norms' backward reads (2 x 4 bytes). On TPU (the splash kernel's platform)
    their [T, heads, 64] layout fills 128-lane tiles: twice that. In the buffer dumps of SD3.5-large's
    step (v5e, v5p, v6e recipes) both live through each block's backward, 3.70 bf16 T x D of the image
    tokens each, as this counts."""
    if not mm.qk_norm:
        return 0
    dh = mm.attention_head_dim
    lanes = -(-dh // 128) * 128 / dh if attention == "splash" else 1
    return int(2 * 4 * lanes)


def _scores(attention: str, heads: int, n: int, s: int) -> int:
    """Bytes per example of one attention's scores over n tokens: XLA's float32 logits and the
    probabilities; none with a fused kernel. (The splash kernel's lane-replicated float32 logsumexp,
    [heads, n padded, 128] an example, is a transient of its forward: not counted; docs/training.md.)"""
    return heads * n * n * (4 + s) if attention == "xla" else 0


def activations(config, b: int, tensor: int = 1, attention: str = "xla",
                text_gather: int = 0) -> list[tuple[str, int]]:
    """(name, bytes per device) of the activation estimate of one training step of config.stage
    (the formulas are in the module docstring); `text_gather`: bytes of the largest text-encoder
    layer all-gathered by FSDP (added to the text encoders' forward working set).

    `attention`: the step's attention implementation (`models.attention.IMPLEMENTATIONS`): "xla"
    stores the logits; "cudnn" (GPUs) fuses the MM-DiT's and the entropy model's, not the VAE's
    (head size 512); "splash" (TPU) fuses the MM-DiT's and the VAE's, not the entropy model's (it
    stays on XLA's path on TPU: `attention_implementation(allow_splash=False)`)."""
    if attention not in IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r}: choose one of {IMPLEMENTATIONS}")
    s, t = jnp.dtype(config.dtype).itemsize, int(tensor)
    vae_fused = attention == "splash"
    side, ch = build.latent_geometry(config)
    m_ctx = build.clip_max_length(config) + config.text.max_sequence_length
    joint = config.mmdit.joint_attention_dim
    text_peak = _text_forward_peak(config, b, s, t) + text_gather if build.text_encoders_in_step(config) else 0
    text_in = b * (m_ctx * joint * s + config.mmdit.pooled_projection_dim * s)
    batch = b * config.image_size ** 2 * 3 * 4 + text_in
    if config.stage == 2:
        em, g, k = config.entropy_model, config.codec.grid_side, config.codec.codebook_size
        n = g * g + (m_ctx if em.conditional else 0)
        w = em.width
        scores = 0 if attention == "cudnn" else -(-em.num_heads // t) * n * n * (4 + s)
        block = b * (s * (6 * n * w + (4 + 2 * em.mlp_ratio) * n * w // t) + scores)
        frozen_fwd = max(_vae_encoder_peak(config, b, s, vae_fused), _hyper_encoder(config, b, s, saved=False),
                         text_peak if em.conditional else 0)
        return [(f"entropy model, {em.depth} blocks + cotangents", (em.depth + 1) * block),
                ("logits, log-softmax, their gradient", b * g * g * k * 4 * 3),
                (FROZEN_FORWARD, frozen_fwd),
                ("batch (images, text context)", batch)]
    mm = config.mmdit
    n_img = (side // mm.patch_size) ** 2
    tok = n_img + m_ctx
    d, h, layers = mm.num_attention_heads * mm.attention_head_dim, mm.num_attention_heads, mm.num_layers
    qk = _qk_norm_bytes(mm, attention)
    heads = -(-h // t)

    def block(dual: bool) -> int:
        resid, split = 7 * tok * d, 12 * tok * d
        scores = _scores(attention, heads, tok, s)
        norms = qk * tok * d
        if dual:
            resid += 2 * n_img * d
            split += 4 * n_img * d
            scores += _scores(attention, heads, n_img, s)
            norms += qk * n_img * d
        return b * (s * (resid + split // t) + norms // t + scores)

    duals = set(mm.dual_attention_layers or ())
    blocks = [block(i in duals) for i in range(layers)]
    if config.remat:
        mmdit = [(f"MM-DiT saved block inputs ({layers} blocks, remat)", layers * b * tok * d * s),
                 ("MM-DiT one block recomputed + cotangents", max(blocks))]
    else:
        mmdit = [(f"MM-DiT all {layers} blocks (no remat)", sum(blocks)),
                 ("MM-DiT one block's cotangents", max(blocks))]
    embed = b * (4 * tok * d * s + 4 * side * side * (ch + config.codec.code_dim) * 4)
    frozen_fwd = max(_vae_encoder_peak(config, b, s, vae_fused), text_peak)
    if config.stage == 3:  # the hyper-encoder is frozen; the shortcut targets are forward passes
        nb = 2 * int(round(b * config.stage3.bootstrap_fraction)) if config.stage3.method == "shortcut" else 0
        targets = max(blocks) // b * nb  # one block's working set on the target passes' examples
        frozen_fwd = max(frozen_fwd, _hyper_encoder(config, b, s, saved=False), targets)
        if config.stage3.method == "reflow":  # the batch is couplings: no image is encoded in the step
            g = config.codec.grid_side
            couplings = b * (2 * side * side * ch * 4 + g * g * 4) + text_in  # float32 noise + latent, indices
            return mmdit + [("MM-DiT embeddings, output, latents, noise", embed),
                            (FROZEN_FORWARD, text_peak),
                            ("batch (noise, latents, indices, text context)", couplings)]
        return mmdit + [("MM-DiT embeddings, output, latents, noise", embed),
                        (FROZEN_FORWARD, frozen_fwd),
                        ("batch (images, text context)", batch)]
    return mmdit + [("MM-DiT embeddings, output, latents, noise", embed),
                    ("hyper-encoder (saved for backward)", _hyper_encoder(config, b, s, saved=True)),
                    (FROZEN_FORWARD, frozen_fwd),
                    ("batch (images, text context)", batch)]
