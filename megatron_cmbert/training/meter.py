"""Training throughput: tokens/s and model FLOPs utilisation (MFU), measured the same way on every machine.

It exists so that the loop only says "a step of N tokens happened" and "this stretch (eval, save) is not
training": the FLOP count of the model, the peak of the device it runs on and the clock live here.

MFU = (model FLOPs per second) / (dense peak of one device x number of devices). The FLOP count is the
model's arithmetic on the real documents (3x the forward: backward = 2x forward), not what the kernels
execute (no recomputation, no padding tokens, no masked-out attention pairs), so it compares across
implementations: attention is counted per document, a local layer's keys capped at its window.
`model_flops` is the one formula; the trainer's meter and tools/bench_train.py both report it.
"""
from __future__ import annotations

import contextlib
import re
import time
from typing import Optional

import numpy as np
import torch


def attention_pairs(lengths, half_window: Optional[int] = None) -> int:
    """Query-key pairs attended over documents of these lengths: L^2 each for global attention; with keys
    |i - j| <= half_window, L + 2 * sum_{d=1..m} (L - d), m = min(half_window, L - 1)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if half_window is None:
        return int((lengths * lengths).sum())
    m = np.minimum(half_window, np.maximum(lengths - 1, 0))
    return int((lengths + 2 * (m * lengths - m * (m + 1) // 2)).sum())


def model_flops(config, lengths, num_predicted: int) -> float:
    """Training FLOPs (3x forward) of one batch of real documents of `lengths` tokens, the MLM head applied
    to `num_predicted` of them.

    Forward, per token and layer, the linears 2*(Wqkv 3H^2 + Wo H^2 + Wi 2HI + Wo' IH) = 2*(4H^2 + 3HI); per
    attended query-key pair and layer 4*H (scores and values); per predicted token the head 2*(H^2 + V*H)
    (dense + decoder)."""
    h, i, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    tokens = int(np.asarray(lengths).sum())
    linear = 2 * (4 * h * h + 3 * h * i) * config.num_layers * tokens
    pairs = {kind: attention_pairs(lengths, None if kind == "full_attention" else config.local_attention // 2)
             for kind in set(config.layer_types)}
    attention = sum(4 * h * pairs[kind] for kind in config.layer_types)
    head = 2 * (h * h + v * h) * num_predicted
    return 3.0 * (linear + attention + head)


def train_flops_per_token(config, seq_len: int, predicted_share: float) -> float:
    """model_flops per token for documents of exactly `seq_len` tokens (the paper's fixed-length view)."""
    return model_flops(config, [seq_len], predicted_share * seq_len) / seq_len


# Dense (no structured sparsity) tensor-core peaks for bf16/fp16 with fp32 accumulation, FLOP/s, from the
# vendors' public datasheets (the sparse figure they print first is twice these):
#   NVIDIA H100 Tensor Core GPU datasheet: SXM 989 TFLOP/s, NVL 835, PCIe 756
#   NVIDIA H200 Tensor Core GPU datasheet: SXM 989, NVL 835 (GH200 superchip datasheet: 989)
#   NVIDIA HGX B200 / DGX B200 datasheet: 2.25 PFLOP/s per GPU
#   NVIDIA A100 Tensor Core GPU datasheet: 312 (SXM and PCIe, 40 and 80 GB)
#   NVIDIA L40S datasheet: 362; L40 datasheet: 181; L4 datasheet: 121; A40 datasheet: 150; A10 datasheet: 125
#   NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 165 (fp32 accumulate, as PyTorch uses)
#   AMD Instinct MI300X datasheet: 1307
# Matched in order against torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
# "NVIDIA A100-SXM4-80GB"), so the more specific names come first; \b keeps "A10" from matching "A100".
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),
    (r"\bH200\b.*\bNVL\b", 835e12),
    (r"\bGH200\b", 989e12),
    (r"\bH200\b", 989e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA40\b", 150e12),
    (r"\bA10\b", 125e12),
    (r"\bRTX 4090\b", 165e12),
    (r"\bMI300X\b", 1307e12),
]

# Only half-precision tensor-core work has a peak in the table: an fp32 run has no comparable single figure
# (plain fp32 vs TF32 depends on torch.backends settings), so it reports tokens/s without MFU.
_HALF = (torch.bfloat16, torch.float16)


def peak_by_name(name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of the device called `name`, or None when the table does not know it."""
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peak
    return None


def device_peak_flops(device, dtype: torch.dtype) -> Optional[float]:
    """Dense peak FLOP/s of one `device` at `dtype`; None on CPU, for fp32, and for unknown devices."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in _HALF or not torch.cuda.is_available():
        return None
    return peak_by_name(torch.cuda.get_device_name(device))


class ThroughputMeter:
    """Tokens/s and MFU between two `report()` calls, excluding the time spent inside `paused()`.

    `add` takes the tokens of a whole step over every data-parallel replica (tensor-parallel ranks share
    their replica's tokens), so MFU divides by all `world_size` devices.
    """

    def __init__(self, config, device, dtype: torch.dtype, world_size: int):
        self.config, self.world_size = config, world_size
        self.device = torch.device(device)
        self.peak = device_peak_flops(self.device, dtype)
        self._reset()

    def _now(self) -> float:
        if self.device.type == "cuda":  # queued kernels belong to the stretch that launched them
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _reset(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.excluded = 0.0
        self.start = self._now()

    def add(self, step_tokens: int, step_flops: float) -> None:
        """A step of `step_tokens` real tokens and `step_flops` model FLOPs (model_flops), all replicas."""
        self.tokens += step_tokens
        self.flops += step_flops

    @contextlib.contextmanager
    def paused(self):
        """Time spent in this block (evaluation, checkpoint saves) does not count as training time."""
        start = self._now()
        try:
            yield
        finally:
            self.excluded += self._now() - start

    def report(self) -> dict:
        """{"tokens_per_s", and "mfu" when the device's peak is known} since the last report; resets."""
        elapsed = max(self._now() - self.start - self.excluded, 1e-9)
        out = {"tokens_per_s": self.tokens / elapsed,
               "tflops_per_device": self.flops / elapsed / self.world_size / 1e12}
        if self.peak:
            out["mfu"] = self.flops / elapsed / (self.peak * self.world_size)
        self._reset()
        return out
