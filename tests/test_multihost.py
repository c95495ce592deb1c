"""Multi-device and multi-host training on the CPU, cheaply: three processes run side by side.

Two processes joined by `jax.distributed` (loopback coordinator; JAX's default CPU collectives,
gloo), 4 simulated devices each, train the tiny config on a data=4 x fsdp=2 mesh over their 8
devices (params sharded over fsdp), each reading its own half of every global batch; a third
process, with 8 devices, trains the same on 1 of them and then on the meshes data 8 x 1,
data 2 x fsdp 4 and data 2 x fsdp 2 x tensor 2. Then:

- the checkpoint the two processes saved is restored onto a 4-device mesh (data=2 x fsdp=2, fsdp
  across the processes) by the two processes and onto 1 device by this process: the whole
  TrainState comes back bit-identical, laid out on the new meshes;
- the two processes' params agree with the single process's; only process 0 wrote the run's files;
- every mesh of the third process gives the single device's params, with params and frozen text
  encoders split over fsdp / tensor where the mesh has them.

This file is also the processes' script (`python test_multihost.py ROOT OVERRIDES (ID PORT | meshes)`).
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# test_train's FAST overrides (one layer per network) plus 2 steps of a global batch of 8 (4 per
# process, 1 per device).
RUN = ["num_train_steps=2", "batch_size=8"]
MESH = ["mesh.data=4", "mesh.fsdp=2"]
# the third process's meshes over 8 devices (4 x 2 is the two processes' mesh)
MESHES = {"8x1": ["mesh.data=8"], "2x4": ["mesh.data=2", "mesh.fsdp=4"],
          "2x2x2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}
# LLVM's optimisation level 0 (the same in the three processes) compiles about a third faster than
# the default, and compiling is most of this file's time; the tiny programs run slower, no matter.
XLA_FLAGS = "--xla_force_host_platform_device_count={} --xla_backend_optimization_level=0"
TIMEOUT = 480  # seconds, for the four processes (about 1.5 minutes on 2 cores)
REPO = Path(__file__).resolve().parents[1]
FIELDS = ("params", "opt_state", "ema_params", "vq_state")
pytestmark = pytest.mark.slow  # (about two minutes: `make test-slow`)


def _flat(tree) -> dict:
    """{path: leaf} of a pytree."""
    import jax

    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _local_copy(x) -> np.ndarray:
    """The whole of a global array from this process's own shards (which must cover it)."""
    out = np.zeros(x.shape, x.dtype)
    covered = np.zeros(x.shape, bool)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
        covered[shard.index] = True
    assert covered.all(), f"this process's shards of {x.sharding} do not cover the array"
    return out


def _num_split(tree) -> int:
    """How many arrays of the tree each device holds only a part of."""
    import jax

    return sum(x.sharding.shard_shape(x.shape) != x.shape for x in jax.tree_util.tree_leaves(tree))


def _check_restored(restored, shardings, saved: dict, devices) -> None:
    """restored (this process's shards) equals saved bit for bit and lies on the expected shardings."""
    import jax

    got, want = _flat(restored), _flat(shardings)
    assert sorted(got) == sorted(want) == sorted(saved), (sorted(got), sorted(want), sorted(saved))
    for k, x in got.items():
        assert x.sharding.is_equivalent_to(want[k], x.ndim), (k, x.sharding, want[k])
        assert x.sharding.device_set == set(devices), (k, x.sharding.device_set)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), saved[k][shard.index], err_msg=k)
    for field in FIELDS:
        assert jax.tree_util.tree_leaves(getattr(restored, field)), f"no {field} restored"


def _abstract_state(config, mesh):
    from perco_jax import build, parallel
    from perco_jax.train.step import init_state
    from perco_jax.train.state import make_optimizer

    config = build.stage_config(config)
    return init_state(config, build.build_perco(config), make_optimizer(config), mesh,
                      parallel.rules_from_config(config.sharding_rules), abstract=True)


# ---------------------------------------------------------------- the processes

def _meshes(root: Path, overrides: list[str]) -> None:
    """The same training in one process: on its first device, then on 8 devices per mesh of MESHES."""
    import jax

    from perco_jax import parallel
    from perco_jax.config import load_config
    from perco_jax.train.loop import train

    assert jax.device_count() == 8
    state = train(load_config("tiny", overrides + ["mesh.data=1"]), root / "one", progress=False)
    np.savez(root / "one_params.npz", **{k: np.asarray(x) for k, x in _flat(state.params).items()})
    placed = {}
    place = parallel.place

    def recording_place(tree, shardings):  # the training loop places the frozen params with it
        out = place(tree, shardings)
        placed["text"] = _num_split(out["text"])
        return out

    parallel.place = recording_place
    info = {}
    for name, mesh in MESHES.items():
        state = train(load_config("tiny", overrides + mesh), root / f"mesh_{name}", progress=False)
        np.savez(root / f"mesh_{name}.npz", **{k: np.asarray(x) for k, x in _flat(state.params).items()})
        info[name] = {"split_params": _num_split(state.params), "split_text": placed.pop("text")}
    (root / "meshes.json").write_text(json.dumps(info))


def _record_writes() -> list[str]:
    """Record every file this (Python) process opens for writing from now on."""
    import builtins
    import pathlib

    written: list[str] = []
    real_open, real_path_open = builtins.open, pathlib.Path.open

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+"):
            written.append(os.path.abspath(file))
        return real_open(file, mode, *args, **kwargs)

    def path_open(self, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            written.append(os.path.abspath(self))
        return real_path_open(self, mode, *args, **kwargs)

    builtins.open, pathlib.Path.open = open_, path_open
    return written


def _process(root: Path, overrides: list[str], process_id: int, port: int) -> None:
    """One of the two processes: train on 8 devices, restore on 4, write what the tests check."""
    import jax

    # (not jax_share_binary_between_hosts: with it, JAX 0.10.2's first CPU collective fails with
    # "Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120, shutdown_timeout_seconds=30)
    import perco_jax.data.pipeline as pipeline
    from perco_jax import parallel
    from perco_jax.config import load_config
    from perco_jax.train.checkpoints import restore_latest
    from perco_jax.train.loop import train

    assert (jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count()) == \
        (process_id, 2, 8, 4)
    written = _record_writes()
    read = []  # the global positions of the examples this process fed to training
    make_dataset = pipeline.make_dataset

    def recording(*args, **kwargs):
        for batch in make_dataset(*args, **kwargs):
            read.append(batch["index"].tolist())
            yield batch

    pipeline.make_dataset = recording  # (train imports it when it starts)
    work = (root / "two").absolute()
    config = load_config("tiny", overrides + MESH)
    state = train(config, work, progress=False)
    assert int(state.step) == 2 and state.ema_params is not None
    # data x fsdp = 4 x 2 over [4 devices of process 0, 4 of process 1]: fsdp pairs lie within a
    # process, so each process holds the whole state (in halves on its devices)
    saved = {k: _local_copy(x) for k, x in _flat(state).items()}
    if process_id == 0:
        np.savez(root / "saved.npz", **saved)
    info = {"pid": os.getpid(), "read": read, "split_when_saved": _num_split(state.params)}

    # restore on 4 devices, two of each process, with fsdp across the processes
    local = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
    four = [local[0][0], local[1][0], local[0][1], local[1][1]]
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2}, four)
    assert [[d.process_index for d in row] for row in mesh.devices[:, :, 0]] == [[0, 1], [0, 1]], mesh
    with jax.set_mesh(mesh):
        abstract, shardings = _abstract_state(config, mesh)
        restored = restore_latest(work, abstract, shardings)
    _check_restored(restored, shardings, saved, four)
    info["split_on_four"] = _num_split(restored)
    info["written"] = sorted({p for p in written if p.startswith(str(work) + os.sep)
                              and not p.startswith(str(work / "checkpoints") + os.sep)})
    (root / f"process{process_id}.json").write_text(json.dumps(info))


# ---------------------------------------------------------------- the tests

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _finish(runs, names: list[str]) -> None:
    """Wait for the named processes; fail with their logs if one fails or time runs out (once one
    has failed, the others get a few seconds: a peer would otherwise wait for it)."""
    root, procs, deadline = runs["root"], runs["procs"], runs["deadline"]
    while time.monotonic() < deadline:
        codes = [procs[n].poll() for n in names]
        if None not in codes:
            break
        if any(c not in (None, 0) for c in codes):
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.2)
    killed = [n for n in names if procs[n].poll() is None]
    for n in killed:
        procs[n].kill()
        procs[n].wait()
    if killed or any(procs[n].returncode for n in names):
        logs = "\n".join(f"===== {n}: exit code {procs[n].returncode}{' (killed)' if n in killed else ''}\n"
                         + (root / f"{n}.log").read_text(errors="replace")[-6000:] for n in names)
        pytest.fail(f"a subprocess failed or timed out:\n{logs}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{root, procs: {name: Popen}, deadline, overrides}: the two processes of the distributed run
    ("process0", "process1") and the single-process runs on 1 device and on MESHES ("meshes"),
    started together."""
    from test_train import FAST

    root = tmp_path_factory.mktemp("multihost")
    over, port = FAST + RUN, str(_free_port())
    script = [sys.executable, str(Path(__file__).resolve()), str(root), json.dumps(over)]
    procs = {}
    try:
        for name, devices, args in [("process0", 4, ["0", port]), ("process1", 4, ["1", port]),
                                    ("meshes", 8, ["meshes"])]:
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS.format(devices))
            env.pop("JAX_COORDINATOR_ADDRESS", None)  # (that would make JAX look for a cluster)
            with open(root / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen(script + args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        yield {"root": root, "procs": procs, "deadline": time.monotonic() + TIMEOUT, "overrides": over}
    finally:
        for p in procs.values():  # (still running only after a failure)
            if p.poll() is None:
                p.kill()
                p.wait()


def test_checkpoint_saved_on_8_devices_restores_on_4_and_1(runs):
    """Saved by two processes from 8 devices with params sharded over fsdp; restored onto 4 devices
    (by the two processes: see _process) and onto 1 (here): step, params, opt_state, EMA, vq_state
    and rng bit-identical, on the new meshes' shardings."""
    import jax

    from perco_jax import parallel
    from perco_jax.config import load_config
    from perco_jax.train.checkpoints import restore_latest

    _finish(runs, ["process0", "process1"])
    root = runs["root"]
    for i in (0, 1):
        info = json.loads((root / f"process{i}.json").read_text())
        assert info["split_when_saved"] > 0 and info["split_on_four"] > 0, info
    saved = dict(np.load(root / "saved.npz"))
    devices = jax.devices()[:1]
    mesh = parallel.make_mesh({"data": 1}, devices)
    with jax.set_mesh(mesh):
        abstract, shardings = _abstract_state(load_config("tiny", runs["overrides"] + MESH), mesh)
        restored = restore_latest(root / "two", abstract, shardings)
    _check_restored(restored, shardings, saved, devices)


def test_two_processes_train_like_one(runs):
    _finish(runs, ["process0", "process1"])
    root = runs["root"]
    info = [json.loads((root / f"process{i}.json").read_text()) for i in (0, 1)]
    # each process fed its own half of each global batch of 8 (positions 0-7, then 8-15)
    assert info[0]["read"] == [[0, 1, 2, 3], [8, 9, 10, 11]], info[0]["read"]
    assert info[1]["read"] == [[4, 5, 6, 7], [12, 13, 14, 15]], info[1]["read"]

    # process 0 alone wrote the run's files: config, tokenizers, loss history and TensorBoard
    # events (whose names carry the writer's pid); process 1 wrote nothing outside checkpoints/
    work = root / "two"
    assert {"config.json", "loss_history.json"} <= {Path(p).name for p in info[0]["written"]}, info[0]
    assert info[1]["written"] == [], info[1]
    assert [step for step, _ in json.loads((work / "loss_history.json").read_text())] == [1, 2]
    events = [f.name for f in work.iterdir() if f.name.startswith("events.out.tfevents")]
    assert events and all(name.split(".")[-3] == str(info[0]["pid"]) for name in events), (events, info)
    # both processes saved their part of the checkpoint (orbax's per-process OCDBT files)
    state = work / "checkpoints" / "2" / "state"
    assert sorted(f.name for f in state.iterdir() if f.name.startswith("ocdbt.process_")) == \
        ["ocdbt.process_0", "ocdbt.process_1"], sorted(f.name for f in state.iterdir())

    # the same training as in one process on one device
    _finish(runs, ["meshes"])
    saved, one = np.load(root / "saved.npz"), np.load(root / "one_params.npz")
    assert len(one.files) > 50
    err = max(float(np.abs(one[k] - saved[".params" + k]).max()) for k in one.files)
    assert err < 1e-5, err


def test_meshes_of_8_devices_train_like_one(runs):
    """8 x 1, 2 x 4 and 2 x 2 x 2 (data x fsdp x tensor) on 8 devices equal 1 device (4 x 2: above)."""
    _finish(runs, ["meshes"])
    root = runs["root"]
    one = np.load(root / "one_params.npz")
    info = json.loads((root / "meshes.json").read_text())
    for name in MESHES:
        got = np.load(root / f"mesh_{name}.npz")
        assert sorted(got.files) == sorted(one.files), name
        err = max(float(np.abs(one[k] - got[k]).max()) for k in one.files)
        assert err < 1e-5, (name, err)
    # data parallel only: everything replicated; with fsdp / tensor axes the trained params and the
    # frozen text encoders are split over them
    assert info["8x1"] == {"split_params": 0, "split_text": 0}, info
    for name in ("2x4", "2x2x2"):
        assert info[name]["split_params"] > 0 and info[name]["split_text"] > 0, info
    assert info["2x2x2"]["split_params"] > info["2x4"]["split_params"], info  # heads / MLP over tensor too


if __name__ == "__main__":
    if sys.argv[3] == "meshes":
        _meshes(Path(sys.argv[1]), json.loads(sys.argv[2]))
    else:
        _process(Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
