"""HyperEncoder and VectorQuantizer: shapes, errors, logical axes, assignment, EMA, restarts, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from perco_jax.models.hyper_encoder import HyperEncoder, num_stages
from perco_jax.models.vq import VectorQuantizer, l2_normalise


def _boxed_leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _all_partitioned(tree):
    leaves = _boxed_leaves(tree)
    return bool(leaves) and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)


# ----------------------------------------------------------------------------- hyper-encoder

def test_num_stages():
    assert num_stages(64, 16) == 2 and num_stages(64, 8) == 3 and num_stages(32, 32) == 0
    for side, g in ((48, 16), (64, 24), (8, 16)):
        with pytest.raises(ValueError, match=f"latent side {side} is not grid_side {g} times a power of two"):
            num_stages(side, g)
    with pytest.raises(ValueError, match="grid_side must be a positive integer"):
        num_stages(64, 0)


@pytest.mark.parametrize("side,grid,attention", [(64, 16, True), (64, 8, False), (32, 32, True)])
def test_hyper_encoder_shapes(side, grid, attention):
    he = HyperEncoder(grid_side=grid, width=16, depth=1, out_channels=6, num_groups=4, attention=attention)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, side, side, 3))
    variables = jax.eval_shape(he.init, jax.random.PRNGKey(1), x)
    out = jax.eval_shape(he.apply, variables, x)
    assert out.shape == (2, grid, grid, 6)
    names = set(variables["params"])
    assert {f"down_{s}_downsample" for s in range(num_stages(side, grid))} <= names
    assert f"down_{num_stages(side, grid)}_downsample" not in names
    assert ("attentions_0" in variables["params"]["mid_block"]) == attention
    assert _all_partitioned(variables["params"])


def test_hyper_encoder_runs_and_axes():
    he = HyperEncoder(grid_side=4, width=8, depth=1, out_channels=5, num_groups=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3))
    variables = jax.jit(he.init)(jax.random.PRNGKey(1), x)
    y = jax.jit(he.apply)(variables, x)
    assert y.shape == (1, 4, 4, 5) and bool(jnp.all(jnp.isfinite(y)))
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
    assert tuple(specs["mid_block"]["attentions_0"]["to_q"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["norm_out"]["scale"]) == ("norm",)


def test_rematerialised_hyper_encoder_has_the_same_params_values_and_gradients():
    """`remat`: the same parameter tree, output and gradients (float32), and the backward pass
    recomputes each ResnetBlock instead of keeping its insides (the jaxpr holds the remat)."""
    kw = dict(grid_side=4, width=8, depth=2, out_channels=5, num_groups=4)
    plain, remat = HyperEncoder(**kw), HyperEncoder(**kw, remat=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = jax.jit(plain.init)(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.PRNGKey(1), x)) == jax.tree.structure(variables)

    def loss(module):
        return lambda v: jnp.sum(module.apply(v, x) ** 2)

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss(m)))(variables) for m in (plain, remat))
    np.testing.assert_allclose(b, a, rtol=1e-6)
    for p, q in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(q, p, rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat)))(variables))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss(plain)))(variables))


def test_hyper_encoder_errors():
    he = HyperEncoder(grid_side=16, width=8, num_groups=4)
    with pytest.raises(ValueError, match="square"):
        he.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 64, 3)))
    with pytest.raises(ValueError, match="latent side 48 is not grid_side 16 times a power of two"):
        he.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ValueError, match="num_groups"):
        HyperEncoder(grid_side=16, width=12, num_groups=8)


# ----------------------------------------------------------------------------- vector quantiser

def _vq_setup(k=16, d=4, d_in=6, shape=(2, 5, 5), seed=0, **kw):
    vq = VectorQuantizer(codebook_size=k, code_dim=d, **kw)
    z = jax.random.normal(jax.random.PRNGKey(seed), (*shape, d_in))
    variables = nn.meta.unbox(vq.init(jax.random.PRNGKey(seed + 1), z))
    return vq, z, variables


def _projected(params, z):
    p = params["proj_in"]
    return l2_normalise(z @ p["kernel"] + p["bias"])


def test_codebook_size_and_field_errors():
    with pytest.raises(ValueError, match="codebook_size must be >= 2"):
        VectorQuantizer(codebook_size=1, code_dim=8)
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(codebook_size=4, code_dim=8, decay=1.5)


def test_variables_and_logical_axes():
    vq = VectorQuantizer(codebook_size=8, code_dim=4)
    boxed = vq.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 3, 6)))
    assert set(boxed) == {"params", "vq"}
    assert set(boxed["params"]) == {"proj_in"} and set(boxed["vq"]) == {"embed_sum", "cluster_size"}
    assert _all_partitioned(boxed["params"]) and _all_partitioned(boxed["vq"])
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["params"]["proj_in"]["kernel"]) == ("embed", None)
    variables = nn.meta.unbox(boxed)
    assert variables["vq"]["embed_sum"].shape == (8, 4) and variables["vq"]["cluster_size"].shape == (8,)
    np.testing.assert_allclose(jnp.linalg.norm(variables["vq"]["embed_sum"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(variables["vq"]["cluster_size"], 1.0)


def test_unit_norm_codes_argmax_and_lookup():
    vq, z, variables = _vq_setup()
    out = vq.apply(variables, z)
    codes, idx = out["codes"], out["indices"]
    assert codes.shape == (2, 5, 5, 4) and idx.shape == (2, 5, 5) and idx.dtype == jnp.int32
    np.testing.assert_allclose(jnp.linalg.norm(codes, axis=-1), 1.0, rtol=1e-5)
    # brute force: cosine similarity of the projection with every codebook row
    x = np.asarray(_projected(variables["params"], z)).reshape(-1, 4)
    cb = np.asarray(variables["vq"]["embed_sum"], np.float64)
    cos = (x @ cb.T) / (np.linalg.norm(x, axis=-1, keepdims=True) * np.linalg.norm(cb, axis=-1)[None])
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), cos.argmax(-1))
    np.testing.assert_allclose(codes.reshape(-1, 4), cb[cos.argmax(-1)] / np.linalg.norm(cb[cos.argmax(-1)], axis=-1,
                                                                                          keepdims=True), atol=1e-6)
    looked = vq.apply(variables, idx, method=vq.lookup)
    np.testing.assert_array_equal(looked, codes)
    assert float(out["loss"]) == 0.0


def test_perplexity_usage_bounds():
    vq, z, variables = _vq_setup(k=16, shape=(2, 5, 5))
    out = vq.apply(variables, z)
    n_used = len(np.unique(np.asarray(out["indices"])))
    counts = np.bincount(np.asarray(out["indices"]).ravel(), minlength=16) / out["indices"].size
    nz = counts[counts > 0]
    assert float(out["perplexity"]) == pytest.approx(float(np.exp(-(nz * np.log(nz)).sum())), rel=1e-5)
    assert 1.0 < float(out["perplexity"]) < n_used  # strictly inside: the codes are not equally used here
    assert float(out["usage"]) == pytest.approx(n_used / 16)
    # all positions on one code: perplexity 1, usage 1/K
    same = jnp.broadcast_to(z[:1, :1, :1], z.shape)
    out1 = vq.apply(variables, same)
    assert float(out1["perplexity"]) == pytest.approx(1.0) and float(out1["usage"]) == pytest.approx(1 / 16)


def test_straight_through_gradient():
    vq, z, variables = _vq_setup(k=8, d=3, d_in=5, shape=(1, 2, 2))

    def codes_fn(z_):
        return vq.apply(variables, z_)["codes"]

    def proj_fn(z_):
        return _projected(variables["params"], z_)

    jac_codes = jax.jacobian(codes_fn)(z)
    jac_proj = jax.jacobian(proj_fn)(z)
    np.testing.assert_allclose(jac_codes, jac_proj, atol=1e-5)
    assert float(jnp.max(jnp.abs(jac_proj))) > 1e-3
    # forward value is the codebook vector, not the projection
    out = vq.apply(variables, z)
    np.testing.assert_allclose(out["codes"], vq.apply(variables, out["indices"], method=vq.lookup), atol=0)
    assert float(jnp.max(jnp.abs(out["codes"] - proj_fn(z)))) > 1e-3
    # gradients reach proj_in through the straight-through path
    g = jax.grad(lambda p: jnp.sum(vq.apply({"params": p, "vq": variables["vq"]}, z)["codes"][..., 0]))(
        variables["params"])
    assert float(jnp.abs(g["proj_in"]["kernel"]).sum()) > 0


def test_commitment_loss():
    vq, z, variables = _vq_setup(commitment_cost=0.25)
    out = vq.apply(variables, z)
    x = _projected(variables["params"], z)
    expected = 0.25 * jnp.mean(jnp.sum((x - out["codes"]) ** 2, axis=-1))
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)


def _identity_vq(**kw):
    """K=3, d=2 quantiser whose proj_in is the identity, with a hand-set EMA state."""
    vq = VectorQuantizer(codebook_size=3, code_dim=2, **kw)
    params = {"proj_in": {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}}
    state = {"embed_sum": jnp.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), "cluster_size": jnp.array([2.0, 1.0, 1.0])}
    return vq, {"params": params, "vq": state}


def test_ema_update_by_hand():
    vq, variables = _identity_vq(decay=0.5, restart_threshold=0.0)
    x = jnp.array([[[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-0.6, -0.8]]])   # -> codes 0, 1, 0, 2
    out, upd = jax.jit(lambda v, x_: vq.apply(v, x_, train=True, mutable=["vq"]))(variables, x)
    np.testing.assert_array_equal(out["indices"], [[0, 1, 0, 2]])
    # n = [2, 1, 1]; s0 = (1.8, 0.6), s1 = (0.6, 0.8), s2 = (-0.6, -0.8)
    np.testing.assert_allclose(upd["vq"]["cluster_size"], [0.5 * 2 + 0.5 * 2, 0.5 * 1 + 0.5 * 1, 0.5 * 1 + 0.5 * 1])
    np.testing.assert_allclose(upd["vq"]["embed_sum"], [[1.9, 0.3], [0.3, 0.9], [-0.8, -0.4]], atol=1e-6)
    # the step's outputs use the codebook before the update
    np.testing.assert_allclose(out["codes"][0, 1], [0.0, 1.0], atol=1e-7)
    # new codebook = normalised embed_sum
    new_codes = vq.apply({"params": variables["params"], "vq": upd["vq"]}, jnp.array([0, 1, 2]), method=vq.lookup)
    np.testing.assert_allclose(new_codes[0], np.array([1.9, 0.3]) / np.hypot(1.9, 0.3), atol=1e-6)


def test_no_update_when_not_training_or_immutable():
    vq, variables = _identity_vq(decay=0.5)
    x = jnp.array([[[1.0, 0.0], [0.6, 0.8]]])
    _, upd = vq.apply(variables, x, train=False, mutable=["vq"])
    jax.tree.map(np.testing.assert_array_equal, upd["vq"], variables["vq"])
    out = vq.apply(variables, x, train=True)   # collection immutable: nothing updated, no rng needed
    assert out["codes"].shape == (1, 2, 2)


def test_dead_code_restart():
    vq, variables = _identity_vq(decay=0.9, restart_threshold=0.03)
    variables["vq"]["cluster_size"] = jnp.array([50.0, 50.0, 0.0])            # code 2 is dead
    x = jnp.array([[[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]]])         # none near code 2
    step = jax.jit(lambda v, x_, r: vq.apply(v, x_, train=True, mutable=["vq"], rngs={"vq": r}))
    out, upd = step(variables, x, jax.random.PRNGKey(3))
    cluster = np.asarray(upd["vq"]["cluster_size"])
    mean = (0.9 * 50 + 0.1 * 2) * 2 / 3          # after the EMA: [45.2, 45.2, 0], restart uses their mean
    np.testing.assert_allclose(cluster, [45.2, 45.2, mean], rtol=1e-6)
    restarted = np.asarray(upd["vq"]["embed_sum"][2]) / mean
    assert np.min(np.abs(np.asarray(x[0]) - restarted).max(-1)) < 1e-6      # equals one batch vector
    np.testing.assert_allclose(upd["vq"]["embed_sum"][:2],
                               [[0.9 * 2 + 0.1 * 1.8, 0.1 * 0.6], [0.1 * 0.6, 0.9 + 0.1 * 1.8]], atol=1e-6)
    # a different key may pick a different vector, but always a batch vector
    _, upd2 = step(variables, x, jax.random.PRNGKey(4))
    r2 = np.asarray(upd2["vq"]["embed_sum"][2]) / mean
    assert np.min(np.abs(np.asarray(x[0]) - r2).max(-1)) < 1e-6
    with pytest.raises(ValueError, match="rngs"):
        vq.apply(variables, x, train=True, mutable=["vq"])


def test_jit_training_loop_changes_codebook():
    vq, z, variables = _vq_setup(k=8, d=4, shape=(4, 4, 4))

    @jax.jit
    def step(v, r):
        out, upd = vq.apply(v, z, train=True, mutable=["vq"], rngs={"vq": r})
        return out, {"params": v["params"], "vq": upd["vq"]}

    v = variables
    for i in range(3):
        out, v = step(v, jax.random.PRNGKey(i))
    assert not np.allclose(v["vq"]["embed_sum"], variables["vq"]["embed_sum"])
    assert 0 < float(out["usage"]) <= 1 and 1 <= float(out["perplexity"]) <= 8 + 1e-4
    np.testing.assert_allclose(jnp.linalg.norm(out["codes"], axis=-1), 1.0, rtol=1e-5)
