"""`perco-jax plan` (per-device memory from eval_shape and the sharding rules) and the
distributed start-up flags (`perco_jax.distributed`)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AbstractMesh, NamedSharding

from perco_jax import build, distributed, parallel
from perco_jax.train import activations, plan, shapes
from perco_jax.cli import main
from perco_jax.config import load_config
from perco_jax.models.hyper_encoder import num_stages

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _bytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def _boxed_tiny_params(config):
    """The PerCo params of `config` by an eval_shape of its own (boxed: logical axis names kept)."""
    model = build.build_perco(config)
    side, ch = build.latent_geometry(config)
    x = jnp.zeros((1, side, side, ch))
    ctx = jnp.zeros((1, 8, config.mmdit.joint_attention_dim))
    pooled = jnp.zeros((1, config.mmdit.pooled_projection_dim))
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(lambda: model.init({"params": key, "vq": key}, x, x, jnp.zeros((1,)), ctx, pooled))["params"]


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


def test_tiny_on_one_device_is_the_eval_shape_byte_count(tiny):
    p = plan.make_plan(tiny, {"data": 1})
    params = nn.meta.unbox(_boxed_tiny_params(tiny))
    expected = sum(_bytes(x) for x in jax.tree_util.tree_leaves(params))
    trainable, frozen = p.row("params, trainable"), p.row("params, frozen")
    assert trainable[1] + frozen[1] == expected and frozen == (0, 0)  # tiny trains everything
    assert p.row("gradients (float32, all params)")[1] == expected
    assert p.row("EMA of params")[1] == expected
    opt = p.row("optimiser state (AdamW mu+nu)")[1]
    assert 2 * expected <= opt <= 2 * expected + 64  # mu + nu + the step counts
    for name, total, per in p.rows:  # one device holds everything
        assert total == per, name
    assert p.per_device == sum(r[2] for r in p.rows) + p.activation_bytes
    assert 0 < p.activation_bytes <= sum(v for _, v in p.activation_rows)  # frozen passes: max, not sum
    # trainable="frozen" moves the MM-DiT (except its patch embedding) to the frozen row, and its
    # optimiser state away
    frozen_mmdit = shapes.abstract_components(load_config("tiny", ["trainable=frozen"]))
    q = plan.make_plan(tiny, {"data": 1}, components=frozen_mmdit)
    assert q.row("params, trainable")[1] + q.row("params, frozen")[1] == expected
    mmdit = sum(_bytes(x) for x in jax.tree_util.tree_leaves(params["mmdit"]))
    patch = sum(_bytes(x) for x in jax.tree_util.tree_leaves(params["mmdit"]["pos_embed"]))
    assert q.row("params, frozen")[1] == mmdit - patch
    assert q.row("optimiser state (AdamW mu+nu)")[1] < 2 * (expected - mmdit + patch) + 64


def test_runs_reading_precomputed_embeddings_hold_and_run_no_text_encoder():
    """text.embeddings: the loop builds no text encoder, so the plan counts neither its params nor its
    forward pass; text.cache: the encoders are held (they fill the cache) but not run in the step."""
    few = ["mmdit.num_layers=2", "t5.num_layers=2", "clip_l.num_hidden_layers=2", "clip_g.num_hidden_layers=2"]
    full = plan.make_plan(load_config("sd3_medium", few), {"data": 8})  # (SD3's widths, fewer layers: quicker)
    cached = plan.make_plan(load_config("sd3_medium", few + ["text.cache=True"]), {"data": 8})
    stored = plan.make_plan(load_config("sd3_medium", few + ["text.embeddings=/emb"]), {"data": 8})
    assert any(r[0].startswith("T5 text encoder") for r in full.rows + cached.rows)
    assert not any("text encoder" in r[0] for r in stored.rows)
    assert stored.per_device < cached.per_device <= full.per_device
    assert stored.activation_bytes == cached.activation_bytes <= full.activation_bytes


def test_fsdp8_shards_exactly_the_leaves_the_rules_shard(tiny):
    p = plan.make_plan(tiny, {"fsdp": 8})
    boxed = _boxed_tiny_params(tiny)
    rules = dict(parallel.DEFAULT_RULES)
    expected, sharded, replicated = 0, 0, 0
    for logical, x in zip(jax.tree_util.tree_leaves(nn.get_partition_spec(boxed),
                                                    is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
                          jax.tree_util.tree_leaves(nn.meta.unbox(boxed))):
        axes = [rules.get(name) for name in logical]
        dims = [d for d, a in zip(x.shape, axes) if a == "fsdp"]
        if dims and dims[0] % 8 == 0:
            expected += _bytes(x) // 8
            sharded += 1
        else:
            assert not dims, f"a tiny leaf of shape {x.shape} is sharded over an axis that 8 does not divide"
            expected += _bytes(x)
            replicated += 1
    assert sharded > 10 and replicated > 10  # both kinds are exercised
    trainable = p.row("params, trainable")
    assert trainable[1] == expected
    assert p.row("EMA of params")[1] == expected
    # the hand-rolled shard shapes agree with jax's own on an AbstractMesh
    comp = shapes.abstract_components(tiny)
    mesh = AbstractMesh((1, 8, 1), parallel.MESH_AXES)
    for _, x, spec in comp.state.leaves():
        assert shapes.shard_shape(x.shape, spec, dict(mesh.shape)) == NamedSharding(mesh, spec).shard_shape(x.shape)
    # data-parallel replicas hold the same shard; tensor=2 splits heads / MLP leaves further
    assert plan.make_plan(tiny, {"data": 2, "fsdp": 8}).row("params, trainable") == trainable
    assert plan.make_plan(tiny, {"fsdp": 8, "tensor": 2}).row("params, trainable")[1] < expected


def _parse_table(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(\S.*?)\s{2,}(?:([\d.]+ \w+)|-)?\s+([\d.]+) (B|KiB|MiB|GiB)$", line)
        if m:
            rows[m.group(1)] = float(m.group(3)) * UNITS[m.group(4)]
    return rows


@pytest.mark.slow
def test_sd35_large_fits_64_devices_of_16gb_with_fsdp_64_not_data8_fsdp8():
    config = load_config("sd35_large")
    comp = shapes.abstract_components(config)
    p = plan.make_plan(config, plan.parse_mesh("data=8,fsdp=8,tensor=1"), components=comp)
    text = plan.format_plan(p, plan.parse_bytes("16GB"))
    print(text)
    total, per = p.row("params, trainable")
    assert 8.0e9 < total / 4 < 8.2e9  # 8B float32 params (MM-DiT + hyper-encoder + VQ)
    assert 4.6e9 < p.row("T5 text encoder (frozen)")[0] / 4 < 4.9e9  # T5-XXL's encoder
    assert per * 64 >= total and per * 8 >= total and per < 1.01 * total / 8  # fsdp only; data replicates
    assert p.row("gradients (float32, all params)")[1] == per == p.row("EMA of params")[1]
    assert 2 * per <= p.row("optimiser state (AdamW mu+nu)")[1] < 2 * per + 2**20
    assert p.per_device_batch == 4
    assert "does not fit" in text.splitlines()[-1] and p.per_device > 16e9
    assert "fits" in plan.format_plan(p, plan.parse_bytes("80GB")).splitlines()[-1] and p.per_device < 80e9
    rows = _parse_table(text)
    assert rows["total per device"] == pytest.approx(p.per_device, rel=1e-3)
    assert rows["params, trainable"] == pytest.approx(per, rel=1e-3)

    wide = plan.make_plan(config, {"fsdp": 64}, components=comp)
    # a few small leaves (norm / bias vectors, the pooled-text embedder) are not sharded over fsdp
    assert total <= wide.row("params, trainable")[1] * 64 < 1.1 * total
    assert wide.per_device < 16e9 < p.per_device  # 64 x 16 GB: with FSDP over all 64
    # 8 x 80 GB: fits (32 examples per device), with less to spare than 64 devices; a fused attention
    # kernel drops the stored attention logits
    eight = plan.make_plan(config, {"fsdp": 8}, components=comp)
    assert p.per_device < eight.per_device < 80e9 and eight.per_device_batch == 32
    fused = plan.make_plan(config, {"fsdp": 8}, attention="cudnn", components=comp)
    assert fused.per_device < eight.per_device - 10 * 2**30
    assert [r for r in fused.rows] == [r for r in eight.rows]  # only activations change
    replicated = plan.make_plan(config, {"fsdp": 64}, frozen="replicated", components=comp)
    assert replicated.per_device - wide.per_device > 0.9 * p.row("T5 text encoder (frozen)")[0]
    with pytest.raises(ValueError, match="not divisible by data x fsdp"):
        plan.make_plan(config, {"data": 3, "fsdp": 8}, components=comp)


def test_cli_plan_output_parses_and_matches_json(capsys, tiny):
    assert main(["plan", "--config", "tiny", "--mesh", "data=2,fsdp=4,tensor=1", "--device-memory", "1GB"]) == 0
    text = capsys.readouterr().out
    rows = _parse_table(text)
    assert rows["total per device"] > 0 and text.splitlines()[-1].startswith("device memory") and "fits" in text
    assert main(["plan", "--config", "tiny", "--mesh", "data=2,fsdp=4,tensor=1", "--device-memory", "1GB",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["devices"] == 8 and d["per_device_batch"] == 2 and d["fits"] is True
    assert d["per_device_bytes"] == sum(r["per_device_bytes"] for r in d["rows"]) + d["activation_bytes"]
    assert rows["total per device"] == pytest.approx(d["per_device_bytes"], rel=5e-3)
    for r in d["rows"]:
        if r["per_device_bytes"] >= 1024:
            assert rows[r["what"]] == pytest.approx(r["per_device_bytes"], rel=5e-3), r["what"]
    # -1 with --devices, --batch and --stage 2
    assert main(["plan", "--mesh", "data=-1,fsdp=2", "--devices", "8", "--batch", "32", "--stage", "2",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1} and d["stage"] == 2 and d["per_device_batch"] == 4
    assert any(r["what"].startswith("stage-1 codec") for r in d["rows"])


@pytest.mark.parametrize("mesh, match", [
    ("data=3,fsdp=x", "fsdp='x' is not an integer"),
    ("data=2,model=4", "unknown axis 'model'"),
    ("data=-1,fsdp=-1", "only one axis may be -1"),
    ("data=-1", "needs the total device count"),
    ("data=0", "sizes are >= 1"),
    ("data=2,data=2", "given twice"),
    ("data", "not AXIS=SIZE"),
])
def test_bad_mesh_strings_give_one_clear_error(capsys, mesh, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        plan.parse_mesh(mesh)
    assert main(["plan", "--mesh", mesh]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("perco-jax plan: error: mesh") and match in err[0]


def test_mesh_and_memory_parsing():
    assert plan.parse_mesh("data=8,fsdp=8,tensor=1") == {"data": 8, "fsdp": 8, "tensor": 1}
    assert plan.parse_mesh("fsdp=-1", num_devices=16) == {"data": 1, "fsdp": 16, "tensor": 1}
    with pytest.raises(ValueError, match="do not divide"):
        plan.parse_mesh("data=-1,fsdp=3", num_devices=16)
    with pytest.raises(ValueError, match="has 4 devices, not 8"):
        plan.parse_mesh("data=4", num_devices=8)
    assert plan.parse_bytes("16GB") == 16 * 10**9 and plan.parse_bytes("80GiB") == 80 * 2**30
    assert plan.parse_bytes("1.5e9") == 1_500_000_000
    with pytest.raises(ValueError, match="device memory"):
        plan.parse_bytes("sixteen gigs")



def test_recipes_at_a_reduced_slice_keep_their_batch_per_chip():
    """`recipe_on_devices` (benchmarks/train_step.py --recipe): the recipe's preset, overrides and
    stage on N devices, FSDP over a divisor of both N and the recipe's fsdp, data over the rest."""
    from perco_jax.configs.recipes import RECIPES

    for name, r in RECIPES.items():
        pod = plan.parse_mesh(r["mesh"])
        for devices in (1, 6, 8, 64):
            preset, over, mesh, per = plan.recipe_on_devices(name, devices)
            assert preset == r["config"] and over[:len(r["overrides"])] == list(r["overrides"])
            assert mesh["data"] * mesh["fsdp"] == devices and mesh["tensor"] == 1
            assert mesh["fsdp"] == {1: 1, 6: 2, 8: 8, 64: pod["fsdp"]}[devices]  # (recipes: fsdp 16 or 64)
            assert per * pod["data"] * pod["fsdp"] == r["batch"]
            config = load_config(preset, over)  # the overrides load, and set the stage and the mesh
            assert config.stage == r["stage"] and {a: config.mesh[a] for a in mesh} == mesh
    with pytest.raises(ValueError, match="recipe 'nope': one of sd35_large-stage1-v5e-256"):
        plan.recipe_on_devices("nope", 8)


def test_largest_batch_is_the_last_the_plan_fits(tiny):
    """largest_batch: the plan at its batch leaves the headroom, the next batch tried does not; a
    VAE chunk restricts the batches to those it divides; None when one image does not fit."""
    mesh = {"data": 2, "fsdp": 2, "tensor": 1}

    def per_device(config, b):
        return plan.make_plan(config, mesh, batch=b * 4).per_device

    budget = per_device(tiny, 37)
    memory = int(budget / 0.8) + 1
    assert plan.largest_batch(tiny, mesh, memory) == 37
    assert plan.largest_batch(tiny, mesh, memory, most=20) == 20
    assert plan.largest_batch(tiny, mesh, memory, headroom=0.5) < 37
    assert plan.largest_batch(tiny, mesh, per_device(tiny, 1) - 1, headroom=0) is None
    chunked = load_config("tiny", ["autoencoder_chunk=8"])
    b = plan.largest_batch(chunked, mesh, int(per_device(chunked, 37) / 0.8) + 1)
    assert b % 8 == 0 and per_device(chunked, b) <= per_device(chunked, 37) < per_device(chunked, b + 8)
    with pytest.raises(ValueError, match="headroom"):
        plan.largest_batch(tiny, mesh, memory, headroom=1.0)


def test_cli_plan_prints_the_largest_batch(capsys, tiny):
    """`plan --largest-batch`: plan.largest_batch's answer at plan.HEADROOM, as text and JSON; one
    clear error without --device-memory or with --compile."""
    mesh = {"data": 2, "fsdp": 2, "tensor": 1}
    want = plan.largest_batch(tiny, mesh, 10**9, most=1 << 16)
    args = ["plan", "--config", "tiny", "--mesh", "data=2,fsdp=2", "--device-memory", "1GB", "--largest-batch"]
    assert main(args) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("largest batch leaving 20% of 953.67 MiB to spare: ")
    assert f": {want} a device, {4 * want} in" in line
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["largest_per_device_batch"] == want and d["largest_batch"] == 4 * want
    next_up = plan.make_plan(tiny, mesh, batch=4 * want + 4).per_device
    assert d["largest_batch_per_device_bytes"] <= 0.8 * 10**9 < next_up
    assert main(args[:-3] + ["--largest-batch"]) == 2
    assert "--largest-batch needs --device-memory" in capsys.readouterr().err
    assert main(args + ["--compile", "--topology", "v5e-8"]) == 2
    assert "leave out --compile" in capsys.readouterr().err

# ----------------------------------------------------------------------------- distributed

@pytest.mark.parametrize("flags, match", [
    (("h:1234", 2, 2), "process_id=2 must be < num_processes=2"),
    (("h:1234", None, None), "coordinator_address needs num_processes"),
    ((None, 4, 0), "num_processes=4 needs coordinator_address"),
    (("h:1234", 4, None), "needs this process's process_id"),
    ((None, None, 1), "process_id needs num_processes"),
    (("localhost", 2, 0), "is not HOST:PORT"),
    (("h:1234", 0, 0), "num_processes=0 must be >= 1"),
    (("h:1234", 2, -1), "process_id=-1 must be >= 0"),
    (("h:1234", "two", 0), "num_processes='two' is not an integer"),
])
def test_distributed_flags_validation(flags, match):
    with pytest.raises(ValueError, match=re.escape(match)) as e:
        distributed.validate_flags(*flags)
    assert str(e.value).startswith("inconsistent distributed flags: ")


def test_distributed_valid_flags_and_detection():
    assert distributed.validate_flags() is None
    assert distributed.validate_flags("10.0.0.1:1234", 2, 1) == {"coordinator_address": "10.0.0.1:1234",
                                                                 "num_processes": 2, "process_id": 1}
    assert distributed.validate_flags(None, 1, None) == {"coordinator_address": None, "num_processes": 1,
                                                         "process_id": 0}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert distributed.detect_cluster({}) is None
    assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: single process
    assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None  # sbatch, not srun
    assert distributed.detect_cluster({**slurm, "SLURM_NTASKS": "4"}).startswith("SLURM")
    assert distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "JAX_COORDINATOR_ADDRESS"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "TPU pod (4 hosts)"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed.detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}).startswith("Open")


def test_distributed_initialize_calls_jax_as_told(monkeypatch):
    calls = []
    state = {"up": False}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: (calls.append(kw), state.update(up=True)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(distributed, "_initialised_with", None)
    monkeypatch.setattr(distributed, "detect_cluster", lambda environ=None: None)
    assert distributed.initialize() is False and calls == []           # single process: nothing
    assert distributed.initialize(None, 1, 0) is False and calls == []  # explicitly one process
    assert distributed.initialize("h:99", 2, 1) is True
    assert calls == [{"coordinator_address": "h:99", "num_processes": 2, "process_id": 1}]
    assert distributed.initialize("h:99", 2, 1) is True and distributed.initialize() is True  # idempotent
    assert len(calls) == 1
    with pytest.raises(ValueError, match="already initialised"):
        distributed.initialize("h:99", 2, 0)
    # from the environment: no arguments, JAX's cluster detection fills them in
    state["up"], calls[:] = False, []
    monkeypatch.setattr(distributed, "_initialised_with", None)
    monkeypatch.setattr(distributed, "detect_cluster", lambda environ=None: "SLURM (4 tasks)")
    assert distributed.initialize() is True and calls == [{}]


def test_train_refuses_inconsistent_distributed_flags(capsys, tmp_path):
    rc = main(["train", "--workdir", str(tmp_path), "--num-processes", "2", "--process-id", "2",
               "--coordinator", "localhost:1234"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "process_id=2 must be < num_processes=2" in err[0]
    assert not (tmp_path / "config.json").exists()  # refused before anything ran


def test_scripts_train_flags_and_real_single_process_initialize(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), f"--config={ROOT}/configs/tiny.py",
                        f"--workdir={tmp_path}", "--coordinator_address=localhost:1234"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "coordinator_address needs num_processes" in r.stderr
    # the real jax.distributed with one process on a loopback coordinator, twice (idempotent)
    code = ("import socket; s = socket.socket(); s.bind(('localhost', 0)); port = s.getsockname()[1]; s.close()\n"
            "from perco_jax import distributed\n"
            "a = distributed.initialize(f'localhost:{port}', 1, 0)\n"
            "b = distributed.initialize(f'localhost:{port}', 1, 0)\n"
            "import jax; print(a, b, jax.process_count(), jax.distributed.is_initialized())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True", "1", "True"]


def test_stage3_reflow_batch_is_its_couplings(tiny):
    """A reflow step reads (noise, latent, indices) couplings and the text inputs: its batch row
    counts those, by hand, and no image is encoded in the step (its frozen passes are the text's)."""
    shortcut = plan.make_plan(load_config("tiny", ["stage3.method=shortcut"]), {"data": 1}, stage=3)
    reflow = plan.make_plan(load_config("tiny", ["stage3.method=reflow"]), {"data": 1}, stage=3)
    b, g = 16, tiny.codec.grid_side  # stage3.batch_size
    side, ch = build.latent_geometry(tiny)
    context = build.clip_max_length(tiny) + tiny.text.max_sequence_length  # CLIP's tokens, then T5's
    text = b * context * tiny.mmdit.joint_attention_dim * 4 + b * tiny.mmdit.pooled_projection_dim * 4  # float32
    rows, sc_rows = dict(reflow.activation_rows), dict(shortcut.activation_rows)
    assert rows["batch (noise, latents, indices, text context)"] == b * (2 * side * side * ch * 4 + g * g * 4) + text
    assert sc_rows["batch (images, text context)"] == b * tiny.image_size ** 2 * 3 * 4 + text
    assert 0 < rows[activations.FROZEN_FORWARD] < sc_rows[activations.FROZEN_FORWARD]  # the text encoders' alone


def test_axes_that_do_not_divide_a_leaf_leave_it_whole():
    """jax shards no array unevenly: `parallel.fit_spec` keeps a dimension's axes while their product
    divides it, and the plan counts the leaf so. SD3's VAE output bias (32 channels, conv_out ->
    fsdp) on fsdp = 64 stays whole; with fsdp = 16 it is split."""
    from jax.sharding import PartitionSpec as P

    assert parallel.fit_spec(P("fsdp"), (32,), {"data": 1, "fsdp": 64, "tensor": 1}) == P()
    assert parallel.fit_spec(P("fsdp"), (32,), {"data": 1, "fsdp": 16, "tensor": 1}) == P("fsdp")
    assert parallel.fit_spec(P(("data", "fsdp"), None), (48, 5), {"data": 4, "fsdp": 16, "tensor": 1}) == P("data")
    assert parallel.fit_spec(P(None, "tensor"), (6, 8), {"data": 1, "fsdp": 1, "tensor": 2}) == P(None, "tensor")
    assert shapes.shard_shape((32, 64), P("fsdp", None), {"data": 1, "fsdp": 64, "tensor": 1}) == (32, 64)
    # the whole SD3-medium run on fsdp = 64: the VAE's small leaves are counted whole, not padded
    config = load_config("sd3_medium", ["text.embeddings=emb"])
    vae = shapes.abstract_components(config, 1, 64).frozen["VAE"]
    small = [(x.shape, s) for _, x, s in vae.leaves() if s and s[0] == "fsdp" and x.shape[0] % 64]
    assert small, "no VAE leaf smaller than the fsdp axis: the case this test is for is gone"
    per_device = vae.per_device({"data": 1, "fsdp": 64, "tensor": 1})
    assert per_device == sum(
        int(np.prod(shapes.shard_shape(x.shape, s, {"data": 1, "fsdp": 64, "tensor": 1}))) * x.dtype.itemsize
        for _, x, s in vae.leaves())


@pytest.mark.slow
def test_init_state_places_leaves_smaller_than_the_fsdp_axis():
    """The stage-1 state of a config with a 4-wide leaf on an 8-way fsdp mesh (it raised
    IndivisibleError before axes were fitted to the leaves)."""
    code = ("import jax; from perco_jax.config import load_config; from perco_jax import build, parallel; "
            "from perco_jax.train.step import init_state; from perco_jax.train.state import make_optimizer; "
            "c = load_config('tiny', ['hyper_encoder.out_channels=4', 'codec.code_dim=4']); "
            "m = parallel.make_mesh({'fsdp': 8}); "
            "s, sh = init_state(c, build.build_perco(c), make_optimizer(c), m, parallel.rules_from_config([])); "
            "print(sum(x.sharding.spec == jax.sharding.PartitionSpec() for x in jax.tree_util.tree_leaves(s.params)))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) > 0


def test_remat_keeps_the_saved_block_inputs_and_one_block():
    """With remat the MM-DiT's rows are every block's saved inputs (L b T D s) and one block's
    working set A, the same A that the plan without remat counts once per block and once more for
    the cotangents (`mmdit.recompute_in_order` runs each block's backward right after recomputing
    it; docs/training.md has the compiler's figures)."""
    config = load_config("sd3_medium", ["text.embeddings=emb"])
    on = dict(activations.activations(config, 4))
    config.remat = False
    off = dict(activations.activations(config, 4))
    layers, mm = config.mmdit.num_layers, config.mmdit
    tok = (config.image_size // 8 // mm.patch_size) ** 2 + 77 + config.text.max_sequence_length
    block = off["MM-DiT one block's cotangents"]
    width = mm.num_attention_heads * mm.attention_head_dim
    assert on[f"MM-DiT saved block inputs ({layers} blocks, remat)"] == layers * 4 * tok * width * 2  # bf16
    assert on["MM-DiT one block recomputed + cotangents"] == block
    assert off[f"MM-DiT all {layers} blocks (no remat)"] == layers * block  # (SD3-medium: no dual-attention block)


def test_vae_attention_logits_only_without_the_splash_kernel():
    """At 1024^2 the frozen VAE encoder's peak is its mid-block attention over 128^2 latent positions:
    float32 logits and probabilities of b x 16384^2, unless the splash kernel runs it
    (attention "splash", TPU), when the 3 full-resolution feature maps are the peak; cuDNN's kernel
    (GPUs) does not take the VAE's head size 512."""
    config = load_config("sd35_large", ["text.embeddings=emb", "image_size=1024", "data.image_size=1024"])
    b, s = 2, 2  # bf16
    lat, c0, c_last = 128, config.vae.block_out_channels[0], config.vae.block_out_channels[-1]
    stored = dict(activations.activations(config, b, attention="cudnn"))[activations.FROZEN_FORWARD]
    fused = dict(activations.activations(config, b, attention="splash"))[activations.FROZEN_FORWARD]
    moments = b * lat * lat * 2 * config.vae.latent_channels * s
    assert stored == moments + b * (lat ** 4 * (4 + s) + 4 * lat * lat * c_last * s)
    assert fused == moments + b * 3 * 1024 * 1024 * c0 * s
    # config.autoencoder_chunk: one image a pass holds one image's maps (the moments of both kept)
    config.autoencoder_chunk = 1
    chunked = dict(activations.activations(config, b, attention="splash"))[activations.FROZEN_FORWARD]
    assert chunked == moments + 3 * 1024 * 1024 * c0 * s


def test_the_plan_counts_the_attention_kernel_the_step_runs(capsys):
    """`attention`: XLA stores every attention's logits; cuDNN's kernel (GPUs) fuses the MM-DiT's and
    the entropy model's but not the VAE's (head size 512); TPU's splash kernel fuses the MM-DiT's
    and the VAE's, while the entropy model stays on XLA's path. The command line picks the kind
    from --attention, --flash-attention (cuDNN) or --recipe (splash)."""
    config = load_config("sd35_large", ["text.embeddings=emb", "image_size=1024", "data.image_size=1024",
                                        "mmdit.num_layers=2"])  # (the terms compared are per block)
    comp = plan.abstract_components(config, 1, 64)
    p = {a: plan.make_plan(config, {"fsdp": 8}, attention=a, components=comp) for a in ("xla", "cudnn", "splash")}
    acts = {a: dict(q.activation_rows) for a, q in p.items()}
    block = "MM-DiT one block recomputed + cotangents"
    # (splash above cuDNN: on TPU the QK norms' float32 q and k fill 128-lane tiles, below)
    assert acts["cudnn"][block] < acts["splash"][block] < acts["xla"][block]
    assert (acts["splash"][activations.FROZEN_FORWARD] < acts["cudnn"][activations.FROZEN_FORWARD]
            == acts["xla"][activations.FROZEN_FORWARD])
    assert (p["xla"].attention, p["cudnn"].vae_flash_attention, p["splash"].vae_flash_attention) == ("xla", False, True)
    config.stage = 2
    em = f"entropy model, {config.entropy_model.depth} blocks + cotangents"
    stage2 = {a: dict(activations.activations(config, 4, attention=a))[em] for a in ("xla", "cudnn", "splash")}
    assert stage2["cudnn"] < stage2["splash"] == stage2["xla"]
    with pytest.raises(ValueError, match="attention='flash'"):
        activations.activations(config, 4, attention="flash")

    def planned(*args):
        assert main(["plan", "--config", "tiny", "--mesh", "data=2", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)["attention"]

    assert [planned(), planned("--flash-attention"), planned("--attention", "splash")] == ["xla", "cudnn", "splash"]
    assert main(["plan", "--config", "tiny", "--mesh", "data=2", "--flash-attention", "--attention", "xla"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_qk_norms_keep_q_and_k_in_float32_lane_padded_on_tpu():
    """SD3.5's QK RMS-norms: a block's working set counts q and k in float32 (the norms' backward
    reads them), twice that on TPU where heads of 64 fill 128-lane tiles (XLA:TPU's buffer dumps of
    the SD3.5-large recipes); SD3-medium has no QK norms and no such term."""
    over = ["text.embeddings=emb", "image_size=1024", "data.image_size=1024"]
    block = "MM-DiT one block recomputed + cotangents"
    config = load_config("sd35_large", over)
    tok = (1024 // 8 // config.mmdit.patch_size) ** 2 + 77 + config.text.max_sequence_length
    d = config.mmdit.num_attention_heads * config.mmdit.attention_head_dim
    rows = {a: dict(activations.activations(config, 3, attention=a))[block] for a in ("cudnn", "splash")}
    assert rows["splash"] - rows["cudnn"] == 3 * 2 * 4 * tok * d  # the float32 q and k's second 64 lanes
    config.mmdit.qk_norm = None
    plain = {a: dict(activations.activations(config, 3, attention=a))[block] for a in ("cudnn", "splash")}
    assert plain["splash"] == plain["cudnn"] == rows["cudnn"] - 3 * 2 * 4 * tok * d


def test_tpu_plans_count_the_generated_code_of_every_block(capsys):
    """A TPU program's code is in HBM too: XLA:TPU emits each unrolled MM-DiT block's code (55-99
    MiB a block in the recipes' training steps, by generation: docs/training.md), so a plan for a
    TPU generation has a code row that grows with the blocks; a plan for no TPU has none, nor does
    stage 2's (no MM-DiT). The compiler comparison sets it beside the compiler's code, and leaves it
    out of a compile stopped after buffer assignment, which has no code. `plan --recipe` counts it
    for the recipe's slice."""
    from perco_jax.train import aot

    def planned(layers, tpu, stage=1):
        config = load_config("sd3_medium", ["text.embeddings=emb"] * (stage != 2) + [f"mmdit.num_layers={layers}"])
        return plan.make_plan(config, {"fsdp": 8}, stage=stage, batch=64, attention="splash", tpu=tpu)

    two, six = planned(2, "v5e"), planned(6, "v5e")
    assert six.code_bytes - two.code_bytes == 4 * plan.TPU_CODE_PER_BLOCK["v5e"]
    assert planned(6, "v5p").code_bytes > six.code_bytes  # (v5p's blocks take the most code)
    assert two.code_bytes == plan.tpu_code_bytes(load_config("sd3_medium", ["mmdit.num_layers=2"]), "v5e")
    assert six.per_device - two.per_device > 4 * plan.TPU_CODE_PER_BLOCK["v5e"]  # (and the blocks' state)
    assert planned(6, None).code_bytes == 0 and planned(6, "v5e", stage=2).code_bytes == 0
    assert plan.CODE_ROW in plan.format_plan(six)
    with pytest.raises(ValueError, match="v3"):
        planned(2, "v3")

    program = aot.CompiledProgram(name="step", mesh={"fsdp": 8}, seconds=1.0, attention="splash",
                                  argument_bytes=2**30, temp_bytes=2**31, code_bytes=500 * 2**20)
    rows = {n: (est, got) for n, est, got in aot.comparison_rows(six, program)}
    assert rows["generated code"] == (six.code_bytes, 500 * 2**20)
    assert rows["total per chip"] == (six.per_device, program.per_device)
    stopped = dataclasses.replace(program, code_bytes=0, stopped="after buffer assignment")
    rows = {n: (est, got) for n, est, got in aot.comparison_rows(six, stopped)}
    assert "generated code" not in rows
    assert rows["total per chip, without the code"] == (six.per_device - six.code_bytes, stopped.per_device)

    assert main(["plan", "--recipe", "sd35_large-stage1-v5p-128", "--json"]) == 0
    rows = {r["what"]: r["per_device_bytes"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows[plan.CODE_ROW] == plan.TPU_CODE_BASE + 38 * plan.TPU_CODE_PER_BLOCK["v5p"]


def test_a_rematerialised_hyper_encoder_keeps_only_its_blocks_inputs():
    """hyper_encoder.remat: the saved row counts each ResnetBlock's input and each downsample's, not
    the 2 maps a block (+ conv_in's output) of the plain hyper-encoder."""
    over = ["text.embeddings=emb", "image_size=1024", "data.image_size=1024"]
    row = "hyper-encoder (saved for backward)"
    plain = dict(activations.activations(load_config("sd35_large", over), 4))[row]
    remat = dict(activations.activations(load_config("sd35_large", over + ["hyper_encoder.remat=True"]), 4))[row]
    config = load_config("sd35_large", over)
    he, g, side = config.hyper_encoder, config.codec.grid_side, 128
    maps = sum((side >> k) ** 2 for k in range(num_stages(side, g)))  # one map of each stage, elements / width
    mid = 5 * g * g * he.width * 2 + (g ** 4 * 6 if he.attention else 0)
    assert remat == 4 * ((he.depth + 1) * maps * he.width * 2 + mid)
    assert plain == 4 * ((side * side + (2 * he.depth + 1) * maps) * he.width * 2 + mid)
