"""Ahead-of-time compilation for TPU slices (`perco-jax plan --compile`, train/aot.py) with XLA's TPU
compiler (libtpu, the '.[tpu]' extra) on this CPU machine: topology names, the collectives read
from the compiled program, the real tiny programs compiled for a v5e:2x2 slice, and a run too large
for its chips reported with the compiler's own out-of-memory message."""
import dataclasses
import json

import pytest

from perco_jax import cli
from perco_jax.train import aot


@pytest.mark.parametrize("name,generation,grid,chips", [
    ("v5e-256", "v5e", (16, 16), 256), ("v5litepod-16", "v5e", (4, 4), 16), ("v6e-8", "v6e", (2, 4), 8),
    ("v5p-128", "v5p", (4, 4, 4), 64), ("v5p-8", "v5p", (2, 2, 1), 4), ("v4-16", "v4", (2, 2, 2), 8),
    ("v5p-256", "v5p", (4, 4, 8), 128), ("v5e:2x4", "v5e", (2, 4), 8), ("v5p:4x4x8", "v5p", (4, 4, 8), 128)])
def test_cloud_tpu_names(name, generation, grid, chips):
    """v5e / v6e count chips, v4 / v5p TensorCores (two per chip); literal grids pass through."""
    t = aot.parse_topology(name)
    assert (t.generation, t.grid, t.chips) == (generation, grid, chips)
    assert aot.parse_topology(name, num_slices=2).chips == 2 * chips


@pytest.mark.parametrize("name,message", [("v5p-127", "TensorCores"), ("v7-8", "Cloud TPU type"),
                                          ("v5e-12", "power of two"), ("v5p:4x4", "3 dimensions")])
def test_bad_topology_names(name, message):
    with pytest.raises(ValueError, match=message):
        aot.parse_topology(name)


@pytest.mark.parametrize("name", ["v5e-8", "v5p-16", "v4-16", "v6e-4"])
def test_topology_devices_are_the_chips(name):
    """The compile-only devices libtpu gives are one per chip (v4 and v5p as megacore)."""
    t = aot.parse_topology(name)
    devices = t.devices()
    assert len(devices) == t.chips
    assert {d.platform for d in devices} == {"tpu"}
    assert devices[0].device_kind == aot.GENERATIONS[t.generation][3]


def test_collectives_of_hlo_text():
    hlo = "\n".join([
        "  %all-gather.1 = bf16[16,1536]{1,0} all-gather(bf16[1,1536]{1,0} %p), dimensions={0}",
        "  %ags = (f32[8]{0}, f32[64]{0}) all-gather-start(f32[8]{0} %x), dimensions={0}",
        "  %agd = f32[64]{0} all-gather-done((f32[8]{0}, f32[64]{0}) %ags)",
        "  %ar = f32[] all-reduce(f32[] %y), to_apply=%add",
        "  %fusion = f32[4]{0} fusion(f32[4]{0} %all-reduce.3), kind=kLoop",
    ])
    got = aot.collectives(hlo)
    assert got == {"all-gather": {"count": 2, "bytes": 16 * 1536 * 2 + 64 * 4}, "all-reduce": {"count": 1, "bytes": 4}}
    # XLA:TPU's reduce-scatter: an all-reduce of the whole buffers inside a fused computation named
    # all-reduce-scatter.N, whose results are the shards (as the tiny step on fsdp 4 compiles)
    fused = "\n".join([
        "%all-reduce-scatter.42 (input_0.1: f32[192,192], input_1.1: f32[192,768]) -> (f32[192,48], f32[48,768]) {",
        "  %input_0.1 = f32[192,192]{1,0} parameter(0)",
        "  %all-reduce.7 = (f32[192,192]{1,0}, f32[192,768]{1,0}) all-reduce(%input_0.1, %input_1.1), to_apply=%add",
        "  ROOT %tuple = (f32[192,48]{1,0}, f32[48,768]{1,0}) tuple(%a, %b)",
        "}",
        "",
        "ENTRY %main {",
        "  %ar = f32[8]{0} all-reduce(f32[8]{0} %y), to_apply=%add",
        "}",
    ])
    assert aot.collectives(fused) == {"reduce-scatter": {"count": 1, "bytes": (192 * 48 + 48 * 768) * 4},
                                      "all-reduce": {"count": 1, "bytes": 32}}


def test_compile_flags_need_compile(capsys):
    assert cli.main(["plan", "--config", "tiny", "--mesh", "data=4", "--topology", "v5e-4"]) == 2
    assert "go with --compile" in capsys.readouterr().err
    assert cli.main(["plan", "--config", "tiny", "--mesh", "data=4", "--compile"]) == 2
    assert "needs --topology" in capsys.readouterr().err
    assert cli.main(["plan", "--config", "tiny", "--mesh", "data=8", "--compile", "--topology", "v5e-4"]) == 2
    assert "has 8 devices, not 4" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_programs_compile_for_a_v5e_slice(capsys):
    """`plan --compile` compiles the tiny stage-1 step (FSDP over 2 chips) and both decoders for
    v5e:2x2: the compiler's arguments hold at least the state's shards that the plan counts, the
    step all-gathers the FSDP-sharded params, and the MM-DiT uses the splash kernel."""
    code = cli.main(["plan", "--config", "tiny", "--mesh", "data=2,fsdp=2", "--compile", "--topology", "v5e-4",
                     "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    train, teacher, few = out["programs"]
    assert "stage 1 training step" in train["name"] and "guided sampler" in teacher["name"]
    assert "few-step decoder" in few["name"]
    for p in out["programs"]:
        assert p["error"] is None and p["fits"] and 0 < p["per_device_bytes"] < out["topology"]["hbm_bytes"]
    state = sum(r["per_device_bytes"] for r in out["plan"]["rows"]
                if r["what"].startswith(("params", "optimiser", "EMA")))
    assert train["argument_bytes"] >= state
    assert train["alias_bytes"] > 0.9 * state  # the donated state is updated in place
    assert train["collectives"]["all-gather"]["count"] > 0
    assert out["plan"]["flash_attention"] is True


@pytest.mark.slow
def test_compile_stopped_after_buffer_assignment(capsys, tmp_path, monkeypatch):
    """`plan --compile --buffers-only` stops the compiling process once XLA has assigned the tiny
    stage-1 step's buffers: the arguments are the finished compile's to the byte, the collectives
    its own, no code size; an oversized run still gets the compiler's RESOURCE_EXHAUSTED and exit
    status 1; the dump folder is removed."""
    import tempfile

    from perco_jax.config import load_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config, topology, mesh = load_config("tiny", []), aot.parse_topology("v5e-4"), {"data": 2, "fsdp": 2, "tensor": 1}
    full = aot.compile_training(config, topology, mesh)
    code = cli.main(["plan", "--config", "tiny", "--mesh", "data=2,fsdp=2", "--compile", "--buffers-only",
                     "--topology", "v5e-4", "--programs", "train", "--json"])
    (quick,) = json.loads(capsys.readouterr().out)["programs"]
    assert code == 0 and quick["fits"] and full.stopped is None and quick["stopped"] == aot.BUFFERS
    assert quick["name"] == full.name and quick["argument_bytes"] == full.argument_bytes
    assert {k: dict(v) for k, v in quick["collectives"].items()} == full.collectives
    assert quick["temp_bytes"] > 0 and quick["code_bytes"] == 0 and quick["flops"] is None
    assert list(tmp_path.iterdir()) == []
    fields = {f.name for f in dataclasses.fields(aot.CompiledProgram)}
    text = aot.format_program(aot.CompiledProgram(**{k: v for k, v in quick.items() if k in fields}), topology.hbm_bytes)
    assert "stopped after buffer assignment" in text and "fits" in text
    peak = quick["peak"]  # what the temporaries hold at their peak, read from the same dump
    assert 0 < sum(g["bytes"] for g in peak["groups"]) <= peak["live_bytes"] <= peak["heap_bytes"] <= quick["temp_bytes"]
    assert "temporaries at their peak" in text and peak["groups"][0]["what"] in text
    code = cli.main(["plan", "--config", "tiny", "--mesh", "data=4", "--batch", "16384", "--compile",
                     "--buffers-only", "--topology", "v5e:2x2", "--programs", "train", "--json"])
    (program,) = json.loads(capsys.readouterr().out)["programs"]
    assert code == 1 and "RESOURCE_EXHAUSTED" in program["error"] and not program["fits"]


def test_peak_breakdown_of_a_dumped_buffer_assignment(tmp_path):
    """`peak_breakdown` finds the program point where the temporaries take the most bytes, counts a
    buffer an op updates in place once, groups the values by op with the MM-DiT's blocks taken
    together, and reports the heap XLA allocated beside the bytes live at the peak."""
    name = "module_0001.jit_step.cl_1.after_optimizations"
    (tmp_path / f"{name}-buffer-assignment.txt").write_text(
        "allocation 0: size 100, parameter 0, shape |f32[25]| at ShapeIndex {}:\n"
        " value: <1 p0 @0> (size=100,offset=0): f32[25]{0}\n"
        "allocation 1: size 5000, preallocated-temp:\n"
        " value: <2 fusion.1 @0> (size=1000,offset=0): bf16[500]{0}\n"
        " value: <3 fusion.2 @0> (size=1000,offset=1000): bf16[500]{0}\n"
        " value: <4 dot.3 @0> (size=2000,offset=2000): f32[500]{0}\n"
        " value: <5 dynamic-update-slice.4 @0> (size=500,offset=1000): bf16[250]{0}\n"
        " value: <6 fusion.5 @0> (size=400,offset=4000): bf16[200]{0}\n"
        "allocation 2: size 8, thread-local:\n")
    (tmp_path / f"{name}-live-range.txt").write_text(
        "HloLiveRange (max 9):\n  InstructionSequence:\n    0:p0\n    1:fusion.1\n  BufferLiveRange:\n"
        "    p0{}:0-9\n    fusion.1{}:1-3\n    fusion.2{}:2-5\n    dot.3{}:4-6\n"
        "    dynamic-update-slice.4{}:5-7\n    fusion.5{}:0-9\n  Live ranges at 5 (peak):\n"
        "    dot.3{}: 2000 bytes (cumulative: 2000 bytes)\n")
    (tmp_path / f"{name}.txt").write_text(
        "ENTRY %main (p0: f32[25]) -> f32[25] {\n"
        '  %fusion.1 = bf16[500]{0} fusion(%p0), metadata={op_name="jit(step)/mmdit/blocks_0/ff/dot_general"}\n'
        '  %fusion.2 = bf16[500]{0} fusion(%p0), metadata={op_name="jit(step)/mmdit/blocks_1/ff/dot_general"}\n'
        '  %dot.3 = f32[500]{0} dot(%fusion.1, %fusion.2), metadata={op_name="jit(step)/loss/dot_general"}\n'
        "  %dynamic-update-slice.4 = bf16[250]{0} dynamic-update-slice(%fusion.2)\n"
        '  %fusion.5 = bf16[200]{0} fusion(%p0), metadata={op_name="jit(step)/mmdit/blocks_7/ff/dot_general"}\n'
        "}\n")
    peak = aot.peak_breakdown(str(tmp_path))
    assert peak == {"heap_bytes": 5000, "live_bytes": 3400,
                    "groups": [{"what": "loss/dot_general", "count": 1, "bytes": 2000},
                               {"what": "mmdit/blocks_N/ff/dot_general", "count": 2, "bytes": 1400}]}
    assert aot.peak_breakdown(str(tmp_path), top=1)["groups"] == peak["groups"][:1]
    (tmp_path / f"{name}.txt").unlink()
    assert aot.peak_breakdown(str(tmp_path)) is None  # a dump without its HLO


@pytest.mark.slow
def test_a_run_too_large_for_its_chips_is_reported(capsys):
    """A tiny stage-1 run of 16,384 images on four 16 GiB chips: the compiler's RESOURCE_EXHAUSTED
    message, the verdict, and exit status 1."""
    code = cli.main(["plan", "--config", "tiny", "--mesh", "data=4", "--batch", "16384", "--compile",
                     "--topology", "v5e:2x2", "--programs", "train"])
    out = capsys.readouterr().out
    assert code == 1
    assert "does not fit: RESOURCE_EXHAUSTED" in out and "HBM" in out


@pytest.mark.slow
def test_stage3_step_moves_no_examples_between_chips():
    """On a data-parallel mesh the shortcut step's only collective is the gradients' all-reduce:
    its self-consistency examples are taken within each chip's share of the batch (taking the first
    quarter of the global batch added all-to-alls and permutes, 106 GiB a step at SD3-medium scale)."""
    from perco_jax.config import load_config

    config = load_config("tiny", ["stage3.method=shortcut", "stage3.batch_size=64"])
    p = aot.compile_training(config, aot.parse_topology("v5e-4"), {"data": 4, "fsdp": 1, "tensor": 1}, stage=3)
    assert p.error is None and set(p.collectives) == {"all-reduce"}


def test_multi_slice_mesh_puts_data_across_slices():
    """Two v5e-4 slices: 8 chips, the data axis over the slices (DCN), fsdp within each; a data axis
    that the slices do not divide is refused."""
    t = aot.parse_topology("v5e-4", num_slices=2)
    mesh = aot.training_mesh(t, {"data": 2, "fsdp": 4, "tensor": 1})
    slices = [[d.slice_index for d in row] for row in mesh.devices[:, :, 0]]
    assert slices == [[0, 0, 0, 0], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="multiple of the 2 slices"):
        aot.training_mesh(t, {"data": 1, "fsdp": 8, "tensor": 1})


def test_every_recipe_mesh_builds_on_its_slice():
    """Each recipe's mesh lays out on its slice's chips, including fsdp 64 on a 16x16 v6e torus,
    which no product of whole torus axes gives (jax.make_mesh refused it: the physical axis is
    split), each device once."""
    from perco_jax.configs.recipes import RECIPES
    from perco_jax.train.plan import parse_mesh

    for name, r in RECIPES.items():
        t = aot.parse_topology(r["topology"])
        shape = parse_mesh(r["mesh"], t.chips)
        mesh = aot.training_mesh(t, shape)
        assert mesh.devices.shape == (shape["data"], shape["fsdp"], shape["tensor"]), name
        assert len({d.id for d in mesh.devices.flat}) == t.chips, name


def test_plan_of_a_recipe(capsys):
    """`plan --recipe NAME` plans the recipe's config, stage, batch and mesh, counting the splash
    kernel (no stored logits), without compiling; every recipe names a known preset, slice and a
    mesh of its chips that divides its batch."""
    from perco_jax.configs.recipes import RECIPES
    from perco_jax.config import PRESETS, load_config
    from perco_jax.train import plan
    from perco_jax.train.plan import parse_mesh

    for name, r in RECIPES.items():
        t = aot.parse_topology(r["topology"])
        mesh = parse_mesh(r["mesh"], t.chips)
        assert r["config"] in PRESETS and r["batch"] % (mesh["data"] * mesh["fsdp"]) == 0, name
        per_chip = r["batch"] // (mesh["data"] * mesh["fsdp"])
        chunk = [int(o.split("=")[1]) for o in r["overrides"] if o.startswith("autoencoder_chunk=")]
        assert chunk and per_chip % chunk[0] == 0, name  # the VAE's passes split each chip's share
    assert cli.main(["plan", "--recipe", "sd3_medium-stage1-v5e-256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["config"], out["stage"], out["batch"], out["devices"]) == ("sd3_medium", 1, 10240, 256)
    assert out["attention"] == "splash" and out["flash_attention"] is True and out["vae_flash_attention"] is True
    assert out["mesh"] == {"data": 16, "fsdp": 16, "tensor": 1}
    code = [r["per_device_bytes"] for r in out["rows"] if r["what"] == plan.CODE_ROW]
    assert code == [plan.tpu_code_bytes(load_config("sd3_medium"), "v5e")]  # the v5e program's code
    assert cli.main(["plan", "--recipe", "nope"]) == 2


@pytest.mark.slow
def test_decoder_of_a_run_that_read_stored_embeddings_compiles():
    """A run trained on precomputed text embeddings (no text encoder on the chips) still exports a
    codec that encodes captions: its decoder is compiled with the text encoders."""
    from perco_jax.config import load_config

    config = load_config("tiny", ["text.embeddings=emb"])
    p = aot.compile_decoding(config, aot.parse_topology("v5e-4"), sampler="teacher")
    assert p.error is None and p.argument_bytes > 0


def test_batch_chunks_stay_on_their_chip_and_shrink_the_working_set():
    """`parallel.map_batch_chunks` (the frozen autoencoder's encoder at `autoencoder_chunk` images a
    chip) compiled for a v5e:2x2 slice with the batch split over data x fsdp: no collective (each
    chip maps over its own rows) and a quarter of the temporaries of the whole batch at once, for a
    per-example function whose intermediate is 64x its input."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from perco_jax import parallel

    devices = aot.parse_topology("v5e:2x2").devices()
    mesh = jax.make_mesh((2, 2, 1), parallel.MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    batch = NamedSharding(mesh, P(parallel.BATCH_AXES))
    x = jax.ShapeDtypeStruct((32, 64, 64, 8), jnp.float32, sharding=batch)  # 8 images a chip

    def per_example(a):  # [n, 64, 64, 8] -> [n, 8]: a [n, 64, 64, 512] intermediate
        h = jnp.tanh(jnp.concatenate([a * k for k in range(64)], axis=-1))
        return jnp.mean(h, axis=(1, 2))[:, :8]

    def compiled(chunk):
        with jax.set_mesh(mesh):
            return jax.jit(lambda a: parallel.map_batch_chunks(per_example, a, chunk),
                           out_shardings=batch).lower(x).compile()

    whole, chunked = compiled(0), compiled(2)
    assert aot.collectives(chunked.as_text()) == {}
    temp = chunked.memory_analysis().temp_size_in_bytes
    assert temp < whole.memory_analysis().temp_size_in_bytes / 3


def test_a_compiling_child_ends_with_its_parent(tmp_path):
    """The child of `compile_until_buffers` calls `die_with_parent`: when the parent is killed (a
    SIGKILL runs none of its clean-up) the child ends too instead of compiling on, orphaned."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    ready = tmp_path / "ready"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, time
        from perco_jax.train.aot import die_with_parent

        def child(parent):
            die_with_parent(parent)
            open({str(ready)!r}, "w").write(str(os.getpid()))
            time.sleep(120)

        if __name__ == "__main__":
            multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),)).start()
            time.sleep(120)
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.time() + 60
        while not (ready.exists() and ready.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        pid = int(ready.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()

        def alive():
            try:
                with open(f"/proc/{pid}/status") as f:
                    return "zombie" not in f.read()
            except FileNotFoundError:
                return False

        deadline = time.time() + 10
        while alive() and time.time() < deadline:
            time.sleep(0.2)
        assert not alive()
    finally:
        parent.kill()
