"""Tensor / sequence parallelism for the model via megatron-core, and data parallelism via torch DDP.

layer_spec.py  the one place that chooses which classes fill the model (TorchSpec / megatron-core / TE)
sharding.py    full <-> sharded tensors, sequence-parallel grad reduction
data_parallel.py  data_parallel(model, group): torch DDP over the DP group, gradients summed, not averaged
cpu_shim.py    lets megatron-core's TP collectives run on CPU with gloo
world.py       a gloo world of one process (single_process_group) for plain `python` runs
"""
