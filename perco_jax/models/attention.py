"""Multi-head attention dispatch for the models: XLA's, cuDNN's or the Pallas TPU splash kernel.

The one home of the choice of attention implementation. Shapes (as `jax.nn.dot_product_attention`):
  q [B, Tq, H, Dh], k and v [B, Tk, H, Dh] -> o [B, Tq, H, Dh]
non-causal, unmasked, scaled by 1/sqrt(Dh), in the inputs' dtype.

Implementations:
  "xla"     XLA's generic path: it materialises the [B, H, Tq, Tk] logits, which at SD3's 1024^2
            (4096 image + 333 text tokens) dominates the MM-DiT's memory.
  "cudnn"   cuDNN's fused (flash) kernel on GPUs: 16-bit inputs and Dh <= 128. Its training path
            rejects odd sequence lengths (jax 0.11: "Unsupported sequence length Q 1357, KV 1357" for
            SD3 at 512^2, 1024 image + 333 text tokens), so both are padded to a multiple of
            CUDNN_MULTIPLE and the padded keys masked by `key_value_seq_lengths`.
  "splash"  the Pallas TPU splash (flash) kernel: never stores the logits. Off TPU it runs in
            Pallas interpret mode (slow; for tests of its numerics on the CPU).
  None      automatic (`attention_implementation`).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("xla", "cudnn", "splash")

# The mesh axes the splash kernel's shard_map splits over. models/ may not import
# perco_jax/parallel.py, so these repeat its names: BATCH_AXES = parallel.BATCH_AXES (the batch is
# split over data x fsdp) and HEAD_AXIS = the axis parallel.DEFAULT_RULES map "heads" to (one of
# parallel.MESH_AXES). tests/test_attention.py checks that they agree; a caller with other mesh
# names passes its own to `attention` / `splash_attention`.
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"

# Splash block sizes (query and key/value rows per tile). The kernel needs multiples of 128 (the TPU
# lane width; masking by segment ids requires it), and the padded length a multiple of the block.
# 512 suits long sequences (fewer grid steps: SD3 at 1024^2 has 4429 joint tokens); a smaller block
# is used where 512 would pad much more than 128 does (see `splash_block_size`).
SPLASH_BLOCKS = (512, 384, 256, 128)
SPLASH_MIN_BLOCK = 128
SPLASH_MAX_PAD = 1 / 16  # allowed extra padded length over the least (a multiple of 128)

CUDNN_MULTIPLE = 8  # cuDNN's sequences are padded to this (even lengths are what its backward needs)


def target_platform() -> str:
    """The platform the program is compiled for: that of the devices of the mesh set by
    `jax.set_mesh` (a deviceless TPU compile from a CPU process sets one), else the default backend.
    Works inside `jax.jit`, where only the abstract mesh is known."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def attention_implementation(requested: Optional[str], q: jax.Array, allow_splash: bool = True) -> str:
    """The implementation `attention` runs for queries q [B, T, H, Dh]: an explicit choice wins;
    else "splash" when compiling for TPU (unless `allow_splash` is False), "cudnn" on GPUs for 16-bit
    compute with Dh <= 128, else "xla".

    `allow_splash=False` keeps a model on XLA's path on TPUs: the entropy model, whose sequences are
    short (g^2 + caption tokens, so the kernel does not pay) and whose float coding tables must not
    change with the implementation.
    """
    if requested is not None:
        if requested not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {requested!r}; use None or one of {IMPLEMENTATIONS}")
        return requested
    platform = target_platform()
    if allow_splash and platform == "tpu":
        return "splash"
    if platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128:
        return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: Optional[str] = None, *,
              batch_axes: Sequence[str] = BATCH_AXES, head_axis: Optional[str] = HEAD_AXIS) -> jax.Array:
    """Softmax attention q [B, Tq, H, Dh], k, v [B, Tk, H, Dh] -> [B, Tq, H, Dh], scale 1/sqrt(Dh).

    `implementation`: None (automatic, `attention_implementation`), "xla", "cudnn" or "splash".
    `batch_axes` / `head_axis`: the mesh axes the splash kernel splits the batch / heads over.
    """
    impl = attention_implementation(implementation, q)
    if impl == "splash":
        return splash_attention(q, k, v, batch_axes=batch_axes, head_axis=head_axis)
    if impl == "cudnn":
        return padded_attention(q, k, v, CUDNN_MULTIPLE, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, multiple: int,
                     implementation: Optional[str] = None) -> jax.Array:
    """`jax.nn.dot_product_attention` of q [B, Tq, H, Dh], k, v [B, Tk, H, Dh] -> [B, Tq, H, Dh] run on
    sequences padded with zeros to multiples of `multiple`: the padded keys are masked out by
    `key_value_seq_lengths` and the padded query rows dropped, so the result is unpadded attention's."""
    tq, tk = q.shape[1], k.shape[1]
    pq, pk = -tq % multiple, -tk % multiple
    if not pq and not pk:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    def pad(x, n):
        return jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))

    lengths = jnp.full((q.shape[0],), tk, jnp.int32)
    o = jax.nn.dot_product_attention(pad(q, pq), pad(k, pk), pad(v, pk), key_value_seq_lengths=lengths,
                                     implementation=implementation)
    return o[:, :tq]


# ----------------------------------------------------------------------------- splash

def splash_block_size(length: int) -> int:
    """The splash block (tile rows) for a sequence of `length` tokens: the largest of
    SPLASH_BLOCKS that pads `length` at most SPLASH_MAX_PAD more than a block of 128 does, and
    never beyond the whole (128-padded) sequence. 4429 -> 512 (padded 4608), 1357 -> 128 (1408),
    38 -> 128."""
    least = _round_up(length, SPLASH_MIN_BLOCK)
    for block in SPLASH_BLOCKS:
        if block <= least and _round_up(length, block) <= least * (1 + SPLASH_MAX_PAD):
            return block
    return SPLASH_MIN_BLOCK


def splash_padded_length(length: int) -> int:
    """`length` rounded up to a multiple of its block (`splash_block_size`): what the kernel runs on."""
    return _round_up(length, splash_block_size(length))


def splash_block_sizes(q_len: int, kv_len: int) -> splash.BlockSizes:
    """Forward and backward (dq, dkv) block sizes for sequences of q_len queries and kv_len keys
    (unpadded; each block divides its `splash_padded_length`)."""
    bq, bkv = splash_block_size(q_len), splash_block_size(kv_len)
    # The backward kernels use the forward tiles; the separate dq kernel (not the fused one) keeps
    # the backward free of a [kv_blocks, H, Tq, Dh] float32 partial-dq buffer.
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                             block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                             block_q_dq=bq, block_kv_dq=bkv)


def _kernel(heads: int, q_len: int, kv_len: int, interpret: bool) -> splash.SplashAttentionKernel:
    # The kernel for `heads` heads of q_len queries over kv_len keys (unpadded lengths), on their
    # padded lengths. Full (unmasked) attention: the padding is masked by segment ids, not by the
    # static mask, so every tile is "full". Built at each trace (its mask tables become constants of
    # the traced program, so a kernel object cannot outlive the trace); the host work is small.
    shape = (splash_padded_length(q_len), splash_padded_length(kv_len))
    mask = splash.MultiHeadMask([splash.FullMask(shape) for _ in range(heads)])
    return splash.make_splash_mha(mask, block_sizes=splash_block_sizes(q_len, kv_len), head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, batch_axes: Sequence[str] = BATCH_AXES,
                     head_axis: Optional[str] = HEAD_AXIS, interpret: Optional[bool] = None) -> jax.Array:
    """Attention q [B, Tq, H, Dh], k, v [B, Tk, H, Dh] -> [B, Tq, H, Dh] by the splash kernel.

    Tq and Tk are padded to block multiples; padded keys are masked out with segment ids and padded
    query rows dropped. `interpret` (default: not compiling for TPU) runs Pallas' interpreter.
    Under a mesh set by `jax.set_mesh` the kernel runs in a `jax.shard_map` (GSPMD does not
    partition a Pallas call): the batch split over those of `batch_axes` the mesh has (as far as
    they divide B), the heads over `head_axis` when it divides H; the rest is replicated.
    """
    if interpret is None:
        interpret = target_platform() != "tpu"
    local = partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    axes = [] if mesh.empty else [a for a in mesh.axis_names if a not in mesh.manual_axes]
    if not axes:  # no mesh (or already inside a shard_map over all of it): one device's program
        return local(q, k, v)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    b, h = q.shape[0], q.shape[2]
    batch_split, split = [], 1
    for a in batch_axes:  # in order, while the product still divides the batch
        if a in axes and b % (split * sizes[a]) == 0:
            batch_split.append(a)
            split *= sizes[a]
    head_split = head_axis if head_axis in axes and h % sizes[head_axis] == 0 else None
    spec = P(tuple(batch_split) or None, None, head_split, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         axis_names=frozenset(axes), check_vma=False)(q, k, v)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """The kernel on one device's q [b, Tq, h, Dh], k, v [b, Tk, h, Dh] -> [b, Tq, h, Dh]."""
    _, tq, h, dh = q.shape
    tk = k.shape[1]
    tq_pad, tk_pad = splash_padded_length(tq), splash_padded_length(tk)

    def heads_major(x, pad):  # [b, T, h, Dh] -> [b, h, T + pad, Dh] (zero rows appended)
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

    # The kernel does not scale the logits; scaling q first is exact for power-of-two Dh (64).
    qh = heads_major(q * (1.0 / math.sqrt(dh)), tq_pad - tq)
    kh, vh = heads_major(k, tk_pad - tk), heads_major(v, tk_pad - tk)
    segment_ids = None
    if tk_pad != tk:
        # Real keys are segment 0, padded keys 1; every query (padded rows too) is segment 0, so no
        # query row is fully masked and padded keys get no weight. (NumPy: constants of the program.)
        segment_ids = splash.SegmentIds(q=np.zeros((tq_pad,), np.int32),
                                        kv=(np.arange(tk_pad) >= tk).astype(np.int32))

    def per_example(a, b_, c):  # [h, T, Dh] each
        return _kernel(h, tq, tk, bool(interpret))(a, b_, c, segment_ids=segment_ids)

    run = jax.vmap(per_example)
    if jnp.dtype(q.dtype).itemsize <= 2:
        run = _at_default_precision(run)
    o = run(qh, kh, vh)
    return jnp.swapaxes(o[:, :, :tq], 1, 2)


def _at_default_precision(fn):
    """`fn` (a function of arrays to an array), its forward and backward traced at the default
    matmul precision. A global "highest" (jax_default_matmul_precision, as the tests set) would ask
    Mosaic for float32 contraction of 16-bit operands, which it refuses ("Bad lhs type"); for 16-bit
    operands the default loses nothing. A custom_vjp, so the backward kernels, traced when the
    gradient is transposed, are also traced inside the context."""
    @jax.custom_vjp
    def wrapped(*args):
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def fwd(*args):
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)  # (out, the pullback: a pytree of residuals)

    def bwd(pullback, g):
        with jax.default_matmul_precision("default"):
            return pullback(g)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
