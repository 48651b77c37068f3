"""Compute kernels behind small dispatch layers, each with a pure-PyTorch reference.

`attention` is the model's only attention call; see kernels/attention.py for its backends.
"""
from megatron_cmbert.kernels.attention import BACKENDS, attention, select_backend

__all__ = ["BACKENDS", "attention", "select_backend"]
