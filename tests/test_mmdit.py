"""MM-DiT parity with diffusers' SD3Transformer2DModel (float32, small random references)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from perco_jax.convert.common import DictSource
from perco_jax.convert.transformer import config_from_diffusers, transformer_from_source
from perco_jax.models.mmdit import mmdit_from_config, sincos_pos_embed
from tests.reference import randomize_, rel_err

SD3_STYLE = dict(sample_size=16, patch_size=2, in_channels=8, num_layers=3, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=64,
                 pooled_projection_dim=40, out_channels=8, pos_embed_max_size=24)
SD35_STYLE = dict(SD3_STYLE, qk_norm="rms_norm", dual_attention_layers=(0, 1))


def reference(cfg, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**cfg)
    return randomize_(model, seed)


def inputs(cfg, b=2, h=8, w=8, l=7, seed=1):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((b, cfg["in_channels"], h, w)).astype(np.float32)
    t = rng.uniform(0, 1000, (b,)).astype(np.float32)
    ctx = rng.standard_normal((b, l, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((b, cfg["pooled_projection_dim"])).astype(np.float32)
    return lat, t, ctx, pooled


def run_ref(ref, lat, t, ctx, pooled):
    with torch.no_grad():
        out = ref(torch.from_numpy(lat), encoder_hidden_states=torch.from_numpy(ctx),
                  pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def run_ours(model, params, lat, t, ctx, pooled):
    fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    return np.asarray(fn(params, jnp.asarray(lat.transpose(0, 2, 3, 1)), t, ctx, pooled))


@pytest.mark.parametrize("cfg,shape", [
    (SD3_STYLE, (2, 8, 8)),
    (SD35_STYLE, (2, 8, 8)),
    (SD3_STYLE, (1, 12, 6)),    # non-square, batch 1
    (SD35_STYLE, (3, 6, 10)),   # non-square, batch 3
])
def test_parity_with_diffusers(cfg, shape):
    ref = reference(cfg)
    model = mmdit_from_config(config_from_diffusers(dict(ref.config)))
    params = transformer_from_source(DictSource(ref.state_dict()), model)
    b, h, w = shape
    args = inputs(cfg, b, h, w)
    ours, theirs = run_ours(model, params, *args), run_ref(ref, *args)
    assert np.abs(theirs).max() > 1e-2  # a non-trivial output
    assert rel_err(ours, theirs) <= 1e-4


def test_pos_embed_matches_diffusers_table():
    d, max_size, base = 32, 12, 5
    full = get_2d_sincos_pos_embed(d, max_size, base_size=base, output_type="pt").numpy()
    full = full.reshape(max_size, max_size, d)
    for h, w in [(12, 12), (4, 6), (7, 3)]:
        top, left = (max_size - h) // 2, (max_size - w) // 2
        want = full[top:top + h, left:left + w].reshape(h * w, d)
        np.testing.assert_allclose(sincos_pos_embed(d, h, w, max_size, base), want, atol=1e-6)


def test_extra_in_channels_start_inert():
    """A converted model with extra z_l channels gives the same output whatever they hold."""
    ref = reference(SD3_STYLE)
    kw = config_from_diffusers(dict(ref.config))
    model = mmdit_from_config(kw, extra_in_channels=5)
    params = transformer_from_source(DictSource(ref.state_dict()), model)
    assert np.all(np.asarray(params["pos_embed"]["kernel"])[:, :, 8:, :] == 0)
    lat, t, ctx, pooled = inputs(SD3_STYLE, 2, 8, 8)
    want = run_ref(ref, lat, t, ctx, pooled)
    for fill in (0.0, 3.0):
        extra = np.full((2, 5, 8, 8), fill, np.float32) + np.random.default_rng(2).standard_normal((2, 5, 8, 8))
        got = run_ours(model, params, np.concatenate([lat, extra.astype(np.float32)], 1), t, ctx, pooled)
        assert rel_err(got, want) <= 1e-4
    # a freshly initialised model also starts with inert extra columns
    fresh = nn_init(model)
    assert np.all(np.asarray(fresh["pos_embed"]["kernel"])[:, :, 8:, :] == 0)


def nn_init(model):
    from flax import linen as nn
    return nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *model.dummy_inputs()))["params"]


def test_bad_inputs_raise_clear_errors():
    model = mmdit_from_config(SD3_STYLE)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.dummy_inputs())["params"]
    lat, t, ctx, pooled = (jnp.asarray(a) for a in inputs(SD3_STYLE, 1, 8, 8))
    for bad, match in (((1, 8, 8, 3), "channels"), ((1, 7, 8, 8), "multiple of patch_size"),
                       ((1, 50, 8, 8), "pos_embed_max_size")):
        with pytest.raises(ValueError, match=match):  # (raised while tracing: shapes are enough)
            jax.eval_shape(lambda p, x: model.apply({"params": p}, x, t, ctx, pooled), params, jnp.zeros(bad))


def test_bfloat16_compute_close_to_float32():
    ref = reference(SD3_STYLE)
    kw = config_from_diffusers(dict(ref.config))
    params = transformer_from_source(DictSource(ref.state_dict()), mmdit_from_config(kw))
    args = inputs(SD3_STYLE, 1, 8, 8)
    f32 = run_ours(mmdit_from_config(kw), params, *args)
    bf16 = run_ours(mmdit_from_config(kw, dtype=jnp.bfloat16), params, *args)
    assert bf16.dtype == jnp.bfloat16 or bf16.dtype == np.dtype("bfloat16")
    assert rel_err(bf16.astype(np.float32), f32) < 0.1
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32


def test_remat_recomputes_in_backward_order_with_the_plain_gradients():
    """remat (`recompute_in_order`): the same output and gradients as the plain model (SD3.5 style:
    dual attention and the context-pre-only last block), and each block's recomputation and its
    gradients are tied by optimization barriers (two a block), so the compiler runs one block's
    backward at a time (docs/training.md: otherwise XLA:TPU left each block's temb and weight
    gradients for the end, holding its activations)."""
    ref = reference(SD35_STYLE)
    kw = config_from_diffusers(dict(ref.config))
    params = transformer_from_source(DictSource(ref.state_dict()), mmdit_from_config(kw))
    args = [jnp.asarray(a) for a in inputs(SD35_STYLE, 2, 8, 8)]
    args[0] = args[0].transpose(0, 2, 3, 1)
    plain, remat = mmdit_from_config(kw), mmdit_from_config(kw, remat=True)

    def loss(model):
        return lambda p, x, t, c, y: jnp.sum(jnp.sin(model.apply({"params": p}, x, t, c, y)))

    grads = [jax.jit(jax.grad(loss(m), argnums=(0, 1, 3, 4)))(params, *args) for m in (plain, remat)]
    assert jax.tree_util.tree_structure(grads[0]) == jax.tree_util.tree_structure(grads[1])
    for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads)):
        assert rel_err(np.asarray(b), np.asarray(a)) < 1e-5
    out = [np.asarray(jax.jit(m.apply)({"params": params}, *args)) for m in (plain, remat)]
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6, atol=1e-6)
    jaxprs = [str(jax.make_jaxpr(jax.grad(loss(m)))(params, *args)) for m in (plain, remat)]
    assert jaxprs[0].count("optimization_barrier") == 0
    assert jaxprs[1].count("optimization_barrier") == 2 * SD35_STYLE["num_layers"]
