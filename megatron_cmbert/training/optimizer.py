"""StableAdamW (Wortsman et al. 2023), the weight-decay groups, and the global grad-norm clip, all aware of
tensor parallelism through an optional process group (None: single process, no communication).

StableAdamW step for each tensor, t = the tensor's own step count (from 1):
    b1_t = b1 (1 - b1^(t-1)) / (1 - b1^t), same for b2          debiased betas (b_1 = 0 at t = 1)
    m <- b1_t m + (1 - b1_t) g ;  v <- b2_t v + (1 - b2_t) g^2
    rms = sqrt(mean(g^2 / max(v, eps^2)))                        over the whole LOGICAL tensor
    lr_t = lr / max(1, rms)                                      update clipping
    p <- p (1 - lr_t wd) ;  p <- p - lr_t m / (sqrt(v) + eps)

Relation to torch.optim.AdamW: with debiased betas m and v ARE Adam's bias-corrected m_hat and v_hat
(induction: b_t m_{t-1} + (1 - b_t) g = (b M_{t-1} + (1 - b) g) / (1 - b^t) = M_t / (1 - b^t) when
m_{t-1} = M_{t-1} / (1 - b^(t-1))). torch's AdamW divides by sqrt(v_hat) + eps as well, and decays
p (1 - lr wd) first, so whenever rms <= 1 the two are the same update, eps placement included; only
floating-point rounding differs. rms depends on the gradients alone (not on lr): it exceeds 1 when the
current gradient is large against its second-moment history, e.g. a loss spike.

Weight decay follows ModernBERT's training code: every parameter with ndim > 1 decays (linear weights, the
token embedding and the decoder tied to it); 1-D parameters (norm weights) and biases do not. Because the
rule reads ndim, megatron-core's sharded layers and Transformer Engine's fused norms get the same groups
as the plain TP=1 model. `param_groups(..., decay_embeddings=False)` keeps embeddings undecayed (ablation).

Tensor parallelism: a parameter marked `tensor_model_parallel = True` (megatron-core's attribute) is a
shard, so the sum of g^2/max(v, eps^2) and the element count are all-reduced over `tp_group` before
taking the mean; replicated tensors use their local mean. All sharded tensors share ONE all-reduce per
step. clip_grad_norm counts sharded grads across the group and replicated grads once. Gradients must
already be reduced over data parallelism (DDP does it).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megatron_cmbert.parallel.sharding import is_tensor_parallel

# Embedding classes for the `decay_embeddings=False` ablation, matched by type (an embedding weight is 2-D
# like a linear one, so ndim cannot tell them apart). megatron-core's VocabParallelEmbedding and this repo's
# Embedding are added in embedding_types() without importing megatron here.
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _active(group) -> bool:
    """True when there is a process group with more than one rank to reduce over."""
    if group is None:
        return False
    import torch.distributed as dist  # only imported when a group was passed in

    return dist.get_world_size(group) > 1


def _all_reduce_sum(tensor: torch.Tensor, group) -> None:
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """ModernBERT's rule (`param_groups_weight_decay` in its main.py): a parameter with ndim <= 1 (norm
    weights, biases, TE's fused `layer_norm_weight`) or named as a bias gets no weight decay; every other
    parameter, embeddings and the tied decoder included, decays."""
    local = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or local == "bias" or local.endswith("_bias")


def embedding_types() -> tuple[type, ...]:
    """The embedding module classes known here: torch's, this repo's, and megatron-core's vocab-parallel one
    when megatron-core is already loaded (a model that uses it has imported it)."""
    from megatron_cmbert.model.layers import Embedding  # plain PyTorch: no distributed import

    types = EMBEDDING_TYPES + (Embedding,)
    tensor_parallel = sys.modules.get("megatron.core.tensor_parallel")
    if tensor_parallel is not None:
        types += (tensor_parallel.VocabParallelEmbedding,)
    return types


def param_groups(model: nn.Module, weight_decay: float = 0.1, decay_embeddings: bool = True) -> list[dict]:
    """Two optimizer groups in model.parameters() order: decay (`weight_decay`) and no-decay (0.0), each with
    a 'param_names' list. The rule is no_weight_decay (ndim <= 1 or a bias: exempt; everything else
    decays, as ModernBERT trains). decay_embeddings=False also exempts the weights of embedding modules
    (embedding_types), the tied decoder with them: the `--no-decay-embeddings` ablation. Shared
    parameters appear once; frozen ones (requires_grad=False) are left out."""
    exempt = set()
    if not decay_embeddings:
        types = embedding_types()
        exempt = {id(p) for m in model.modules() if isinstance(m, types) for p in m.parameters(recurse=False)}
    decay, no_decay = {"params": [], "param_names": [], "weight_decay": weight_decay}, \
        {"params": [], "param_names": [], "weight_decay": 0.0}
    for name, param in model.named_parameters():  # deduplicates tied parameters
        if not param.requires_grad:
            continue
        target = no_decay if id(param) in exempt or no_weight_decay(name, param) else decay
        target["params"].append(param)
        target["param_names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, tp_group=None) -> torch.Tensor:
    """Scale grads so that their global L2 norm is at most max_norm (coefficient max_norm / (norm + 1e-6),
    as torch and megatron-core); returns the norm before clipping as a 0-d fp32 tensor, on the device.

    Multi-tensor (torch._foreach_norm / _foreach_mul_ per device and dtype) and free of host syncs: the
    coefficient stays on the device. Sharded grads (`tensor_model_parallel`) are summed over tp_group;
    replicated grads, identical on every TP rank, are counted once. A non-finite norm leaves the grads
    untouched (coefficient 1, as megatron-core), so the caller can see it and skip the step. Every TP rank
    must call it (a collective when tp_group is set)."""
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    # [sharded, replicated] sums of squares in fp64: the sharded part is summed over ranks, whose order
    # differs from the single-device sum, and fp64 keeps that from showing in the returned norm.
    squares = torch.zeros(2, dtype=torch.float64, device=device)
    for sharded in (True, False):
        for grads in _by_device_and_dtype([p.grad for p in params if is_tensor_parallel(p) == sharded]).values():
            norms = torch.stack(torch._foreach_norm(grads, 2.0)).double()
            squares[0 if sharded else 1] += (norms * norms).sum()
    if _active(tp_group):
        sharded = squares[:1].clone()
        _all_reduce_sum(sharded, tp_group)
        squares[0] = sharded[0]
    total = squares.sum().sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    coefficient = torch.where(torch.isfinite(coefficient), coefficient, torch.ones_like(coefficient))
    for grads in _by_device_and_dtype([p.grad for p in params]).values():
        torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
    return total.float()


def _by_device_and_dtype(tensors) -> dict:
    """Tensors grouped by (device, dtype): a foreach kernel takes one of each."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _debiased(beta: float, step: int) -> float:
    """beta (1 - beta^(t-1)) / (1 - beta^t): the EMA weight under which the moments are already unbiased."""
    return beta * (1.0 - beta ** (step - 1)) / (1.0 - beta ** step)


@dataclass
class _StepIndices:
    batches: list  # per batch: its tensors' positions in the step's work list (long, on the device)
    inverse: Optional[torch.Tensor]  # batch order -> work order, when the batches interleave
    counts: torch.Tensor  # elements per tensor (fp64)
    split: Optional[torch.Tensor]  # positions of the tensor-parallel (sharded) tensors


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping (module docstring). Defaults are the paper's: betas (0.9, 0.95),
    weight decay 0.1 (param_groups gives norm weights and biases 0.0), eps 1e-6.

    tp_group: the tensor-parallel process group, or None (no reduction). Moments have the parameter's dtype
    (keep fp32 master weights under mixed precision); rms is computed in at least fp32. The step is
    multi-tensor (torch._foreach_*) and reads nothing back to the host. After each step `self.stats` holds
    {"tensors": int, "clipped": 0-d tensor, "max_rms": 0-d tensor} for logging; not part of the state dict.
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

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def checkpoint_state(self, names: dict) -> tuple[dict, dict]:
        """What a checkpoint stores of this optimizer (checkpoint/store.py knows nothing of its internals):
        tensors {key: (tensor, parameter)} shaped like their parameter (sharded like it), and common state
        {key: value}, identical on every rank. `names`: parameter -> its name in the model. Parameters
        without state yet get zero moments at step 0, so a load has tensors to fill."""
        tensors, steps = {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                for key in self.MOMENTS:
                    tensors[f"optimizer.{names[p]}.{key}"] = (state[key], p)
                steps[names[p]] = state["step"]
        return tensors, {"optimizer_steps": steps}

    @torch.no_grad()
    def load_checkpoint_state(self, names: dict, loaded: dict) -> None:
        """Fill this optimizer from a loaded checkpoint (the keys checkpoint_state wrote)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                for key in self.MOMENTS:
                    state[key].copy_(loaded[f"optimizer.{names[p]}.{key}"])
                state["step"] = loaded["optimizer_steps"][names[p]]

    def _indices(self, work, batches, device) -> "_StepIndices":
        """The step's index tensors on the device, built once per batching of the tensors and reused: a copy
        of a host list to a GPU waits for the device, so building them every step would be a host sync."""
        key = (device, tuple(id(p) for _, p, _ in work), tuple(tuple(idx) for _, _, idx in batches.values()))
        cached = getattr(self, "_index_cache", None)
        if cached is None or cached[0] != key:
            as_index = lambda ix: torch.tensor(ix, dtype=torch.long, device=device)  # noqa: E731
            order = [i for _, _, idx in batches.values() for i in idx]  # the batches' sums, concatenated
            inverse = None
            if order != sorted(order):
                inverse = [0] * len(order)
                for position, i in enumerate(order):
                    inverse[i] = position
                inverse = as_index(inverse)
            split = [i for i, (_, p, _) in enumerate(work) if is_tensor_parallel(p)]
            counts = torch.tensor([float(p.grad.numel()) for _, p, _ in work], dtype=torch.float64, device=device)
            cached = self._index_cache = (key, _StepIndices(
                batches=[as_index(idx) for _, _, idx in batches.values()], inverse=inverse, counts=counts,
                split=as_index(split) if split else None))
        return cached[1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Tensors with a grad, in group order, batched per (group, step count, device, dtype) for the
        # multi-tensor kernels: one launch per operation and batch instead of one per tensor.
        work = []  # (group, param, state)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                 exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
                state["step"] += 1
                work.append((group, p, state))
        if not work:
            self.stats = {"tensors": 0, "clipped": 0, "max_rms": 0.0}
            return loss
        batches: dict = {}
        for i, (group, p, state) in enumerate(work):
            key = (id(group), state["step"], p.device, p.dtype)
            batches.setdefault(key, (group, state["step"], []))[2].append(i)

        # Pass 1: moments and each tensor's sum of g^2 / max(v, eps^2) = ||g / sqrt(max(v, eps^2))||^2.
        sums = []  # per batch, in batch order; put back in work order below
        for group, step, idx in batches.values():
            (beta1, beta2), eps = group["betas"], group["eps"]
            b1, b2 = _debiased(beta1, step), _debiased(beta2, step)
            grads = [work[i][1].grad for i in idx]
            exp_avgs = [work[i][2]["exp_avg"] for i in idx]
            exp_avg_sqs = [work[i][2]["exp_avg_sq"] for i in idx]
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - b1)
            torch._foreach_mul_(exp_avg_sqs, b2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - b2)
            dtype = torch.promote_types(grads[0].dtype, torch.float32)
            up = (lambda ts: [t.to(dtype) for t in ts]) if dtype != grads[0].dtype else (lambda ts: ts)
            scaled = torch._foreach_div(up(grads), torch._foreach_sqrt(torch._foreach_clamp_min(up(exp_avg_sqs),
                                                                                              eps * eps)))
            norms = torch.stack(torch._foreach_norm(scaled, 2.0)).double()  # one stack, not a cast per tensor
            sums.append(norms * norms)

        # One all-reduce of [sums of sharded tensors..., their counts...] for the logical-tensor means.
        index = self._indices(work, batches, sums[0].device)
        sums = torch.cat(sums)
        if index.inverse is not None:  # batches interleave: back to work order
            sums = sums[index.inverse]
        counts = index.counts
        if _active(self.tp_group) and index.split is not None:
            packed = torch.cat([sums[index.split], counts[index.split]])
            _all_reduce_sum(packed, self.tp_group)
            counts = counts.clone()  # the cached tensor stays intact (sums is this step's own)
            sums[index.split], counts[index.split] = packed[:len(index.split)], packed[len(index.split):]
        rms = (sums / counts).sqrt()  # stays on the device: no host sync in the step
        scale = 1.0 / rms.clamp(min=1.0)  # lr_t = lr / max(1, rms)

        # Pass 2: clipped learning rate, decoupled weight decay, Adam update; per-tensor factors as 0-d
        # device tensors (torch.optim's capturable trick: fold -lr_t into the denominator).
        for (group, step, idx), device_idx in zip(batches.values(), index.batches):
            params = [work[i][1] for i in idx]
            exp_avgs = [work[i][2]["exp_avg"] for i in idx]
            lr_t = (scale[device_idx] * group["lr"]).to(params[0].dtype)
            if group["weight_decay"] != 0.0:
                torch._foreach_mul_(params, list((1.0 - lr_t * group["weight_decay"]).unbind()))
            denom = torch._foreach_sqrt([work[i][2]["exp_avg_sq"] for i in idx])
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_div_(denom, list((-lr_t).unbind()))
            torch._foreach_addcdiv_(params, exp_avgs, denom)
        self.stats = {"tensors": len(work), "clipped": (rms > 1.0).sum(), "max_rms": rms.max()}
        return loss
