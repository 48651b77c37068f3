"""Two ranks (gloo, TP=2) must take the same checkpoint decision when only one of them sees a failure.

Saves iter_5 and iter_10, then on rank 1 alone iter_10 fails (a) verification, (b) the preparation of the
load, before the collective read, (c) the collective read itself (a data file read error), (d) filling the
tensors after the read; each time both ranks must fall back to iter_5 (and hold its values) rather than
one loading iter_10 while the other waits forever. (e) The ranks see different candidates: both raise.
Prints "checkpoint agreement: ok" on rank 0. Launched by tests/test_checkpoint.py via torchrun.
"""
import faulthandler
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemReader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    from megatron.core import parallel_state

    from megatron_cmbert.model import get_preset
    from megatron_cmbert.parallel import cpu_shim
    from megatron_cmbert.parallel.layer_spec import build_masked_lm
    from megatron_cmbert.checkpoint import store as ckpt
    from megatron_cmbert.checkpoint.records import RunRecord, TrainState
    from megatron_cmbert.parallel.world import Ranks
    from megatron_cmbert.training.optimizer import StableAdamW

    faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where, then fails the launch
    dist.init_process_group("gloo")
    cpu_shim.install()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    ranks = Ranks(tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=2, dp_rank=0,
                  rank=rank, world=2)

    def build(seed):
        torch.manual_seed(seed)
        model = build_masked_lm(get_preset("tiny"))
        return model, StableAdamW(model.parameters(), lr=1e-2)

    holder = [tempfile.mkdtemp(prefix="ckpt_agree_") if rank == 0 else None]
    dist.broadcast_object_list(holder)
    save = holder[0]
    model, optimizer = build(0)
    held = {}
    for step in (5, 10):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        held[step] = [p.detach().clone() for p in model.parameters()]
        ckpt.save_checkpoint(save, step, model, optimizer, ranks, TrainState(step=step),
                             RunRecord(model=get_preset("tiny"), seq_length=64))
    newest = os.path.join(save, "iter_0000010")

    loading = {"newest": False}  # set while iter_10 is being loaded (the read and fill see no path)

    def fails_on_rank_1(real, what):
        def patched(*args, **kwargs):
            if rank == 1 and (newest in map(str, args) or loading["newest"]):
                raise OSError(f"{what} failed (injected on rank 1)")
            return real(*args, **kwargs)
        return patched

    real_request = ckpt._request

    def request(path, *args):
        loading["newest"] = path == newest
        return real_request(path, *args)

    ckpt._request = request
    reader = FileSystemReader
    for owner, name in ((ckpt, "verify_checkpoint"), (ckpt, "_request"), (reader, "read_data"), (ckpt, "_fill")):
        real = getattr(owner, name)
        setattr(owner, name, fails_on_rank_1(real, name))
        warnings = []
        fresh, fresh_opt = build(1)
        path, state = ckpt.load_latest(save, fresh, fresh_opt, ranks, warn=warnings.append)
        setattr(owner, name, real)
        assert path == os.path.join(save, "iter_0000005") and state == TrainState(step=5), (rank, name, path)
        assert len(warnings) == 1 and f"{name} failed (injected on rank 1)" in warnings[0], (rank, warnings)
        for p, want in zip(fresh.parameters(), held[5]):
            assert torch.equal(p, want), (rank, name)
    ckpt._request = real_request

    real = ckpt.resolve_load
    ckpt.resolve_load = lambda path, warn=None: real(path, warn)[rank:]  # rank 1 misses iter_10
    try:
        ckpt.load_latest(save, *build(1), ranks)
        raise AssertionError("different candidate lists were not detected")
    except ckpt.CheckpointError as error:
        assert "the ranks see different checkpoints" in str(error), str(error)
    ckpt.resolve_load = real

    dist.barrier()
    if rank == 0:
        print("checkpoint agreement: ok", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer re-imports the main module
    main()
