import os

# Tests run on the CPU in float32; keep XLA from grabbing all cores' worth of threads per test.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests build the same tiny programs again (each `train` call jits a fresh step function):
# a persistent compilation cache, fresh for each session and removed after it, compiles each
# program once. Subprocess tests inherit it through the environment.
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # made here (workers inherit it): removed at exit
    import atexit  # noqa: E402
    import shutil  # noqa: E402

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="perco_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402

# Two tiny codecs, each trained once per session. The quick one (stage 0: QUICK_STAGE0_STEPS, stage 1:
# QUICK_STAGE1_STEPS) serves the tests of the mechanics (coding, the CLI, evaluation, export), which
# need a trained codec but not a good one; `make test` trains only this one. The learned one
# (stage 0: 1,000 steps, stage 1: 700) serves the slow tests that judge what training learned (the
# learning test, the autoencoder's quality, stage 3). Each: stage 2 for 100 steps on its indices,
# exported and reloaded. (`make demo` trains the same with the tiny config's full budget.)
# `make test` runs two pytest processes (pytest-xdist, --dist loadgroup), and session fixtures are
# per process: the tests of the quick codec are in xdist group "tiny_codecs", those of the learned
# ones in "learned_codecs", so each group's process trains its codecs once.
QUICK_STAGE0_STEPS, QUICK_STAGE1_STEPS = 300, 200

STAGE0_STEPS = 1000
STAGE1_OVERRIDES = ["num_train_steps=700", "log_every_steps=10", "checkpoint_every_steps=1000"]
QUICK_STAGE1 = [f"num_train_steps={QUICK_STAGE1_STEPS}", "log_every_steps=50", "checkpoint_every_steps=1000"]
CODEC_OVERRIDES = ["codec.coding_batch_size=8", "sample.steps=4", "entropy_model.width=64", "entropy_model.depth=2",
                   "stage2.num_train_steps=100", "stage2.batch_size=16"]


def pytest_configure(config):
    """`--dist loadgroup`: pytest-xdist's workers rename each test's id (`item._nodeid`) to carry its
    xdist_group, and the scheduler sends a group to one process. Where pytest reads the id from
    another field (pytest 9.2), the groups split silently and each process trains the shared codecs
    itself, for minutes: stop with one clear error instead."""
    import inspect

    if config.getoption("dist", "no") == "loadgroup" and "_nodeid" not in inspect.getsource(pytest.Item.nodeid.fget):
        raise pytest.UsageError(f"pytest {pytest.__version__} ignores pytest-xdist's test groups (--dist loadgroup): "
                                "install the pytest that setup.cfg pins (pip install -e '.[dev]')")


def _stage0(tmp_path_factory, steps: int):
    from perco_jax.config import load_config
    from perco_jax.train.loop import train

    work = tmp_path_factory.mktemp("stage0")
    config = load_config("tiny", ["stage=0", f"stage0.num_train_steps={steps}", "log_every_steps=100",
                                  "checkpoint_every_steps=10000"])
    train(config, work, progress=False)
    return config, work


def _stage1(stage0_run, tmp_path_factory, overrides: list[str]):
    from perco_jax.config import load_config
    from perco_jax.train.loop import train

    work = tmp_path_factory.mktemp("stage1")
    config = load_config("tiny", overrides + [f"autoencoder_workdir={stage0_run[1]}"])
    train(config, work, progress=False)
    return config, work


def _codec(stage1_run, tmp_path_factory):
    """Stage 2 on the stage-1 run, its config that run's plus CODEC_OVERRIDES."""
    from perco_jax.codec.codec import Codec
    from perco_jax.config import apply_override
    from perco_jax.train.export import export_codec
    from perco_jax.train.loop import train

    config, stage1 = stage1_run
    work = tmp_path_factory.mktemp("codec")
    config = config.copy_and_resolve_references()
    for item in CODEC_OVERRIDES + ["stage=2", f"stage1_workdir={stage1}"]:
        apply_override(config, item)
    train(config, work / "stage2", progress=False)
    export_codec(config, stage1, work / "stage2").save(work / "checkpoint")
    return config, work / "checkpoint", Codec.load(work / "checkpoint")


@pytest.fixture(scope="session")
def stage0_run(tmp_path_factory):
    """(config, workdir) of a finished quick stage-0 run (the tiny autoencoder, QUICK_STAGE0_STEPS)."""
    return _stage0(tmp_path_factory, QUICK_STAGE0_STEPS)


@pytest.fixture(scope="session")
def stage1_run(stage0_run, tmp_path_factory):
    """(config, workdir) of a finished quick stage-1 run of the tiny config on stage0_run's autoencoder."""
    return _stage1(stage0_run, tmp_path_factory, QUICK_STAGE1)


@pytest.fixture(scope="session")
def trained_codec(stage1_run, tmp_path_factory):
    """(config, codec folder, Codec): the quick codec, stage 2 trained on stage1_run, exported, loaded back."""
    return _codec(stage1_run, tmp_path_factory)


@pytest.fixture(scope="session")
def learned_stage0(tmp_path_factory):
    """(config, workdir) of a stage-0 run at the learning tests' budget (STAGE0_STEPS)."""
    return _stage0(tmp_path_factory, STAGE0_STEPS)


@pytest.fixture(scope="session")
def learned_stage1(learned_stage0, tmp_path_factory):
    """(config, workdir) of a stage-1 run at the learning tests' budget on learned_stage0's autoencoder."""
    return _stage1(learned_stage0, tmp_path_factory, STAGE1_OVERRIDES)


@pytest.fixture(scope="session")
def learned_codec(learned_stage1, tmp_path_factory):
    """(config, codec folder, Codec): stage 2 trained on learned_stage1, exported, loaded back."""
    return _codec(learned_stage1, tmp_path_factory)


@pytest.fixture(scope="session")
def few_step_codec(learned_stage1, learned_codec, tmp_path_factory):
    """(config, workdir, codec folder, Codec): stage 3 (the tiny config's: the default decoder's
    pictures distilled, here 300 steps) trained on learned_stage1, exported with learned_codec's
    stage 2 and loaded back."""
    from perco_jax.codec.codec import Codec
    from perco_jax.config import load_config
    from perco_jax.train.export import export_codec
    from perco_jax.train.loop import train

    config, stage1 = learned_stage1
    work = tmp_path_factory.mktemp("stage3")
    s3 = load_config("tiny", STAGE1_OVERRIDES + CODEC_OVERRIDES + [
        "stage=3", "stage3.num_train_steps=300", f"stage1_workdir={stage1}",
        f"autoencoder_workdir={config.autoencoder_workdir}"])
    train(s3, work / "stage3", progress=False)
    export_codec(learned_codec[0], stage1, learned_codec[1].parent / "stage2", work / "stage3").save(work / "checkpoint")
    return s3, work / "stage3", work / "checkpoint", Codec.load(work / "checkpoint")
