"""Stage 3: few-step decoding. The stage-1 decoder (the MM-DiT with its z_l input and the caption)
of the run in config.stage1_workdir is fine-tuned so that 1 to 4 sampler steps decode, with one
model pass per step (the caption's guidance is trained in). Its MM-DiT gets a step-size input
(`models.perco.with_step_conditioning`, zero-initialised: the model is the teacher at step 0);
the hyper-encoder, VQ and entropy model stay as they are, so the bitstream does not change.

config.stage3.method picks how:

- "shortcut" (Frans et al. 2024, "One Step Diffusion via Shortcut Models"): each batch trains flow
  matching at d = 0 (the instantaneous velocity, captions dropped as in stage 1) and, on
  `bootstrap_fraction` of its examples, self-consistency: the prediction for a step of d equals the
  two steps of d / 2 of the model itself (`flow.two_step_target`, no gradient through the target),
  for d = 1, 1/2, ..., 2^-levels on the sampler's grid in base time (SD3's sigma = shift(u): the
  sampler of N steps runs u = 1 -> 0 in steps of 1/N). At the finest level the two half steps are
  the instantaneous velocity with classifier-free guidance (stage3.guidance), so every coarser level
  learns the guided flow. No teacher sampling.
- "reflow" (Liu et al. 2023, "Flow Straight and Fast"): `make_couplings` draws stage3.couplings pairs
  (noise, latent) once with the guided teacher sampler (sample.steps, stage3.guidance) for the
  training stream's first images (their z_l and captions); the first `reflow_fraction` of the steps
  train the 2-rectified flow on the straight lines between each pair (d = 0, target noise - latent,
  sigma drawn as in stage 1); the rest distil it to each k of stage3.steps: d = 1 / k at the k grid
  points of the k-step sampler, on the same lines, so k steps land on the teacher's sample.

    batch (shortcut) = stage 1's: {"image": [B, H, W, 3] in [-1, 1]} + token ids or cached embeddings
    batch (reflow)   = {"noise", "latent": [B, h, w, C], "indices": [B, g, g]} + the same text inputs
    train_step(state, batch, frozen, empty) -> (state, metrics); frozen = {"codec": the stage-1
    codec (codec_params), "autoencoder", "text"}; state.params = {"mmdit": the student's MM-DiT}
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from perco_jax import build, flow, parallel
from perco_jax.config import read_saved_config
from perco_jax.models.perco import with_step_conditioning
from perco_jax.codec.transforms import few_step_codec, guided_latents, image_latents, text_context
from perco_jax.train.state import TrainState, ema_update, fresh_state, sharded_init, step_key
from perco_jax.train.step import TOKEN_KEYS, init_variables

BATCH_KEYS = {"shortcut": ("image",), "reflow": ("noise", "latent", "indices")}
COUPLING_ARRAYS = ("noise", "latent", "indices")


def few_step_guidance(config) -> float:
    """The guidance scale the few-step decoder learns: stage3.guidance, or sample.guidance (the
    teacher's) when it is None (as `config.complete` sets it in a config that predates the field)."""
    g = config.stage3.guidance
    return float(config.sample.guidance if g is None else g)


def student_model(config):
    """The stage-3 model: the stage-1 PerCo whose MM-DiT takes the step size."""
    return with_step_conditioning(build.build_perco(config))


def init_state(config, student, tx, mesh, rules, abstract: bool = False):
    """(state, shardings): a fresh sharded stage-3 TrainState, params {"mmdit"} (random: the loop
    starts it from the teacher with `start_from_teacher`); abstract=True: ShapeDtypeStructs only."""
    def make(rng):
        k_init, k_state = jax.random.split(rng)
        mmdit = init_variables(config, student, k_init)["params"]["mmdit"]
        return fresh_state({"mmdit": mmdit}, tx, config, None, k_state)

    return sharded_init(make, jax.random.PRNGKey(config.seed + 4), mesh, rules, abstract)


def start_from_teacher(state: TrainState, codec: dict, shardings) -> TrainState:
    """The step-0 state: the teacher's MM-DiT weights, with the new step embedder as initialised
    (its output layer is zero, so the student's velocity is the teacher's for every step size)."""
    mmdit = dict(state.params["mmdit"], **codec["params"]["mmdit"])

    def place(tree, sharding):  # own buffers: the step donates the state's, the teacher's stay
        return jax.tree_util.tree_map(lambda x, sh: jax.device_put(jnp.array(x, copy=True), sh), tree, sharding)

    params = place({"mmdit": mmdit}, shardings.params)
    ema = place(params, shardings.ema_params) if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema)


def reflow_steps(config) -> int:
    """Steps of 2-rectified flow before the distillation (method reflow)."""
    return int(round(config.stage3.num_train_steps * config.stage3.reflow_fraction))


def make_train_step(student, autoencoder, prompt_encoder, config, tx):
    """(state, batch, frozen, empty) -> (state, metrics) of config.stage3.method."""
    if config.stage3.method == "shortcut":
        return _shortcut_step(student, autoencoder, prompt_encoder, config, tx)
    return _reflow_step(student, prompt_encoder, config, tx)


def _text(prompt_encoder, frozen, batch, empty, b, max_len):
    """(cond, uncond): (context, pooled) of the batch's captions and of the empty prompt, [b, ...]."""
    given = {k: batch[k] for k in ("context", "pooled", *TOKEN_KEYS) if k in batch}
    cond = text_context(prompt_encoder, frozen["text"], given, max_sequence_length=max_len)
    empty = {k: jnp.broadcast_to(v, (b,) + v.shape[1:]) for k, v in empty.items()}
    uncond = text_context(prompt_encoder, frozen["text"], empty, max_sequence_length=max_len)
    return jax.lax.stop_gradient(cond), jax.lax.stop_gradient(uncond)


def _training_shift(config) -> float:
    return flow.resolution_shift(config.image_size, config.image_size) if config.sigma_sampling.resolution_shift else 1.0


def _sigmas(config, key, n):
    """Stage 1's training sigmas [n] (the d = 0 examples)."""
    ss = config.sigma_sampling
    return flow.sample_sigmas(key, n, scheme=ss.scheme, mean=ss.mean, std=ss.std, shift=_training_shift(config))


def _update(state: TrainState, grads, config, tx) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema_params is None else ema_update(state.ema_params, params, config.ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


class ExampleSplit:
    """The split of a batch of b examples into nb self-consistency ("boot") examples and b - nb flow-
    matching ("fm") ones, chosen so that each device keeps its own: the batch is taken in groups of
    k consecutive examples, the first j of each group boot (j / k = bootstrap_fraction), so with the
    batch split over the mesh in blocks whose size k divides, `boot` / `fm` / `join` are reshapes
    and slices within each device's block. (Taking the first nb examples of the global batch, as
    before, put them on a quarter of the devices: the TPU compile of SD3-medium's stage 3 on v5e-256
    moved 106 GiB between chips per step.) When no group size fits b, one group of b: the first nb.

        boot(a [b, ...]) -> [nb, ...];  fm(a) -> [b - nb, ...];  join(boot, fm) -> [b, ...]
    """

    def __init__(self, b: int, fraction: float):
        from fractions import Fraction

        self.b = b
        self.nb = int(round(b * float(fraction)))
        f = Fraction(float(fraction)).limit_denominator(b)
        k, j = f.denominator, f.numerator
        if b % k or self.nb != b // k * j:
            k, j = b, self.nb
        self.k, self.j = k, j

    def _groups(self, a):
        return a.reshape((self.b // self.k, self.k) + a.shape[1:])

    def boot(self, a):
        return self._groups(a)[:, :self.j].reshape((self.nb,) + a.shape[1:])

    def fm(self, a):
        return self._groups(a)[:, self.j:].reshape((self.b - self.nb,) + a.shape[1:])

    def join(self, boot, fm):
        g = self.b // self.k
        parts = (boot.reshape((g, self.j) + boot.shape[1:]), fm.reshape((g, self.k - self.j) + fm.shape[1:]))
        return jnp.concatenate(parts, axis=1).reshape((self.b,) + boot.shape[1:])


def pair(a_u, a_c):
    """[2n, ...] of the (uncond, cond) pair of each of n examples, interleaved: each device keeps its
    examples' pairs (a concatenation [uncond; cond] would move half of every device's rows)."""
    return jnp.stack([a_u, a_c], axis=1).reshape((-1,) + a_u.shape[1:])


def unpair(v):
    """(v_u, v_c) [n, ...] of `pair`'s layout [2n, ...]."""
    v = v.reshape((-1, 2) + v.shape[1:])
    return v[:, 0], v[:, 1]


def _shortcut_step(student, autoencoder, prompt_encoder, config, tx):
    s3 = config.stage3
    shift = float(config.scheduler_shift)   # the sampler's: the grid the few-step decoder runs on
    detail = float(config.loss_detail)  # stage 1's weighting for the flow-matching part
    finest = 2.0 ** -int(s3.levels)
    guidance = few_step_guidance(config)
    max_len = config.text.max_sequence_length
    p_drop = float(config.text.caption_dropout)

    def train_step(state: TrainState, batch: dict, frozen: dict, empty: dict):
        b = batch["image"].shape[0]
        split = ExampleSplit(b, s3.bootstrap_fraction)  # the self-consistency examples, per device
        nb = split.nb
        k_drop, k_sigma, k_noise, k_boot = (step_key(state, i) for i in range(4))
        codec = frozen["codec"]
        x0 = parallel.map_batch_chunks(lambda x: image_latents(autoencoder, frozen["autoencoder"], x),
                                       batch["image"], build.autoencoder_chunk(config))
        indices = student.apply(codec, x0, method=student.encode)["indices"]
        codes = student.apply(codec, indices, method=student.lookup)
        cond, uncond = _text(prompt_encoder, frozen, batch, empty, b, max_len)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)

        # flow matching at d = 0 (split.fm's examples), captions dropped as in stage 1
        drop = jax.random.uniform(k_drop, (b - nb,)) < p_drop
        fm_ctx = jnp.where(drop[:, None, None], split.fm(uncond[0]), split.fm(cond[0]))
        fm_pooled = jnp.where(drop[:, None], split.fm(uncond[1]), split.fm(cond[1]))
        sigma_fm = _sigmas(config, k_sigma, b - nb)

        # self-consistency (split.boot's examples): one step of d = two steps of d / 2 of the current model
        d_boot, u_boot = flow.shortcut_steps(k_boot, nb, int(s3.levels))
        sigma_boot = flow.shift_sigmas(u_boot, shift)
        x_boot = flow.interpolate(split.boot(x0), split.boot(noise), sigma_boot)
        codes_boot = split.boot(codes)
        target_codec = jax.lax.stop_gradient(few_step_codec(codec, state.params["mmdit"]))

        def half_steps(x, t, d):
            label = jnp.where(d < finest, 0.0, d)          # below the finest level: the d -> 0 model,
            g = jnp.where(label == 0, guidance, 1.0)       # guided; coarser levels are guided already
            v = student.apply(target_codec, pair(x, x), pair(t, t), pair(codes_boot, codes_boot),
                              pair(split.boot(uncond[0]), split.boot(cond[0])),
                              pair(split.boot(uncond[1]), split.boot(cond[1])), pair(label, label),
                              method=student.velocity)
            v_u, v_c = unpair(v.astype(jnp.float32))
            return v_u + g[:, None, None, None] * (v_c - v_u)

        target = jax.lax.stop_gradient(flow.two_step_target(half_steps, x_boot, u_boot, d_boot / 2, shift))

        x_t = split.join(x_boot, flow.interpolate(split.fm(x0), split.fm(noise), sigma_fm))
        sigma = split.join(sigma_boot, sigma_fm)
        d = split.join(d_boot, jnp.zeros((b - nb,)))
        ctx = split.join(split.boot(cond[0]), fm_ctx)
        pooled = split.join(split.boot(cond[1]), fm_pooled)

        def loss_fn(params):
            v = student.apply(few_step_codec(codec, params["mmdit"]), x_t, sigma * 1000.0, codes, ctx, pooled, d,
                              method=student.velocity)
            fm = (flow.flow_matching_loss(split.fm(v), split.fm(x0), split.fm(noise), sigma_fm, config.loss_weighting,
                                          detail) if nb < b else jnp.float32(0))
            sc = jnp.mean(jnp.square(split.boot(v).astype(jnp.float32) - target)) if nb else jnp.float32(0)
            return (nb * sc + (b - nb) * fm) / b, (fm, sc)

        # the targets' forward passes end before the training pass starts: without the barrier XLA:TPU
        # interleaves them with it (SD3-medium on v5e-256, 24 a chip: 3.2 GiB more a chip)
        target, params = jax.lax.optimization_barrier((target, state.params))
        (loss, (fm, sc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return _update(state, grads, config, tx), {"loss": loss, "flow_loss": fm, "consistency_loss": sc,
                                                   "grad_norm": optax.global_norm(grads)}

    return train_step


def _reflow_step(student, prompt_encoder, config, tx):
    s3 = config.stage3
    shift = float(config.scheduler_shift)
    ks = jnp.asarray(tuple(int(k) for k in s3.steps), jnp.int32)
    n_reflow = reflow_steps(config)
    max_len = config.text.max_sequence_length

    def train_step(state: TrainState, batch: dict, frozen: dict, empty: dict):
        noise, x1 = batch["noise"].astype(jnp.float32), batch["latent"].astype(jnp.float32)
        b = noise.shape[0]
        k_sigma, k_k, k_m = (step_key(state, i) for i in range(3))
        codec = frozen["codec"]
        codes = student.apply(codec, batch["indices"], method=student.lookup)
        cond, _ = _text(prompt_encoder, frozen, batch, empty, b, max_len)
        # 2-rectified flow: anywhere on the line, d = 0; distillation: the k-step sampler's grid, d = 1/k
        k = ks[jax.random.randint(k_k, (b,), 0, ks.shape[0])].astype(jnp.float32)
        u = 1.0 - jnp.floor(jax.random.uniform(k_m, (b,)) * k) / k
        reflow = state.step < n_reflow
        sigma = jnp.where(reflow, _sigmas(config, k_sigma, b), flow.shift_sigmas(u, shift))
        d = jnp.where(reflow, 0.0, 1.0 / k)
        x_t = flow.interpolate(x1, noise, sigma)

        def loss_fn(params):
            v = student.apply(few_step_codec(codec, params["mmdit"]), x_t, sigma * 1000.0, codes, cond[0], cond[1], d,
                              method=student.velocity)
            return flow.flow_matching_loss(v, x1, noise, sigma)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return _update(state, grads, config, tx), {"loss": loss, "distilling": 1.0 - reflow.astype(jnp.float32),
                                                   "grad_norm": optax.global_norm(grads)}

    return train_step


# ----------------------------------------------------------------------------- reflow couplings

def make_couplings(config, folder: str | Path, model, autoencoder, prompt_encoder, frozen: dict, text_of, *,
                   progress: bool = True) -> Path:
    """Draw config.stage3.couplings (noise, latent) pairs with the guided teacher sampler
    (sample.steps, stage3.guidance, scheduler_shift) for the training stream's first images, and
    write folder/{noise, latent, indices}.npy [N, ...] and captions.json (done.json last, with
    `coupling_settings`: a folder that has it is reused if they match, refused if not).
    stage3.coupling_sampler "ode": the Euler ODE from unit noise; "decoder": the codec's sampler
    (sample.stochastic, sample.temperature), and `noise` is its scaled starting point, the input of
    the student's first step. model: the stage-1 PerCo (the teacher, without the step input);
    frozen: {"codec", "autoencoder", "text"};
    text_of(captions) -> the text inputs of a batch (token ids or {"context", "pooled"}).
    Example g's noise and keys (`noise_keys`): fold_in(key(seed + 5), g)."""
    from tqdm.auto import tqdm

    from perco_jax.data.pipeline import make_dataset
    from perco_jax.codec.transforms import initial_noise, noise_keys

    folder = Path(folder)
    settings = coupling_settings(config)
    if (folder / "done.json").exists():
        # (a folder from before the sampler was recorded holds ODE couplings)
        saved = {"sampler": "ode", "stochastic": False, "temperature": 1.0,
                 **json.loads((folder / "done.json").read_text())}
        if any(saved.get(k) != v for k, v in settings.items()):
            raise build.ConfigError(f"{folder} holds couplings drawn with {saved}, this run asks for {settings}: "
                                    "move that folder away (or restore the settings that drew it)")
        return folder
    if jax.process_count() > 1:
        raise build.ConfigError("stage3.method=reflow draws its couplings in one process: run stage 3 once "
                                "with one process to write WORKDIR/couplings, then resume it on many")
    folder.mkdir(parents=True, exist_ok=True)
    s3 = config.stage3
    n, bs = int(s3.couplings), int(s3.batch_size)
    side, channels = build.latent_geometry(config)
    g = config.codec.grid_side
    data_config = config.copy_and_resolve_references()
    data_config.batch_size = bs
    data = make_dataset(data_config)
    empty = text_of([""])
    max_len = config.text.max_sequence_length
    stochastic, temperature = settings["stochastic"], settings["temperature"]

    @jax.jit
    def draw(images, text, noise, keys):
        codec = frozen["codec"]
        indices = model.apply(codec, image_latents(autoencoder, frozen["autoencoder"], images),
                              method=model.encode)["indices"]
        codes = model.apply(codec, indices, method=model.lookup)
        b = images.shape[0]
        cond, uncond = _text(prompt_encoder, frozen, text, empty, b, max_len)
        latents = guided_latents(model, codec, codes, cond, uncond, noise, jnp.float32(few_step_guidance(config)),
                                 steps=int(config.sample.steps), shift=float(config.scheduler_shift),
                                 keys=keys if stochastic else None, temperature=temperature)
        return latents, indices

    out = {"noise": np.lib.format.open_memmap(folder / "noise.npy", "w+", np.float32, (n, side, side, channels)),
           "latent": np.lib.format.open_memmap(folder / "latent.npy", "w+", np.float32, (n, side, side, channels)),
           "indices": np.lib.format.open_memmap(folder / "indices.npy", "w+", np.int32, (n, g, g))}
    captions: list[str] = []
    for start in tqdm(range(0, n, bs), desc="stage 3: teacher couplings", unit="batch", disable=not progress):
        local = next(data)
        m = min(bs, n - start)
        caps = [c.decode() if isinstance(c, bytes) else str(c) for c in local["caption"]]
        ids = np.arange(start, start + bs)
        noise = initial_noise(config.seed + 5, ids, (side, side, channels))
        latents, indices = jax.device_get(draw(jnp.asarray(local["image"]), text_of(caps), noise,
                                               noise_keys(config.seed + 5, ids)))
        out["noise"][start:start + m] = temperature * np.asarray(noise)[:m]
        out["latent"][start:start + m] = latents[:m]
        out["indices"][start:start + m] = indices[:m]
        captions += caps[:m]
    for a in out.values():
        a.flush()
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "done.json").write_text(json.dumps(settings))
    return folder


def coupling_settings(config) -> dict:
    """What the couplings of config.stage3 are drawn with (make_couplings writes it to done.json):
    {"couplings", "steps", "guidance", "sampler", "stochastic", "temperature"}; sampler "ode" is the
    Euler ODE at temperature 1."""
    decoder = config.stage3.coupling_sampler == "decoder"
    return {"couplings": int(config.stage3.couplings), "steps": int(config.sample.steps),
            "guidance": few_step_guidance(config), "sampler": str(config.stage3.coupling_sampler),
            "stochastic": decoder and bool(config.sample.stochastic),
            "temperature": float(config.sample.temperature) if decoder else 1.0}


def coupling_batches(folder: str | Path, batch_size: int, *, start_index: int = 0, process_index: int = 0,
                     process_count: int = 1, seed: int = 0):
    """Endless per-process batches {"noise", "latent", "indices", "caption"} of the couplings in
    `folder`, as make_dataset numbers its stream: global position p is coupling perm_e[p mod N]
    (e = p // N, a permutation per epoch seeded by (seed, e)); process i takes its slice of each
    global batch; start_index skips the positions already trained on (exact resume)."""
    folder = Path(folder)
    arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in COUPLING_ARRAYS}
    captions = np.asarray(json.loads((folder / "captions.json").read_text()))
    n = len(captions)
    per_host = batch_size // process_count
    perms: dict[int, np.ndarray] = {}
    step = start_index // batch_size
    while True:
        pos = step * batch_size + process_index * per_host + np.arange(per_host)
        rows = []
        for p in pos:
            e = int(p) // n
            if e not in perms:
                perms.clear()
                perms[e] = np.random.default_rng((seed, e)).permutation(n)
            rows.append(perms[e][int(p) % n])
        rows = np.asarray(rows)
        yield {**{k: np.asarray(a[rows]) for k, a in arrays.items()}, "caption": captions[rows]}
        step += 1


# ----------------------------------------------------------------------------- export

def few_step_settings(config) -> dict:
    """What a codec needs to know of its few-step decoder (saved beside its params)."""
    s3 = config.stage3
    return {"method": str(s3.method), "steps": [int(k) for k in s3.steps], "guidance": few_step_guidance(config),
            "levels": int(s3.levels)}


def restore_few_step(config, stage3_workdir: str | Path) -> dict:
    """{"params": the student's MM-DiT (EMA when kept), "config": few_step_settings} of the latest
    checkpoint of a stage-3 run, which must have trained on this codec (its config sections)."""
    from perco_jax import parallel
    from perco_jax.train.checkpoints import restore_latest
    from perco_jax.train.stage2 import check_stage1_config
    from perco_jax.train.state import make_optimizer

    stage3_workdir = Path(stage3_workdir)
    check_stage1_config(config, stage3_workdir)
    saved = read_saved_config(stage3_workdir / "config.json")
    c3 = config.copy_and_resolve_references()
    c3.stage, c3.stage3 = 3, saved["stage3"]
    c3.stage1_workdir = c3.stage1_workdir or saved["stage1_workdir"]
    c3.sample.guidance = saved["sample"]["guidance"]
    c3.trainable = saved["trainable"]
    c3 = build.stage_config(c3)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    rules = parallel.rules_from_config(c3.sharding_rules)
    abstract, shardings = init_state(c3, student_model(c3), make_optimizer(c3), mesh, rules, abstract=True)
    state = restore_latest(stage3_workdir, abstract, shardings)
    if state is None:
        raise build.ConfigError(f"{stage3_workdir} has no stage-3 checkpoint: train stage 3 first")
    params = state.inference_params
    return {"params": jax.device_get(params["mmdit"]), "config": few_step_settings(c3)}
