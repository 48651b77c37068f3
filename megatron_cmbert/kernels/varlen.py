"""Where the sequences of a packed batch lie, known on the host and sent to the device once.

A packed batch is `total` tokens in a row; sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1] and attends
only inside itself. The loader knows the lengths on the host (it packed them), so a `PackedLayout` carries
them there *and* on the device: attention backends plan their launches (block masks, work lists) from the
host copy without reading the device (no sync inside the step), and every layer reuses the one plan.

Static shapes: a training micro-batch pads its tokens to a fixed budget and its sequence list to a fixed
count with empty sequences (data/pretrain_data.py), and `max_seqlen` is the configured sequence length, so
every tensor here has a shape fixed by the configuration.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class PackedLayout:
    lengths: np.ndarray
    """(num_seqs,) int64 on the host; zero-length sequences (static-shape padding) are allowed."""
    cu_seqlens: torch.Tensor
    """(num_seqs + 1,) int32 offsets, on the device the model runs on."""
    positions: torch.Tensor
    """(total,) int64 position of each token inside its own sequence, on the device."""
    max_seqlen: int
    """An upper bound of the lengths (the configured sequence length in training: a static value)."""

    @property
    def total(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def host_cu_seqlens(self) -> np.ndarray:
        """(num_seqs + 1,) int64 offsets on the host."""
        return np.concatenate(([0], np.cumsum(self.lengths)))

    @classmethod
    def from_lengths(cls, lengths, device=None, max_seqlen: int | None = None,
                     non_blocking: bool = False) -> "PackedLayout":
        """From host lengths (a list, tuple or array): offsets and positions are computed on the host and
        copied once (pinned and non_blocking on CUDA when asked)."""
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if lengths.size and lengths.min() < 0:
            raise ValueError(f"negative sequence length in {lengths.tolist()[:8]}...")
        cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        positions = host_positions(lengths)
        bound = int(lengths.max()) if lengths.size else 0
        if max_seqlen is not None and max_seqlen < bound:
            raise ValueError(f"max_seqlen {max_seqlen} is below the longest sequence ({bound})")
        return cls(lengths=lengths, cu_seqlens=_to(torch.from_numpy(cu), device, non_blocking),
                   positions=_to(torch.from_numpy(positions), device, non_blocking),
                   max_seqlen=bound if max_seqlen is None else int(max_seqlen))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> "PackedLayout":
        """From device offsets: reads them to the host once (a sync). For callers outside the training step
        (evaluation, tests); the loader builds layouts from host lengths instead."""
        cu = cu_seqlens.detach().to("cpu", torch.int64).numpy()
        lengths = np.diff(cu)
        layout = cls.from_lengths(lengths, cu_seqlens.device, None)
        bound = max(layout.max_seqlen, int(max_seqlen or 0))
        return cls(lengths=layout.lengths, cu_seqlens=cu_seqlens.to(torch.int32), positions=layout.positions,
                   max_seqlen=bound)

    def to(self, device, non_blocking: bool = False) -> "PackedLayout":
        return PackedLayout(self.lengths, _to(self.cu_seqlens, device, non_blocking),
                            _to(self.positions, device, non_blocking), self.max_seqlen)


def host_positions(lengths: np.ndarray) -> np.ndarray:
    """Position of each token inside its own sequence, restarting at 0 for every sequence (int64)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    starts = np.repeat(np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) - starts


def _to(t: torch.Tensor, device, non_blocking: bool) -> torch.Tensor:
    if device is None or t.device == torch.device(device):
        return t
    if non_blocking and torch.device(device).type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=non_blocking)


@dataclass(frozen=True, eq=False)
class VarlenPlan:
    """The plan of the attention backends that need nothing but the layout and the window (reference,
    flash-attn): what `attend` reads, made once per micro-batch."""

    layout: PackedLayout
    window: tuple[int, int]


def plan_from_cu_seqlens(plan_fn, cu_seqlens: torch.Tensor, max_seqlen, window):
    """A backend's plan from device offsets (reads them once; outside the training step)."""
    return plan_fn(PackedLayout.from_cu_seqlens(cu_seqlens, max_seqlen), tuple(window))
