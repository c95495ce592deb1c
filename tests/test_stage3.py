"""Stage 3, few-step decoding: the step-size input, the shortcut and reflow objectives, the few-step
sampler, and (slow) the tiny codec's student against the teacher."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from perco_jax import build, flow
from perco_jax.config import complete, load_config
from perco_jax.models.mmdit import MMDiT
from perco_jax.models.perco import with_step_conditioning

SMALL = dict(sample_size=8, patch_size=2, in_channels=4, extra_in_channels=2, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
             out_channels=4, pos_embed_max_size=8)


def _inputs(b=3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((b, 4, 4, 6)), jnp.float32), jnp.asarray(rng.uniform(0, 1000, b), jnp.float32),
            jnp.asarray(rng.standard_normal((b, 5, 12)), jnp.float32), jnp.asarray(rng.standard_normal((b, 6)), jnp.float32))


def test_zero_initialised_step_embedding_leaves_outputs_unchanged():
    """The teacher's weights + a fresh step embedder give the teacher's velocity for every d."""
    teacher, student = MMDiT(**SMALL), MMDiT(**SMALL, step_conditioning=True)
    x, t, ctx, pooled = _inputs()
    tp = teacher.init(jax.random.PRNGKey(0), x, t, ctx, pooled)["params"]
    sp = student.init(jax.random.PRNGKey(1), x, t, ctx, pooled)["params"]
    assert set(sp) - set(tp) == {"step_embedder_1", "step_embedder_2"}
    sp = dict(sp, **tp)
    want = teacher.apply({"params": tp}, x, t, ctx, pooled)
    for d in (0.0, 0.25, 1.0):
        got = student.apply({"params": sp}, x, t, ctx, pooled, jnp.full((3,), d))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # ... and the step input is live: a trained (non-zero) embedder makes d matter
    sp["step_embedder_2"] = jax.tree_util.tree_map(lambda a: a + 0.1, sp["step_embedder_2"])
    a, b = (student.apply({"params": sp}, x, t, ctx, pooled, jnp.full((3,), d)) for d in (0.0, 1.0))
    assert float(jnp.abs(a - b).max()) > 1e-3
    with pytest.raises(ValueError, match="step_conditioning"):
        teacher.apply({"params": tp}, x, t, ctx, pooled, jnp.zeros((3,)))


def test_perco_student_is_the_perco_model_with_a_step_input():
    config = load_config("tiny")
    model = build.build_perco(config)
    student = with_step_conditioning(model)
    assert student.mmdit.step_conditioning and not model.mmdit.step_conditioning
    assert student.hyper_encoder == model.hyper_encoder and student.vq == model.vq


def _toy_velocity(a):
    """A toy step-conditioned velocity field v(x, t, d) (non-linear in x, depends on t and d)."""
    def v(x, t, d):
        return jnp.tanh(x * a) - (t / 1000.0)[:, None, None, None] * x + d[:, None, None, None] * x ** 2
    return v


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_two_step_target_is_the_mean_of_two_steps(shift):
    """One step of 2d along the target lands where two steps of d land; with shift 1 the target is
    the plain mean of the two velocities."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 2, 2, 3)), jnp.float32)
    v = _toy_velocity(jnp.asarray(rng.standard_normal((2, 2, 3)), jnp.float32))
    u, d = jnp.array([1.0, 0.75, 0.5, 0.25]), jnp.array([0.125, 0.125, 0.0625, 0.125])
    target = flow.two_step_target(v, x, u, d, shift)

    def s(uu):
        return flow.shift_sigmas(uu, shift)[:, None, None, None]

    v1 = v(x, s(u)[:, 0, 0, 0] * 1000, d)
    x1 = x + (s(u - d) - s(u)) * v1
    v2 = v(x1, s(u - d)[:, 0, 0, 0] * 1000, d)
    x2 = x1 + (s(u - 2 * d) - s(u - d)) * v2
    np.testing.assert_allclose(x + (s(u - 2 * d) - s(u)) * target, x2, rtol=1e-5, atol=1e-5)
    if shift == 1.0:
        np.testing.assert_allclose(target, (v1 + v2) / 2, rtol=1e-5, atol=1e-6)
    else:  # the spans differ: not the plain mean
        assert float(jnp.abs(target - (v1 + v2) / 2).max()) > 1e-3


def test_shortcut_steps_lie_on_the_sampler_grid():
    d, u = flow.shortcut_steps(jax.random.PRNGKey(0), 4096, 3)
    d, u = np.asarray(d), np.asarray(u)
    assert set(np.round(1 / d).astype(int)) == {1, 2, 4, 8}
    np.testing.assert_allclose(np.round((1 - u) / d), (1 - u) / d, atol=1e-5)  # u = 1 - m d
    assert (u - d >= -1e-6).all() and (u <= 1).all()  # a step of d from u stays in [0, 1]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_n_step_sampler_calls_the_model_n_times(n):
    calls = []
    a = jnp.ones((2, 2, 3)) * 0.5
    v = _toy_velocity(a)

    def counted(x, t, d):
        jax.debug.callback(lambda tt, dd: calls.append((np.asarray(tt)[0], np.asarray(dd)[0])), t, d)
        return v(x, t, d)

    noise = jnp.ones((2, 2, 2, 3))
    out = flow.few_step_sample(counted, noise, n, shift=3.0)
    jax.block_until_ready(out)
    assert len(calls) == n
    sigmas = flow.uniform_sigmas(n, 3.0)
    np.testing.assert_allclose([c[0] for c in calls], sigmas[:-1] * 1000, rtol=1e-6)
    np.testing.assert_allclose([c[1] for c in calls], [1 / n] * n)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    # the same Euler steps by hand
    x = noise
    for i in range(n):
        x = x + (sigmas[i + 1] - sigmas[i]) * v(x, jnp.full((2,), sigmas[i] * 1000), jnp.full((2,), 1 / n))
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)


def test_straightness_is_zero_for_straight_paths_only():
    noise = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 2, 1)), jnp.float32)
    sigmas, timesteps = flow.sigma_schedule(8, 3.0)
    const = flow.straightness(lambda x, t: jnp.ones_like(x) * 0.3, noise, jnp.asarray(sigmas), jnp.asarray(timesteps))
    np.testing.assert_allclose(const, 0.0, atol=1e-10)
    curved = flow.straightness(lambda x, t: jnp.ones_like(x) * (t / 1000.0)[:, None, None, None], noise,
                               jnp.asarray(sigmas), jnp.asarray(timesteps))
    assert (np.asarray(curved) > 1e-3).all()


@pytest.mark.parametrize("override,match", [
    (["stage3.method=distil"], "stage3.method"),
    (["stage3.method=shortcut", "stage3.steps=(1, 3)"], "powers of two"),
    (["stage3.method=shortcut", "stage3.levels=1", "stage3.steps=(1, 4)"], "powers of two"),
    (["stage3.coupling_sampler=sde"], "coupling_sampler"),
    (["stage3.bootstrap_fraction=1.5"], "bootstrap_fraction"),
    (["stage3.guidance=-1.0"], "stage3.guidance"),
    (["stage=3"], "stage1_workdir"),
])
def test_bad_stage3_values_fail_at_start(override, match):
    with pytest.raises(build.ConfigError, match=match):
        build.validate(load_config("tiny", override))


@pytest.fixture(scope="module")
def random_codec(tmp_path_factory):
    """(teacher, autoencoder, prompt encoder, frozen {"codec", "autoencoder", "text"}) of a random
    tiny codec (teacher = a fresh 1-layer stage-1 model; built once: its eager init takes ~20 s)."""
    from perco_jax.train.stage0 import autoencoder_params
    from perco_jax.train.step import init_variables

    config = _stage3_config()
    teacher = build.build_perco(config)
    autoencoder = build.build_autoencoder(config)
    prompt_encoder, text_params = build.build_text(config, tmp_path_factory.mktemp("text"))
    variables = nn.meta.unbox(init_variables(config, teacher, jax.random.PRNGKey(3)))
    codec = {"params": variables["params"], "vq": variables["vq"]}
    frozen = {"codec": codec, "autoencoder": autoencoder_params(config, autoencoder), "text": text_params}
    return teacher, autoencoder, prompt_encoder, frozen


def _stage3_config(overrides=()):
    """The random codec's stage-3 config (stage3.batch_size 4) with `overrides` (none that change
    the models' shapes)."""
    return build.stage_config(load_config("tiny", ["stage=3", "stage1_workdir=(unused)", "mmdit.num_layers=1",
                                                   "stage3.batch_size=4", *overrides]))


def _random_codec_step(random_codec, fraction, overrides=()):
    """A stage-3 shortcut step on `random_codec`, its first state (started from the teacher), a batch
    and the frozen inputs."""
    from perco_jax import parallel
    from perco_jax.train import stage3
    from perco_jax.train.state import make_optimizer

    config = _stage3_config(("stage3.method=shortcut", f"stage3.bootstrap_fraction={fraction}", *overrides))
    teacher, autoencoder, prompt_encoder, frozen = random_codec
    codec = frozen["codec"]
    student = stage3.student_model(config)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    tx = make_optimizer(config)
    state, shardings = stage3.init_state(config, student, tx, mesh, parallel.rules_from_config([]))
    state = stage3.start_from_teacher(state, codec, shardings)
    rng = np.random.default_rng(0)
    tokens = prompt_encoder.tokenize(["a red circle", "a blue square", "a green triangle", ""],
                                     config.text.max_sequence_length)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32),
             **{k: jnp.asarray(v) for k, v in tokens.items()}}
    empty = {k: jnp.asarray(v[:1]) for k, v in prompt_encoder.tokenize([""], config.text.max_sequence_length).items()}
    step = stage3.make_train_step(student, autoencoder, prompt_encoder, config, tx)
    return config, teacher, autoencoder, prompt_encoder, state, step, batch, frozen, empty


@pytest.mark.xdist_group("random_codec")  # (built once, see random_codec)
@pytest.mark.slow
def test_shortcut_loss_at_d0_is_the_teachers_flow_matching_loss(random_codec):
    """With no self-consistency examples, the first stage-3 loss is stage 1's flow-matching loss
    (with its detail weighting) of the teacher on the same draw (the step embedder starts at zero,
    d = 0 is flow matching)."""
    from perco_jax.codec.transforms import image_latents
    from perco_jax.train.state import step_key

    config, teacher, ae, pe, state, step, batch, frozen, empty = _random_codec_step(random_codec, 0.0)
    _, metrics = jax.jit(step)(state, batch, frozen, empty)
    codec = frozen["codec"]
    x0 = image_latents(ae, frozen["autoencoder"], batch["image"])
    codes = teacher.apply(codec, teacher.apply(codec, x0, method=teacher.encode)["indices"], method=teacher.lookup)
    max_len = config.text.max_sequence_length
    cond = pe.encode_tokens(frozen["text"], {k: batch[k] for k in ("clip_l", "clip_g", "t5")}, max_sequence_length=max_len)
    uncond = pe.encode_tokens(frozen["text"], {k: jnp.broadcast_to(v, (4,) + v.shape[1:]) for k, v in empty.items()},
                              max_sequence_length=max_len)
    drop = jax.random.uniform(step_key(state, 0), (4,)) < config.text.caption_dropout
    ctx = jnp.where(drop[:, None, None], uncond[0], cond[0])
    pooled = jnp.where(drop[:, None], uncond[1], cond[1])
    ss = config.sigma_sampling
    sigma = flow.sample_sigmas(step_key(state, 1), 4, scheme=ss.scheme, mean=ss.mean, std=ss.std, shift=1.0)
    noise = jax.random.normal(step_key(state, 2), x0.shape)
    v = teacher.apply(codec, flow.interpolate(x0, noise, sigma), sigma * 1000.0, codes, ctx, pooled,
                      method=teacher.velocity)
    assert config.loss_detail > 0  # (tiny's: stage 3 weights its flow matching as stage 1 does)
    want = flow.flow_matching_loss(v, x0, noise, sigma, config.loss_weighting, config.loss_detail)
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
    assert float(metrics["flow_loss"]) == float(metrics["loss"]) and float(metrics["consistency_loss"]) == 0.0


def test_few_step_guidance_is_stage3s_and_the_teachers_for_older_configs():
    from perco_jax.train.stage3 import few_step_guidance, few_step_settings

    config = load_config("tiny", ["sample.guidance=2.0", "stage3.guidance=3.5"])
    assert few_step_guidance(config) == 3.5 and few_step_settings(config)["guidance"] == 3.5
    saved = config.to_dict()
    del saved["stage3"]["guidance"]  # a config written before the field existed, loaded
    config = ml_collections.ConfigDict(complete(saved))
    assert config.stage3.guidance is None
    assert few_step_guidance(config) == 2.0 and few_step_settings(config)["guidance"] == 2.0


@pytest.mark.xdist_group("random_codec")  # (built once, see random_codec)
@pytest.mark.slow
def test_self_consistency_targets_follow_stage3_guidance(random_codec):
    """The finest self-consistency targets are guided with stage3.guidance, not sample.guidance."""
    def loss(*overrides):
        # levels 0: every target is two guided d -> 0 half steps; a perturbed student (a fresh one
        # starts with zero output layers, which no guidance changes) tells captions apart
        _, _, _, _, state, step, batch, frozen, empty = _random_codec_step(
            random_codec, 1.0, ("stage3.levels=0", "stage3.steps=(1,)") + overrides)
        leaves, tree = jax.tree_util.tree_flatten(state.params)
        keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
        params = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
        return float(jax.jit(step)(state.replace(params=params), batch, frozen, empty)[1]["consistency_loss"])

    base = loss("stage3.guidance=3.0", "sample.guidance=2.0")
    assert loss("stage3.guidance=3.0", "sample.guidance=5.0") == pytest.approx(base, rel=1e-6)
    assert abs(loss("stage3.guidance=1.0", "sample.guidance=2.0") - base) > 1e-3 * base


@pytest.mark.xdist_group("random_codec")  # (built once, see random_codec)
@pytest.mark.slow
def test_shortcut_step_trains_both_terms(random_codec):
    _, _, _, _, state, step, batch, frozen, empty = _random_codec_step(random_codec, 0.5)
    # the self-consistency targets [2, 8, 8, 4] and the trained params pass one optimization barrier
    # together: the training pass waits for the targets' forward passes (XLA:TPU interleaved them)
    barriers = [e for e in jax.make_jaxpr(step)(state, batch, frozen, empty).jaxpr.eqns
                if e.primitive.name == "optimization_barrier"]
    n_params = len(jax.tree_util.tree_leaves(state.params))
    assert [(len(e.invars), e.invars[0].aval.shape) for e in barriers] == [(1 + n_params, (2, 8, 8, 4))]
    step = jax.jit(step)
    new, metrics = step(step(state, batch, frozen, empty)[0], batch, frozen, empty)  # (warm-up: lr 0 at step 0)
    assert float(metrics["consistency_loss"]) > 0 and float(metrics["flow_loss"]) > 0
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 2
    before, after = state.params["mmdit"]["step_embedder_2"]["kernel"], new.params["mmdit"]["step_embedder_2"]["kernel"]
    assert float(jnp.abs(before).max()) == 0.0 and float(jnp.abs(after).max()) > 0.0  # the step input learns


@pytest.mark.parametrize("method", ["shortcut", "reflow"])
def test_full_size_stage3_plans_abstractly(method):
    """sd3_medium's stage 3 from shapes only (jax.eval_shape): the student's MM-DiT with its step
    embedder trains, the stage-1 codec is kept frozen."""
    from perco_jax.train import plan, shapes

    config = load_config("sd3_medium", [f"stage3.method={method}"])
    comp = shapes.abstract_components(config, stage=3)
    mmdit = comp.state.shapes.params["mmdit"]
    d = config.mmdit.num_attention_heads * config.mmdit.attention_head_dim
    assert mmdit["step_embedder_2"]["kernel"].shape == (d, d)
    assert set(comp.state.shapes.params) == {"mmdit"}
    p = plan.make_plan(config, plan.parse_mesh("data=8,fsdp=8"), stage=3, components=comp)
    assert p.stage == 3 and p.row("stage-1 codec (frozen)")[0] > 0
    assert p.row("params, trainable")[0] == sum(np.prod(x.shape) * 4 for x in jax.tree_util.tree_leaves(mmdit))


HELDOUT_SEED = 4242  # synthetic scenes that no training run draws (as test_train.py's)


@pytest.mark.xdist_group("learned_codecs")  # (see tests/conftest.py)
@pytest.mark.slow
def test_tiny_student_one_step_draws_the_teachers_pictures(few_step_codec):
    """The tiny config's stage 3 (the default decoder's pictures distilled, here 300 steps), on 64
    held-out scenes as a user decodes them (the default temperature): one step of the student lands
    much nearer the 20-step teacher than one plain guided step does, and its realism (which a 1-step
    decoder that follows the ODE loses) is close to the teacher's and well above the plain step's."""
    from perco_jax.eval.few_step import compare_decoders

    config, _, _, codec = few_step_codec
    assert codec.few_step["config"]["guidance"] == config.stage3.guidance
    teacher, plain, student = compare_decoders(codec, HELDOUT_SEED, n=64, steps=(1,))
    assert (plain["decoder"], student["decoder"]) == ("plain", "student (reflow)")
    summary = {r["decoder"]: (round(r["mse_to_teacher"], 5), round(r["realism"], 4), round(r["psnr"], 2))
               for r in (teacher, plain, student)}
    print("1 step against the teacher (MSE to teacher, realism, PSNR):", summary)  # (make test-slow -rP)
    assert student["mse_to_teacher"] < 0.8 * plain["mse_to_teacher"], summary
    assert student["realism"] > plain["realism"] + 0.005, summary
    assert student["realism"] > teacher["realism"] - 0.015, summary
    assert student["psnr"] > teacher["psnr"] - 0.5, summary


@pytest.mark.xdist_group("learned_codecs")  # (see tests/conftest.py)
@pytest.mark.slow
def test_codec_carries_the_few_step_decoder_and_the_bitstream_does_not_change(few_step_codec, learned_codec,
                                                                                tmp_path):
    from perco_jax.cli import main
    from perco_jax.data.synthetic import synthetic_example
    from perco_jax.images import load_image

    _, _, folder, codec = few_step_codec
    plain = learned_codec[2]
    assert codec.few_step_counts == (1, 2, 4) and plain.few_step_counts == ()
    assert codec.fingerprint == plain.fingerprint
    image, caption = synthetic_example(0, HELDOUT_SEED, codec.config.image_size)
    stream = codec.compress(image, caption)
    assert stream == plain.compress(image, caption)
    (tmp_path / "x.perco").write_bytes(stream)
    assert main(["decompress", "--checkpoint", str(folder), str(tmp_path / "x.perco"), "-o", str(tmp_path / "x.png"),
                 "--steps", "1"]) == 0
    got = load_image(tmp_path / "x.png")
    few, guided = (codec.decompress(stream, steps=1, sampler=s) for s in ("few_step", "teacher"))
    assert np.abs(got - few).max() <= 1 / 255 + 1e-6
    assert np.abs(got - guided).max() > 4 / 255
    assert np.array_equal(plain.decompress(stream, steps=1), guided)  # no few-step decoder: the guided sampler
    with pytest.raises(ValueError, match="no few-step decoder"):
        plain.decompress(stream, steps=1, sampler="few_step")


@pytest.mark.xdist_group("random_codec")  # (built once, see random_codec)
@pytest.mark.slow
def test_decoder_couplings_are_the_codecs_own_pictures(random_codec, tmp_path):
    """stage3.coupling_sampler=decoder: coupling g is the codec's sampler's picture (stochastic steps,
    fresh draws and starting noise at sample.temperature, keys fold_in(key(seed + 5), g)) of the
    stream's g-th image, and `noise` its scaled starting point; "ode" keeps the Euler ODE from unit
    noise. A folder drawn one way is refused by a run that asks for the other."""
    from perco_jax.codec.transforms import guided_latents, image_latents, initial_noise, noise_keys
    from perco_jax.data.pipeline import make_dataset
    from perco_jax.train import stage3
    from perco_jax.train.step import TOKEN_KEYS

    over = ("stage3.method=reflow", "stage3.couplings=4", "sample.steps=3", "sample.stochastic=True",
            "sample.temperature=0.5", "stage3.guidance=2.0")
    config = _stage3_config(over + ("stage3.coupling_sampler=decoder",))
    teacher, ae, pe, frozen = random_codec
    max_len = config.text.max_sequence_length

    def text_of(captions):
        tokens = pe.tokenize(captions, max_len)
        return {k: tokens[k] for k in TOKEN_KEYS if k in tokens}

    def draw(cfg, name):
        folder = stage3.make_couplings(cfg, tmp_path / name, teacher, ae, pe, frozen, text_of, progress=False)
        return {k: np.load(folder / f"{k}.npy") for k in ("noise", "latent", "indices")}

    got = draw(config, "decoder")
    batch = next(make_dataset(config))  # the stream's first 4 images (batch_size: stage3's)
    codec, ids = frozen["codec"], np.arange(4)
    indices = teacher.apply(codec, image_latents(ae, frozen["autoencoder"], jnp.asarray(batch["image"])),
                            method=teacher.encode)["indices"]
    np.testing.assert_array_equal(got["indices"], indices)
    codes = teacher.apply(codec, indices, method=teacher.lookup)
    captions = [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]
    cond = pe.encode_tokens(frozen["text"], text_of(captions), max_sequence_length=max_len)
    uncond = pe.encode_tokens(frozen["text"], text_of([""] * 4), max_sequence_length=max_len)
    unit = initial_noise(config.seed + 5, ids, got["noise"].shape[1:])
    np.testing.assert_allclose(got["noise"], 0.5 * np.asarray(unit), rtol=1e-6)

    def teacher_sampler(keys, temperature):
        return np.asarray(guided_latents(teacher, codec, codes, cond, uncond, unit, 2.0, steps=3,
                                         shift=float(config.scheduler_shift), keys=keys, temperature=temperature))

    want = teacher_sampler(noise_keys(config.seed + 5, ids), 0.5)
    np.testing.assert_allclose(got["latent"], want, atol=2e-5)
    ode_config = config.copy_and_resolve_references()
    ode_config.stage3.coupling_sampler = "ode"
    ode = draw(ode_config, "ode")
    np.testing.assert_allclose(ode["noise"], np.asarray(unit), rtol=1e-6)
    np.testing.assert_allclose(ode["latent"], teacher_sampler(None, 1.0), atol=2e-5)
    assert np.abs(ode["latent"] - got["latent"]).max() > 0.1
    with pytest.raises(build.ConfigError, match="holds couplings drawn with"):
        stage3.make_couplings(ode_config, tmp_path / "decoder", teacher, ae, pe, frozen, text_of, progress=False)


@pytest.mark.xdist_group("learned_codecs")  # (see tests/conftest.py)
@pytest.mark.slow
def test_reflow_straightens_the_flow(learned_stage1, learned_codec, tmp_path):
    """2-rectified flow on the teacher's couplings: the straightness E ||(x_1 - x_0) - v||^2 of the
    decoder's flow (20 Euler steps from held-out noise) falls well below the teacher's."""
    from perco_jax.eval.few_step import flow_straightness, heldout_scenes
    from perco_jax.train.export import export_codec
    from perco_jax.train.loop import train

    config, stage1 = learned_stage1
    s3 = load_config("tiny", ["stage=3", f"stage1_workdir={stage1}", f"autoencoder_workdir={config.autoencoder_workdir}",
                              "stage3.method=reflow", "stage3.couplings=128", "stage3.num_train_steps=150",
                              "stage3.reflow_fraction=1.0", "stage3.coupling_sampler=ode", "log_every_steps=50"])
    train(s3, tmp_path / "reflow", progress=False)
    assert (tmp_path / "reflow" / "couplings" / "done.json").exists()
    codec = export_codec(learned_codec[0], stage1, learned_codec[1].parent / "stage2", tmp_path / "reflow")
    assert codec.few_step["config"]["method"] == "reflow"
    _, images, captions = heldout_scenes(16, config.image_size, HELDOUT_SEED)
    before = flow_straightness(codec, images, captions, student=False, steps=20)
    after = flow_straightness(codec, images, captions, student=True, steps=20)
    assert after < 0.5 * before, (after, before)


def test_example_split_keeps_each_devices_examples():
    """The shortcut step's boot / flow-matching split takes the first j of every k consecutive
    examples (j / k = bootstrap_fraction), so a batch split over devices in blocks of a multiple of
    k splits within each block; join puts them back in place; a fraction no group fits falls back
    to the first nb examples."""
    from perco_jax.train.stage3 import ExampleSplit, pair, unpair

    a = jnp.arange(16)
    s = ExampleSplit(16, 0.25)
    assert (s.k, s.j, s.nb) == (4, 1, 4)
    assert s.boot(a).tolist() == [0, 4, 8, 12]
    assert s.fm(a).tolist() == [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15]
    assert s.join(s.boot(a), s.fm(a)).tolist() == list(range(16))
    for block in (4, 8, 16):  # each device's block of the batch holds its own boot examples
        assert sorted(int(i) // block for i in s.boot(a)) == sorted(
            i // block for i in range(16) if i % 4 == 0)
    odd = ExampleSplit(10, 0.25)  # 10 examples: no group of 4
    assert (odd.nb, odd.boot(jnp.arange(10)).tolist()) == (2, [0, 1])
    assert ExampleSplit(16, 0.0).nb == 0 and ExampleSplit(16, 0.0).fm(a).tolist() == list(range(16))
    x = jnp.arange(6).reshape(3, 2)
    assert pair(x, -x).tolist() == [[0, 1], [0, -1], [2, 3], [-2, -3], [4, 5], [-4, -5]]
    u, c = unpair(pair(x, -x))
    assert u.tolist() == x.tolist() and c.tolist() == (-x).tolist()
