"""Run the native hook under valgrind's memcheck (not a pytest module).

    python tests/memcheck_hook.py                 # runs itself under valgrind, reports, exits 1 on errors
    python tests/memcheck_hook.py --model PATH    # another GGUF (default: the default model)
    python tests/memcheck_hook.py --no-valgrind   # only the workload (what valgrind runs)

The workload drives every entry point of native/scope_hook.c through
ScopeLlama and the Hook binding: begin/end on one-shot, multi-ubatch and
chunked prefills; capture_arm/capture_read on SnapKV/H2O prefills and every
decode step (slide, h2o); evict (runs, singles, refusals); shift (positions
re-indexed past a lowered trained context); truncate; clear; cells; visible;
the errors of a flash-attention graph, of calls out of order and of a closed
hook; and many hooks created and freed.

Valgrind sees all of Python, numba and llama.cpp too. The runner therefore
uses PYTHONMALLOC=malloc (so pymalloc's arenas are not flagged), writes
valgrind's XML and counts only the errors with a frame in _scope_hook*.so:
invalid reads/writes, uses of uninitialised values, invalid frees, and
definite leaks allocated by the hook. Takes a few minutes (valgrind runs the
model ~30x slower).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HOOK_LIB = "_scope_hook"


def workload(model: str) -> None:
    import llama_cpp
    import numpy as np

    from scope_edge import Budget, ScopeLlama
    from scope_edge._native import Hook, HookError

    chat = "<|im_start|>user\nWrite a story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
    words = "the keeper counted ships and wrote their names in a blue book every night".split()
    long_text = " ".join(words[i % len(words)] + str(i % 7) for i in range(300))
    small = Budget(prefill=16, decode=8, observation_window=4, recent_window=4)

    # begin/end, capture, evict on one-shot prefill and every decode step
    for strategy, selector in [("slide", "snapkv"), ("h2o", None), ("adaptive", "h2o"), ("discontinuous", "streaming")]:
        with ScopeLlama(model, budget=small, strategy=strategy, prefill_selector=selector, n_threads=1) as m:
            out = m.generate(chat, max_tokens=12, ignore_eos=True)
            print(f"{strategy}/{selector}: {out.stats.evicted_cells} evicted, {out.stats.captured_steps} captures")

    # chunked prefill over several ubatches, then re-indexing (shift) past a lowered trained context
    with ScopeLlama(model, budget=small, prefill_chunk=64, n_threads=1) as m:
        prompt = m._model.tokenize(long_text)
        out = m.generate(prompt, max_tokens=4)
        m._model.n_ctx_train = 48
        out = m.generate(chat, max_tokens=40, ignore_eos=True)
        print(f"chunked + re-indexed: {out.stats.position_resets} resets")

    # the hook's API directly: cells, visible, evict runs/singles/refusals, truncate, clear
    with ScopeLlama(model, n_ctx=1024, n_threads=1) as m:
        prompt = m._model.tokenize(long_text)[:600]  # two ubatches
        m.generate(prompt, max_tokens=3)
        ctx = m._ctx
        hook = ctx.hook
        hook.cells(), hook.visible()
        for bad in ([-1], [10**6], [int(m.kv_positions()[-1])]):
            try:
                hook.evict(ctx.ptr, np.array(bad, dtype=np.int32))
            except HookError as exc:
                print("refused:", exc)
        hook.evict(ctx.ptr, np.r_[np.arange(3, 40), np.arange(100, 300), [401, 403, 405]].astype(np.int32))
        nxt = int(m.kv_positions()[-1]) + 1
        hook.arm(nxt)
        ctx.decode(prompt[:5], list(range(nxt, nxt + 5)), want_logits=True)
        cap = hook.capture()
        hook.arm(None)
        print("captured rows:", int(cap.rows[0]), "over", len(cap.positions), "cells")
        hook.truncate(ctx.ptr, 200)
        hook.shift(ctx.ptr, 0, 200, 5)
        hook.clear(ctx.ptr)
        for call in (hook.end, lambda: hook.begin(np.array([5, 4], dtype=np.int32)), lambda: hook.arm(-3)):
            try:
                call()
            except HookError as exc:
                print("refused:", exc)

    # a graph without kq_soft_max (flash attention forced on)
    disabled = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    try:
        with ScopeLlama(model, budget=small, n_threads=1) as m:
            try:
                m.generate(chat, max_tokens=4)
            except HookError as exc:
                print("flash attention:", exc)
    finally:
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED = disabled

    # many hooks, and a closed one
    for n in (1, 7, 256, 4096):
        Hook(n_cells=n, n_layer=3, n_head=2).close()
    h = Hook(n_cells=8, n_layer=1, n_head=1)
    h.close()
    try:
        h.cells()
    except HookError as exc:
        print("closed hook:", exc)
    print("workload done")


def hook_errors(xml_path: Path) -> list[str]:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the registered default model)")
    ap.add_argument("--no-valgrind", action="store_true", help="run the workload only")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from scope_edge import models

        model = str(models.fetch())
    if args.no_valgrind:
        workload(model)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "memcheck.xml"
        cmd = ["valgrind", "--tool=memcheck", "--leak-check=full", "--track-origins=yes", "--xml=yes",
               f"--xml-file={xml_path}", "--num-callers=30",
               sys.executable, os.path.abspath(__file__), "--no-valgrind", "--model", model]
        env = dict(os.environ, PYTHONMALLOC="malloc")
        print("running:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            print(f"the workload failed under valgrind (exit {proc.returncode})")
            return 1
        errors = hook_errors(xml_path)
        total = sum(1 for _ in ET.parse(xml_path).getroot().iter("error"))
    print(f"valgrind: {total} errors/leak records in the whole process, {len(errors)} in {HOOK_LIB}*.so")
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
