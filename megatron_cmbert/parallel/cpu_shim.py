"""Let megatron-core's tensor-parallel layers and sequence-parallel collectives run on CPU (gloo).

megatron-core 0.16.1 allocates the buffers of its all-gather / reduce-scatter with
`device=torch.cuda.current_device()`, which raises on a CPU-only build.
When CUDA is absent, install() gives those few modules a view of `torch` whose `cuda.current_device()` is
the CPU and whose `cuda.synchronize()` does nothing; nothing changes for any other module, and nothing at all when CUDA is available.
"""
from __future__ import annotations

import importlib

import torch

# Modules that call torch.cuda.current_device() on the tensor-parallel / sequence-parallel path, and
# dist_checkpointing's writer, which calls torch.cuda.synchronize() before saving.
PATCHED_MODULES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
                   "megatron.core.utils", "megatron.core.dist_checkpointing.strategies.filesystem_async",
                   "megatron.core.dist_checkpointing.strategies.state_dict_saver")


class _CudaOnCPU:
    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None):  # nothing to wait for on the CPU
        return None


class _TorchOnCPU:
    """Delegates everything to torch except `cuda.current_device()`."""

    cuda = _CudaOnCPU()

    def __getattr__(self, name):
        return getattr(torch, name)


def install() -> bool:
    """Idempotent. Returns True when the shim is active (CUDA absent)."""
    if torch.cuda.is_available():
        return False
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _TorchOnCPU):
            module.torch = _TorchOnCPU()
    return True
