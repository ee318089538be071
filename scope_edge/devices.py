"""Where the model's layers run: the CPU, local GPUs, or RPC servers.

One Devices value goes from the facade to the model loader. The hook reads
tensors only through ggml_backend_tensor_get, so every backend is the same to
it; what changes with offload is where the KV cache lives and what each
tensor read costs.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp

from . import rpc
from .checks import is_int

_GPU_TYPES = (1, 2)  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU


@dataclass(frozen=True, kw_only=True)
class Devices:
    """Offload settings, as llama.cpp's llama_model_params takes them.

    n_gpu_layers: layers to offload, counted from the last; -1 offloads every
        repeating layer and the output layer (llama.cpp's n_layer + 1), as
        does any value above that. 0 keeps everything on the CPU.
    main_gpu: index into the device list of the device that holds the whole
        model when split_mode is none (llama.cpp's main_gpu).
    tensor_split: fraction of the offloaded layers per device, in device
        order (empty or None: in proportion to free memory).
    rpc_servers: 'host:port' of llama.cpp RPC servers; their devices come
        first in the device list (as in llama.cpp's own tools), local GPUs
        after them.
    """

    n_gpu_layers: int = 0
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()
    rpc_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rpc_servers, str):
            raise ValueError(f"rpc_servers must be a list of 'host:port' strings, got the str {self.rpc_servers!r}")
        for name in ("tensor_split", "rpc_servers"):  # lists as the keywords' short form gives them
            value = getattr(self, name)
            if value is None or isinstance(value, list):
                object.__setattr__(self, name, tuple(value or ()))
        if not is_int(self.n_gpu_layers) or self.n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be an int >= -1 (-1: every layer), got {self.n_gpu_layers!r}")
        if not is_int(self.main_gpu) or self.main_gpu < 0:
            raise ValueError(f"main_gpu must be an int >= 0, got {self.main_gpu!r}")
        split = self.tensor_split
        max_devices = llama_cpp.llama_max_devices()
        if (not isinstance(split, tuple) or len(split) > max_devices
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 for x in split)
                or (split and sum(split) <= 0)):
            raise ValueError(f"tensor_split must be at most {max_devices} numbers >= 0 with a positive sum, "
                             f"got {split!r}")
        for endpoint in self.rpc_servers:
            rpc.parse_endpoint(endpoint)
        if len(set(self.rpc_servers)) != len(self.rpc_servers):
            raise ValueError(f"rpc_servers lists an endpoint twice: {list(self.rpc_servers)}")

    def offloads(self) -> bool:
        """Whether layers go to a device other than the CPU (an RPC server or
        a local GPU), where every tensor the hook reads costs a transfer."""
        return self.n_gpu_layers != 0 and bool(self.rpc_servers or _gpus())

    def handles(self) -> ctypes.Array[ctypes.c_void_p] | None:
        """The NULL-terminated device list for llama_model_params.devices, or
        None for llama.cpp's default list (no RPC servers). Connects to the
        RPC servers: RPCError if one cannot be used."""
        if not self.rpc_servers:
            return None
        devs = rpc.devices(self.rpc_servers) + _local_gpus()
        return (ctypes.c_void_p * (len(devs) + 1))(*devs, None)


def _gpus() -> list[int]:
    """Every GPU-type device llama.cpp would offload to by default: local
    GPUs and RPC servers registered in this process."""
    ggml = rpc.ggml_lib()
    return [d for d in (ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count()))
            if ggml.ggml_backend_dev_type(d) in _GPU_TYPES]


def _local_gpus() -> list[int]:
    return [d for d in _gpus() if not rpc.is_rpc_device(d)]
