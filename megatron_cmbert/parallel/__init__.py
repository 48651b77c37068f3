"""Tensor / sequence parallelism for the model via megatron-core.

layer_spec.py  the one place that chooses which classes fill the model (TorchSpec / megatron-core / TE)
sharding.py    full <-> sharded tensors, sequence-parallel grad reduction
cpu_shim.py    lets megatron-core's TP collectives run on CPU with gloo
"""
