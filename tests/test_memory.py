"""KV geometry from GGUF metadata and KV byte accounting."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest

from scope_edge import memory
from scope_edge.memory import KvGeometry

F16_BYTES_PER_CELL = 23_040  # 2 (K and V) x 30 layers x 3 KV heads x 64 dims x 2 bytes


def write_gguf(
    path: Path,
    arch: str,
    *,
    n_layer: int = 4,
    n_ctx: int = 2048,
    n_embd: int = 256,
    n_head: int = 8,
    n_head_kv: int | list[int] = 2,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """A tiny random-weight GGUF with the given attention shape."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_layer)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    if extra is not None:
        extra(writer)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((32, n_embd), dtype=np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal(n_embd, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2", n_head_kv=[2, 2, 0, 4])


@pytest.fixture(scope="module")
def smol(model_path: str) -> KvGeometry:
    return memory.read_geometry(model_path)


# ---------------------------------------------------------------------------------------------
# The default model


def test_default_model_geometry(smol: KvGeometry) -> None:
    assert smol.architecture == "llama"
    assert (smol.n_layer, smol.n_head, smol.n_head_kv) == (30, 9, 3)
    assert (smol.head_dim_k, smol.head_dim_v, smol.n_ctx_train) == (64, 64, 8192)
    assert smol.n_head_kv_per_layer == (3,) * 30 and smol.n_kv_layers == 30
    assert smol.sliding_window is None and not smol.recurrent
    assert smol.unsupported_reason() is None


def test_default_model_f16_bytes(smol: KvGeometry) -> None:
    assert memory.bytes_per_cell(smol) == F16_BYTES_PER_CELL
    assert memory.kv_bytes(smol, 8192) == 180 * 2**20
    assert memory.kv_bytes(smol, 0) == 0


@pytest.mark.parametrize("type_k, block_bytes", [
    ("f32", 4 * 32), ("f16", 2 * 32), ("bf16", 2 * 32), ("q8_0", 34), ("q5_1", 24),
    ("q5_0", 22), ("q4_1", 20), ("q4_0", 18),
])
def test_quantized_k_is_smaller_by_its_block_ratio(smol: KvGeometry, type_k: str, block_bytes: int) -> None:
    v_bytes = F16_BYTES_PER_CELL // 2
    k_bytes = memory.bytes_per_cell(smol, type_k, "f16") - v_bytes
    assert k_bytes * 64 == v_bytes * block_bytes  # f16 takes 64 bytes per 32 elements


def test_q8_0_k_exact(smol: KvGeometry) -> None:
    assert memory.bytes_per_cell(smol, "q8_0") == 11_520 * 34 // 64 + 11_520 == 17_640
    assert memory.kv_bytes(smol, 256, "q4_0", "q4_0") == 256 * 2 * 11_520 * 18 // 64


def test_kv_types_by_name_or_ggml_number(smol: KvGeometry) -> None:
    assert memory.kv_type("Q8_0") is gguf.GGMLQuantizationType.Q8_0
    assert memory.kv_type(1) is gguf.GGMLQuantizationType.F16
    assert memory.bytes_per_cell(smol, 8, 1) == memory.bytes_per_cell(smol, "q8_0", "f16")


@pytest.mark.parametrize("bad", ["q4_k", "fp16", 12, True])
def test_unsupported_kv_type(smol: KvGeometry, bad: object) -> None:
    with pytest.raises(ValueError, match="valid types: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1"):
        memory.bytes_per_cell(smol, bad)  # type: ignore[arg-type]


def test_kv_bytes_rejects_bad_cell_counts(smol: KvGeometry) -> None:
    with pytest.raises(ValueError, match="n_cells must be >= 0, got -1"):
        memory.kv_bytes(smol, -1)
    with pytest.raises(TypeError):
        memory.kv_bytes(smol, 1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("n, padded", [
    (1, 256), (255, 256), (256, 256), (257, 512), (8192, 8192), (8193, 8448),
])
def test_padded_cells(n: int, padded: int) -> None:
    assert memory.padded_cells(n) == padded


@pytest.mark.parametrize("n", [0, -5])
def test_padded_cells_rejects_empty_contexts(n: int) -> None:
    with pytest.raises(ValueError, match=f"got {n}"):
        memory.padded_cells(n)


# ---------------------------------------------------------------------------------------------
# Other architectures, written with gguf.GGUFWriter


def test_per_layer_kv_heads(tiny_gguf: Path) -> None:
    g = memory.read_geometry(tiny_gguf)
    assert (g.architecture, g.n_layer, g.n_ctx_train) == ("qwen2", 4, 2048)
    assert g.n_head_kv_per_layer == (2, 2, 0, 4) and g.n_head_kv == 4 and g.n_kv_layers == 3
    assert (g.head_dim_k, g.head_dim_v) == (32, 32)  # embedding_length / head_count
    assert memory.bytes_per_cell(g) == (2 + 2 + 0 + 4) * 32 * 2 * 2


def test_explicit_key_and_value_lengths(tmp_path: Path) -> None:
    def lengths(w: gguf.GGUFWriter) -> None:
        w.add_key_length(128)
        w.add_value_length(96)

    g = memory.read_geometry(write_gguf(tmp_path / "q3.gguf", "qwen3", extra=lengths))
    assert (g.head_dim_k, g.head_dim_v) == (128, 96)
    assert memory.bytes_per_cell(g) == 4 * 2 * (128 + 96) * 2


def test_sliding_window_layouts(tmp_path: Path) -> None:
    """gemma3's layout is llama.cpp's (every 6th layer full-attention); one
    with no full-attention layer, or an architecture whose layout is not
    verified, is refused with its reason."""
    window = lambda w: w.add_sliding_window(512)  # noqa: E731
    g = memory.read_geometry(write_gguf(tmp_path / "g3.gguf", "gemma3", n_layer=12, extra=window))
    assert g.sliding_window == 512 and g.unsupported_reason() is None
    assert [il for il, swa in enumerate(g.swa_layers) if not swa] == [5, 11]
    # two caches: the full-attention layers' of n_cells, the window's of 512 + a ubatch, padded
    per_layer = memory.bytes_per_cell(g) // 12
    assert memory.kv_bytes_split(g, 4096) == (2 * per_layer * 4096, 10 * per_layer * 1024)
    assert memory.kv_bytes_split(g, 768) == (2 * per_layer * 768, 10 * per_layer * 768)
    assert memory.kv_bytes_split(g, 4096, swa_full=True) == (2 * per_layer * 4096, 10 * per_layer * 4096)
    assert sum(memory.kv_bytes_split(g, 4096, swa_full=True)) == memory.kv_bytes(g, 4096)
    short = memory.read_geometry(write_gguf(tmp_path / "g3s.gguf", "gemma3", n_layer=4, extra=window))
    assert "no full-attention layer" in (short.unsupported_reason() or "")
    other = memory.read_geometry(write_gguf(tmp_path / "g2.gguf", "gemma2", extra=window))
    assert "sliding-window attention (window 512) with a layer layout scope-edge has not verified" in (
        other.unsupported_reason() or "")
    assert memory.kv_bytes_split(memory.read_geometry(write_gguf(tmp_path / "l.gguf", "llama")), 256) == (
        memory.kv_bytes(memory.read_geometry(tmp_path / "l.gguf"), 256), 0)


@pytest.mark.parametrize("arch, extra", [
    ("mamba2", None),
    ("jamba", None),
    ("somehybrid", lambda w: w.add_uint32("somehybrid.ssm.state_size", 16)),
])
def test_recurrent_models_are_flagged(
    tmp_path: Path, arch: str, extra: Callable[[gguf.GGUFWriter], None] | None
) -> None:
    g = memory.read_geometry(write_gguf(tmp_path / f"{arch}.gguf", arch, extra=extra))
    assert g.recurrent
    assert "recurrent state" in (g.unsupported_reason() or "")


def test_quantized_k_needs_whole_blocks_per_head(tmp_path: Path) -> None:
    g = memory.read_geometry(write_gguf(tmp_path / "h48.gguf", "llama", n_embd=384))  # head dim 48
    assert memory.bytes_per_cell(g, "f16") == 4 * 2 * 2 * 48 * 2
    with pytest.raises(ValueError, match="blocks of 32 elements, which do not divide head_dim_k=48"):
        memory.bytes_per_cell(g, "q8_0")


def test_missing_required_key(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="bare.gguf: GGUF metadata has no 'llama.context_length'"):
        memory.read_geometry(tmp_path / "bare.gguf")


def test_rewritten_file_is_read_again(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama", n_layer=4)
    assert memory.read_geometry(path).n_layer == 4
    mtime_ns = path.stat().st_mtime_ns
    write_gguf(path, "llama", n_layer=5)
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))  # whatever the clock's resolution
    assert memory.read_geometry(path).n_layer == 5


# ---------------------------------------------------------------------------------------------
# Broken files


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, -1])
def test_truncated_gguf(tiny_gguf: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])
    with pytest.raises(ValueError, match="cut.gguf .* is not a valid GGUF file or is truncated"):
        memory.read_geometry(cut)


def test_truncated_copy_of_the_default_model(model_path: str, tmp_path: Path) -> None:
    cut = tmp_path / "smol-head.gguf"
    with open(model_path, "rb") as f:
        cut.write_bytes(f.read(1 << 20))  # metadata (inside the tokenizer) and no tensors
    with pytest.raises(ValueError, match="smol-head.gguf"):
        memory.read_geometry(cut)


@pytest.mark.parametrize("content, message", [
    (b"", "is 0 bytes, shorter than a GGUF header"),
    (b"GGUF\x03\x00", "is 6 bytes"),
    (b"not a model at all, just some text\n", "it starts with b'not '"),
    (b"GGUF\x07\x00\x00\x00" + bytes(16), "GGUF version 7 is not supported"),
])
def test_invalid_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.gguf") as info:
        memory.read_geometry(path)
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        memory.read_geometry(tmp_path / "nope.gguf")


# ---------------------------------------------------------------------------------------------
# The parser agrees with gguf.GGUFReader


def _parsed_metadata(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """What scope_edge's own GGUF parser read from path: the metadata
    read_geometry hands to geometry_from_metadata (its public way out)."""
    seen: list[dict[str, object]] = []
    real = memory.geometry_from_metadata

    def spy(metadata: dict[str, object], source: str = "<metadata>") -> KvGeometry:
        seen.append(metadata)
        return real(metadata, source)

    with monkeypatch.context() as mp:
        mp.setattr(memory, "geometry_from_metadata", spy)
        memory.read_geometry(path)
    assert len(seen) == 1, f"read_geometry answered {path} from its cache: give it a fresh path"
    return seen[0]


def _reader_metadata(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith(("GGUF.", "tokenizer."))}


def test_parser_matches_gguf_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def everything(w: gguf.GGUFWriter) -> None:
        w.add_sliding_window(64)
        w.add_float32("llama.rope.freq_base", 1e4)
        w.add_bool("llama.flag", True)
        w.add_array("general.languages", ["en", "fr"])
        w.add_int64("llama.big", -(2**40))
        w.add_token_list(["a", "b", "c"])

    path = write_gguf(tmp_path / "all.gguf", "llama", n_head_kv=[1, 2, 3, 4], extra=everything)
    assert _parsed_metadata(path, monkeypatch) == _reader_metadata(path)


@pytest.mark.slow
def test_parser_matches_gguf_reader_on_the_default_model(model_path: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "default.gguf"  # a path read_geometry has not cached
    try:
        os.link(model_path, copy)
    except OSError:  # another file system
        shutil.copyfile(model_path, copy)
    assert _parsed_metadata(copy, monkeypatch) == _reader_metadata(copy)
