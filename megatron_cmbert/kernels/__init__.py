"""Compute kernels behind small dispatch layers, each with a pure-PyTorch reference.

`attention` is the model's only attention call (kernels/attention.py: backends reference, flex, flash_attn,
triton). `apply_rope`, `geglu`, `rms_norm` choose between a reference and a Triton kernel
(kernels/dispatch.py). One file per op holds its reference, Triton kernel and autograd wrapper:
attention_triton.py, rope_triton.py, geglu_triton.py, rms_norm_triton.py. Nothing imports Triton until a kernel is used.
"""
from megatron_cmbert.kernels.attention import BACKENDS, attention, select_backend
from megatron_cmbert.kernels.dispatch import apply_rope, geglu, rms_norm, select_kernel_backend

__all__ = ["BACKENDS", "attention", "select_backend", "apply_rope", "geglu", "rms_norm", "select_kernel_backend"]
