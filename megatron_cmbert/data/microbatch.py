"""A packed micro-batch with static shapes, and the budget that fixes them.

Packing closes samples short and a sample holds as many pieces as its documents give, so the raw
micro-batch changes shape at every step: nothing could be compiled or captured, and FlexAttention would
recompile per size. Here every tensor has a shape fixed by the configuration (`MicroBatchShape`):

    tokens     micro-batch size x sequence length (rounded up to a multiple of `multiple`, e.g. TP for
               sequence parallelism); the real tokens first, then ONE padding sequence of [PAD] tokens that
               predicts nothing (it attends only to itself: a few dozen tokens, the samples' slack)
    sequences  a bound on the pieces (a piece is >= 3 tokens: [CLS] token [SEP]) + the padding sequence;
               the rest of the list is zero-length sequences, which every attention backend skips
    predicted  a bound on the masked tokens: the highest masking rate of the run times the real tokens, plus
               each sample's rounding (whole-word units are picked whole); the rest of the index list points
               at position 0 ([CLS], never predicted), so those rows carry no loss

The host keeps what the device would otherwise have to be asked for: the lengths (attention plans are built
from them), the number of real and of predicted tokens (the loss normaliser). `MicroBatch.unpadded()` is the
same data without the padding, as the trainer saw it before (tests compare the two).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from megatron_cmbert.kernels.varlen import host_positions
from megatron_cmbert.tokens import IGNORE_INDEX, PAD_ID

MIN_PIECE_TOKENS = 3  # [CLS] + at least one token + [SEP]
UNIT_SLACK = 64       # per sample: masked tokens beyond rate x tokens when the last unit is picked whole


@dataclass(frozen=True)
class MicroBatchShape:
    """The static sizes of every micro-batch of a run."""

    tokens: int
    sequences: int
    predicted: int
    max_seqlen: int
    """The configured sequence length: no piece is longer (the attention plans' static bound)."""

    @classmethod
    def for_run(cls, micro_batch_size: int, seq_length: int, max_mask_rate: float, multiple: int = 1) -> "MicroBatchShape":
        tokens = math.lcm(multiple, 8) * -(-micro_batch_size * seq_length // math.lcm(multiple, 8))
        sequences = micro_batch_size * (seq_length // MIN_PIECE_TOKENS) + 1
        predicted = math.ceil(max_mask_rate * micro_batch_size * seq_length) + micro_batch_size * UNIT_SLACK
        predicted = min(tokens, 64 * -(-predicted // 64))
        return cls(tokens=tokens, sequences=sequences, predicted=predicted, max_seqlen=seq_length)


@dataclass
class MicroBatch:
    """One packed micro-batch: every piece is its own sequence. Tensors on the host (pinned by the loader on
    CUDA machines); `lengths` and the counts are plain host values."""

    input_ids: torch.Tensor        # (tokens,) int64
    labels: torch.Tensor           # (tokens,) int64, IGNORE_INDEX where not predicted (and on padding)
    lengths: np.ndarray            # (sequences,) int64; zero-length sequences after the real ones
    cu_seqlens: torch.Tensor       # (sequences + 1,) int32
    positions: torch.Tensor        # (tokens,) int64: position inside its own sequence
    predicted_index: torch.Tensor  # (predicted,) int64: token positions whose labels are scored
    num_tokens: int                # real tokens (no padding)
    num_predicted: int             # real predicted tokens (the loss normaliser's share)
    max_seqlen: int
    mask_rate: float

    @classmethod
    def pack(cls, inputs: list[np.ndarray], labels: list[np.ndarray], lengths: list[np.ndarray], rate: float,
             shape: MicroBatchShape | None = None) -> "MicroBatch":
        """Samples' (inputs, labels, piece lengths) -> one micro-batch, padded to `shape` when given."""
        ids, lab, lens = np.concatenate(inputs), np.concatenate(labels), np.concatenate(lengths).astype(np.int64)
        real, pieces = ids.size, lens.size
        predicted = np.flatnonzero(lab != IGNORE_INDEX)
        max_seqlen = int(lens.max()) if lens.size else 0
        if shape is not None:
            if real > shape.tokens or pieces + 1 > shape.sequences:
                raise ValueError(f"micro-batch of {real} tokens in {pieces} pieces exceeds its static shape {shape}")
            if predicted.size > shape.predicted:  # the bound assumes units of <= UNIT_SLACK tokens
                raise ValueError(f"micro-batch predicts {predicted.size} tokens, more than the static bound "
                                 f"{shape.predicted} (a whole-word unit longer than {UNIT_SLACK} tokens?)")
            pad = shape.tokens - real
            ids = np.concatenate([ids, np.full(pad, PAD_ID, dtype=ids.dtype)])
            lab = np.concatenate([lab, np.full(pad, IGNORE_INDEX, dtype=lab.dtype)])
            lens = np.concatenate([lens, [pad], np.zeros(shape.sequences - pieces - 1, dtype=np.int64)])
            predicted = np.concatenate([predicted, np.zeros(shape.predicted - predicted.size, dtype=predicted.dtype)])
            max_seqlen = shape.max_seqlen
        cu = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
        return cls(torch.from_numpy(ids), torch.from_numpy(lab), lens, torch.from_numpy(cu),
                   torch.from_numpy(host_positions(lens)), torch.from_numpy(predicted.astype(np.int64)),
                   num_tokens=int(real), num_predicted=int((lab != IGNORE_INDEX).sum()), max_seqlen=max_seqlen,
                   mask_rate=rate)

    @property
    def real_lengths(self) -> np.ndarray:
        """The lengths of the real pieces (no padding sequence, no empty ones): what the model's FLOPs count."""
        lens = self.lengths[self.lengths > 0]
        return lens[:-1] if self.num_tokens < self.input_ids.numel() else lens

    def unpadded(self) -> "MicroBatch":
        """The same micro-batch without its static-shape padding."""
        pieces = int(np.count_nonzero(self.lengths))
        if self.num_tokens < self.input_ids.numel():
            pieces -= 1  # the padding sequence
        lens = self.lengths[:pieces]
        n = self.num_tokens
        return replace(self, input_ids=self.input_ids[:n], labels=self.labels[:n], lengths=lens,
                       cu_seqlens=self.cu_seqlens[:pieces + 1], positions=self.positions[:n],
                       predicted_index=self.predicted_index[:self.num_predicted],
                       max_seqlen=int(lens.max()) if lens.size else 0)

    def pin_memory(self) -> "MicroBatch":
        """For DataLoader(pin_memory=True): page-locked tensors, so the copies to the GPU are asynchronous."""
        return replace(self, **{k: getattr(self, k).pin_memory() for k in
                                ("input_ids", "labels", "cu_seqlens", "positions", "predicted_index")})


@dataclass
class DeviceBatch:
    """A micro-batch's tensors on the device, with its attention layout (kernels/varlen.PackedLayout)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    layout: object
    predicted_index: torch.Tensor
    num_predicted: int

    @classmethod
    def of(cls, mb: MicroBatch, device) -> "DeviceBatch":
        """Copies to `device`, asynchronous from pinned memory on CUDA; nothing is read back."""
        from megatron_cmbert.kernels.varlen import PackedLayout

        device = torch.device(device)
        nb = device.type == "cuda"
        to = lambda t: t.to(device, non_blocking=nb)  # noqa: E731
        layout = PackedLayout(lengths=mb.lengths, cu_seqlens=to(mb.cu_seqlens), positions=to(mb.positions),
                              max_seqlen=mb.max_seqlen)
        return cls(to(mb.input_ids), to(mb.labels), layout, to(mb.predicted_index), mb.num_predicted)
