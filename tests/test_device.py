"""The offload path on a real non-CPU device: llama.cpp's RPC backend.

A session fixture starts an RPC server (the CPU device behind a socket, in a
child process) on 127.0.0.1; models offload every layer (-1) or about half of
them (15 of 31) to it. With every layer offloaded, the hook's inputs reach it
as the scheduler's copies into the device split, the KV cache lives in the
server's memory and every tensor read is a transfer: what a GPU exercises.
"""
from __future__ import annotations

import os
import socket

import llama_cpp
import numpy as np
import pytest

from scope_edge import Budget, ScopeLlama, Sketch, rpc
from scope_edge.devices import Devices
from scope_edge.openai import create_chat_completion
from scope_edge.runtime.context import default_capture_layers
from scope_edge.runtime.model import Model
from llama_log import llama_log
from served import start_server
from test_batch import check_reordered_step, reordered_prompts
from test_bench import check_protocol_run, load_script, with_default
from test_budgets import check_invariants_every_step
from test_lend import check_lending_every_step
from test_runtime import PROMPT

OFFLOAD = {"all": -1, "half": 15}
STRATEGIES = [("slide", "snapkv"), ("adaptive", "h2o"), ("discontinuous", "streaming"),
              ("streaming", "streaming"), ("h2o", "h2o"), ("full", "full")]


def under_ci() -> bool:
    """CI=true (or 1, yes): the device tests must run, so what would skip them fails."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def endpoint() -> str:
    if not rpc.available():
        if under_ci():
            pytest.fail(f"CI must run the device tests: llama-cpp-python lacks RPC; {rpc.REBUILD}")
        pytest.skip(f"llama-cpp-python was built without the RPC backend; to run these: {rpc.REBUILD}")
    try:  # one compute thread: the client's thread and the server's share this machine's 2 cores
        server = rpc.Server(rpc.free_endpoint(), n_threads=1)
    except rpc.RPCError as e:  # a build with RPC whose server cannot run is broken, CI or not
        pytest.fail(f"the device tests need an rpc-server on 127.0.0.1, and it did not start: {e}")
    with server:
        rpc.register(server.endpoint)  # stock llama_cpp.Llama offloads to it too
        yield server.endpoint


@pytest.fixture(params=list(OFFLOAD), ids=[f"{k}-layers" for k in OFFLOAD])
def device(request: pytest.FixtureRequest, endpoint: str) -> dict:
    return {"rpc_servers": [endpoint], "n_gpu_layers": OFFLOAD[request.param]}


def _kv_buffers(run) -> list[str]:
    """llama.cpp's own log lines naming the buffers its KV cache was put in."""
    with llama_log() as lines:
        run()
    return [line for line in lines if "KV buffer size" in line]


def test_cache_lives_on_the_device(model_path, device):
    def run() -> None:
        with ScopeLlama(model_path, budget=None, n_ctx=512, **device) as llm:
            llm.generate(PROMPT, max_tokens=4)

    buffers = _kv_buffers(run)
    on_device = [b for b in buffers if "RPC" in b]
    assert on_device, buffers
    if device["n_gpu_layers"] == -1:
        assert len(on_device) == len(buffers)  # nothing of the cache on the host
    else:
        assert len(on_device) < len(buffers)  # the lower layers stay on the CPU


def test_full_cache_is_token_identical_to_stock_on_the_device(model_path, device):
    n_ctx, max_tokens = 512, 40
    want = {}

    def run_stock() -> None:
        stock = llama_cpp.Llama(model_path, n_ctx=n_ctx, n_gpu_layers=device["n_gpu_layers"], verbose=False)
        try:
            want.update(stock.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0))
        finally:
            stock.close()

    assert any("RPC" in b for b in _kv_buffers(run_stock))  # stock really ran on the device
    with ScopeLlama(model_path, budget=None, n_ctx=n_ctx, **device) as llm:
        got = llm.generate(PROMPT, max_tokens=max_tokens)
    assert got.text == want["choices"][0]["text"]
    assert len(got.tokens) == max_tokens


def test_device_matches_cpu_under_a_budget(model_path, device):
    budget = Budget(prefill=48, decode=32, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=budget, **device) as llm:
        got = llm.generate(PROMPT, max_tokens=60, ignore_eos=True)
        layers = llm.capture_layers  # the offload default: every 4th layer
    with ScopeLlama(model_path, budget=budget, capture_layers=layers) as cpu:
        want = cpu.generate(PROMPT, max_tokens=60, ignore_eos=True)
    # the same attention reaches the policy, so the same cells are evicted
    assert got.stats.evicted_cells == want.stats.evicted_cells > 0
    assert got.stats.captured_steps == want.stats.captured_steps > 0
    assert got.tokens[:30] == want.tokens[:30]


@pytest.mark.parametrize("strategy,selector", STRATEGIES)
def test_budget_invariants_every_step_on_the_device(model_path, endpoint, strategy, selector):
    check_invariants_every_step(model_path, strategy, selector, rpc_servers=[endpoint], n_gpu_layers=-1)


@pytest.mark.parametrize("strategy,selector", STRATEGIES[:2])
def test_budget_invariants_with_half_the_layers_offloaded(model_path, endpoint, strategy, selector):
    check_invariants_every_step(model_path, strategy, selector, rpc_servers=[endpoint], n_gpu_layers=15)


@pytest.mark.parametrize("lend", ["passed", "accumulated"])
def test_lending_every_step_on_the_device(model_path, endpoint, lend):
    check_lending_every_step(model_path, "slide", lend, rpc_servers=[endpoint], n_gpu_layers=-1)


@pytest.mark.parametrize("strategy,selector", [("slide", "snapkv"), ("h2o", "h2o")])
def test_sketch_invariants_every_step_on_the_device(model_path, device, strategy, selector):
    """Flash attention on, K and V q8_0, scores from key sketches: the hook
    finds flash attention's node in the device split and reads the queries
    and the stored keys from the device."""
    check_invariants_every_step(model_path, strategy, selector, flash_attn=True, type_k="q8_0", type_v="q8_0",
                                scoring=Sketch(rank=8), **device)


def test_sketch_agrees_with_the_cpu_on_the_device(model_path, endpoint):
    """The same sketch-scored generation on the device and on the CPU: the
    same cells evicted, so the same text for a good while."""
    kw = dict(budget=Budget(prefill=64, decode=32, observation_window=8, recent_window=8), flash_attn=True,
              scoring=Sketch(rank=8))
    with ScopeLlama(model_path, rpc_servers=[endpoint], n_gpu_layers=-1, **kw) as dev:
        got = dev.generate(PROMPT, max_tokens=60, ignore_eos=True)
        layers = dev.capture_layers
    with ScopeLlama(model_path, capture_layers=layers, **kw) as cpu:
        want = cpu.generate(PROMPT, max_tokens=60, ignore_eos=True)
    assert got.stats.evicted_cells == want.stats.evicted_cells > 0
    assert got.tokens[:30] == want.tokens[:30]


def test_captured_rows_sum_to_one_on_the_device(model_path, device):
    with ScopeLlama(model_path, budget=None, n_ctx=1024, **device) as llm:
        llm.generate(PROMPT, max_tokens=2)
        ctx = llm.context
        pos = int(llm.kv_positions()[-1]) + 1
        with ctx.capturing(pos):
            ctx.decode([100, 200, 300], range(pos, pos + 3), want_logits=True)
        cap = ctx.capture()
        picked = np.zeros(30, dtype=bool)
        picked[llm.capture_layers] = True
    np.testing.assert_allclose(cap.attn[picked].sum(axis=-1), 3.0, rtol=1e-4)  # 3 rows, each summing to 1
    assert (cap.rows[picked] == 3).all() and not cap.attn[~picked].any() and (cap.rows[~picked] == 0).all()


def test_reindexing_on_the_device(model_path, device):
    b = Budget(prefill=64, decode=64, observation_window=8, recent_window=16)
    with ScopeLlama(model_path, budget=None) as tokenizer:
        prompt = tokenizer.tokenize(PROMPT * 8)
    assert len(prompt) + 20 > b.total + 32
    with ScopeLlama(model_path, budget=b, position_limit=len(prompt) + 20, **device) as llm:  # re-index early and often
        got = llm.generate(prompt, max_tokens=200, ignore_eos=True)
        held = llm.kv_positions()
        mem = llm.context.memory
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == held.max() < len(prompt) + 20
    assert got.stats.position_resets >= 2
    assert len(set(got.tokens[-50:])) > 3


def test_multi_turn_chat_on_the_device(model_path, endpoint):
    b = Budget(prefill=32, decode=16, observation_window=8, recent_window=8)
    messages = [{"role": "user", "content": "Name three colours."}]
    with ScopeLlama(model_path, budget=b, rpc_servers=[endpoint], n_gpu_layers=-1) as llm:
        for turn in range(3):
            r = create_chat_completion(llm, messages, max_tokens=24)
            st = r["scope_edge"]
            assert st["kv_cells_peak"] <= b.total
            if turn:
                assert st["reused_prompt_tokens"] > 0
            messages += [r["choices"][0]["message"], {"role": "user", "content": f"And {turn + 4} more?"}]


def test_interrupted_stream_on_the_device(model_path, endpoint):
    b = Budget(prefill=32, decode=16, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b, rpc_servers=[endpoint], n_gpu_layers=-1) as llm:
        want = llm.generate(PROMPT, max_tokens=24).tokens
        for i, _ in enumerate(llm.stream(PROMPT, max_tokens=200)):
            if i == 5:
                break
        assert llm.generate(PROMPT, max_tokens=24).tokens == want


def test_sequences_in_their_own_streams_on_the_device(model_path, endpoint):
    """A step of three sequences that llama.cpp reorders into ubatches, every
    layer on the device: each sequence's cells and captured attention are what
    its tokens give alone on the CPU."""
    with ScopeLlama(model_path, budget=None) as llm, Model(model_path) as cpu, \
            Model(model_path, devices=Devices(rpc_servers=(endpoint,), n_gpu_layers=-1)) as on_device:
        check_reordered_step(on_device, cpu, reordered_prompts(llm))


def test_unreachable_server_fails_fast_with_the_endpoint(model_path):
    endpoint = rpc.free_endpoint()  # bound, then released: nothing listens there
    with pytest.raises(rpc.RPCError, match=f"cannot reach an RPC server at {endpoint}"):
        ScopeLlama(model_path, budget=None, rpc_servers=[endpoint], n_gpu_layers=-1)


def test_silent_server_times_out_with_the_endpoint(model_path):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(rpc.RPCError, match=f"{endpoint} did not answer within 1 s"):
            rpc.probe(endpoint, timeout=1.0)


@pytest.mark.parametrize("bad", ["localhost", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", ":50052",
                                 "127.0.0.1:port", 50052])
def test_malformed_endpoints_are_refused(bad):
    with pytest.raises(ValueError, match="host:port"):
        ScopeLlama("unused.gguf", rpc_servers=[bad], n_gpu_layers=-1)


@pytest.mark.parametrize("kwargs,match", [
    ({"rpc_servers": "127.0.0.1:50052"}, "list of 'host:port' strings"),
    ({"rpc_servers": ["127.0.0.1:1", "127.0.0.1:1"]}, "twice"),
    ({"n_gpu_layers": -2}, r"n_gpu_layers must be an int >= -1"),
    ({"main_gpu": -1}, "main_gpu"),
    ({"tensor_split": [-1.0]}, "tensor_split"),
    ({"tensor_split": [0.0, 0.0]}, "tensor_split"),
])
def test_bad_device_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScopeLlama("unused.gguf", **kwargs)


def test_offload_captures_every_4th_layer_unless_told(model_path, endpoint):
    """Each captured layer stops the device's graph once per captured step:
    offloaded, the default captures layers 2, 6, ..., 26 and reads only
    those; range(30) captures every layer; on the CPU the default is every layer."""
    b = Budget(prefill=48, decode=32, observation_window=8, recent_window=8)
    runs = {}
    for layers in (range(30), None):
        with ScopeLlama(model_path, budget=b, capture_layers=layers, rpc_servers=[endpoint], n_gpu_layers=-1) as llm:
            st = llm.generate(PROMPT, max_tokens=60, ignore_eos=True).stats
            ctx = llm.context
            pos = int(llm.kv_positions()[-1]) + 1
            with ctx.capturing(pos):
                ctx.decode([100], [pos], want_logits=True)
            runs[layers is None] = (st, ctx.capture(), llm.capture_layers)
    (st_all, cap_all, every), (st_dev, cap_dev, default) = runs[False], runs[True]
    assert every == list(range(30)) and default == list(range(2, 30, 4))
    picked = np.zeros(30, dtype=bool)
    picked[default] = True
    np.testing.assert_allclose(cap_dev.attn[picked].sum(axis=-1), 1.0, rtol=1e-4)
    assert not cap_dev.attn[~picked].any() and (cap_dev.rows[~picked] == 0).all() and (cap_dev.rows[picked] == 1).all()
    np.testing.assert_allclose(cap_all.attn.sum(axis=-1), 1.0, rtol=1e-4)
    assert st_dev.captured_steps == st_all.captured_steps > 0
    assert st_dev.hook_bytes_read < 0.35 * st_all.hook_bytes_read  # 7 of 30 layers' transfers
    with ScopeLlama(model_path, budget=b) as cpu:
        assert cpu.capture_layers is None


def test_default_capture_layers():
    assert default_capture_layers(30, offloaded=False) is None
    assert default_capture_layers(30, offloaded=True) == [2, 6, 10, 14, 18, 22, 26]
    assert default_capture_layers(4, offloaded=True) == [2]
    assert default_capture_layers(2, offloaded=True) is None  # no layer past the first two: every layer


@pytest.mark.parametrize("layers", [[], [30], [-1], [3, 3], "12", [1.0]])
def test_bad_capture_layers(model_path, layers):
    # a str is refused by EngineConfig before the model is read; the rest once its layers are known
    match = r"capture_layers must be (layer indices or None|distinct layer indices in \[0, 30\))"
    with pytest.raises(ValueError, match=match):
        ScopeLlama(model_path, budget=None, capture_layers=layers)


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


NOTES = "Remember these notes. " + " ".join(f"Note {i}: ship {i} passed the light at {i % 12} o'clock."
                                           for i in range(30))


def test_serve_offloads_every_layer_to_the_rpc_device(model_path):
    """`scope-edge serve --rpc HOST:PORT --n-gpu-layers -1`, asked through the
    real openai client: the weights and KV cache land in the RPC server's
    memory (its resident set grows by more than the model file's weights),
    /health and the startup log say where the layers are, and conversations
    still evict inside their budgets."""
    # A server of its own: llama.cpp's RPC server takes one client at a time.
    with rpc.Server(rpc.free_endpoint(), n_threads=1) as device:
        before = _rss(device.pid)
        srv = start_server(model_path, "--rpc", device.endpoint, "--n-gpu-layers", "-1", "--slots", "2",
                           "--prefill-budget", "64", "--decode-budget", "32", "--recent-window", "8",
                           "--selector", "h2o", "--lend", "none")
        try:
            grown = _rss(device.pid) - before
            health = srv.health()
            reply = srv.client.chat.completions.create(
                model=srv.model, messages=[{"role": "user", "content": NOTES}], max_tokens=40, temperature=0)
        finally:
            status = srv.stop()
        log = srv.process.stderr.read()
    assert status == 0, log
    weights = os.path.getsize(model_path) * 0.8  # the weights, less the GGUF's metadata and vocabulary
    assert grown > weights, f"the RPC server grew by {grown / 2**20:.1f} MiB only"
    assert health["devices"] == {"n_gpu_layers": -1, "rpc_servers": [device.endpoint], "offloaded": True,
                                 "capture_layers": default_capture_layers(30, offloaded=True)}
    assert f"-1 layers offloaded to {device.endpoint}" in log
    stats = reply.model_extra["scope_edge"]
    assert reply.usage.completion_tokens > 0 and stats["evicted_cells"] > 0
    assert stats["hook_reads"] > 0  # what the policy scored with was read back from the device


def test_device_script_on_the_protocol(model_path, endpoint):
    """bench/device.py's headline: the protocol's columns with every layer on the
    device (stock included), and the hook's bytes: capturing every layer reads more."""
    script = load_script("device")
    args = script.parser().parse_args(["--prompt", "128", "--tokens", "24", "--prefill-budget", "64",
                                       "--decode-budget", "16", "--rounds", "2", "--ideal-steps", "8",
                                       "--threads", "1"])
    h = script.headline(str(model_path), endpoint, args)
    slide = "ours, slide 64/16"
    want = with_default(["stock", "ours, no budget", slide, "ideal, slide 64/16", script.EVERY_LAYER])
    check_protocol_run(h, 2, want)
    hook = h["hook"]
    assert hook["ours, no budget"]["captured_steps"] == 0
    assert hook[script.EVERY_LAYER]["bytes_per_captured_step"] > hook[slide]["bytes_per_captured_step"] > 0
    text = "\n".join(script.headline_table(h))
    assert f"| {slide} |" in text and f"| {script.EVERY_LAYER} |" in text
