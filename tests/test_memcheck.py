"""The memory-checker runner (tests/memcheck_hook.py) stays runnable: its
workload drives the hook without a checker, and its report parsers count only
what involves the hook. The checkers themselves are run by hand (README)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def memcheck():
    spec = importlib.util.spec_from_file_location("memcheck_hook", HERE / "memcheck_hook.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["memcheck_hook"] = mod
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["memcheck_hook"]


def test_workload_parts_run_without_a_checker(memcheck, model_path, capsys):
    memcheck.workload(model_path, ["api", "streams", "flash", "iswa", "hooks"])
    out = capsys.readouterr().out
    assert "stream 1: 50 cells captured over 50 rows, 46 held after eviction" in out
    assert out.count("refused:") == 6, out  # three bad evictions, three calls out of order
    assert "flash attention:" in out and "closed hook:" in out
    assert "captured rows: 5 over" in out
    assert "iswa: " in out and "every layer is a sliding-window layer" in out and "2 flags for 3 layers" in out
    assert out.rstrip().endswith("workload done")


ASAN_LOG = """\
=================================================================
==1==ERROR: LeakSanitizer: detected memory leaks

Direct leak of 64 byte(s) in 1 object(s) allocated from:
    #0 0x7f in malloc
    #1 0x7f in scope_hook_new native/scope_hook.c:120

Indirect leak of 32 byte(s) in 1 object(s) allocated from:
    #0 0x7f in malloc
    #1 0x5f in PyMem_RawMalloc python3.11

SUMMARY: AddressSanitizer: 96 byte(s) leaked in 2 allocation(s).
"""

UBSAN_LOG = "native/scope_hook.c:300:5: runtime error: signed integer overflow\n"


def test_asan_reports_count_only_what_involves_the_hook(memcheck, tmp_path):
    (tmp_path / "asan.101").write_text(ASAN_LOG)
    errors, n_leaks = memcheck.asan_reports(tmp_path / "asan")
    assert n_leaks == 2
    assert len(errors) == 1 and "scope_hook_new" in errors[0]
    (tmp_path / "asan.102").write_text(UBSAN_LOG)
    errors, _ = memcheck.asan_reports(tmp_path / "asan")
    assert len(errors) == 2 and "runtime error" in errors[1]


def test_asan_reports_no_verdict_when_leak_sanitizer_gave_up(memcheck, tmp_path):
    capped = "Too many leaks! Only the first 5000 leaks encountered will be reported.\n\n" + ASAN_LOG
    (tmp_path / "asan.7").write_text(capped.replace("scope_hook_new native/scope_hook.c:120", "PyList_New"))
    errors, n_leaks = memcheck.asan_reports(tmp_path / "asan")
    assert n_leaks == 2
    assert len(errors) == 1 and "incomplete" in errors[0]


VALGRIND_XML = """<?xml version="1.0"?>
<valgrindoutput>
 <error><kind>InvalidRead</kind><what>Invalid read of size 4</what>
  <stack><frame><fn>scope_hook_cells_get_pos</fn><obj>/x/_scope_hook.cpython-311-x86_64-linux-gnu.so</obj></frame></stack>
 </error>
 <error><kind>Leak_PossiblyLost</kind><xwhat><text>8 bytes possibly lost</text></xwhat>
  <stack><frame><fn>malloc</fn><obj>/x/_scope_hook.so</obj></frame></stack>
 </error>
 <error><kind>UninitCondition</kind><what>Conditional jump</what>
  <stack><frame><fn>ggml_graph_compute</fn><obj>/x/libggml-cpu.so</obj></frame></stack>
 </error>
</valgrindoutput>
"""


def test_valgrind_errors_count_only_the_hooks_and_definite_leaks(memcheck, tmp_path):
    xml = tmp_path / "v.xml"
    xml.write_text(VALGRIND_XML)
    errors = memcheck.valgrind_hook_errors(xml)
    assert len(errors) == 1
    assert errors[0].startswith("InvalidRead") and "scope_hook_cells_get_pos" in errors[0]
