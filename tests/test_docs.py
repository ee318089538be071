"""The README's headline table quotes only numbers its cited result files hold.

Each row of the table under "## Results" cites one file in bench/results/ in its
last column; every number in the row's other columns must be one the file
holds for that row's run, formatted as the README prints it (MiB to 0.1,
ratios as x to 0.01, shares as % to 0.1, tok/s to 0.1). No model is loaded.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# a number not glued to a word, a dot or a hyphen (so "top-1" and "q8_0" are words)
NUMBER = re.compile(r"(?<![\w.\-])\d[\d,]*(?:\.\d+)?")
CITED = re.compile(r"\]\((bench/results/[^)]+)\)")


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _spread(s: dict, digits: int) -> set[str]:
    return {f"{s[k]:.{digits}f}" for k in ("median", "min", "max")}


def _headline(d: list[dict] | dict) -> set[str]:
    if isinstance(d, dict):  # bench/headline.py under scope_edge.protocol
        return _headline_protocol(d)
    r = next(r for r in d if r["config"]["strategy"] == "slide")
    c, o, s = r["config"], r["ours"], r["stock"]
    return {str(c["prompt_tokens"]), str(c["max_tokens"]), str(c["prefill_budget"]), str(c["decode_budget"]),
            _mib(o["kv_bytes_allocated"]), _mib(s["kv_bytes"]), _pct(r["ratios"]["kv_bytes"]),
            f"{o['decode_tokens_per_s']:.1f}", f"{s['decode_tokens_per_s']:.1f}",
            f"{r['ratios']['decode_speedup']:.2f}", _pct(r["fidelity"]["top1_agreement"])}


def _headline_protocol(d: dict) -> set[str]:
    c, cols = d["config"], d["columns"]
    held = {str(c[k]) for k in ("prompt_tokens", "max_tokens", "prefill_budget", "decode_budget")}
    held |= {str(d["protocol"]["rounds"]), f"{d['load_1m']['before']:.2f}", f"{d['load_1m']['after']:.2f}"}
    for col in cols.values():
        held |= {_mib(col["kv_bytes"]), f"{col['cells']}", _pct(col["kv_bytes"] / cols["stock"]["kv_bytes"]),
                 *_spread(col["summary"]["decode_tokens_per_s"], 1)}
    for r in d["ratios"].values():
        held |= _spread(r, 2)
    for f in (d.get("fidelity") or {}).values():
        held.add(_pct(f["top1_agreement"]))
    return held


def _beyond(d: dict) -> set[str]:
    t = d["targets"]
    if "protocol" in t:  # bench/beyond.py under scope_edge.protocol
        return _beyond_protocol(t)
    o = next(o for o in t["ours"] if o["type_k"] == "f16")
    return {str(t["prompt_tokens"]), str(t["max_tokens"]), str(o["ours"]["kv_cells_allocated"]),
            _mib(o["ours"]["kv_bytes_allocated"]), _mib(t["stock"]["kv_bytes"]), _pct(o["kv_bytes_vs_stock_f16"])}


def _beyond_protocol(t: dict) -> set[str]:
    cols = t["columns"]
    held = {str(t["prompt_tokens"]), str(t["max_tokens"]), str(t["protocol"]["rounds"]),
            *map(str, t["budget"].values())}
    for col in cols.values():
        held |= {_mib(col["kv_bytes"]), f"{col['cells']}", _pct(col["kv_bytes"] / cols["stock"]["kv_bytes"]),
                 *_spread(col["summary"]["decode_tokens_per_s"], 1)}
    for r in t["ratios"].values():
        held |= _spread(r, 2)
    return held


def _device(d: dict) -> set[str]:
    """device.py's steady rows (steady.json): slide's, and the
    ratios of ours with no budget (its own cost) when the file has them."""
    r = d["steady_cpu"]["slide"]
    held = {str(r["kv_cells"]), str(r["repeats"]), f"{r['decode_tokens_per_s']:.1f}",
            f"{r['stock_same_cells_tokens_per_s']:.1f}"}
    for row in (r, d["steady_cpu"].get("none") or r):
        held |= {f"{row[k]:.2f}" for k in ("vs_stock", "vs_stock_min", "vs_stock_max")}
    return held


def _server(d: dict) -> set[str]:
    if "protocol" in d:  # bench/server.py under scope_edge.protocol
        return _server_protocol(d)
    r = max(d["runs"], key=lambda r: r["conversations"])
    o = r["ours"]
    return {str(r["conversations"]), str(d["prompt"]), str(d["tokens"]), *map(str, d["budget"]),
            str(d["batch_threads"]), f"{o['decode_tokens_per_s']:.1f}", f"{r['stock_threads_decode_tokens_per_s']:.1f}",
            f"{r['decode_speedup_same_threads']:.2f}", f"{r['decode_speedup']:.2f}", _mib(o["kv_bytes"]),
            _mib(r["stock_kv_bytes"]), _pct(r["kv_ratio"]), _mib(d["stock"][0]["kv_bytes"])}


def _server_protocol(d: dict) -> set[str]:
    r = max(d["runs"], key=lambda r: r["conversations"])
    held = {str(r["conversations"]), str(d["prompt"]), str(d["tokens"]), *map(str, d["budget"]),
            str(d["protocol"]["rounds"]), *map(str, d["protocol"]["threads"])}
    held |= _spread(r["ours"]["decode_tokens_per_s"], 1)
    for key, s in r.items():
        if key.startswith("stock in turn") or key == "batched":
            held |= _spread(s["decode_tokens_per_s"], 1)
    for q in r["ratios"].values():
        held |= _spread(q, 2)
    kv = r["kv"]
    held |= {_mib(kv[k]) for k in ("ours", "stock_held", "stock_at_once", "batched")}
    held |= {_pct(kv[k]) for k in kv if k.startswith("ours / ")}
    return held


# cited file -> the numbers it holds for the README's rows
HELD: dict[str, Callable[..., set[str]]] = {
    "headline.json": _headline, "goal_4096_12288.json": _headline, "beyond.json": _beyond, "steady.json": _device,
    "server.json": _server,
}


def headline_rows(readme: str) -> list[list[str]]:
    """The cells of every body row of the first table under '## Results'."""
    section = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[2:]]  # past header and rule


def unheld_numbers(row: list[str]) -> tuple[str, list[str]]:
    """(the cited file, the numbers of the row that file does not hold)."""
    cited = CITED.findall(row[-1])
    assert len(cited) == 1, f"a headline row cites exactly one result file in its last column: {row}"
    path = ROOT / cited[0]
    assert path.is_file(), f"the README cites {cited[0]}, which does not exist"
    assert path.name in HELD, f"no reader for {path.name} in tests/test_docs.py: add one to HELD"
    held = HELD[path.name](json.loads(path.read_text()))
    text = re.sub(r"`[^`]*`", "", " | ".join(row[:-1]))  # code spans name things, they quote nothing
    numbers = [n.replace(",", "") for n in NUMBER.findall(text)]
    assert numbers, f"a headline row without numbers: {row}"
    return path.name, [n for n in numbers if n not in held]


def test_readme_headline_numbers_are_held_by_the_cited_files():
    rows = headline_rows((ROOT / "README.md").read_text())
    assert len(rows) >= 5, rows
    wrong = {}
    for row in rows:
        name, unheld = unheld_numbers(row)
        if unheld:
            wrong[row[0]] = (name, unheld)
    assert not wrong, f"README headline numbers not held by the files they cite: {wrong}"


@pytest.mark.parametrize("row,bad", [
    (["decode tok/s, prompt 2048 + 4096", "97.0", "49.9", "1.84x", "median of 3 rounds", "[h](bench/results/headline.json)"],
     ["1.84"]),
    (["KV, 4 conversations", "67.5 MiB", "180.0 MiB", "28.7%", "", "[s](bench/results/server.json)"], ["28.7"]),
])
def test_a_number_the_file_does_not_hold_is_caught(row, bad):
    assert unheld_numbers(row)[1] == bad


def test_ci_runs_the_readme_setup_commands():
    """.ci/run's fresh set-up runs the README's first command and its test run the second, with the
    same CMAKE_ARGS: the README's set-up block is what CI proves."""
    setup = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("CMAKE_ARGS=")]
    assert len(setup) >= 2, setup
    ci = (ROOT / ".ci/run").read_text()
    for command in setup[:2]:
        cmake, rest = re.fullmatch(r'(CMAKE_ARGS="[^"]*") (.*)', command).groups()
        assert f"export {cmake}\n" in ci
        install, run = rest.split(" && ", 1)
        assert run in ci, f".ci/run does not run the README's {run!r}"


# a result file's name as the docs write it: not a pattern ("fidelity*.json", "<script>.json")
RESULT_NAME = re.compile(r"(?<![\w*/<-])([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\.(?:jsonl?|png))\b")


def test_every_result_file_the_docs_name_exists():
    """A result file the README, bench/README.md or docs/ name is in
    bench/results/ (a deleted or renamed file is caught; CHANGELOG.md is
    history and may name files that are gone)."""
    stored = {p.name for p in (ROOT / "bench" / "results").rglob("*")}
    docs = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = {(doc.name, m) for doc in docs for m in RESULT_NAME.findall(doc.read_text()) if m not in stored}
    assert not missing, f"docs name result files bench/results/ does not hold: {sorted(missing)}"


def test_a_deleted_result_file_is_caught():
    assert RESULT_NAME.findall("see `fidelity_lend.json` and fidelity*.json, <script>.json") == ["fidelity_lend.json"]
