"""The training loop shared by every stage: sharded jit step on a device mesh, orbax
CheckpointManager (periodic + SIGTERM, keep-N, exact resume), clu metric writers and periodic
actions, a progress bar. config.stage picks what trains: 0 = the learned autoencoder
(`stage0.py`), 1 = the codec (`step.py`), 2 = the entropy model on the frozen stage-1 codec's
indices (`stage2.py`), 3 = the few-step decoder fine-tuned from the stage-1 decoder (`stage3.py`).

    train(config, workdir) -> final TrainState
"""
from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from tqdm.auto import tqdm

from perco_jax import build, parallel
from perco_jax.train.checkpoints import restore_target
from perco_jax.train.state import TrainState, count_params, make_optimizer
from perco_jax.train.step import TOKEN_KEYS, init_state, make_train_step


class _Preemption:
    """SIGTERM sets a flag; the loop saves at the next step boundary and stops."""

    def __init__(self):
        self.requested = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._old = None

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def load_pretrained_mmdit(config, state, shardings):
    """Replace the random MM-DiT with the converted one (zero z_l columns) from config.pretrained."""
    from perco_jax.checkpoint import load_weights
    from perco_jax.convert.transformer import config_from_diffusers
    from perco_jax.models.mmdit import mmdit_from_config

    configs, params = load_weights(config.pretrained, ["transformer"])
    pre = params["transformer"]
    kernel = pre["pos_embed"]["kernel"]
    want = state.params["mmdit"]["pos_embed"]["kernel"].shape
    if kernel.shape[2] < want[2]:  # add the zero-initialised z_l input columns
        pad = np.zeros(kernel.shape[:2] + (want[2] - kernel.shape[2], kernel.shape[3]), kernel.dtype)
        pre["pos_embed"]["kernel"] = np.concatenate([np.asarray(kernel), pad], axis=2)
    ours = jax.tree_util.tree_map(lambda x: x.shape, state.params["mmdit"])
    theirs = jax.tree_util.tree_map(lambda x: x.shape, pre)
    if ours != theirs:
        model = mmdit_from_config(config_from_diffusers(configs["transformer"]))
        raise build.ConfigError(f"pretrained={config.pretrained} holds a {model.num_layers}-layer, "
                                f"{model.inner_dim}-wide MM-DiT that does not match config.mmdit")
    params = dict(state.params, mmdit=pre)
    params = jax.device_put(params, shardings.params)
    ema = jax.device_put(params, shardings.ema_params) if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema)


def _checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options)


def _restore(mngr, state, shardings):
    step = mngr.latest_step()
    if step is None:
        return state, 0
    target = restore_target(state, shardings)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          data=ocp.args.JsonRestore()))
    logging.info("resumed from step %d", step)
    return restored.state, int(restored.data["examples_seen"])


def _save(mngr, state, examples_seen: int, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave({"examples_seen": examples_seen})), force=force)
    mngr.wait_until_finished()


def train(config, workdir: str | Path, *, progress: bool = True, stop_after: int | None = None) -> TrainState:
    """Train stage config.stage for its num_train_steps (resuming from workdir's latest checkpoint).

    `stop_after=N` behaves as a preemption after step N (save, stop): tests use it to check that
    an interrupted and resumed run equals an uninterrupted one.
    """
    from clu import metric_writers, periodic_actions  # (imports TensorFlow: only when training)

    from perco_jax.data.pipeline import make_dataset
    from perco_jax.train import stage0, stage2, stage3

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    build.validate(config)
    if config.stage in (2, 3):
        config = stage2.inherit_autoencoder(config, config.stage1_workdir)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    config = build.stage_config(config)
    mesh = parallel.make_mesh(config.mesh.to_dict())
    rules = parallel.rules_from_config(config.sharding_rules)
    model = stage3.student_model(config) if config.stage == 3 else build.build_perco(config)
    autoencoder = build.build_autoencoder(config)
    store = None
    if config.stage == 0:  # the autoencoder alone: no text
        prompt_encoder, text_params = None, {}
    elif not build.text_encoders_built(config):  # precomputed by `perco-jax embed-text`
        from perco_jax.text.store import TextEmbeddingStore

        store = TextEmbeddingStore(config.text.embeddings, config)
        prompt_encoder, text_params = None, {}
    else:
        prompt_encoder, text_params = _build_text(config, workdir)
    tx = make_optimizer(config)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)

    with jax.set_mesh(mesh):
        frozen = {"autoencoder": {} if config.stage == 0 else stage0.autoencoder_params(config, autoencoder),
                  "text": text_params}
        if config.stage == 0:
            state, shardings = stage0.init_state(config, autoencoder, tx, mesh, rules)
            postfix = {"psnr": "psnr"}
        elif config.stage == 1:
            state, shardings = init_state(config, model, tx, mesh, rules)
            postfix = {"loss": "loss", "usage": "codebook_usage"}
        elif config.stage == 2:
            frozen["codec"] = stage2.codec_params(stage2.restore_stage1(config, config.stage1_workdir, mesh, rules))
            state, shardings = stage2.init_state(config, build.build_entropy_model(config), tx, mesh, rules)
            postfix = {"bits/index": "bits_per_index"}
        else:
            frozen["codec"] = stage2.codec_params(stage2.restore_stage1(config, config.stage1_workdir, mesh, rules))
            state, shardings = stage3.init_state(config, model, tx, mesh, rules)
            postfix = {"loss": "loss"}
        mngr = _checkpoint_manager(workdir, config)
        state, examples_seen = _restore(mngr, state, shardings)
        if config.stage == 1 and examples_seen == 0 and config.pretrained:
            state = load_pretrained_mmdit(config, state, shardings)
        if config.stage == 3 and examples_seen == 0:
            state = stage3.start_from_teacher(state, frozen["codec"], shardings)
        frozen = parallel.place(frozen, frozen_shardings(config, frozen, prompt_encoder, autoencoder, mesh, rules))
        cache = store
        if store is None and config.text.cache:
            from perco_jax.text.cache import TextEmbeddingCache

            cache = TextEmbeddingCache(prompt_encoder, text_params, config.text.max_sequence_length, workdir)
        if cache is not None:
            e_ctx, e_pooled = cache([""])
            empty = {"context": jnp.asarray(e_ctx), "pooled": jnp.asarray(e_pooled)}
        elif prompt_encoder is None:
            empty = {}
        else:
            empty = {k: jnp.asarray(v[:1]) for k, v in
                     prompt_encoder.tokenize([""], config.text.max_sequence_length).items()}

        def text_of(captions):
            """The text inputs of a batch's captions: cached embeddings or token ids ({} without text)."""
            if cache is not None:
                ctx, pooled = cache(captions)
                return {"context": ctx, "pooled": pooled}
            if prompt_encoder is None:
                return {}
            tokens = prompt_encoder.tokenize(captions, config.text.max_sequence_length)
            return {k: tokens[k] for k in TOKEN_KEYS if k in tokens}

        keys = ("image",)
        data = None
        if config.stage == 3:
            keys = stage3.BATCH_KEYS[config.stage3.method]
        start = int(jax.device_get(state.step))
        # (a finished run draws none: resuming it with other sampler settings is not an error)
        if config.stage == 3 and config.stage3.method == "reflow" and start < config.num_train_steps:
            couplings = stage3.make_couplings(config, workdir / "couplings", build.build_perco(config), autoencoder,
                                              prompt_encoder, frozen, text_of, progress=progress)
            data = stage3.coupling_batches(couplings, config.batch_size, start_index=examples_seen,
                                           process_index=jax.process_index(), process_count=jax.process_count(),
                                           seed=config.seed)
        step_fn = jit_step(make_step(config, model, autoencoder, prompt_encoder, tx), shardings, mesh)
        writer.write_hparams({"stage": config.stage, "params_trainable_and_frozen": count_params(state.params),
                              "bpp_uniform": build.bits_per_pixel(config)})
        report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer)
        if data is None:
            data = make_dataset(config, process_index=jax.process_index(), process_count=jax.process_count(),
                                start_index=examples_seen)
        preempt = _Preemption()
        bar = tqdm(total=config.num_train_steps, initial=start, disable=not progress or jax.process_index() > 0,
                   desc=f"train stage {config.stage}", unit="step", dynamic_ncols=True)
        hist_path = workdir / "loss_history.json"  # (step, loss) pairs; a resumed run extends them
        history = [h for h in json.loads(hist_path.read_text()) if h[0] <= start] if hist_path.exists() else []
        try:
            for i in range(start, config.num_train_steps):
                local = next(data)
                captions = [c.decode() if isinstance(c, bytes) else str(c) for c in local["caption"]]
                batch = parallel.global_batch({**{k: local[k] for k in keys}, **text_of(captions)}, mesh)
                state, metrics = step_fn(state, batch, frozen, empty)
                examples_seen += config.batch_size
                done = i + 1
                report(done)
                if done % config.log_every_steps == 0 or done == config.num_train_steps:
                    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    scalars["bpp_uniform"] = build.bits_per_pixel(config)
                    writer.write_scalars(done, scalars)
                    history.append((done, scalars["loss"]))
                    bar.set_postfix({k: f"{scalars[m]:.4f}" for k, m in postfix.items()})
                bar.update(1)
                if done % config.checkpoint_every_steps == 0 or done == config.num_train_steps:
                    _save(mngr, state, examples_seen)
                    if cache is not None and cache is not store and jax.process_index() == 0:
                        cache.save()
                elif preempt.requested or mngr.reached_preemption(done) or done == stop_after:
                    _save(mngr, state, examples_seen, force=True)
                    logging.warning("preempted: saved step %d and stopped", done)
                    break
        finally:
            bar.close()
            preempt.restore()
            writer.flush()
            mngr.close()
    if jax.process_index() == 0:
        hist_path.write_text(json.dumps(history))
    return state


def make_step(config, model, autoencoder, prompt_encoder, tx):
    """The training step of config.stage: (state, batch, frozen, empty) -> (state, metrics); `model`
    is the stage-1 PerCo (stage 3: its student, `stage3.student_model`)."""
    from perco_jax.train import stage0, stage2, stage3

    if config.stage == 0:
        return stage0.make_train_step(autoencoder, config, tx)
    if config.stage == 1:
        return make_train_step(model, autoencoder, prompt_encoder, config, tx)
    if config.stage == 2:
        return stage2.make_train_step(build.build_entropy_model(config), model, autoencoder, prompt_encoder,
                                      config, tx)
    return stage3.make_train_step(model, autoencoder, prompt_encoder, config, tx)


def jit_step(step, shardings, mesh):
    """The step as the loop runs it: the state in and out on its shardings (donated), the batch
    split over the batch axes, the frozen params and the empty prompt where they were placed."""
    return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh), None, None),
                   out_shardings=(shardings, None), donate_argnums=(0,))


def _build_text(config, workdir: Path):
    """build.build_text. Without config.pretrained it writes the tiny tokenizers (made by code, the
    same every time) into the folder it is given: only process 0 writes them into workdir, which the
    processes of a multi-host run may share (a second writer could rewrite a file while the first
    reads it); the other processes make their own in a temporary folder."""
    if jax.process_index() == 0 or config.pretrained:
        return build.build_text(config, workdir)
    with tempfile.TemporaryDirectory(prefix="perco_jax_tokenizers_") as tmp:
        return build.build_text(config, tmp)


def frozen_shardings(config, frozen: dict, prompt_encoder, autoencoder, mesh, rules) -> dict:
    """Shardings of the frozen params {"autoencoder", "text"[, "codec"]}: the VAE and the text
    encoders by the logical axes their modules declare (T5-XXL's 4.7B parameters are split over
    fsdp / tensor like the trained model's; config.frozen_placement = "replicated" keeps a full copy
    on every device instead), the stage-1 codec as it was restored."""
    if config.frozen_placement == "replicated":
        out = {k: jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), frozen[k]) for k in ("text", "autoencoder")}
    else:
        out = {"text": parallel.text_shardings(prompt_encoder, frozen["text"], mesh, rules), "autoencoder": {}}
        if frozen["autoencoder"]:
            x = jnp.zeros((1, autoencoder.downsample_factor, autoencoder.downsample_factor, 3))
            out["autoencoder"] = parallel.module_shardings(autoencoder, (x,), frozen["autoencoder"], mesh, rules)
    if "codec" in frozen:
        out["codec"] = jax.tree_util.tree_map(lambda x: x.sharding, frozen["codec"])
    return out
