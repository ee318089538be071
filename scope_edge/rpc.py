"""llama.cpp's RPC backend: devices served over TCP by another process or machine.

A server exposes its CPU (or GPU) as a device; a client passes that device
in llama_model_params.devices and offloads layers to it with n_gpu_layers,
so weights and KV cache live in the server's memory and every tensor read
crosses the socket, as a GPU's cross PCIe. llama-cpp-python 0.3.36 has no
RPC option of its own: this module registers servers the way llama.cpp's
tools do (ggml_backend_rpc_add_server).

    scope-edge rpc-server 127.0.0.1:50052           # in another process
    ScopeLlama(rpc_servers=["127.0.0.1:50052"], n_gpu_layers=-1)

llama.cpp aborts the process when it cannot connect or its handshake fails,
so endpoints are probed here first and refused with a clear error.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import llama_cpp

log = logging.getLogger(__name__)

REBUILD = 'CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36'
_HELLO = 14               # RPC_CMD_HELLO, fixed across protocol versions
_CAPS = 24                # RPC_CONN_CAPS_SIZE
_PROTO_MAJOR = 7          # RPC_PROTO_MAJOR_VERSION of the pinned llama.cpp
_GGML_BACKEND_DEVICE_TYPE_CPU = 0
_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"
_lock = threading.Lock()
_global: set[str] = set()  # endpoints in llama.cpp's default device list
_registered: dict[str, tuple[int, list[int]]] = {}  # endpoint -> (reg, devices); one connection each


class RPCError(RuntimeError):
    """An RPC server could not be used (unreachable, not an RPC server, busy)."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port); ValueError naming the problem otherwise."""
    if not isinstance(endpoint, str):
        raise ValueError(f"an RPC endpoint must be a 'host:port' str, got {endpoint!r}")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or ":" in host:
        raise ValueError(f"RPC endpoint {endpoint!r} is not 'host:port' (for example '127.0.0.1:50052', port 1-65535)")
    return host, int(port)


def _library(name: str) -> ctypes.CDLL | None:
    # A wheel stores lib<name>.so and lib<name>.so.0 as two files; libllama
    # loads the one its soname names, and ours must be that same instance
    # (one device registry, one RPC connection), not a second copy.
    suffixes = {"darwin": (".0.dylib", ".dylib", ".so"), "win32": (".dll",)}.get(sys.platform, (".so.0", ".so"))
    for suffix in suffixes:
        for stem in (f"lib{name}", name):
            path = _LIB_DIR / f"{stem}{suffix}"
            if path.exists():
                return ctypes.CDLL(str(path))
    return None


def available() -> bool:
    """Whether the installed llama-cpp-python was built with the RPC backend."""
    return _library("ggml-rpc") is not None


@functools.cache
def _rpc_lib() -> ctypes.CDLL:
    lib = _library("ggml-rpc")
    if lib is None:
        raise RPCError(f"llama-cpp-python was built without the RPC backend (no libggml-rpc in {_LIB_DIR}); "
                       f"rebuild it with: {REBUILD}")
    lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_start_server.restype = None
    lib.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    return lib


@functools.cache
def ggml_lib() -> ctypes.CDLL:
    """libggml (the backend registry) with the signatures used here."""
    lib = _library("ggml")
    if lib is None:
        raise RPCError(f"libggml not found in {_LIB_DIR}; reinstall llama-cpp-python==0.3.36")
    vp, size = ctypes.c_void_p, ctypes.c_size_t
    for name, restype, argtypes in (
        ("ggml_backend_reg_dev_count", size, [vp]),
        ("ggml_backend_reg_dev_get", vp, [vp, size]),
        ("ggml_backend_reg_name", ctypes.c_char_p, [vp]),
        ("ggml_backend_register", None, [vp]),
        ("ggml_backend_dev_count", size, []),
        ("ggml_backend_dev_get", vp, [size]),
        ("ggml_backend_dev_type", ctypes.c_int, [vp]),
        ("ggml_backend_dev_backend_reg", vp, [vp]),
        ("ggml_backend_dev_by_type", vp, [ctypes.c_int]),
        ("ggml_backend_load_all", None, []),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def is_rpc_device(dev: int) -> bool:
    ggml = ggml_lib()
    return ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev)) == b"RPC"


def probe(endpoint: str, *, timeout: float = 5.0) -> None:
    """Check that an RPC server of the pinned protocol answers at endpoint,
    within timeout seconds; RPCError naming the endpoint otherwise."""
    host, port = parse_endpoint(endpoint)
    hello = bytes([_HELLO]) + struct.pack("<Q", _CAPS) + bytes(_CAPS)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(hello)
            reply = _recv_exact(sock, 8 + 4 + _CAPS)
    except socket.timeout:
        raise RPCError(f"RPC server {endpoint} did not answer within {timeout:g} s (is it serving another "
                       "client? llama.cpp's RPC server serves one at a time)") from None
    except OSError as e:
        raise RPCError(f"cannot reach an RPC server at {endpoint}: {e.strerror or e}; start one there with "
                       f"`scope-edge rpc-server {endpoint}` (or llama.cpp's rpc-server)") from None
    size, major = struct.unpack_from("<Q", reply)[0], reply[8]
    if size != 4 + _CAPS or major != _PROTO_MAJOR:
        raise RPCError(f"{endpoint} answered, but not as an RPC server of protocol {_PROTO_MAJOR}.x "
                       f"(reply size {size}, major {major}); run the server from llama-cpp-python==0.3.36")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise OSError(f"connection closed after {len(data)} of {n} reply bytes")
        data += part
    return data


def _add(endpoint: str) -> tuple[int, list[int]]:
    """The reg and devices of a server, connecting on first use."""
    with _lock:
        return _registered.get(endpoint) or _connect(endpoint)


def _connect(endpoint: str) -> tuple[int, list[int]]:
    parse_endpoint(endpoint)
    rpc, ggml = _rpc_lib(), ggml_lib()
    probe(endpoint)  # llama.cpp aborts the process on a failed connection: fail here instead
    reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise RPCError(f"RPC server {endpoint} reports no devices")
    devs = [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    _registered[endpoint] = (reg, devs)
    log.info("RPC server %s: %d device(s)", endpoint, len(devs))
    return reg, devs


def devices(endpoints: Sequence[str]) -> list[int]:
    """Device handles (ggml_backend_dev_t) of every server, in order."""
    return [dev for endpoint in endpoints for dev in _add(endpoint)[1]]


def register(endpoint: str) -> None:
    """Add a server's devices to llama.cpp's default device list, so that any
    model loaded later in this process without an explicit device list (for
    example llama_cpp.Llama(n_gpu_layers=-1)) offloads to it, as llama.cpp's
    --rpc does. ScopeLlama does not need this: it takes rpc_servers."""
    reg, _ = _add(endpoint)
    if endpoint not in _global:
        ggml_lib().ggml_backend_register(reg)
        _global.add(endpoint)


def serve(endpoint: str, *, n_threads: int | None = None) -> None:
    """Serve this machine's CPU as an RPC device at endpoint; blocks forever.
    llama.cpp's server has no authentication: bind to 127.0.0.1 or a trusted
    network only."""
    host, _ = parse_endpoint(endpoint)
    rpc, ggml = _rpc_lib(), ggml_lib()
    ggml.ggml_backend_load_all()
    cpu = ggml.ggml_backend_dev_by_type(_GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        raise RPCError("llama.cpp has no CPU device")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the RPC protocol has no authentication; anyone who reaches it can use it", host)
    devs = (ctypes.c_void_p * 1)(cpu)
    rpc.ggml_backend_rpc_start_server(endpoint.encode(), None, n_threads or os.cpu_count() or 1, 1, devs)
    raise RPCError(f"the RPC server at {endpoint} stopped (address in use?)")


class Server:
    """An RPC server in a child process (`scope-edge rpc-server`), for
    tests, benchmarks and single-machine use; stopped on exit.

        with rpc.Server("127.0.0.1:50052") as server:
            ScopeLlama(rpc_servers=[server.endpoint], n_gpu_layers=-1)
    """

    def __init__(self, endpoint: str, *, n_threads: int | None = None, start_timeout: float = 30.0) -> None:
        parse_endpoint(endpoint)
        _rpc_lib()  # fail here, with the rebuild command, rather than in the child
        self.endpoint = endpoint
        cmd = [sys.executable, "-m", "scope_edge.cli", "rpc-server", endpoint]
        if n_threads:
            cmd += ["--threads", str(n_threads)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(start_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RPCError(f"the RPC server for {self.endpoint} exited with {self._proc.returncode}: "
                               f"{err.strip()[-500:]}")
            try:
                probe(self.endpoint, timeout=2.0)
                return
            except RPCError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RPCError(f"the RPC server for {self.endpoint} did not start within {timeout:g} s") from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        """The server process's id (its memory holds the offloaded weights and KV cache)."""
        return self._proc.pid

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def free_endpoint(host: str = "127.0.0.1") -> str:
    """host:port with a port free now (for a Server started next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"
