"""The shape of the code: the library never imports the stage layer, lower layers never import higher ones, and
each DVC stage's code deps are exactly the project modules its stage module reaches (so DVC reruns a stage whose
code changed, and only then)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")

# Library layers, bottom first: a module imports only from its own layer or below (and the graph has no cycle).
LAYERS = [
    {"errors", "registry", "threat", "runtime", "reporting", "config", "distributed", "metadata"},
    {"data", "graph", "masking"},
    {"models", "checkpoint", "onnx_io", "onnx_load", "channels", "quantization", "compression", "smoothing",
     "bounds", "attacks"},
    {"objectives", "training", "structured", "pruning"},
    {"audit"},
]
# attacks and bounds run on the graph form only: no masks, no architectures, no ONNX
GRAPH_CONSUMERS = {"bounds", "attacks"}
GRAPH_CONSUMER_MAY_IMPORT = LAYERS[0] | {"graph"} | GRAPH_CONSUMERS


def _module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere (also inside functions), relative imports resolved."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES and _module_file(m)}


def _files_of(module: str) -> set[Path]:
    """The files Python executes to import ``module``: every package ``__init__`` on the way, then the module."""
    parts = module.split(".")
    return {f for i in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:i])))}


def closure(path: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [path, *(_files_of(_module_name(path)))]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for m in _imports(p):
            todo.extend(_files_of(m))
    return seen


def _library_files() -> list[Path]:
    return sorted((ROOT / "pipeline").rglob("*.py"))


def _part(path: Path) -> str:
    """The library part a file belongs to: ``bounds`` for pipeline/bounds/crown.py, ``graph`` for graph.py."""
    return path.relative_to(ROOT / "pipeline").with_suffix("").parts[0]


def test_the_library_never_imports_the_stage_layer():
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in _library_files() for m in _imports(p)
                 if m.split(".")[0] == "stages"]
    assert not offenders


def test_lower_layers_never_import_higher_ones():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    parts = {_part(p) for p in _library_files()} - {"__init__"}
    assert parts <= set(layer_of), f"modules without a layer: {sorted(parts - set(layer_of))}"
    bad = []
    for p in _library_files():
        me = _part(p)
        for m in _imports(p):
            other = m.split(".")[1] if "." in m else "__init__"
            if other in ("__init__", me):
                continue
            if layer_of.get(other, 99) > layer_of.get(me, -1):
                bad.append(f"{p.relative_to(ROOT)} (layer {layer_of.get(me)}) imports {m} (layer {layer_of[other]})")
            if me in GRAPH_CONSUMERS and other not in GRAPH_CONSUMER_MAY_IMPORT:
                bad.append(f"{p.relative_to(ROOT)} runs on the graph form but imports {m}")
    assert not bad


def test_no_import_cycles_between_library_parts():
    edges = {}
    for p in _library_files():
        me = _part(p)
        edges.setdefault(me, set()).update(m.split(".")[1] for m in _imports(p) if "." in m and m.split(".")[1] != me)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in edges.get(a, ()))

    cycles = sorted(a for a in edges if reaches(a, a, set()))
    assert not cycles


def _module_imports() -> dict[str, set[str]]:
    """Each library module's project imports (anywhere in the file, functions included), less a package
    ``__init__``'s imports of its own submodules (a package gathering its parts is no cycle)."""
    edges: dict[str, set[str]] = {}
    for p in _library_files():
        me = _module_name(p)
        own = f"{me}." if p.name == "__init__.py" else None
        edges[me] = {m for m in _imports(p) if m.split(".")[0] == "pipeline" and m != me
                     and not (own and m.startswith(own))}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node, or with a self-edge (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_library_modules():
    """Finer than the parts: within a part too, two modules that import each other (even inside a function)
    split one idea wrongly."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself
    assert not _cycles(_module_imports())


# parts whose modules import no underscore name of another project module: ``_`` means "this module only"
PRIVATE_NAMES_KEPT = ("bounds", "audit")


def _underscore_imports(path: Path) -> list[str]:
    """The underscore names ``path`` takes from other project modules: ``from m import _x`` and ``alias._x`` of an
    ``import m as alias``."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base.split(".")[0] in PACKAGES and base != me:
                found += [f"{base}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] in PACKAGES})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            target = ast.unparse(node.value)
            if target in aliases and aliases[target] != me:
                found.append(f"{aliases[target]}.{node.attr}")
    return found


def test_modules_import_no_private_names_of_other_modules():
    offenders = [f"{p.relative_to(ROOT)} imports {name}" for p in _library_files()
                 if _part(p) in PRIVATE_NAMES_KEPT for name in _underscore_imports(p)]
    assert not offenders


def test_every_stage_lists_exactly_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"pretrain", "prune", "finetune", "quantize", "audit", "export", "report"}
    for name, stage in stages.items():
        code = {str(p.relative_to(ROOT)) for p in closure(ROOT / "stages" / f"{name}.py")}
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        # a folder stands for every module in it (DVC hashes the whole folder)
        listed = {str(p.relative_to(ROOT)) for d in deps if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py")}
        listed |= {d for d in deps if d.endswith(".py")}
        assert listed == code, (f"dvc.yaml stage {name}: missing {sorted(code - listed)}, "
                                f"not imported {sorted(listed - code)}")


def _patched_private_names(path: Path) -> list[str]:
    """``monkeypatch.setattr(alias, "_x", ...)`` where ``alias`` is an ``import pipeline.m as alias``."""
    tree = ast.parse(path.read_text())
    aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names if a.name.split(".")[0] == "pipeline"}
    return [f"{aliases[node.args[0].id]}.{node.args[1].value}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
            and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
            and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")]


def test_tests_reach_the_audit_through_its_public_seams(tmp_path):
    """No test imports or patches an underscore name of the audit (they would freeze today's structure): the
    seams are ``AuditHooks`` (compute, bars, layout, say) and the modules' public names."""
    old = tmp_path / "old.py"  # the check itself, on what the tests did before
    old.write_text('import pipeline.audit.parts as audit\n\ndef test(monkeypatch):\n'
                   '    monkeypatch.setattr(audit, "_work", None)\n')
    assert _patched_private_names(old) == ["pipeline.audit.parts._work"]
    offenders = [f"{p.relative_to(ROOT)}: {name}" for p in sorted((ROOT / "tests").glob("*.py"))
                 for name in _underscore_imports(p) + _patched_private_names(p) if name.startswith("pipeline.audit")]
    assert not offenders
