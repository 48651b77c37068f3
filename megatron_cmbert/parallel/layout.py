"""The parallel layout of a training run, as the trainer sees it: the trainer asks it to build the model,
wrap it for data parallelism, finish the gradients after the backward passes and sum step statistics over
the replicas, and never needs to know whether tensor or sequence parallelism is on (torchtitan's split:
the loop is layout-agnostic, parallelism is applied here)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_cmbert.parallel.world import init_distributed


def compile_layers(model) -> None:
    """torch.compile each encoder layer in place (fullgraph off: a backend that runs eagerly, such as the
    reference attention, is a graph break of its own); the attention plans are built outside, once per
    micro-batch, so the compiled code sees only tensors of static shapes."""
    model.kernels.prepare(next(model.parameters()).device)
    for layer in model.model.layers:
        layer.compile(dynamic=False)


class ParallelLayout:
    """TP x DP on megatron-core and torch DDP over this process's world."""

    def __init__(self, tensor_parallel_size: int, sequence_parallel: bool = False, transformer_impl: str = "local",
                 seed: int = 0):
        from megatron.core import parallel_state

        self.ranks, self.device = init_distributed(tensor_parallel_size, seed)
        self.sequence_parallel = bool(sequence_parallel) and tensor_parallel_size > 1
        self.transformer_impl = transformer_impl
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tensor_parallel_size > 1 else None
        """The group sharded tensors are reduced over (optimizer update RMS, grad-norm clip); None at TP=1."""
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.token_multiple = self.ranks.tp_size if self.sequence_parallel else 1
        """What a micro-batch's token count must divide by: sequence parallelism splits it over TP ranks."""

    def build_model(self, config, compile: bool = False):
        """CMBertForMaskedLM with the spec this layout needs, on this rank's device; with `compile` each
        encoder layer is compiled (torchtitan's per-block torch.compile; static shapes keep it to one
        graph per layer kind)."""
        from megatron_cmbert.parallel.layer_spec import build_masked_lm

        model = build_masked_lm(config, transformer_impl=self.transformer_impl,
                                sequence_parallel=self.sequence_parallel).to(self.device)
        if compile:
            compile_layers(model)
        return model

    def data_parallel(self, model):
        """`model` wrapped for gradient reduction over the DP group (`.module`, `.no_sync()`)."""
        from megatron_cmbert.parallel.data_parallel import data_parallel

        return data_parallel(model, self.dp_group)

    def finish_grads(self, model) -> None:
        """After the step's last backward: the partial weight grads of norms on token shards are summed over
        TP under sequence parallelism (nothing to do otherwise)."""
        if self.sequence_parallel:
            from megatron_cmbert.parallel.sharding import allreduce_sequence_parallel_grads

            allreduce_sequence_parallel_grads(model)

    def step_sums(self, values: list[float], flags: list[int]) -> tuple[list[float], list[int]]:
        """One all-reduce per step (one host sync): `values` summed over the data-parallel replicas, and
        `flags` summed over every rank (a stop request may reach only some ranks, TP peers included). Both
        go over the whole world: the TP ranks of a replica hold the same values, so the world sum is TP times
        the replicas' sum, divided back exactly (integers below 2^53 in float64)."""
        t = torch.tensor([*values, *flags], dtype=torch.float64, device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
        out = t.tolist()
        tp = self.ranks.tp_size
        return [v / tp for v in out[:len(values)]], [int(f) for f in out[len(values):]]

    def dp_sum(self, values) -> list[float]:
        """Sum over data parallelism (one all-reduce) and bring the values to the host (one sync)."""
        t = torch.stack(values).double() if isinstance(values[0], torch.Tensor) else \
            torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()
