"""Compute kernels behind one registry (kernels/registry.py), each op with a pure-PyTorch reference.

Ops: attention (backends reference, triton, flex, flash_attn), rope, geglu, rms_norm (reference, triton).
A model gets a `KernelSet` when it is built (ModelConfig.kernel_backend / kernel_overrides). One file per op
holds its Triton kernel, launch configuration and autograd wrapper: attention_triton.py, rope_triton.py,
geglu_triton.py, rms_norm_triton.py. Nothing imports Triton until a Triton kernel is used. See docs/KERNELS.md.
"""
from megatron_cmbert.kernels.attention import BACKENDS, attention
from megatron_cmbert.kernels.registry import OPS, KernelError, KernelSet, backends

__all__ = ["BACKENDS", "OPS", "KernelError", "KernelSet", "attention", "backends"]
