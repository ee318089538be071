"""Run the native hook under a memory checker (not a pytest module).

    python tests/memcheck_hook.py --asan             # AddressSanitizer + UBSan build of the hook (minutes)
    python tests/memcheck_hook.py --asan --pytest "-q -m 'not slow'"   # the test suite against that build
    python tests/memcheck_hook.py                    # valgrind memcheck (about an hour per part on 2 cores)
    python tests/memcheck_hook.py --parts chunked,api  # only some parts of the workload
    python tests/memcheck_hook.py --model PATH       # another GGUF (default: the default model)
    python tests/memcheck_hook.py --no-checker       # the workload only (what the checkers run)

The workload drives every entry point of the native hook (native/*.c) through
ScopeLlama and the Hook binding, in parts:
  strategies  begin/end, capture_arm/capture_gather and evict on one-shot
              prefills and every decode step, for four strategy x selector pairs;
  chunked     chunked prefill over several ubatches, then shift (positions
              re-indexed past a low position_limit);
  api         cells, visible, evict (runs, singles, refusals), a captured
              multi-token decode (gathered per head and heads reduced), held,
              truncate, shift, clear, calls out of order;
  streams     three sequences in their own KV streams, decoded together in
              ubatches llama.cpp reorders (split_equal), captured, evicted;
  flash       the error path of a graph without kq_soft_max (flash attention on);
  iswa        a sliding-window model (tiny gemma3: full-attention layer 5, window
              16) under a budget, every step evicting; swa_layers refusals;
  hooks       many hooks created and freed, and a closed hook.

--asan compiles native/ with -fsanitize=address,undefined into a temporary
copy of the package and runs the workload (or, with --pytest, the tests) with
libasan preloaded: any invalid access or undefined behaviour aborts the run,
and LeakSanitizer's leak records with a frame in the hook are counted. Valgrind instead sees all of Python,
numba and llama.cpp: the runner uses PYTHONMALLOC=malloc (so pymalloc's arenas
are not flagged), writes valgrind's XML and counts only the errors with a frame
in _scope_hook*.so: invalid reads/writes, uses of uninitialised values, invalid
frees, and definite leaks allocated by the hook.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

HOOK_LIB = "_scope_hook"
REPO = Path(__file__).resolve().parents[1]
CHAT = "<|im_start|>user\nWrite a story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
WORDS = "the keeper counted ships and wrote their names in a blue book every night".split()
LONG_TEXT = " ".join(WORDS[i % len(WORDS)] + str(i % 7) for i in range(300))


def _small_budget():
    from scope_edge import Budget

    return Budget(prefill=16, decode=8, observation_window=4, recent_window=4)


def part_strategies(model: str) -> None:
    from scope_edge import ScopeLlama

    for strategy, selector in [("slide", "snapkv"), ("h2o", None), ("adaptive", "h2o"), ("discontinuous", "streaming")]:
        with ScopeLlama(model, budget=_small_budget(), strategy=strategy, prefill_selector=selector, n_threads=1) as m:
            out = m.generate(CHAT, max_tokens=12, ignore_eos=True)
            print(f"{strategy}/{selector}: {out.stats.evicted_cells} evicted, {out.stats.captured_steps} captures")


def part_chunked(model: str) -> None:
    from scope_edge import ScopeLlama

    with ScopeLlama(model, budget=_small_budget(), prefill_chunk=64, n_threads=1) as m:
        prompt = m.tokenize(LONG_TEXT)
        out = m.generate(prompt, max_tokens=4)
        print(f"chunked: {len(prompt)} prompt tokens, {out.stats.evicted_cells} evicted")
    with ScopeLlama(model, budget=_small_budget(), prefill_chunk=64, position_limit=48, n_threads=1) as m:
        out = m.generate(CHAT, max_tokens=40, ignore_eos=True)
        print(f"re-indexed: {out.stats.position_resets} resets")


def part_api(model: str) -> None:
    import numpy as np

    from scope_edge import ScopeLlama
    from scope_edge.hook import Hook, HookError

    with ScopeLlama(model, budget=None, n_ctx=1024, n_threads=1) as m:
        prompt = m.tokenize(LONG_TEXT)[:600]  # two ubatches
        m.generate(prompt, max_tokens=3)
        ctx = m.context
        ctx.cells(), ctx.visible()
        for bad in ([-1], [10**6], [int(m.kv_positions()[-1])]):
            try:
                ctx.evict(np.array(bad, dtype=np.int32))
            except HookError as exc:
                print("refused:", exc)
        ctx.evict(np.r_[np.arange(3, 40), np.arange(100, 300), [401, 403, 405]].astype(np.int32))
        nxt = int(m.kv_positions()[-1]) + 1
        with ctx.capturing(nxt):
            ctx.decode(prompt[:5], list(range(nxt, nxt + 5)), want_logits=True)
            cap = ctx.capture()
        print("captured rows:", int(cap.rows[0]), "over", len(cap.positions), "cells")
        for reduce in ("max", "sum"):  # heads reduced natively, over every held cell and a tail
            ctx.capture(head_reduce=reduce), ctx.capture(nxt, head_reduce=reduce)
        for step, reduce in enumerate(("max", "sum")):  # ... and as the rows are read (a decode step each)
            with ctx.capturing(nxt + 5 + step, heads=reduce):
                ctx.decode(prompt[5 + step : 6 + step], [nxt + 5 + step], want_logits=True)
            ctx.capture(head_reduce=reduce), ctx.capture(nxt, head_reduce=reduce)
        ctx.held(), ctx.held(10**9)
        ctx.truncate(200)
        ctx.shift(0, 200, 5)
        ctx.clear()

        def arm_before_0() -> None:
            with ctx.capturing(-3):
                pass

        # out of order: the context's hook refuses a decreasing batch and a
        # negative capture start; a fresh hook an end without begin
        lone = Hook(n_cells=8, n_layer=m.model.n_layer, n_head=m.model.n_head)
        try:
            for call in (lone.end, lambda: ctx.decode(prompt[:2], [5, 4], want_logits=False), arm_before_0):
                try:
                    call()
                except HookError as exc:
                    print("refused:", exc)
        finally:
            lone.close()


def part_streams(model: str) -> None:
    import contextlib
    import ctypes

    import numpy as np

    from scope_edge.runtime.context import Context
    from scope_edge.runtime.model import Model

    with Model(model) as mdl:
        ctx = Context(mdl, n_cells=3 * 256, n_threads=1, n_threads_batch=1, type_k="f16", abort=ctypes.c_bool(False),
                      n_ubatch=16, n_seq=3)
        try:
            prompt = mdl.tokenize(LONG_TEXT)
            lengths = (20, 50, 7)  # unequal: split_equal's ubatches take the batch out of order
            with contextlib.ExitStack() as armed:
                for s in range(3):
                    armed.enter_context(ctx.capturing(0, seq=s))
                ctx.decode_seqs([t for n in lengths for t in prompt[:n]], [i for n in lengths for i in range(n)],
                                [s for s, n in enumerate(lengths) for _ in range(n)], [False] * sum(lengths))
            for s in range(3):
                cap = ctx.capture(seq=s)
                ctx.evict(np.arange(2, 6, dtype=np.int32), seq=s)
                print(f"stream {s}: {len(cap.positions)} cells captured over {int(cap.rows[0])} rows, "
                      f"{len(ctx.positions(seq=s))} held after eviction")
        finally:
            ctx.close()


def part_flash(model: str) -> None:
    import llama_cpp

    from scope_edge import ScopeLlama
    from scope_edge.hook import HookError

    disabled = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    try:
        with ScopeLlama(model, budget=_small_budget(), n_threads=1) as m:
            try:
                m.generate(CHAT, max_tokens=4)
            except HookError as exc:
                print("flash attention:", exc)
    finally:
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED = disabled


def part_iswa(model: str) -> None:
    import numpy as np

    from scope_edge import Budget, ScopeLlama
    from scope_edge.hook import Hook, HookError

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemma3.gguf"
        # written by a child without the sanitizers: the gguf writer's allocations would fill
        # LeakSanitizer's table of distinct leaks, and none of them is the hook's
        write = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from tiny_gguf import write_tiny_gguf; "
                 f"write_tiny_gguf({str(path)!r}, 'gemma3', n_layer=6, sliding_window=16)")
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONSAFEPATH")}
        subprocess.run([sys.executable, "-c", write], check=True, env=env)
        budget = Budget(prefill=16, decode=16, observation_window=4, recent_window=4)
        with ScopeLlama(path, budget=budget, strategy="slide", prefill_selector="snapkv", n_threads=1) as m:
            out = m.generate([1] + [3 + i % 250 for i in range(59)], max_tokens=40, ignore_eos=True)
            print(f"iswa: {out.stats.evicted_cells} evicted, {len(m.kv_positions())} held")
    h = Hook(n_cells=8, n_layer=3, n_head=1)
    for flags in (np.ones(3, dtype=bool), np.zeros(2, dtype=bool)):
        try:
            h.swa_layers(flags)
        except HookError as exc:
            print("swa_layers:", exc)
    h.close()


def part_hooks(model: str) -> None:
    from scope_edge.hook import Hook, HookError

    for n in (1, 7, 256, 4096):
        Hook(n_cells=n, n_layer=3, n_head=2).close()
    h = Hook(n_cells=8, n_layer=1, n_head=1)
    h.close()
    try:
        h.cells()
    except HookError as exc:
        print("closed hook:", exc)


PARTS: dict[str, Callable[[str], None]] = {
    "strategies": part_strategies,
    "chunked": part_chunked,
    "api": part_api,
    "streams": part_streams,
    "flash": part_flash,
    "iswa": part_iswa,
    "hooks": part_hooks,
}


def workload(model: str, parts: list[str]) -> None:
    from scope_edge import hook

    print("hook library:", hook.library_path(), flush=True)
    for name in parts:
        PARTS[name](model)
        print(f"part {name} done", flush=True)
    print("workload done")


# -- valgrind ----------------------------------------------------------------


def valgrind_hook_errors(xml_path: Path) -> list[str]:
    """valgrind errors with a frame in the hook library, as text."""
    found = []
    for err in ET.parse(xml_path).getroot().iter("error"):
        frames = err.findall("./stack/frame")
        if not any(HOOK_LIB in (f.findtext("obj") or "") for f in frames):
            continue
        kind = err.findtext("kind") or "?"
        if kind.startswith("Leak_") and kind != "Leak_DefinitelyLost":
            continue
        what = err.findtext("what") or err.findtext("xwhat/text") or ""
        stack = "\n".join(
            f"    {f.findtext('fn') or '?'} ({Path(f.findtext('obj') or '?').name}"
            f"{':' + f.findtext('line') if f.findtext('line') else ''})" for f in frames[:8]
        )
        found.append(f"{kind}: {what}\n{stack}")
    return found


def run_valgrind(workload_cmd: list[str], xml_path: Path) -> int:
    # Smaller superblocks: with the default, translating ggml's widest
    # kernels exhausted VEX's temporary storage ("the 'impossible' happened").
    cmd = ["valgrind", "--tool=memcheck", "--leak-check=full", "--track-origins=yes", "--xml=yes",
           f"--xml-file={xml_path}", "--num-callers=30", "--vex-guest-max-insns=25", *workload_cmd]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONMALLOC="malloc", PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        print(f"the workload failed under valgrind (exit {proc.returncode}); its XML: {xml_path}")
        return 1
    errors = valgrind_hook_errors(xml_path)
    total = sum(1 for _ in ET.parse(xml_path).getroot().iter("error"))
    print(f"valgrind: {total} errors/leak records in the whole process, {len(errors)} in {HOOK_LIB}*.so "
          f"(XML: {xml_path})")
    for e in errors:
        print(e)
    return 1 if errors else 0


# -- AddressSanitizer + UndefinedBehaviorSanitizer ---------------------------

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]


def build_asan_package(dest: Path) -> Path:
    """A copy of scope_edge under dest whose hook is built with the sanitizers;
    returns dest (the directory to put on PYTHONPATH)."""
    import llama_cpp

    pkg = dest / "scope_edge"
    shutil.copytree(REPO / "scope_edge", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(REPO / "models" / "registry.json", pkg / "registry.json")
    lib = Path(llama_cpp.__file__).parent / "lib"
    include = Path(llama_cpp.__file__).parent.parent / "include"
    out = pkg / f"{HOOK_LIB}{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = ["gcc", "-shared", "-fPIC", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", *SANITIZE,
           f"-I{REPO / 'native'}", f"-I{include}", f"-I{sysconfig.get_paths()['include']}",
           *[str(c) for c in sorted((REPO / "native").glob("*.c"))],
           f"-L{lib}", "-lllama", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(out)]
    print("building:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return dest


def asan_reports(log_prefix: Path) -> tuple[list[str], int]:
    """(errors that involve the hook, leak records in the whole process).

    An error report (invalid access, UB) aborts the run and always counts; a
    leak record counts when a frame of its allocation stack is in the hook."""
    hook_errors, n_leaks = [], 0
    for path in sorted(log_prefix.parent.glob(log_prefix.name + ".*")):
        text = path.read_text(errors="replace")
        if "Too many leaks!" in text:  # the rest went unexamined, so no verdict
            hook_errors.append(f"{path.name}: LeakSanitizer hit its limit of distinct leaks; the leak check is incomplete")
        for block in re.split(r"\n\s*\n", text):
            if re.search(r"(Direct|Indirect) leak of", block):
                n_leaks += 1
                if HOOK_LIB in block or re.search(r"native/\w+\.c\b", block):
                    hook_errors.append(block.strip())
            elif "detected memory leaks" in block or re.search(r"SUMMARY: AddressSanitizer: .* leaked", block):
                continue  # the leak report's header and footer
            elif "AddressSanitizer" in block:
                hook_errors.append(block.strip())  # an error report, or the sanitizer's own CHECK failing
            elif "runtime error:" in block:
                hook_errors.append(block.strip())
    return hook_errors, n_leaks


def _gcc_file(name: str) -> str:
    out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def asan_env(pkg_root: Path, log_prefix: Path, *, leaks: bool) -> dict[str, str]:
    """Environment that runs Python with libasan preloaded and the sanitized
    package first on the path (PYTHONSAFEPATH: no checkout copy shadows it,
    in subprocesses too)."""
    # libstdc++ is preloaded too: llama.cpp throws (and catches) C++ exceptions,
    # and ASan's __cxa_throw interceptor needs the real one loaded at startup.
    preload = [_gcc_file("libasan.so"), _gcc_file("libstdc++.so.6")]
    return dict(
        os.environ,
        LD_PRELOAD=" ".join(preload),
        PYTHONPATH=os.pathsep.join([str(pkg_root), os.environ.get("PYTHONPATH", "")]),
        PYTHONSAFEPATH="1",
        PYTHONMALLOC="malloc",
        PYTHONUNBUFFERED="1",
        # Short allocation stacks: LeakSanitizer considers at most 5000 distinct
        # leak stacks, and Python's exit leaks exceed that even with 8 frames.
        # The hook calls malloc directly or through one helper, so 3 frames
        # (the interceptor, the caller, its caller) always show a hook frame.
        ASAN_OPTIONS=f"detect_leaks={int(leaks)}:malloc_context_size=3:log_path={log_prefix}:halt_on_error=1",
        UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:log_path={log_prefix}",
    )


def run_asan(cmd: list[str], tmp: Path, *, pytest_mode: bool) -> int:
    """Run cmd (the workload, or pytest) against the sanitized hook.

    The workload runs with LeakSanitizer, which then sets exit code 1 because
    Python itself leaks at exit: it passes when it finishes and no report
    involves the hook. pytest runs without leak checks, so its exit code
    stands; an invalid access aborts the test's process either way."""
    pkg_root = build_asan_package(tmp / "pkg")
    log_prefix = tmp / "asan"
    env = asan_env(pkg_root, log_prefix, leaks=not pytest_mode)
    probe = [sys.executable, "-c", "from scope_edge import hook; print(hook.library_path())"]
    loaded = subprocess.run(probe, env=asan_env(pkg_root, log_prefix, leaks=False), cwd=REPO,
                            capture_output=True, text=True).stdout
    if str(pkg_root) not in loaded:
        print(f"python does not load the sanitized hook from {pkg_root} (it loads {loaded.strip()!r})")
        return 1
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=None if pytest_mode else subprocess.PIPE, text=True)
    errors, n_leaks = asan_reports(log_prefix)
    if pytest_mode:
        failed = proc.returncode != 0
    else:
        print(proc.stdout)
        failed = "workload done" not in proc.stdout
    if failed:
        print(f"the run failed under ASan (exit {proc.returncode})")
        errors = errors or ["(no sanitizer report: see the output above)"]
    print(f"asan+ubsan: {len(errors)} errors or leaks involving {HOOK_LIB}"
          + ("" if pytest_mode else f"; {n_leaks} leak records in the whole process (Python, numba, llama.cpp)"))
    for e in errors:
        print("\n".join(e.splitlines()[:16]), "\n")
    return 1 if errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the registered default model)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--asan", action="store_true", help="AddressSanitizer + UBSan instead of valgrind")
    ap.add_argument("--pytest", metavar="ARGS", default=None,
                    help="with --asan: run pytest with these arguments instead of the workload")
    ap.add_argument("--no-checker", action="store_true", help="run the workload only")
    args = ap.parse_args()
    if args.pytest is not None and not args.asan:
        ap.error("--pytest goes with --asan (valgrind is too slow for the test suite)")
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; valid: {', '.join(PARTS)}")
    model = args.model
    if model is None:
        from scope_edge import models

        model = str(models.fetch())
    if args.no_checker:
        workload(model, parts)
        return 0
    cmd = [sys.executable, os.path.abspath(__file__), "--no-checker", "--model", model, "--parts", args.parts]
    if args.pytest is not None:
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *shlex.split(args.pytest)]
    if not args.asan:  # the XML outlives the run: valgrind runs take hours
        return run_valgrind(cmd, Path(tempfile.gettempdir()) / f"scope_edge_memcheck_{os.getpid()}.xml")
    with tempfile.TemporaryDirectory() as tmp:
        return run_asan(cmd, Path(tmp), pytest_mode=args.pytest is not None)


if __name__ == "__main__":
    sys.exit(main())
