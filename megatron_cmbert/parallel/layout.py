"""The parallel layout of a training run, as the trainer sees it: the trainer asks it to build the model,
wrap it for data parallelism, finish the gradients after the backward passes and sum step statistics over
the replicas, and never needs to know whether tensor or sequence parallelism is on (torchtitan's split:
the loop is layout-agnostic, parallelism is applied here)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_cmbert.parallel.world import init_distributed


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

    def build_model(self, config):
        """CMBertForMaskedLM with the spec this layout needs, on this rank's device."""
        from megatron_cmbert.parallel.layer_spec import build_masked_lm

        return build_masked_lm(config, transformer_impl=self.transformer_impl,
                               sequence_parallel=self.sequence_parallel).to(self.device)

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

    def dp_sum(self, values) -> list[float]:
        """Sum over data parallelism (one all-reduce) and bring the values to the host (one sync)."""
        t = torch.stack(values).double() if isinstance(values[0], torch.Tensor) else \
            torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()
