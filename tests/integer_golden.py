"""The integer entropy model's golden data, tests/data/integer_entropy/ (tests/test_integer_entropy.py),
and the helpers that read and recompute it. Regenerate with

    python -m tests.integer_golden [--out tests/data/integer_entropy]

Two tiny conditional integer entropy models (K = 16, width 32, 2 blocks), one per caption input
(KINDS): model.npz reads an int8 context of 3 x 6 ("context"), model_tokens.npz 3 caption token
ids of a vocabulary of 24 ("tokens"). Each is quantised once from a seeded float EntropyModel
calibrated on seeded random inputs, then stored: the tests read the integers, never redo the float
steps (float initialisation and calibration may differ in the last bit across machines; the
stored integers do not).
golden.json / golden_tokens.json: 8 seeded 4 x 4 index grids and their int8 contexts / caption
tokens, and for each schedule the payloads the NumPy int64 reference encodes (hex) and the sha256
of each step's coding tables [8, n_s, K] (int64, little-endian). Rerun only when the integer
program itself changes on purpose.
"""
import argparse
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from perco_jax import schedules
from perco_jax.codec import entropy_coding
from perco_jax.models import integer_entropy_model as iem
from perco_jax.models.entropy_model import EntropyModel

K, GRID, L, C, V, B = 16, 4, 3, 6, 24, 8
DATA = Path(__file__).parent / "data" / "integer_entropy"
SPECS = ("checkerboard", "qlds:4", "implicit_var", "random:5:3")
KINDS = ("context", "tokens")
_SHAPE = dict(codebook_size=K, width=32, depth=2, num_heads=2, mlp_ratio=2, max_grid=GRID)
FLOAT_MODELS = {"context": dict(_SHAPE, context_dim=C), "tokens": dict(_SHAPE, caption_vocab=V, max_caption=L)}
FILES = {"context": ("model.npz", "golden.json"), "tokens": ("model_tokens.npz", "golden_tokens.json")}


def caption_inputs(rng, kind: str, n: int, length: int = L) -> np.ndarray:
    """Random caption inputs of a `kind` model: int8 contexts [n, length, C] or token ids [n, length]."""
    if kind == "tokens":
        return rng.integers(0, V, (n, length)).astype(np.int32)
    return rng.integers(-127, 128, (n, length, C)).astype(np.int32)


def load(kind: str = "context") -> tuple[iem.IntegerEntropyModel, dict]:
    """(the stored integer model, its golden.json) of a kind."""
    model, streams = FILES[kind]
    return load_model(DATA / model), json.loads((DATA / streams).read_text())


def save_model(qm: iem.IntegerEntropyModel, path: Path) -> None:
    np.savez_compressed(path, config=json.dumps(qm.config, sort_keys=True), **qm.to_tree())


def load_model(path: Path) -> iem.IntegerEntropyModel:
    with np.load(path) as z:
        return iem.IntegerEntropyModel.from_tree(json.loads(str(z["config"])),
                                                 {k: z[k] for k in z.files if k != "config"})


def table_hash(tables: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tables, "<i8").tobytes()).hexdigest()


def golden_inputs(kind: str = "context"):
    """(indices [B, 4, 4] int32, caption input) of the golden streams: context [B, L, C] int32 in
    [-127, 127] or caption tokens [B, L] int32 in [0, V)."""
    rng = np.random.default_rng(14)
    return rng.integers(0, K, (B, GRID, GRID)).astype(np.int32), caption_inputs(rng, kind, B)


def kind_of(qm: iem.IntegerEntropyModel) -> str:
    return "tokens" if qm.caption_vocab else "context"


def golden(qm: iem.IntegerEntropyModel) -> dict:
    """{spec: {"payloads": [hex] * B, "tables": [sha256 per step]}} by the NumPy reference."""
    tables = entropy_coding.IntegerTables(qm, reference=True)
    x, ctx = golden_inputs(kind_of(qm))
    out = {}
    for spec in SPECS:
        g = schedules.from_spec(spec, GRID, GRID)
        out[spec] = {"payloads": [p.hex() for p in entropy_coding.encode_indices(tables, x, g, ctx)],
                     "tables": [table_hash(entropy_coding.group_tables(tables, x, g, s, ctx))
                                for s in range(schedules.num_groups(g))]}
    return out


def reproduces(qm: iem.IntegerEntropyModel, expected: dict, tables, batch: int = B, specs=SPECS) -> list[str]:
    """What differs from `expected` (golden.json) when `tables` (an entropy_coding table source)
    encodes the golden inputs in batches of `batch`: [] when every payload and table hash is equal."""
    x, ctx = golden_inputs(kind_of(qm))
    wrong = []
    for spec in specs:
        g = schedules.from_spec(spec, GRID, GRID)
        got = [table_hash(entropy_coding.group_tables(tables, x, g, s, ctx)) for s in range(schedules.num_groups(g))]
        if got != expected[spec]["tables"]:
            wrong.append(f"{spec} tables")
        payloads = [p.hex() for p in entropy_coding.encode_indices(tables, x, g, ctx, batch_size=batch)]
        if payloads != expected[spec]["payloads"]:
            wrong.append(f"{spec} payloads (batch {batch})")
    return wrong


def sharded_tables_match(qm: iem.IntegerEntropyModel, expected: dict) -> list[str]:
    """The JAX path on the golden batch split over 8 devices (jax.device_count() >= 8): what
    differs from the golden table hashes."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.array(jax.devices()[:B]), ("data",)), PartitionSpec("data"))
    counts = iem.make_jax_counts(qm)
    x, ctx = golden_inputs(kind_of(qm))
    wrong = []
    for spec in SPECS:
        g = schedules.from_spec(spec, GRID, GRID)
        for s in range(schedules.num_groups(g)):
            mask = np.broadcast_to(g >= s, x.shape)
            out = counts(*jax.device_put((x, mask, ctx), sharding))
            if len(out.sharding.device_set) != B:
                wrong.append(f"{spec} step {s} not sharded")
            t = np.asarray(out, np.int64).reshape(B, -1, K)[:, np.flatnonzero(g.ravel() == s)]
            if table_hash(t) != expected[spec]["tables"][s]:
                wrong.append(f"{spec} step {s} tables (8 devices)")
    return wrong


def check_variants() -> dict:
    """{kind: {setting: [what differs]}} of the JAX path under the settings one process can switch:
    jit, disable_jit, batch 1, bfloat16 default matmul precision, 8 devices (when there are 8), x64
    on. XLA_FLAGS (optimisation level, device count) are the caller's environment."""
    return {kind: _check_variants(*load(kind)) for kind in KINDS}


def _check_variants(qm: iem.IntegerEntropyModel, expected: dict) -> dict:
    tables = entropy_coding.IntegerTables(qm)
    out = {"jit": reproduces(qm, expected, tables), "batch 1": reproduces(qm, expected, tables, batch=1)}
    with jax.disable_jit():
        out["disable_jit"] = reproduces(qm, expected, entropy_coding.IntegerTables(qm), specs=SPECS[:1])
    with jax.default_matmul_precision("bfloat16"):
        out["bfloat16 matmul precision"] = reproduces(qm, expected, entropy_coding.IntegerTables(qm))
    if jax.device_count() >= B:
        out["8 devices"] = sharded_tables_match(qm, expected)
    jax.config.update("jax_enable_x64", True)
    try:
        out["x64"] = reproduces(qm, expected, entropy_coding.IntegerTables(qm))
    finally:
        jax.config.update("jax_enable_x64", False)
    return out


def make_model(kind: str = "context") -> iem.IntegerEntropyModel:
    model = EntropyModel(**FLOAT_MODELS[kind])
    rng = np.random.default_rng(0)
    x = rng.integers(0, K, (64, GRID, GRID))
    mask = rng.random((64, GRID, GRID)) < rng.random((64, 1, 1))
    ctx = (rng.normal(size=(64, L, C)).astype(np.float32) if kind == "context"
           else rng.integers(0, V, (64, L)).astype(np.int32))
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]), jnp.asarray(mask[:1]), jnp.asarray(ctx[:1]))
    return iem.quantize(model, params, x, mask, ctx)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DATA))
    p.add_argument("--check", action="store_true",
                   help="print (JSON) what the JAX path gets wrong under each setting, write nothing")
    args = p.parse_args(argv)
    if args.check:
        print(json.dumps(check_variants()))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        model, streams = (out / name for name in FILES[kind])
        save_model(make_model(kind), model)
        qm = load_model(model)
        streams.write_text(json.dumps(golden(qm), indent=1, sort_keys=True) + "\n")
        print(f"wrote {model} and {streams} (model {qm.digest()[:16]})")


if __name__ == "__main__":
    main()
