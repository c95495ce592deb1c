"""Attention dispatch (`perco_jax.models.attention`): the Pallas splash kernel (in interpret mode on
the CPU) against XLA's attention, the automatic choice, and a deviceless compile for a TPU slice."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from perco_jax import parallel
from perco_jax.train import aot
from perco_jax.models import attention as attn_lib
from perco_jax.models.attention import attention, attention_implementation, splash_block_size
from perco_jax.models.entropy_model import EntropyModel
from perco_jax.models.mmdit import JointAttention, mmdit_from_config

HEAD_DIM = 64  # SD3's head size

# A small SD3.5-style MM-DiT (dual attention, qk norm, a context_pre_only last block) at head size 64.
# Two blocks cover every kind of attention call: joint, dual (image only), and image queries over
# the joint keys (the last block).
SMALL = dict(sample_size=16, patch_size=2, in_channels=8, num_layers=2, attention_head_dim=HEAD_DIM,
             num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=2 * HEAD_DIM,
             pooled_projection_dim=40, out_channels=8, pos_embed_max_size=24, qk_norm="rms_norm",
             dual_attention_layers=(0,))


def qkv(b, tq, tk, h, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, tq, h, HEAD_DIM))
    k, v = (rng.standard_normal((b, tk, h, HEAD_DIM)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@pytest.fixture(scope="module")
def tpu_devices():
    """The 4 chips of a v5e:2x2 slice as compile-only devices (no TPU needed: libtpu compiles)."""
    return aot.parse_topology("v5e:2x2").devices()


def tpu_mesh(devices):
    # As parallel.make_mesh builds it (whose device-count check needs jax.devices()).
    return jax.make_mesh((2, 2, 1), parallel.MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("tq,tk", [
    (38, 38),    # a tiny joint sequence: 16 image tokens + 2 + 20, padded to one 128 block
    (300, 300),  # a few hundred, not a block multiple (block 384)
    (16, 38),    # context_pre_only: only the image queries attend to the joint keys
    (256, 256),  # a block multiple: no padding, no segment ids
])
def test_splash_matches_xla_float32(tq, tk):
    q, k, v = qkv(2, tq, tk, 3, jnp.float32)
    out = jax.jit(lambda *a: attention(*a, implementation="splash"))(q, k, v)
    assert out.shape == (2, tq, 3, HEAD_DIM) and out.dtype == jnp.float32
    assert max_err(out, xla(q, k, v)) < 2e-5


@pytest.mark.parametrize("t", [38, 300])
def test_splash_matches_xla_bfloat16(t):
    q, k, v = qkv(2, t, t, 3, jnp.bfloat16, seed=1)
    out = jax.jit(lambda *a: attention(*a, implementation="splash"))(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = xla(*(x.astype(jnp.float32) for x in (q, k, v)))  # the exact answer to the bf16 inputs
    # bf16 has 8 bits of mantissa: both round the probabilities / output to bf16 once or twice.
    assert max_err(out, ref) < 2e-2
    assert max_err(xla(q, k, v), ref) < 2e-2


@pytest.mark.parametrize("tq,tk", [(38, 38), (300, 300), (16, 38)])
def test_splash_gradients_match_xla(tq, tk):
    q, k, v = qkv(2, tq, tk, 3, jnp.float32, seed=2)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((2, tq, 3, HEAD_DIM)), jnp.float32)

    def grads(impl):
        loss = lambda *a: jnp.sum(w * attention(*a, implementation=impl))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads("splash"), grads("xla")):
        assert max_err(got, want) < 2e-5 * max(1.0, float(jnp.max(jnp.abs(want))))


def test_splash_bfloat16_gradients():
    """16-bit inputs go through the kernel at the default matmul precision (the tests set "highest",
    which Mosaic refuses for bf16 operands), forward and backward."""
    q, k, v = qkv(2, 38, 38, 2, jnp.bfloat16, seed=6)

    def grads(impl):
        loss = lambda *a: jnp.sum(attention(*a, implementation=impl).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads("splash"), grads("xla")):
        assert got.dtype == jnp.bfloat16
        assert max_err(got, want) < 2e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32))))


def test_splash_under_a_cpu_mesh():
    """With a mesh set the kernel runs inside a shard_map (here a 1-device CPU mesh)."""
    mesh = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    q, k, v = qkv(2, 38, 38, 2, jnp.float32, seed=4)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: attention(*a, implementation="splash"))(q, k, v)
    assert max_err(out, xla(q, k, v)) < 2e-5


def test_block_sizes():
    assert [splash_block_size(t) for t in (38, 128, 129, 300, 1357, 4096, 4429)] == \
        [128, 128, 256, 384, 128, 512, 512]
    assert [attn_lib.splash_padded_length(t) for t in (38, 300, 1357, 2077, 4429)] == [128, 384, 1408, 2304, 4608]
    for tq, tk in ((38, 38), (16, 38), (300, 300), (1357, 1357), (4096, 4429)):
        bs = attn_lib.splash_block_sizes(tq, tk)
        assert bs.has_backward_blocks
        for block, length in ((bs.block_q, tq), (bs.block_kv, tk), (bs.block_q_dq, tq), (bs.block_kv_dq, tk),
                              (bs.block_q_dkv, tq), (bs.block_kv_dkv, tk), (bs.block_kv_compute, tk)):
            assert block % 128 == 0 and attn_lib.splash_padded_length(length) % block == 0


def test_mmdit_splash_matches_xla():
    model = mmdit_from_config(SMALL)
    rng = np.random.default_rng(5)
    lat = jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.float32)  # 16 image tokens
    t = jnp.asarray([100.0, 700.0])
    ctx = jnp.asarray(rng.standard_normal((2, 22, 48)), jnp.float32)  # joint length 38
    pooled = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    # Random params of the model's shapes (compiling `init` costs ~8 s on the CPU).
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), lat, t, ctx, pooled))["params"]
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32), shapes)

    def run(impl):
        m = model.clone(attention_impl=impl)
        return jax.jit(lambda p: m.apply({"params": p}, lat, t, ctx, pooled))(params)

    out = run("splash")
    assert max_err(out, run("xla")) < 1e-4 * max(1.0, float(jnp.max(jnp.abs(out))))


@pytest.mark.parametrize("tq,tk", [(37, 37), (16, 37), (16, 16)])
def test_padded_attention_matches_unpadded(tq, tk):
    """Padding to a multiple of 8 with the padded keys masked (what the cuDNN path runs: its training
    path rejects odd lengths) is unpadded attention, forward and gradients, in float32."""
    q, k, v = qkv(2, tq, tk, 3, jnp.float32, seed=7)
    w = jnp.asarray(np.random.default_rng(8).standard_normal((2, tq, 3, HEAD_DIM)), jnp.float32)

    def grads(fn):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2)))(q, k, v)

    (got_l, got), (want_l, want) = grads(lambda *a: attn_lib.padded_attention(*a, 8)), grads(xla)
    assert abs(float(got_l) - float(want_l)) < 1e-5 * max(1.0, abs(float(want_l)))
    for g, r in zip(got, want):
        assert g.shape == r.shape
        assert max_err(g, r) < 1e-5 * max(1.0, float(jnp.max(jnp.abs(r))))


def test_cudnn_path_pads_odd_lengths(monkeypatch):
    """The "cudnn" implementation hands cuDNN even (multiple-of-8) lengths with the true key count as
    key_value_seq_lengths. cuDNN is not on the CPU, so the call is recorded and run by XLA."""
    calls = []
    real = jax.nn.dot_product_attention

    def record(q, k, v, *, implementation=None, key_value_seq_lengths=None, **kw):
        calls.append((q.shape[1], k.shape[1], implementation, key_value_seq_lengths))
        return real(q, k, v, implementation="xla", key_value_seq_lengths=key_value_seq_lengths, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    q, k, v = qkv(2, 16, 37, 2, jnp.float32, seed=9)
    out = attention(q, k, v, implementation="cudnn")
    (tq, tk, impl, lengths), = calls
    assert (tq, tk, impl) == (16, 40, "cudnn") and lengths.tolist() == [37, 37]
    assert out.shape == q.shape and max_err(out, real(q, k, v, implementation="xla")) < 1e-5


def test_unknown_implementation():
    q = jnp.zeros((1, 4, 1, HEAD_DIM))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, q, q, implementation="flash")


# ----------------------------------------------------------------------------- the automatic choice

def test_mesh_axis_names_agree_with_parallel():
    assert attn_lib.BATCH_AXES == parallel.BATCH_AXES
    assert attn_lib.HEAD_AXIS in parallel.MESH_AXES and ("heads", attn_lib.HEAD_AXIS) in parallel.DEFAULT_RULES


def test_auto_is_splash_only_when_compiling_for_tpu(tpu_devices):
    q = jax.ShapeDtypeStruct((4, 38, 2, HEAD_DIM), jnp.bfloat16)
    seen = {}

    def probe(name):
        def f(x):  # traced (jax.eval_shape): an eager op under a TPU mesh would fail on the CPU
            seen[name] = (attention_implementation(None, x), attention_implementation(None, x, allow_splash=False))
            return x
        return f

    with jax.set_mesh(tpu_mesh(tpu_devices)):
        jax.eval_shape(probe("tpu"), q)
    cpu_mesh = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, devices=jax.devices()[:1],
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(cpu_mesh):
        jax.eval_shape(probe("cpu"), q)
    jax.eval_shape(probe("none"), q)
    assert seen == {"tpu": ("splash", "xla"), "cpu": ("xla", "xla"), "none": ("xla", "xla")}


@pytest.mark.parametrize("b,h,spec", [
    (4, 4, P(("data", "fsdp"), None, "tensor", None)),
    (2, 3, P(("data", "fsdp"), None, None, None)),  # 3 heads do not divide by tensor = 2
    (1, 4, P("data", None, "tensor", None)),        # a batch of 1: only the size-1 data axis divides it
])
def test_splash_shard_map_splits_batch_and_heads(tpu_devices, b, h, spec):
    mesh = jax.make_mesh((1, 2, 2), parallel.MESH_AXES, devices=tpu_devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    x = jax.ShapeDtypeStruct((b, 38, h, HEAD_DIM), jnp.bfloat16)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda *a: attention(*a))(x, x, x)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert eqn.params["out_specs"] == (spec,) and eqn.params["in_specs"][-3:] == (spec,) * 3


def test_entropy_model_never_splashes(tpu_devices):
    """The entropy model keeps XLA's attention when compiling for TPU (its tables must not change)."""
    model = EntropyModel(codebook_size=16, width=64, depth=1, num_heads=1, max_grid=4)
    idx, mask = jax.ShapeDtypeStruct((1, 4, 4), jnp.int32), jax.ShapeDtypeStruct((1, 4, 4), bool)
    key = jax.random.PRNGKey(0)  # outside: an eager op under the TPU mesh would fail on the CPU
    with jax.set_mesh(tpu_mesh(tpu_devices)):
        params = jax.eval_shape(model.init, key, idx, mask)
        text = jax.jit(model.apply).lower(params, idx, mask).as_text()
    assert "tpu_custom_call" not in text and "splash" not in text


# ----------------------------------------------------------------------------- TPU compile

LOGITS = re.compile(r"\[(?:\d+,)*(\d+),(\d+)\]")


def logits_shapes(hlo: str, length: int) -> set[str]:
    """Shapes in an HLO text whose last two dims are both at least `length` ([.., T, T] logits)."""
    return {m.group(0) for m in LOGITS.finditer(hlo) if min(int(m.group(1)), int(m.group(2))) >= length}


@pytest.mark.slow
def test_mmdit_attention_compiles_for_tpu_and_saves_memory(tpu_devices):
    """The MM-DiT's joint attention, forward and backward in bf16 at head size 64, compiled for a
    v5e:2x2 slice from sharded abstract inputs: with splash (the automatic choice under the TPU
    mesh) the program calls the kernel, holds no [.., T, T] logits and needs less temporary memory
    than with XLA's attention, where the logits dominate (8 heads x 2077^2 per chip)."""
    mesh = tpu_mesh(tpu_devices)
    n, m, heads, b = 1936, 141, 8, 4  # 44^2 image tokens + 77 + 64 text tokens: T = 2077
    width = heads * HEAD_DIM
    batch = NamedSharding(mesh, P(parallel.BATCH_AXES))
    x = jax.ShapeDtypeStruct((b, n, width), jnp.bfloat16, sharding=batch)
    c = jax.ShapeDtypeStruct((b, m, width), jnp.bfloat16, sharding=batch)

    def compile_with(impl):
        module = JointAttention(heads, HEAD_DIM, qk_norm="rms_norm", attention_impl=impl, dtype=jnp.bfloat16)
        params = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x, c))["params"]
        replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
        params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, replicated)

        def loss(p, x_, c_):
            xo, co = module.apply({"params": p}, x_, c_)
            return jnp.sum(xo.astype(jnp.float32) ** 2) + jnp.sum(co.astype(jnp.float32) ** 2)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(replicated, batch, batch),
                       out_shardings=(NamedSharding(mesh, P()), (replicated, batch, batch)))
        with jax.set_mesh(mesh):
            return step.lower(params, x, c).compile()

    splash_c, xla_c = compile_with(None), compile_with("xla")
    splash_hlo, xla_hlo = splash_c.as_text(), xla_c.as_text()
    assert 'custom_call_target="tpu_custom_call"' in splash_hlo
    for phase in ("fwd", "dq", "dkv"):  # the forward and both backward kernels
        assert f"splash_mha_{phase}_segmented" in splash_hlo
    assert logits_shapes(xla_hlo, n + m), "the check should see XLA's logits"
    assert not logits_shapes(splash_hlo, n + m)
    splash_temp = splash_c.memory_analysis().temp_size_in_bytes
    xla_temp = xla_c.memory_analysis().temp_size_in_bytes
    assert xla_temp > heads * (n + m) ** 2 * 2  # at least one bf16 logits buffer per chip
    assert splash_temp < xla_temp / 4, (splash_temp, xla_temp)


def test_vae_mid_attention_splash_matches_xla():
    """The VAE's mid-block attention (one head of the block's width, here 128) through the splash
    kernel (interpret mode) is XLA's, float32."""
    from perco_jax.models.vae import MidAttention

    x = jnp.asarray(np.random.default_rng(10).standard_normal((2, 6, 7, 128)), jnp.float32)  # 42 tokens
    module = MidAttention(32)
    params = module.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    out = {impl: jax.jit(lambda p: module.clone(attention_impl=impl).apply(p, x))(params) for impl in ("splash", "xla")}
    assert max_err(out["splash"], out["xla"]) < 2e-5 * max(1.0, float(jnp.max(jnp.abs(out["xla"]))))


@pytest.mark.slow
def test_vae_mid_attention_compiles_for_tpu_without_logits(tpu_devices):
    """The frozen VAE encoder's mid-block attention compiled for a v5e:2x2 slice: automatically the
    splash kernel (no [.., HW, HW] float32 logits, 64 MiB an image here), and less temporary memory
    than XLA's attention."""
    from perco_jax.models.vae import MidAttention

    mesh = tpu_mesh(tpu_devices)
    b, side, c = 8, 64, 512  # 4096 tokens, the latent side of a 512^2 image
    batch = NamedSharding(mesh, P(parallel.BATCH_AXES))
    x = jax.ShapeDtypeStruct((b, side, side, c), jnp.bfloat16, sharding=batch)

    def compile_with(impl):
        module = MidAttention(32, jnp.bfloat16, attention_impl=impl)
        params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
        params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(mesh, P())),
                              nn.meta.unbox(params))
        with jax.set_mesh(mesh):
            return jax.jit(module.apply, out_shardings=batch).lower(params, x).compile()

    auto, xla_c = compile_with(None), compile_with("xla")
    assert "splash_mha_fwd" in auto.as_text()
    assert logits_shapes(xla_c.as_text(), side * side) and not logits_shapes(auto.as_text(), side * side)
    auto_temp, xla_temp = auto.memory_analysis().temp_size_in_bytes, xla_c.memory_analysis().temp_size_in_bytes
    assert xla_temp > (b // 4) * (side * side) ** 2 * 4  # a float32 logits buffer per chip
    assert auto_temp < xla_temp / 4, (auto_temp, xla_temp)
