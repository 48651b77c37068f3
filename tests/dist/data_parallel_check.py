"""Data parallelism and the stop signal on 2 ranks (gloo), in one launch (each launch costs seconds of imports).

1. data_parallel() on a small fp64 model, then on the tiny CMBert built with megatron-core at TP=1 / DP=2:
   after 3 micro-batches (the first two under no_sync) every rank's gradients equal the gradients of ONE
   process that ran all 6 micro-batches (both ranks') in sequence: a SUM over the ranks, with each
   micro-batch's loss divided by the predicted tokens of the whole global batch, as the trainer does.
2. data_parallel() over a group of one rank is the pass-through wrapper.
3. StopSignal: SIGTERM sent to rank 1 only, and a time limit reached on rank 0 only, stop both ranks.

Launched by tests/test_data_parallel.py as
    torchrun --standalone --nproc_per_node 2 tests/dist/data_parallel_check.py
Exits non-zero on the first mismatch; rank 0 prints `DATA-PARALLEL OK` at the end.
"""
import copy
import faulthandler
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megatron_cmbert.model import IGNORE_INDEX, get_preset
from megatron_cmbert.parallel.data_parallel import LocalModule, data_parallel
from megatron_cmbert.training.preemption import StopSignal

MICRO_BATCHES = 3
# The replicas compute each micro-batch's gradient exactly as the single process does (same weights, same
# inputs, same kernels), so the only difference is the order of the fp64 sums: a few ulps of 1e-16.
RELATIVE_TOLERANCE = 1e-12


def run(module, batches, loss_sum, global_count):
    for batch in batches:
        (loss_sum(module, batch) / global_count).backward()


def compare(tag, model, reference):
    worst = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.grad is not None and q.grad is not None, f"{tag}: no grad for {name}"
        assert q.grad.abs().max() > 0, f"{tag}: reference grad of {name} is zero: nothing is compared"
        diff = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert diff <= RELATIVE_TOLERANCE, f"{tag}: grad of {name} differs by {diff:.2e} (relative)"
        worst = max(worst, diff)
    return worst


def check_against_single_process(tag, build, make_batch, loss_sum, count, group, rank, world):
    """DP over `group` vs one process running every rank's micro-batches."""
    batches = [[make_batch(r, k) for k in range(MICRO_BATCHES)] for r in range(world)]
    global_count = float(sum(count(b) for rank_batches in batches for b in rank_batches))
    model, reference = build(), build()
    dp = data_parallel(model, group)
    assert isinstance(dp, DistributedDataParallel) and dp.module is model, f"{tag}: not DDP over 2 ranks"
    assert dp.module.state_dict().keys() == reference.state_dict().keys(), f"{tag}: checkpoint keys changed"

    with dp.no_sync():
        run(dp, batches[rank][:-1], loss_sum, global_count)
    local = build()  # under no_sync nothing is communicated: this rank's own grads only
    run(local, batches[rank][:-1], loss_sum, global_count)
    compare(f"{tag} under no_sync", model, local)

    run(dp, batches[rank][-1:], loss_sum, global_count)  # this backward reduces all three
    run(reference, [b for rank_batches in batches for b in rank_batches], loss_sum, global_count)
    worst = compare(tag, model, reference)
    if rank == 0:
        print(f"[{tag}] ok: DP sum of {MICRO_BATCHES} micro-batches x {world} ranks = single process "
              f"(max relative diff {worst:.1e})", flush=True)


def small_model_check(rank, world):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def make_batch(r, k):
        g = torch.Generator().manual_seed(100 * r + k)
        n = 3 + 2 * r + k  # unequal micro-batches: the global normalisation matters
        return torch.randn(n, 7, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)

    def loss_sum(module, batch):
        x, y = batch
        return ((module(x) - y) ** 2).sum()

    check_against_single_process("small fp64 model", build, make_batch, loss_sum, lambda b: len(b[0]),
                                 None, rank, world)


def cmbert_check(rank, world):
    from megatron.core import parallel_state

    from megatron_cmbert.model.padding import pack_sequences
    from megatron_cmbert.parallel.layer_spec import build_masked_lm

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    assert parallel_state.get_data_parallel_world_size() == 2
    config = get_preset("tiny")

    def build():
        torch.manual_seed(1234)
        model = build_masked_lm(config).double()
        assert type(model.spec).__name__ == "MegatronSpec", "not the megatron-core model"
        return model

    def make_batch(r, k):
        g = torch.Generator().manual_seed(1000 + 10 * r + k)
        docs = [torch.randint(5, config.vocab_size, (n,), generator=g) for n in (11 + r, 20, 6 + 3 * k)]
        tokens, cu_seqlens, max_seqlen = pack_sequences(docs)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        chosen = torch.rand(tokens.numel(), generator=g) < 0.3
        labels[chosen] = tokens[chosen]
        return tokens, cu_seqlens, max_seqlen, labels

    def loss_sum(module, batch):
        tokens, cu_seqlens, max_seqlen, labels = batch
        out = module(tokens, cu_seqlens, max_seqlen, labels=labels)
        return out.loss * out.num_predicted

    check_against_single_process("tiny CMBert, megatron-core TP=1 DP=2", build, make_batch, loss_sum,
                                 lambda b: int((b[3] != IGNORE_INDEX).sum()),
                                 parallel_state.get_data_parallel_group(), rank, world)
    parallel_state.destroy_model_parallel()


def group_of_one_check(rank, world):
    solo = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    model = nn.Linear(3, 2)
    wrapped = data_parallel(model, solo)
    assert isinstance(wrapped, LocalModule) and wrapped.module is model
    x = torch.randn(4, 3)
    with wrapped.no_sync():
        assert torch.equal(wrapped(x), model(x))
    if rank == 0:
        print("[group of one] ok: pass-through wrapper", flush=True)


def stop_signal_check(rank, world):
    stop = StopSignal()
    stop.install()
    try:
        assert stop.check() is None, "stop requested before any signal"
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10
            while stop.received is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stop.received == "SIGTERM"
        else:
            assert stop.received is None
        reason = stop.check()
        assert reason == "SIGTERM", f"rank {rank}: {reason!r}"
    finally:
        stop.uninstall()
    # The time limit: only rank 0 has one, and it has passed; rank 1 must stop too.
    timed = StopSignal(exit_duration_mins=1e-4 if rank == 0 else 0)
    time.sleep(0.05)
    assert timed.local_reason() == ("time limit" if rank == 0 else None)
    reason = timed.check(dist.group.WORLD)
    assert reason == "time limit", f"rank {rank}: {reason!r}"
    if rank == 0:
        print("[stop signal] ok: SIGTERM on rank 1 and the time limit on rank 0 stop both ranks", flush=True)


def main():
    faulthandler.dump_traceback_later(150, exit=True)  # a dead peer would otherwise hang this rank forever
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "launch with --nproc_per_node 2"
    small_model_check(rank, world)
    cmbert_check(rank, world)
    group_of_one_check(rank, world)
    stop_signal_check(rank, world)
    dist.barrier()
    if rank == 0:
        print("DATA-PARALLEL OK", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
