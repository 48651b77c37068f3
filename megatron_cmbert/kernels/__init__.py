"""Compute kernels behind one registry (kernels/registry.py), each op with a pure-PyTorch reference.

Ops: attention (backends reference, triton, flex, flash_attn), rope, geglu, rms_norm (reference, triton).
A model binds its `KernelSet` when it is built, from the frozen `ModelConfig.kernels` (a KernelChoice). One file per op
holds its Triton kernel, launch configuration and autograd wrapper: attention_triton.py, rope_triton.py,
geglu_triton.py, rms_norm_triton.py. Nothing imports Triton until a Triton kernel is used. See docs/KERNELS.md.
"""
from megatron_cmbert.kernels.attention import BACKENDS, attention
from megatron_cmbert.kernels.registry import OPS, KernelChoice, KernelError, KernelSet, backends
from megatron_cmbert.kernels.varlen import PackedLayout

__all__ = ["BACKENDS", "OPS", "KernelChoice", "KernelError", "KernelSet", "PackedLayout", "attention", "backends"]
