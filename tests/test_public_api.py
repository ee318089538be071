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
     ROOT / "scope_edge" / "cli.py", ROOT / "scope_edge" / "openai.py", ROOT / "scope_edge" / "bench.py"]
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
