"""The world a process runs in: its rank numbers, the process group, and the one-process world that a plain
`python tools/...` run needs (megatron-core's dist_checkpointing and parallel state only work inside an
initialised torch.distributed world).

    World.from_env()              the ranks torchrun (or a plain run: a world of one) will start, no group yet
    init_distributed(tp, seed)    the process group and megatron-core's model-parallel state -> (Ranks, device)
    single_process_group()        a gloo world of one for the duration of a block
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """What the launcher says before any process group exists."""

    size: int
    rank: int
    local_rank: int
    local_size: int

    @classmethod
    def from_env(cls) -> "World":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; a world of one without them."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(size=size, rank=int(os.environ.get("RANK", "0")),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   local_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(size))))

    def device(self) -> torch.device:
        """The device this rank computes on: its local GPU when there is one, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the parallel layout."""

    tp_rank: int
    tp_size: int
    dp_rank: int
    rank: int
    world: int


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for a world of one's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long ranks wait for each other to join the process group (and at any collective) before failing with a
# message instead of hanging: a rank that died before joining must not leave the others waiting forever.
JOIN_TIMEOUT_S = float(os.environ.get("CMBERT_JOIN_TIMEOUT_S", "600"))


def init_process_group() -> torch.device:
    """The default process group (torchrun's environment, or a one-process world for a plain run), with a
    bounded timeout; returns this rank's device."""
    import datetime

    if "RANK" not in os.environ:  # plain `python tools/pretrain.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    device = World.from_env().device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    return device


def agree(error: Optional[BaseException]) -> Optional[str]:
    """Every rank's outcome of a step that ran alone (the launch checks): the first failing rank's one-line
    reason, the same on every rank, or None. Joins the process group (bounded) first, so a rank that failed
    still tells the others instead of leaving them waiting in their first collective. Without a launcher's
    rendezvous environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) there is nobody to tell: this rank's
    own reason is returned."""
    mine = None if error is None else " ".join(str(error).split()) or type(error).__name__
    if not all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return mine
    try:
        init_process_group()
    except Exception as exc:  # a rank that never arrived: the store's timeout
        from megatron_cmbert.errors import ToolFailure

        raise ToolFailure(f"the ranks did not all join within {JOIN_TIMEOUT_S:.0f} s "
                          f"({' '.join(str(exc).split())[:200]})") from None
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine)
    return next((f"{v}" if r == dist.get_rank() else f"rank {r}: {v}" for r, v in enumerate(views) if v), None)


def init_distributed(tp: int, seed: int) -> tuple[Ranks, torch.device]:
    """The process group (torchrun's, or a one-process one for a plain run) and megatron-core's model-parallel
    state for tensor-parallel size `tp`; every rank seeds the same generator (the model's CPU init is
    TP-invariant)."""
    from megatron.core import parallel_state

    from megatron_cmbert.parallel import cpu_shim

    device = init_process_group()
    world = dist.get_world_size()
    if world % tp:  # resolve_run checks this before any rank starts; kept for library callers
        raise ValueError(f"world size {world} is not a multiple of tensor-parallel size {tp}")
    cpu_shim.install()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(seed)
    ranks = Ranks(tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
                  dp_rank=parallel_state.get_data_parallel_rank(), rank=dist.get_rank(), world=world)
    return ranks, device


@contextlib.contextmanager
def single_process_group():
    """A gloo world of one for the duration of the block, unless a process group already exists (then it
    is used as is and left in place)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
