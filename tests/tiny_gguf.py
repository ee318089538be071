"""Tiny random-weight GGUF models of several architectures, written with the
`gguf` package, for tests that need an architecture the default model is not
(recurrent, sliding-window) or a model fast enough to fuzz long runs.

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", n_ctx_train=256)

Every file loads in llama.cpp (llama-cpp-python 0.3.36): a 2-layer model of
width 64 and an SPM vocabulary of 3 specials, 256 byte tokens and 4 words, so
any text tokenizes (as bytes). Weights are seeded: outputs are reproducible.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

ARCHITECTURES = ("llama", "mamba", "gemma3")
N_EMBD, N_LAYER, N_HEAD, N_FF = 64, 2, 4, 128
WORDS = ["▁the", "▁a", "hello", "▁world"]


def _vocab(w: gguf.GGUFWriter) -> int:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + WORDS
    types = [2, 3, 3] + [6] * 256 + [1] * len(WORDS)  # unknown, control, byte, normal
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    return len(tokens)


def write_tiny_gguf(
    path: str | Path, arch: str, *, n_ctx_train: int = 512, sliding_window: int = 64, seed: int = 0,
    n_layer: int = N_LAYER,
) -> Path:
    """Write a tiny `arch` model ("llama", "mamba" or "gemma3" with an
    iSWA sliding window of `sliding_window`; llama.cpp makes every 6th of its
    layers full-attention, so n_layer=6 gives it one) of n_layer layers to
    `path`; returns the path."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:  # numpy order: the reverse of ggml's ne
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(N_EMBD)
    w.add_layer_norm_rms_eps(1e-6)
    n_vocab = _vocab(w)
    w.add_tensor("token_embd.weight", rand(n_vocab, N_EMBD))
    w.add_tensor("output_norm.weight", ones(N_EMBD))
    if arch == "mamba":
        d_inner, d_state, d_conv, dt_rank = 2 * N_EMBD, 8, 4, 4
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_head_count_kv(0)
        w.add_ssm_conv_kernel(d_conv)
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(d_state)
        w.add_ssm_time_step_rank(dt_rank)
        for i in range(n_layer):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", ones(N_EMBD))
            w.add_tensor(p + "ssm_in.weight", rand(2 * d_inner, N_EMBD))
            w.add_tensor(p + "ssm_conv1d.weight", rand(d_inner, d_conv))
            w.add_tensor(p + "ssm_conv1d.bias", rand(d_inner))
            w.add_tensor(p + "ssm_x.weight", rand(dt_rank + 2 * d_state, d_inner))
            w.add_tensor(p + "ssm_dt.weight", rand(d_inner, dt_rank))
            w.add_tensor(p + "ssm_dt.bias", rand(d_inner))
            w.add_tensor(p + "ssm_a", -np.ones((d_inner, d_state), dtype=np.float32))
            w.add_tensor(p + "ssm_d", ones(d_inner))
            w.add_tensor(p + "ssm_out.weight", rand(N_EMBD, d_inner))
    else:
        head_dim = N_EMBD // N_HEAD
        w.add_feed_forward_length(N_FF)
        w.add_head_count(N_HEAD)
        w.add_head_count_kv(N_HEAD)
        w.add_rope_dimension_count(head_dim)
        if arch == "gemma3":
            w.add_sliding_window(sliding_window)
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        for i in range(n_layer):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", ones(N_EMBD))
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                w.add_tensor(p + name + ".weight", rand(N_EMBD, N_EMBD))
            w.add_tensor(p + "ffn_norm.weight", ones(N_EMBD))
            w.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD))
            w.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD))
            w.add_tensor(p + "ffn_down.weight", rand(N_EMBD, N_FF))
            if arch == "gemma3":
                w.add_tensor(p + "post_attention_norm.weight", ones(N_EMBD))
                w.add_tensor(p + "attn_k_norm.weight", ones(head_dim))
                w.add_tensor(p + "attn_q_norm.weight", ones(head_dim))
                w.add_tensor(p + "post_ffw_norm.weight", ones(N_EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
