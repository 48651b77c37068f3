"""Stopping a run cleanly: on SIGTERM (a scheduler's preemption notice, torchrun's shutdown), on the first
Ctrl-C, or when a wall-clock budget runs out, the loop finishes its step, saves and exits.

The decision has to be the same on every rank at the same step: a signal may reach only some ranks, and
their clocks differ, so the local reasons are combined over the ranks (the trainer folds them into its one
all-reduce per step; `check()` does it alone). A rank that stopped alone would leave its peers waiting in
the next collective forever.

Nothing half-written: a checkpoint save runs inside `saving()`. A second Ctrl-C during it no longer raises
in the middle of the write: the save finishes, then the run stops at once (KeyboardInterrupt, exit 130). A
second Ctrl-C outside a save stops at once too (nothing is being written). Child processes (data-loader
workers, the checkpoint writer's helpers, which torchrun's stop signals reach as a process group) ignore
both signals: the main process decides, and ends them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

# A code per reason; MAX over the ranks picks one reason that every rank then reports.
REASONS = (None, "time limit", "SIGINT", "SIGTERM")
_CODE = {name: code for code, name in enumerate(REASONS)}


class StopSignal:
    """install() → check(group) once per step → uninstall().

    exit_duration_mins: stop once this many minutes have passed since construction (0 = no limit).
    """

    def __init__(self, exit_duration_mins: float = 0):
        self.exit_duration_mins = exit_duration_mins
        self.start = time.monotonic()
        self.received: Optional[str] = None
        self.sigints = 0
        self._saving = False
        self._interrupt_after_save = False
        self._finishing = False
        self._previous: dict[int, object] = {}
        self._owner = os.getpid()

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (main thread only, as Python requires for signal handlers)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put back the handlers install() found (a library caller's own Ctrl-C handling comes back)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._owner:
            # A forked child (a DataLoader worker, a checkpoint writer's helper) inherited this handler. The
            # main process decides when to stop and ends its children; a child that died on the group's
            # SIGTERM or Ctrl-C would break the save or the next batch in the middle.
            return
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self.sigints += 1
            if self.sigints > 1:
                if self._finishing:  # the run is already ending (its last save comes next): let it
                    os.write(2, b"Ctrl-C again: the run is already stopping\n")
                    return
                if self._saving:  # never leave the checkpoint being written half done
                    self._interrupt_after_save = True
                    os.write(2, b"Ctrl-C again: stopping once the checkpoint being written is complete\n")
                    return
                raise KeyboardInterrupt("second Ctrl-C: nothing saved since the last checkpoint")
            # os.write, not print: print from a handler that interrupted a print raises "reentrant call"
            os.write(2, b"Ctrl-C: stopping cleanly after this step (saving first); press again to stop at once\n")
        if self.received is None:  # the first one names the stop: torchrun follows a Ctrl-C with SIGTERM
            self.received = name
            if self._saving and name != "SIGINT":
                os.write(2, f"{name}: finishing the checkpoint being written, then stopping\n".encode())

    def finishing(self) -> None:
        """The training loop is over: what follows (the loader's shutdown, the final save) runs to its end;
        a further Ctrl-C only says so."""
        self._finishing = True

    @contextlib.contextmanager
    def saving(self):
        """The block writes a checkpoint: a second Ctrl-C waits for it to finish, then stops the run."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._interrupt_after_save and not self._finishing:
            raise KeyboardInterrupt("second Ctrl-C: stopped after the checkpoint was written")

    def local_reason(self) -> Optional[str]:
        """This rank's reason to stop, without asking the others."""
        if self.received:
            return self.received
        if self.exit_duration_mins and time.monotonic() - self.start >= 60 * self.exit_duration_mins:
            return "time limit"
        return None

    def check(self, group=None) -> Optional[str]:
        """The reason to stop agreed by every rank of `group` (default: the world), or None to go on.
        A collective when the group has more than one rank: every rank must call it at the same step."""
        code = _CODE[self.local_reason()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            device = torch.device("cpu")
            if dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            flag = torch.tensor([code], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            code = int(flag.item())
        return REASONS[code]
