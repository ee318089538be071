"""Everything outside the runtime uses the public API: no private attribute
of another object and no private module, checked on the syntax tree."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The runtime itself (scope_edge/ but its CLI, OpenAI shapes and bench) may reach inside.
OUTSIDE = sorted(
    [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("examples/*.py"),
     *ROOT.glob("scope_edge/bench/*.py"), ROOT / "scope_edge" / "cli.py", ROOT / "scope_edge" / "openai.py",
     ROOT / "scope_edge" / "flags.py"]
)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(path: Path) -> list[str]:
    """'line: code' of every access to another object's private attribute or
    import of a private module in path (self._x and cls._x are the object's own)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module and any(map(_private, node.module.split("."))):
            found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if any(map(_private, a.name.split(".")))]
    return found


def test_the_check_finds_private_access(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import scope_edge._x\nfrom a._b import c\nfrom a import _d\nllm._ctx.ptr\nself._own\n")
    assert [v.split(":")[0] for v in violations(bad)] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_access_outside_the_runtime(path: Path) -> None:
    assert violations(path) == [], f"{path.relative_to(ROOT)} reaches private names: add a public API"


# -- layers ------------------------------------------------------------------------
# Every module of the package, bottom up (docs/layers.md draws the same map). A
# module imports only modules of a lower layer, or of its own layer; nothing
# imports back up, deferred or not (imports inside functions and under
# TYPE_CHECKING count: a cycle broken by deferring is still a cycle).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("scope_edge.checks", "scope_edge._cache_dir", "scope_edge.gguf_meta", "scope_edge.memory",
                    "scope_edge.budget", "scope_edge.model_registry", "scope_edge.model_fetch", "scope_edge.models")),
    ("policies", ("scope_edge.policies", "scope_edge.policies.*")),
    ("mechanism", ("scope_edge.hook", "scope_edge.rpc", "scope_edge.devices")),
    ("runtime", ("scope_edge.runtime", "scope_edge.runtime.*")),
    ("wire", ("scope_edge.openai_wire", "scope_edge.openai_wire.*")),
    ("facade", ("scope_edge.llama",)),
    ("server", ("scope_edge.server", "scope_edge.server.*")),
    ("adapters", ("scope_edge.openai", "scope_edge.bench", "scope_edge.bench.*", "scope_edge.protocol",
                   "scope_edge.flags")),
    ("package", ("scope_edge",)),
    ("cli", ("scope_edge.cli",)),
)
# Layers at the same height: neither may import the other (the server runs
# the batched runtime, never the single-conversation facade).
PEERS = {"facade": 5, "server": 5, "adapters": 6, "package": 6}
# What a user imports (documented); everything else is internal and may change.
PUBLIC = {"scope_edge", "scope_edge.budget", "scope_edge.policies", "scope_edge.memory", "scope_edge.models",
          "scope_edge.openai", "scope_edge.rpc", "scope_edge.devices", "scope_edge.server", "scope_edge.bench",
          "scope_edge.cli"}
# Layers that never load llama.cpp: a policy sees positions and scores only.
NO_LLAMA_CPP = {"foundation", "policies"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "scope_edge").rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every scope_edge module and top-level package that
    path imports, wherever the import statement sits. `from pkg import x`
    names the submodule pkg.x when x is one, else pkg itself."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if sub in known else target))
    return found


def layer_of(name: str) -> str | None:
    for layer, patterns in LAYERS:
        for pattern in patterns:
            if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])):
                return layer
    return None


def height(layer: str) -> int:
    return PEERS.get(layer, [n for n, _ in LAYERS].index(layer))


def layer_violations(root: Path) -> list[str]:
    """'module:line: why' of every import against the layer map, and every
    module the map does not place."""
    modules = package_modules(root)
    known = set(modules)
    out = []
    for name, path in modules.items():
        layer = layer_of(name)
        if layer is None:
            out.append(f"{name}: not in LAYERS; place it in a layer (and docs/layers.md)")
            continue
        for line, target in imports(name, path, known):
            top = target.split(".")[0]
            if layer in NO_LLAMA_CPP and top == "llama_cpp":
                out.append(f"{name}:{line}: {layer} module imports {target} (llama.cpp)")
            if target not in known or target == name:
                continue
            other = layer_of(target)
            if other is None:
                continue
            if other != layer and height(other) >= height(layer):
                out.append(f"{name}:{line}: {layer} imports {target} ({other}, not below it)")
    return sorted(set(out))


def import_cycles(root: Path) -> list[list[str]]:
    """Every cycle of the package's import graph (one per strongly connected
    component of more than one module, or a module importing itself)."""
    modules = package_modules(root)
    known = set(modules)
    graph = {n: sorted({t for _, t in imports(n, p, known) if t in known and t != n}) for n, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_layer_check_finds_a_deferred_cycle(tmp_path: Path) -> None:
    """A cycle broken by a deferred import, and an import up the layers, are both found."""
    root = _fake_package(tmp_path, {
        "scope_edge/__init__.py": "",
        "scope_edge/runtime/__init__.py": "",
        "scope_edge/runtime/cache.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from .batch import SeqView\n",
        "scope_edge/runtime/batch.py": "from .cache import Cache\n",
        "scope_edge/policies/__init__.py": "",
        "scope_edge/policies/base.py": "def f():\n    from ..runtime import context\n",
        "scope_edge/runtime/context.py": "import llama_cpp\n",
    })
    assert import_cycles(root) == [["scope_edge.runtime.batch", "scope_edge.runtime.cache"]]
    assert layer_violations(root) == [
        "scope_edge.policies.base:2: policies imports scope_edge.runtime.context (runtime, not below it)"]


def test_no_import_cycles() -> None:
    assert import_cycles(ROOT) == [], "import cycles (deferred imports count): move the shared part to a lower module"


def test_imports_follow_the_layers() -> None:
    assert layer_violations(ROOT) == []


def test_examples_use_public_modules_only() -> None:
    """Examples are what users copy: they import documented modules only."""
    used = {t for p in ROOT.glob("examples/*.py") for _, t in imports("examples", p, set())
            if t.split(".")[0] == "scope_edge"}
    assert used and used <= PUBLIC, f"examples import internal modules: {sorted(used - PUBLIC)}"


def _members(protocol: type) -> list[str]:
    return sorted(n for n in vars(protocol) if not n.startswith("_")) + sorted(getattr(protocol, "__annotations__", {}))


@pytest.mark.parametrize("impl", ["scope_edge.runtime.context:Context", "scope_edge.runtime.batch:SeqView"])
def test_both_caches_implement_the_sequence_protocol(impl: str) -> None:
    """Context and SeqView are the two SequenceCache the runtime is handed:
    each declares it and has every member with compatible parameters
    (the protocol's positional ones in order, its keywords, and only
    defaulted extras)."""
    import importlib
    import inspect

    from scope_edge.runtime.sequence import SequenceCache

    module, name = impl.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert SequenceCache in cls.__mro__
    for member in _members(SequenceCache):
        want = inspect.getattr_static(SequenceCache, member, None)
        if not callable(want):
            continue  # an attribute or property: checked by use
        have = inspect.getattr_static(cls, member)
        assert have is not want, f"{name} does not implement {member}"
        want_sig, have_sig = inspect.signature(want).parameters, inspect.signature(have).parameters
        positional = [n for n, p in want_sig.items() if p.kind is not p.KEYWORD_ONLY]
        assert list(have_sig)[: len(positional)] == positional, f"{name}.{member}: positional parameters"
        for n, p in want_sig.items():
            assert n in have_sig and (p.kind is not p.KEYWORD_ONLY or have_sig[n].kind is p.KEYWORD_ONLY), \
                f"{name}.{member} lacks keyword {n}"
        extra = [p for n, p in have_sig.items() if n not in want_sig]
        assert all(p.default is not p.empty for p in extra), f"{name}.{member}: extra parameters need defaults"



# A module past this many lines is split by concern, or is one concept and says so ("One concept:" in its
# opening comment, with why), as issue 28 asks.
MODULE_LINES = 400
SOURCES = sorted([*ROOT.glob("scope_edge/**/*.py"), *ROOT.glob("native/*.[ch]")])


def oversized(path: Path) -> str | None:
    """Why path breaks the size rule, or None."""
    text = path.read_text()
    n = text.count("\n")
    if n > MODULE_LINES and "One concept:" not in text[:2000]:
        return f"{path.name}: {n} lines and no 'One concept:' in its opening comment"
    return None


def test_the_size_rule_finds_a_long_module(tmp_path: Path) -> None:
    long = tmp_path / "long.py"
    long.write_text('"""Two things."""\n' + "x = 1\n" * MODULE_LINES)
    assert oversized(long) == f"long.py: {MODULE_LINES + 1} lines and no 'One concept:' in its opening comment"
    long.write_text('"""One concept: a list of ones."""\n' + "x = 1\n" * MODULE_LINES)
    assert oversized(long) is None


def test_modules_are_small_or_one_concept() -> None:
    assert len(SOURCES) > 30
    assert [why for why in map(oversized, SOURCES) if why] == []
