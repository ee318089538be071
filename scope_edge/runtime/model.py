"""The loaded llama_model: vocabulary, tokenizer and chat template."""
from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence

import llama_cpp
import numpy as np

from .. import memory
from ..devices import Devices

ROLES = ("system", "user", "assistant", "tool")


class Model:
    """A GGUF loaded by llama.cpp, with the devices it was offloaded to.

    n_layer, n_head, n_vocab, n_ctx_train: the model's geometry. Read-only
    facts; nothing here touches a KV cache. vocab_only loads the vocabulary
    and template without the weights (tokenizing only). verbose shows
    llama.cpp's log (process-wide: llama.cpp has one logger)."""

    def __init__(self, path: str, *, devices: Devices | None = None, vocab_only: bool = False,
                 verbose: bool = False) -> None:
        llama_cpp.llama_backend_init()
        llama_cpp._logger.set_verbose(verbose)
        devices = devices or Devices()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = bool(vocab_only)
        params.n_gpu_layers = devices.n_gpu_layers
        params.main_gpu = devices.main_gpu
        # llama.cpp reads both arrays during the load only
        handles = devices.handles()
        if handles is not None:
            params.devices = ctypes.cast(handles, ctypes.c_void_p)
        split = (ctypes.c_float * len(devices.tensor_split))(*devices.tensor_split) if devices.tensor_split else None
        if split is not None:
            params.tensor_split = split
        self.path, self.devices = path, devices
        self.ptr = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise ValueError(f"llama.cpp could not load {path}: a truncated or unsupported GGUF? "
                             "(run with verbose=True for its log)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer: int = llama_cpp.llama_model_n_layer(self.ptr)
        # llama.cpp aborts on n_head of a vocab-only model (no layers loaded)
        self.n_head: int = llama_cpp.llama_model_n_head(self.ptr) if self.n_layer > 0 else 0
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(self.ptr)
        # sliding-window attention: the window (0: none) and, once check_supported passed, its layers
        self.n_swa: int = llama_cpp.llama_model_n_swa(self.ptr) if self.n_layer > 0 else 0
        self._eog: list[int] | None = None
        self._pieces: dict[int, bytes] = {}  # piece() per token, met once: a generation asks every step
        self._first_bytes: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_embd_k(self) -> int:
        """Width of one cell's K row: KV heads x key length, from the GGUF."""
        geometry = memory.read_geometry(self.path)
        return geometry.n_head_kv * geometry.head_dim_k

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    @property
    def closed(self) -> bool:
        return not self.ptr

    def _require_open(self) -> None:
        if not self.ptr:
            raise RuntimeError("this ScopeLlama is closed")

    @property
    def swa_layers(self) -> np.ndarray | None:
        """Flags [n_layer] of the sliding-window layers (None: a model without them)."""
        if self.n_swa == 0:
            return None
        return np.array(memory.read_geometry(self.path).swa_layers, dtype=bool)

    def check_supported(self) -> None:
        """Raise ValueError for memory this runtime cannot manage, naming why: recurrent and hybrid
        state, and sliding-window layouts not verified (memory.SWA_PATTERNS)."""
        if llama_cpp.llama_model_is_recurrent(self.ptr) or llama_cpp.llama_model_is_hybrid(self.ptr):
            raise ValueError(
                f"{self.path}: recurrent and hybrid models keep state that cannot be evicted per token; "
                "scope-edge supports attention models (llama, qwen2, gemma3 iSWA, ...)"
            )
        if self.n_swa > 0:
            geometry = memory.read_geometry(self.path)
            reason = geometry.unsupported_reason()
            if reason is None and geometry.sliding_window != self.n_swa:
                reason = f"the GGUF's window {geometry.sliding_window} is not llama.cpp's n_swa={self.n_swa}"
            if reason is not None:
                raise ValueError(f"{self.path}: sliding-window attention (n_swa={self.n_swa}, an iSWA cache): "
                                 f"{reason}")

    # -- text <-> tokens -------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of text, special tokens (e.g. chat-template markers)
        parsed; add_special adds the BOS token the model expects at the start
        of a prompt (False: for pieces of one)."""
        self._require_open()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:  # buffer too small: -n tokens needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, True)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes token stands for (a UTF-8 character may span tokens).
        Thread-safe: the generations of a BatchRunner call it from their own
        threads, so each call writes its own buffer (and the cache's get and
        set are single dict operations)."""
        self._require_open()
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of tokens, as streaming them would print it."""
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """Whether token ends a generation (end of text, end of turn, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token id."""
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        return self._eog

    def first_bytes(self) -> tuple[np.ndarray, np.ndarray]:
        """(the first byte of each token's bytes, -1 if it has none;
        for each byte value, a token that is exactly that byte, -1 if none),
        computed once: a grammar checks the tokens that can start right first."""
        if self._first_bytes is None:
            first = np.full(self.n_vocab, -1, dtype=np.int16)
            single = np.full(256, -1, dtype=np.int32)
            for t in range(self.n_vocab):
                raw = self.piece(t)
                if raw:
                    first[t] = raw[0]
                    if len(raw) == 1 and single[raw[0]] < 0:
                        single[raw[0]] = t
            self._first_bytes = (first, single)
        return self._first_bytes

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for messages through the GGUF's own chat template,
        ending with the assistant's turn opened."""
        self._require_open()
        if not messages:
            raise ValueError("messages is empty; pass at least one {'role': 'user', 'content': ...}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with role in {ROLES} and str content, got {m!r}")
        tmpl = llama_cpp.llama_model_chat_template(self.ptr, None)
        if not tmpl:
            raise ValueError("this GGUF has no chat template; pass a plain prompt instead")
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]  # alive while C reads them
        chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
        size = 2 * sum(len(r) + len(c) for r, c in keep) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(keep), True, buf, size)
            if n < 0:
                raise ValueError("llama.cpp does not recognise this GGUF's chat template")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n
        raise RuntimeError("chat template output kept growing")  # unreachable: the second size fits

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
