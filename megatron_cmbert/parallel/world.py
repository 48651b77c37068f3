"""A process group for one process: what a plain `python tools/...` run needs, since megatron-core's
dist_checkpointing (and its parallel state) only work inside an initialised torch.distributed world."""
from __future__ import annotations

import contextlib
import socket

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for a world of one's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
