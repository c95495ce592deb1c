"""The package's architecture, read from its source with `ast` (nothing is imported or run).

- No import cycle between perco_jax modules at any depth; a function-local import that dodges a
  cycle at import time still counts.
- No `_private` name of a perco_jax module used from another file (tests, benchmarks and scripts
  included): imported (`from m import _x`), read from the module (`m._x`, `Cls._x` of an imported
  class), or an attribute `obj._x` that another module defines and the reading file does not.
- The layering of docs/design.md (models, with convert/ beside them <- flow / text <- codec / train
  <- eval / cli): models/ imports only models/; convert/ only models/, the weights-folder format and
  config (never sd3 or the text layer); the flow / text / base modules nothing of the codec, the
  training code, eval/ or the entry points; codec/ never train/; nothing below eval/ and the entry
  points imports them.

Each check lists everything it finds when it fails (and with `pytest -s`).
"""
from __future__ import annotations

import ast
import dataclasses
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder (setup.cfg installs configs/ as perco_jax.configs)
PACKAGES = {"perco_jax": ROOT / "perco_jax", "perco_jax.configs": ROOT / "configs"}
# Code outside the package that must keep to the package's privacy too.
CLIENTS = ("tests", "benchmarks", "scripts")

ENTRY = ("perco_jax.eval", "perco_jax.cli", "perco_jax.demo")  # the top layer
CODEC_AND_TRAINING = ("perco_jax.codec", "perco_jax.train")
FLOW_TEXT_AND_BASE = ("perco_jax.flow", "perco_jax.text",
                      "perco_jax.sd3", "perco_jax.captions", "perco_jax.build", "perco_jax.images",
                      "perco_jax.checkpoint", "perco_jax.config", "perco_jax.parallel", "perco_jax.distributed",
                      "perco_jax.tiny_sd3", "perco_jax.data")
# (importers, importers exempt, imported modules they may not use, exceptions to that, why); a name
# covers the module and the package below it
LAYERS = (
    (("perco_jax.models",), (), ("perco_jax",), ("perco_jax.models",),
     "models/ are pure networks: they import only models/"),
    (("perco_jax.convert",), (), ("perco_jax",),
     ("perco_jax.convert", "perco_jax.models", "perco_jax.checkpoint", "perco_jax.config"),
     "convert/ sits beside models/: it imports only models/, convert/, the weights-folder format and config"),
    (FLOW_TEXT_AND_BASE, (), CODEC_AND_TRAINING + ENTRY, (),
     "the flow, text and base modules sit below the codec and the training code"),
    (("perco_jax.codec",), (), ("perco_jax.train",), (), "the codec never depends on the training code"),
    (("perco_jax",), ENTRY, ENTRY, (), "eval/ and the entry points are the top layer: nothing below imports them"),
)


# ----------------------------------------------------------------------------- reading the source

def _module_name(path: Path, package: str, folder: Path) -> str:
    parts = path.relative_to(folder).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package,) + parts)


@cache
def package_modules() -> dict[str, Path]:
    """{dotted module name: file} of every perco_jax module."""
    return {_module_name(p, pkg, folder): p for pkg, folder in PACKAGES.items() for p in sorted(folder.rglob("*.py"))}


@cache
def client_modules() -> dict[str, Path]:
    return {_module_name(p, d, ROOT / d): p for d in CLIENTS for p in sorted((ROOT / d).rglob("*.py"))}


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@dataclasses.dataclass(frozen=True)
class Import:
    module: str          # the perco_jax module imported (or imported from)
    name: str | None     # the name taken from it by `from module import name` (None: the module itself)
    bound: str           # the local name bound ("a.b" for a plain `import a.b`)
    line: int


def imports(module: str, path: Path) -> list[Import]:
    """Every import of a perco_jax module in a file, at any depth (function bodies included)."""
    mods = package_modules()
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods:
                    out.append(Import(a.name, None, a.asname or a.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:
                    out.append(Import(sub, None, a.asname or a.name, node.lineno))
                elif base in mods:
                    out.append(Import(base, a.name, a.asname or a.name, node.lineno))
    return out


@cache
def import_graph() -> dict[str, set[str]]:
    """{module: modules it imports} over perco_jax, at any depth."""
    return {m: {i.module for i in imports(m, p)} - {m} for m, p in package_modules().items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):  # recursion depth is bounded by the number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _private(name: str) -> bool:
    """`_x` (and `__x`), not `_` or dunders such as `__init__`."""
    return len(name) > 1 and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@cache
def _defined_private() -> dict[str, set[str]]:
    """{module: private names it defines}: top-level and class-level names, and `self._x` attributes."""
    out = {}
    for m, p in package_modules().items():
        names = set()
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
        out[m] = {n for n in names if _private(n)}
    return out


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


def private_uses(module: str, path: Path) -> set[str]:
    """"module -> owner.name" for each private name of another perco_jax module used in a file."""
    found = set()
    bound = {}  # local dotted name -> "owner" (a module) or "owner.Name" (a class/function of it)
    for imp in imports(module, path):
        if imp.module == module:
            continue
        if imp.name is not None and _private(imp.name):
            found.add(f"{module} -> {imp.module}.{imp.name}")
        bound[imp.bound] = imp.module if imp.name is None else f"{imp.module}.{imp.name}"
    own = _defined_private().get(module, set())
    others: dict = {}  # private name -> the other modules that define it
    for owner, names in _defined_private().items():
        for n in names:
            if owner != module:
                others.setdefault(n, []).append(owner)
    for node in ast.walk(_tree(path)):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        base = _dotted(node.value)
        if base in bound:
            found.add(f"{module} -> {bound[base]}.{node.attr}")
        elif node.attr in others and node.attr not in own and base not in ("self", "cls"):
            found.add(f"{module} -> {'|'.join(sorted(others[node.attr]))}.{node.attr} "
                      f"(as an attribute of {base or 'an expression'})")
    return found


def all_private_uses() -> set[str]:
    files = {**package_modules(), **client_modules()}
    return set().union(*(private_uses(m, p) for m, p in files.items()))


def _under(module: str, names) -> bool:
    """Whether `module` is one of `names` or inside one of them (as a package)."""
    return any(module == n or module.startswith(n + ".") for n in names)


def layering_violations(graph: dict[str, set[str]]) -> set[str]:
    """"importer -> imported" for each import that a rule of LAYERS forbids."""
    out = set()
    for importers, exempt, banned, allowed, _ in LAYERS:
        for m, targets in graph.items():
            if _under(m, importers) and not _under(m, exempt):
                out |= {f"{m} -> {t}" for t in targets if _under(t, banned) and not _under(t, allowed)}
    return out


# ----------------------------------------------------------------------------- the checks

def _check(kind: str, found) -> None:
    report = "\n".join([f"{kind}: {len(found)} found"] + [f"  {v}" for v in sorted(found)])
    print(report)  # shown with -s, and by pytest on failure
    assert not found, report


def test_no_import_cycles():
    _check("import cycles", cycles(import_graph()))


def test_no_private_names_across_modules():
    _check("private names used across modules", all_private_uses())


def test_layering():
    _check("layering violations", layering_violations(import_graph()))


def test_the_checks_catch_what_they_should(tmp_path):
    """The analysis itself: a cycle through a function-local import, and each kind of private use."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert cycles({"a": {"b"}, "b": set()}) == []
    mods = package_modules()
    assert "perco_jax.configs.tiny" in mods and "perco_jax.codec.codec" in mods
    assert "perco_jax" in mods and mods["perco_jax"].name == "__init__.py"
    src = tmp_path / "probe.py"
    src.write_text("def f():\n"
                   "    from perco_jax.codec import bitstream as bs\n"
                   "    from perco_jax.codec.codec import Codec\n"
                   "    from perco_jax.codec.bitstream import _read_varint\n"
                   "    return bs._read_varint, Codec._as_private, obj._read_varint\n")
    name = "tests.probe"
    got = private_uses(name, src)
    assert {i.module for i in imports(name, src)} == {"perco_jax.codec.bitstream", "perco_jax.codec.codec"}
    assert f"{name} -> perco_jax.codec.bitstream._read_varint" in got
    assert f"{name} -> perco_jax.codec.codec.Codec._as_private" in got
    assert any(v.endswith("(as an attribute of obj)") for v in got)
    layered = layering_violations({"perco_jax.models.vq": {"perco_jax.flow", "perco_jax.models.layers"},
                                   "perco_jax.convert.pipeline": {"perco_jax.sd3", "perco_jax.checkpoint"},
                                   "perco_jax.codec.codec": {"perco_jax.train.state", "perco_jax.text.prompt"},
                                   "perco_jax.flow": {"perco_jax.codec.transforms", "perco_jax.models.mmdit"},
                                   "perco_jax.train.loop": {"perco_jax.eval.metrics", "perco_jax.codec.codec"},
                                   "perco_jax.eval.evaluate": {"perco_jax.cli", "perco_jax.train.loop"}})
    assert layered == {"perco_jax.models.vq -> perco_jax.flow", "perco_jax.convert.pipeline -> perco_jax.sd3",
                       "perco_jax.codec.codec -> perco_jax.train.state", "perco_jax.flow -> perco_jax.codec.transforms",
                       "perco_jax.train.loop -> perco_jax.eval.metrics"}
