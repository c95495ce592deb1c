"""SD3 / SD3.5 MM-DiT (rectified-flow transformer), with the semantics of diffusers'
`SD3Transformer2DModel`, plus `extra_in_channels` for the codec's z_l conditioning.

Layout is NHWC throughout:
  latents   [B, H, W, in_channels + extra_in_channels]
  timesteps [B]            in 0..1000 (sigma * 1000, as diffusers)
  context   [B, L, joint_attention_dim]
  pooled    [B, pooled_projection_dim]
  step_sizes [B]           (only with step_conditioning) the sampler step d each prediction is for
  output    [B, H, W, out_channels]   (the velocity prediction)
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from perco_jax.models.attention import attention
from perco_jax.models.layers import RMSNorm, conv, dense, layer_norm

Dtype = Any
STEP_SCALE = 1000.0  # step sizes d in 0..1 are embedded as d * 1000, on the timesteps' scale


# ----------------------------------------------------------------------------- embeddings

def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] of timesteps [B]; (cos, sin) order as diffusers' flip_sin_to_cos."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed(dim: int, h: int, w: int, max_size: int, base_size: int) -> np.ndarray:
    """The centre crop [h*w, dim] of SD3's [max_size, max_size] 2D sin-cos table (float32).

    Positions are scaled by base_size / max_size (diffusers' `base_size`), and the first half of the
    channels encodes the column, the second half the row (diffusers' meshgrid "xy" order).
    Computed in float64 as the reference does, only for the cropped window.
    """
    if h > max_size or w > max_size:
        raise ValueError(f"latent grid {h}x{w} patches exceeds pos_embed_max_size={max_size}")
    top, left = (max_size - h) // 2, (max_size - w) // 2
    scale = np.float32(max_size / base_size)
    rows = (np.arange(max_size, dtype=np.float32) / scale)[top:top + h].astype(np.float64)
    cols = (np.arange(max_size, dtype=np.float32) / scale)[left:left + w].astype(np.float64)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one_d(pos):  # [n] -> [n, dim/2]
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    col_emb = np.broadcast_to(one_d(cols)[None, :, :], (h, w, dim // 2))
    row_emb = np.broadcast_to(one_d(rows)[:, None, :], (h, w, dim // 2))
    return np.concatenate([col_emb, row_emb], axis=-1).reshape(h * w, dim).astype(np.float32)


def patch_kernel_init(in_channels: int):
    """lecun-normal patch-embed kernel whose columns for the extra (z_l) channels start at zero."""
    def init(key, shape, dtype=jnp.float32):
        k = nn.initializers.lecun_normal()(key, shape, dtype)
        return k.at[:, :, in_channels:, :].set(0)
    return init


# ----------------------------------------------------------------------------- blocks

class FeedForward(nn.Module):
    """Linear(dim, 4*dim) -> tanh-GELU -> Linear(dim). diffusers keys: net.0.proj, net.2."""
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(4 * self.dim, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        x = nn.gelu(x, approximate=True)
        return dense(self.dim, ("mlp", "embed"), name="fc2", dtype=self.dtype)(x)


class JointAttention(nn.Module):
    """Attention over the image tokens and (optionally) the context tokens, concatenated (image first).

    x [B, N, D], c [B, M, D] or None -> (x_out [B, N, D], c_out [B, M, D] or None).
    With `context_pre_only` the context stream only provides keys/values (no context output), so
    only the image queries attend: the image output is the same as attending with all queries.
    `attention_impl`: None (automatic: splash on TPU, cuDNN on GPU for 16-bit compute, else XLA),
    "xla", "cudnn" or "splash" (`perco_jax.models.attention`).
    """
    num_heads: int
    head_dim: int
    qk_norm: Optional[str] = None
    context_pre_only: bool = False
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32

    def _qkv(self, x, names, norm_q, norm_k, need_q: bool = True):
        b, n, _ = x.shape
        inner = self.num_heads * self.head_dim
        shape = (b, n, self.num_heads, self.head_dim)

        def proj(name):
            return dense(inner, ("embed", "heads"), name=name, dtype=self.dtype)(x).reshape(shape)

        q = proj(names[0]) if need_q else None
        k, v = proj(names[1]), proj(names[2])
        if self.qk_norm == "rms_norm":
            q = RMSNorm(name=norm_q, dtype=self.dtype)(q) if need_q else None
            k = RMSNorm(name=norm_k, dtype=self.dtype)(k)
        elif self.qk_norm is not None:
            raise ValueError(f"unsupported qk_norm {self.qk_norm!r} (None or 'rms_norm')")
        return q, k, v

    @nn.compact
    def __call__(self, x, c=None):
        b, n, d = x.shape
        q, k, v = self._qkv(x, ("to_q", "to_k", "to_v"), "norm_q", "norm_k")
        if c is not None:
            # With context_pre_only the context queries are unused: their weights are made at init
            # (kept for export) but not applied, so the traced program holds no dead matmul.
            need_cq = not self.context_pre_only or self.is_initializing()
            cq, ck, cv = self._qkv(c, ("add_q_proj", "add_k_proj", "add_v_proj"), "norm_added_q", "norm_added_k",
                                   need_q=need_cq)
            k = jnp.concatenate([k, ck], axis=1)
            v = jnp.concatenate([v, cv], axis=1)
            if not self.context_pre_only:
                q = jnp.concatenate([q, cq], axis=1)
        o = attention(q, k, v, implementation=self.attention_impl)
        o = o.reshape(b, o.shape[1], self.num_heads * self.head_dim)
        x_out = dense(d, ("heads", "embed"), name="to_out", dtype=self.dtype)(o[:, :n])
        c_out = None
        if c is not None and not self.context_pre_only:
            c_out = dense(c.shape[-1], ("heads", "embed"), name="to_add_out", dtype=self.dtype)(o[:, n:])
        return x_out, c_out


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class JointBlock(nn.Module):
    """One MM-DiT block: adaLN-Zero on both streams, joint attention, gated MLPs.

    x [B, N, D] image tokens, c [B, M, D] context tokens, temb [B, D] -> (x, c or None).
    The last block (`context_pre_only`) updates only the image stream; `dual_attention` (SD3.5
    MMDiT-X) adds a second image-only self-attention with its own modulation.
    """
    dim: int
    num_heads: int
    head_dim: int
    context_pre_only: bool = False
    dual_attention: bool = False
    qk_norm: Optional[str] = None
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, temb):
        d = self.dim
        act = nn.silu(temb)
        n_mod = 9 if self.dual_attention else 6
        mod = dense(n_mod * d, ("embed", "mlp"), name="norm1", dtype=self.dtype)(act)
        mod = jnp.split(mod, n_mod, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x_norm = layer_norm(dtype=self.dtype)(x)
        x_mod = _modulate(x_norm, shift_msa, scale_msa)

        c_norm = layer_norm(dtype=self.dtype)(c)
        if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift) order
            c_scale, c_shift = jnp.split(dense(2 * d, ("embed", "mlp"), name="norm1_context",
                                               dtype=self.dtype)(act), 2, axis=-1)
            c_mod = _modulate(c_norm, c_shift, c_scale)
        else:
            cmod = jnp.split(dense(6 * d, ("embed", "mlp"), name="norm1_context", dtype=self.dtype)(act), 6, -1)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmod
            c_mod = _modulate(c_norm, c_shift_msa, c_scale_msa)

        attn = partial(JointAttention, self.num_heads, self.head_dim, qk_norm=self.qk_norm,
                       attention_impl=self.attention_impl, dtype=self.dtype)
        x_attn, c_attn = attn(context_pre_only=self.context_pre_only, name="attn")(x_mod, c_mod)
        x = x + gate_msa[:, None] * x_attn
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            x_attn2, _ = attn(name="attn2")(_modulate(x_norm, shift_msa2, scale_msa2))
            x = x + gate_msa2[:, None] * x_attn2
        x_ff = _modulate(layer_norm(dtype=self.dtype)(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(d, dtype=self.dtype, name="ff")(x_ff)

        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None] * c_attn
        c_ff = _modulate(layer_norm(dtype=self.dtype)(c), c_shift_mlp, c_scale_mlp)
        c = c + c_gate_mlp[:, None] * FeedForward(d, dtype=self.dtype, name="ff_context")(c_ff)
        return x, c


def recompute_in_order(block: nn.Module, *args):
    """`block(*args)` rematerialised: the backward pass recomputes its forward from the saved inputs
    (and the block's params), as `nn.remat` does, and releases all of the block's gradients together.
    With nn.remat, XLA:TPU computed each block's input gradient (which the next block's backward
    needs) but left its adaLN gradients (into temb, needed only at the end of the step) for later,
    and those keep the block's recomputed activations live: SD3.5-large at 1024^2, 20 blocks, 2.4 GiB
    a block a chip (docs/training.md). The barrier on the gradients makes the next block's backward
    wait for all of them; the one on the inputs (with the cotangent) keeps the recomputation from
    being merged with the forward or run before its block's turn."""
    unbound = block.clone(parent=None)

    def run(mdl, *a):
        return mdl(*a)

    def forward(mdl, *a):
        return mdl(*a), (mdl.variables["params"], a)

    def backward(saved, g):
        params, a = saved
        params, a, g = jax.lax.optimization_barrier((params, a, g))
        _, vjp = jax.vjp(lambda p, *inputs: unbound.apply({"params": p}, *inputs), params, *a)
        d_params, *d_inputs = jax.lax.optimization_barrier(vjp(g))
        return ({"params": d_params}, *d_inputs)

    return nn.custom_vjp(run, forward_fn=forward, backward_fn=backward)(block, *args)


# ----------------------------------------------------------------------------- model

class MMDiT(nn.Module):
    """SD3Transformer2DModel in Flax. Field names follow diffusers' config.json.

    `extra_in_channels` are appended to the latent channels at the input (the codec's z_l); their
    patch-embed kernel columns start at zero so a pretrained model is unchanged at step 0.
    `dtype` is the compute dtype (e.g. bfloat16); params stay `param_dtype` (float32).
    `remat` rematerialises each block in the backward pass (saves activation memory).
    `step_conditioning` adds a step-size embedding (a few-step decoder's d, `step_sizes` [B] in 0..1;
    0 = the instantaneous velocity) to the timestep embedding; its output layer starts at zero, so
    the model is unchanged at the start of few-step training, as it is for the z_l input.
    `attention_impl` picks every block's attention, the dual (attn2) one too: None (automatic: the
    Pallas splash kernel when compiling for TPU, cuDNN on GPUs for 16-bit compute, else XLA's),
    "xla", "cudnn" or "splash" (off TPU: Pallas interpret mode, for tests); see
    `perco_jax.models.attention`.
    """
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    extra_in_channels: int = 0
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: Optional[str] = None
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None
    step_conditioning: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def pos_embed(self, h: int, w: int) -> np.ndarray:
        """Position embedding [h*w, D] for a grid of h x w patches."""
        return sincos_pos_embed(self.inner_dim, h, w, self.pos_embed_max_size,
                                self.sample_size // self.patch_size)

    @nn.compact
    def __call__(self, latents, timesteps, context, pooled, step_sizes=None):
        b, hh, ww, ch = latents.shape
        if step_sizes is not None and not self.step_conditioning:
            raise ValueError("step_sizes given to an MM-DiT without step_conditioning")
        p, d = self.patch_size, self.inner_dim
        if ch != self.in_channels + self.extra_in_channels:
            raise ValueError(f"latents have {ch} channels, model expects in_channels + extra_in_channels = "
                             f"{self.in_channels} + {self.extra_in_channels}")
        if hh % p or ww % p:
            raise ValueError(f"latent size {hh}x{ww} is not a multiple of patch_size={p}")
        if self.caption_projection_dim != d:
            raise ValueError("caption_projection_dim must equal num_attention_heads * attention_head_dim")
        h, w = hh // p, ww // p
        dt = self.dtype

        x = conv(d, (p, p), strides=(p, p), padding="VALID", name="pos_embed", dtype=dt,
                 kernel_init=patch_kernel_init(self.in_channels))(latents.astype(dt))
        x = x.reshape(b, h * w, d) + jnp.asarray(self.pos_embed(h, w), dt)[None]

        def mlp2(y, in_axis, name):
            y = dense(d, (in_axis, "mlp"), name=f"{name}_1", dtype=dt)(y)
            return dense(d, ("mlp", "embed"), name=f"{name}_2", dtype=dt)(nn.silu(y))

        temb = (mlp2(timestep_embedding(timesteps).astype(dt), None, "timestep_embedder")
                + mlp2(pooled.astype(dt), "pooled", "text_embedder"))
        if self.step_conditioning:
            d_emb = timestep_embedding(STEP_SCALE * (jnp.zeros((b,)) if step_sizes is None else step_sizes))
            y = nn.silu(dense(d, (None, "mlp"), name="step_embedder_1", dtype=dt)(d_emb.astype(dt)))
            temb = temb + dense(d, ("mlp", "embed"), name="step_embedder_2", dtype=dt,
                                kernel_init=nn.initializers.zeros_init())(y)
        c = dense(d, ("joint", "embed"), name="context_embedder", dtype=dt)(context.astype(dt))

        for i in range(self.num_layers):
            block = JointBlock(d, self.num_attention_heads, self.attention_head_dim,
                               context_pre_only=i == self.num_layers - 1,
                               dual_attention=i in tuple(self.dual_attention_layers),
                               qk_norm=self.qk_norm, attention_impl=self.attention_impl, dtype=dt,
                               name=f"blocks_{i}")
            x, c = recompute_in_order(block, x, c, temb) if self.remat and not self.is_initializing() \
                else block(x, c, temb)

        scale, shift = jnp.split(dense(2 * d, ("embed", "mlp"), name="norm_out", dtype=dt)(nn.silu(temb)), 2, -1)
        x = _modulate(layer_norm(dtype=dt)(x), shift, scale)
        x = dense(p * p * self.out_channels, ("embed", None), name="proj_out", dtype=dt)(x)
        x = x.reshape(b, h, w, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, hh, ww, self.out_channels)

    def dummy_inputs(self, batch: int = 1, height: int | None = None, width: int | None = None,
                     context_len: int = 8):
        """Zero inputs of the right shapes (for `init` / `jax.eval_shape`)."""
        height = height or 2 * self.patch_size
        width = width or height
        return (jnp.zeros((batch, height, width, self.in_channels + self.extra_in_channels)),
                jnp.zeros((batch,)), jnp.zeros((batch, context_len, self.joint_attention_dim)),
                jnp.zeros((batch, self.pooled_projection_dim)))


def mmdit_from_config(cfg, **overrides) -> MMDiT:
    """Build an MMDiT from an ml_collections / dict config of diffusers-style fields."""
    kw = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    kw.update(overrides)
    kw["dual_attention_layers"] = tuple(kw.get("dual_attention_layers", ()) or ())
    kw["qk_norm"] = kw.get("qk_norm") or None
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = jnp.dtype(kw["dtype"])
    return MMDiT(**kw)
