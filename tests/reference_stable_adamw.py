"""The per-tensor StableAdamW and grad-norm clip of megatron_cmbert before the multi-tensor rewrite
(training/optimizer.py at a87db9a), kept verbatim as the reference the new ones must equal
(tests/test_optimizer.py). Single process only (no TP group)."""
import math
from collections.abc import Iterable

import torch

from megatron_cmbert.parallel.sharding import is_tensor_parallel


def _active(group) -> bool:
    return False


def _all_reduce_sum(tensor, group) -> None:  # never called: no group
    raise AssertionError("single process only")


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, tp_group=None) -> torch.Tensor:
    """Scale grads so that their global L2 norm is at most max_norm (coefficient max_norm / (norm + 1e-6),
    as torch and megatron-core); returns the norm before clipping as a 0-d fp32 tensor.

    Sharded grads (`tensor_model_parallel`) are summed over tp_group; replicated grads, identical on every TP
    rank, are counted once. A non-finite norm leaves the grads untouched (megatron-core does the same), so
    the caller can see it and skip the step. Every TP rank must call it (a collective when tp_group is set)."""
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    # [sharded, replicated] sums of squares in fp64: the sharded part is summed over ranks, whose order
    # differs from the single-device sum, and fp64 keeps that from showing in the returned norm.
    squares = torch.zeros(2, dtype=torch.float64, device=device)
    for p in params:
        norm = torch.linalg.vector_norm(p.grad.detach(), 2.0, dtype=torch.float32).double()
        squares[0 if is_tensor_parallel(p) else 1] += norm * norm
    if _active(tp_group):
        sharded = squares[:1].clone()
        _all_reduce_sum(sharded, tp_group)
        squares[0] = sharded[0]
    total = squares.sum().sqrt()
    coefficient = max_norm / (total.item() + 1e-6)
    if math.isfinite(coefficient) and coefficient < 1.0:
        for p in params:
            p.grad.detach().mul_(coefficient)
    return total.float()


def _debiased(beta: float, step: int) -> float:
    """beta (1 - beta^(t-1)) / (1 - beta^t): the EMA weight under which the moments are already unbiased."""
    return beta * (1.0 - beta ** (step - 1)) / (1.0 - beta ** step)


class PerTensorStableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping (module docstring). Defaults are the paper's: betas (0.9, 0.95),
    weight decay 0.1 (param_groups gives norm weights and biases 0.0), eps 1e-6.

    tp_group: the tensor-parallel process group, or None (no reduction). Moments have the parameter's dtype
    (keep fp32 master weights under mixed precision); rms is computed in at least fp32. After each step
    `self.stats` holds {"tensors", "clipped", "max_rms"} for logging; it is not part of the state dict.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-6,
                 weight_decay: float = 0.1, tp_group=None):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.tp_group = tp_group
        self.stats: dict = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Pass 1: moments and the local sum of g^2 / max(v, eps^2) of every tensor.
        work, sums, counts = [], [], []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                b1, b2 = _debiased(beta1, state["step"]), _debiased(beta2, state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - b1)
                exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
                dtype = torch.promote_types(p.dtype, torch.float32)
                ratio = grad.to(dtype).square().div_(exp_avg_sq.to(dtype).clamp_min(eps * eps))
                sums.append(ratio.sum().double())
                counts.append(float(grad.numel()))
                work.append((group, p, exp_avg, exp_avg_sq))
        if not work:
            self.stats = {"tensors": 0, "clipped": 0, "max_rms": 0.0}
            return loss

        # One all-reduce of [sums of sharded tensors..., their counts...] for the logical-tensor means.
        sums = torch.stack(sums)
        counts = torch.tensor(counts, dtype=torch.float64, device=sums.device)
        if _active(self.tp_group):
            split = [i for i, (_, p, _, _) in enumerate(work) if is_tensor_parallel(p)]
            idx = torch.tensor(split, dtype=torch.long, device=sums.device)
            if idx.numel():
                packed = torch.cat([sums[idx], counts[idx]])
                _all_reduce_sum(packed, self.tp_group)
                sums[idx], counts[idx] = packed[:idx.numel()], packed[idx.numel():]
        rms = (sums / counts).sqrt().tolist()  # the step's only host sync

        # Pass 2: clipped learning rate, decoupled weight decay, Adam update.
        for (group, p, exp_avg, exp_avg_sq), r in zip(work, rms):
            lr = group["lr"] / max(1.0, r)
            if group["weight_decay"] != 0.0:
                p.mul_(1.0 - lr * group["weight_decay"])
            p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-lr)
        self.stats = {"tensors": len(rms), "clipped": sum(r > 1.0 for r in rms), "max_rms": max(rms)}
        return loss
