"""StableAdamW and clip_grad_norm at TP=2 (megatron-core layers, gloo) against the same logical model as plain
PyTorch at TP=1, trained side by side in every rank for several steps with both clips active.

Model: VocabParallelEmbedding -> ColumnParallelLinear(+bias) -> GELU -> RowParallelLinear(+bias) -> a
replicated RMSNorm-like scale. That covers sharded tensors split along dim 0 and dim 1, a sharded bias and
replicated tensors (the row-parallel bias and the norm weight).

Negative controls run alongside, so the check can fail: the same TP=2 model whose optimizer gets no TP group
(shard-local rms) must end far from the reference, and the unreduced local grad norm must differ from it.

Launched by tests/test_optimizer.py as
    torchrun --standalone --nproc_per_node 2 tests/dist/tp_optimizer_check.py
Exits non-zero on the first mismatch; rank 0 prints `TP-OPTIMIZER OK` at the end.
"""
import faulthandler
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_cmbert.training import StableAdamW, clip_grad_norm, param_groups

VOCAB, HIDDEN, FFN, STEPS, LR, MAX_NORM = 16, 8, 12, 8, 3e-2, 1.0
# fp32 throughout; TP only reorders the row-parallel sum and the rms / norm sums (~1e-7 relative), and
# Adam's normalised update keeps such differences at the rounding level. The bound is 1e-6.
TOLERANCE = 1e-6


class TinyRMSNorm(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Reference(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, FFN)
        self.fc2 = nn.Linear(FFN, HIDDEN)
        self.norm = TinyRMSNorm(HIDDEN)

    def forward(self, ids):  # ids [b, s] -> [s, b, h] (megatron's layout, kept for symmetry)
        x = self.emb(ids).transpose(0, 1)
        return self.norm(self.fc2(F.gelu(self.fc1(x))))


class Parallel(nn.Module):
    def __init__(self, config, tensor_parallel):
        super().__init__()
        init = nn.init.zeros_  # weights are loaded from the reference afterwards
        self.emb = tensor_parallel.VocabParallelEmbedding(VOCAB, HIDDEN, init_method=init, config=config)
        self.fc1 = tensor_parallel.ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=True,
                                                        gather_output=False)
        self.fc2 = tensor_parallel.RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=True,
                                                     input_is_parallel=True, skip_bias_add=False)
        self.norm = TinyRMSNorm(HIDDEN)

    def forward(self, ids):
        x = self.emb(ids).transpose(0, 1)
        h, _ = self.fc1(x)
        y, _ = self.fc2(F.gelu(h))
        return self.norm(y)


def main():
    faulthandler.dump_traceback_later(150, exit=True)  # a dead peer would otherwise hang this rank forever
    dist.init_process_group("gloo")
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

    from megatron_cmbert.parallel import cpu_shim
    from megatron_cmbert.parallel.sharding import full_state_dict, load_full_state_dict

    cpu_shim.install()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank()
    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                                 params_dtype=torch.float32, gradient_accumulation_fusion=False)

    torch.manual_seed(0)  # same seed on both ranks: the same reference weights and data everywhere
    reference = Reference()
    with torch.no_grad():  # non-trivial biases and norm weight, so their updates are compared too
        for p in (reference.fc1.bias, reference.fc2.bias, reference.norm.weight):
            p.add_(0.1 * torch.randn_like(p))
    models = {"tp": Parallel(config, tensor_parallel), "tp_no_group": Parallel(config, tensor_parallel)}
    for model in models.values():
        load_full_state_dict(model, {k: v.clone() for k, v in reference.state_dict().items()})
    sharded = [n for n, p in models["tp"].named_parameters() if getattr(p, "tensor_model_parallel", False)]
    assert sharded == ["emb.weight", "fc1.weight", "fc1.bias", "fc2.weight"], sharded

    optimizers = {"ref": StableAdamW(param_groups(reference), lr=LR),
                  "tp": StableAdamW(param_groups(models["tp"]), lr=LR, tp_group=group),
                  "tp_no_group": StableAdamW(param_groups(models["tp_no_group"]), lr=LR)}
    # ModernBERT's rule (ndim > 1 decays) gives megatron's sharded layers the TP=1 groups; the embedding
    # ablation must recognise VocabParallelEmbedding as it does nn.Embedding
    assert [g["param_names"] for g in optimizers["tp"].param_groups] == \
        [g["param_names"] for g in optimizers["ref"].param_groups] == \
        [["emb.weight", "fc1.weight", "fc2.weight"], ["fc1.bias", "fc2.bias", "norm.weight"]]
    assert [g["param_names"] for g in param_groups(models["tp"], decay_embeddings=False)] == \
        [g["param_names"] for g in param_groups(reference, decay_embeddings=False)] == \
        [["fc1.weight", "fc2.weight"], ["emb.weight", "fc1.bias", "fc2.bias", "norm.weight"]]

    norms, clipped_tensors, worst_norm = [], 0, 0.0
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (3, 5))
        target = torch.randn(5, 3, HIDDEN)
        scale = 0.1 * 2.0 ** step  # growing loss: grads outgrow their history (rms > 1), later norm > MAX_NORM
        outputs = {}
        for name, model in (("ref", reference), *models.items()):
            model.zero_grad(set_to_none=True)
            out = model(ids)
            (scale * (out - target).pow(2).mean()).backward()
            outputs[name] = out.detach()
        assert (outputs["tp"] - outputs["ref"]).abs().max() <= TOLERANCE, f"step {step}: forward differs"

        ref_norm = clip_grad_norm(reference.parameters(), MAX_NORM).item()
        local_norm = clip_grad_norm(models["tp"].parameters(), float("inf")).item()  # inf: measures, never clips
        tp_norm = clip_grad_norm(models["tp"].parameters(), MAX_NORM, tp_group=group).item()
        clip_grad_norm(models["tp_no_group"].parameters(), MAX_NORM, tp_group=group)
        worst_norm = max(worst_norm, abs(tp_norm - ref_norm) / ref_norm)
        assert abs(local_norm - ref_norm) > 1e-3 * ref_norm, f"step {step}: local norm equals the global one"
        norms.append(ref_norm)
        for optimizer in optimizers.values():
            optimizer.step()
        clipped_tensors += optimizers["ref"].stats["clipped"]

    assert worst_norm <= TOLERANCE, f"rank {rank}: grad norm differs by {worst_norm:.2e} (relative)"
    assert min(norms) < MAX_NORM < max(norms), f"grad-norm clip should be both idle and active: {norms}"
    assert clipped_tensors > 0, "StableAdamW's update clipping never triggered: the check would prove nothing"
    full = {name: full_state_dict(model) for name, model in models.items()}
    diffs = {name: max((full[name][k] - v).abs().max().item() for k, v in reference.state_dict().items())
             for name in models}
    assert diffs["tp"] <= TOLERANCE, f"rank {rank}: TP=2 weights differ from TP=1 by {diffs['tp']:.2e}"
    assert diffs["tp_no_group"] > 100 * TOLERANCE, \
        f"rank {rank}: shard-local rms should diverge, only {diffs['tp_no_group']:.2e}"
    dist.barrier()
    if rank == 0:
        print(f"norms {[round(n, 3) for n in norms]}; clipped tensor-steps {clipped_tensors}; "
              f"max |diff| TP=2 {diffs['tp']:.2e} (without TP group {diffs['tp_no_group']:.2e}); "
              f"grad-norm rel diff {worst_norm:.2e}", flush=True)
        print("TP-OPTIMIZER OK", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
