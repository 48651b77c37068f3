"""Learning-rate and masking-rate schedules as pure functions of the global step.

Every rank, and a run resumed from a checkpoint, must use the same learning rate and masking rate at a
given step, so nothing here keeps state: `lr_at(step, cfg)` and `mask_rate_at(step, cfg)` depend only on
the step and a frozen `ScheduleConfig`. `step` is the number of optimizer steps already taken (0 for the
first update).

Learning rate: a linear warmup from `lr_warmup_init` to `lr` over `lr_warmup_iters` steps, then a main
phase over the remaining `train_iters - lr_warmup_iters` steps, with p = (step - warmup) / main steps
in [0, 1] (clamped at 1 after the end). Main-phase styles:

    damped_cosine  (paper Eq. 1) eta = (Peak + Valley)/2 + (Peak - Valley)/2 * cos(pi (2N - 1) p)
                   Peak(p) = lr [1 - (1 - gamma) p], Valley(p) = lr/2 (1 - p) + min_lr p
                   N = `cycles` (integer >= 1, so eta(1) = min_lr), gamma = `damping`
    cosine         min_lr + (lr - min_lr) (1 + cos(pi p)) / 2
    linear         lr + (min_lr - lr) p
    wsd            warmup-stable-decay (trapezoid): lr until the last `lr_wsd_decay_fraction` of the main
                   phase, then down to min_lr (linear, cosine or 1-sqrt in the decay's own progress q)
    constant       lr

The paper writes p = s/S over all steps; we count p from the end of the warmup (the warmup comes first,
see docs/TRAINING.md), so eta(p=0) is exactly the peak reached by the warmup.

Masking rate (paper 3.2 and 3.7): `dynamic` rises linearly from `mask_rate_min` (15%) to `mask_rate_max`
(30%) during the LR warmup and decays linearly back to `mask_rate_min` over the main phase; the paper gives
no curve shape, so both phases are linear. `constant` is `mask_rate` throughout.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields

LR_DECAY_STYLES = ("damped_cosine", "cosine", "linear", "wsd", "constant")
WSD_DECAY_STYLES = ("linear", "cosine", "minus_sqrt")
MASK_SCHEDULES = ("dynamic", "constant")


@dataclass(frozen=True)
class ScheduleConfig:
    TITLE = "learning-rate and masking schedules"
    train_iters: int
    """Total optimizer steps, warmup included."""
    lr: float = 8e-4
    """Peak learning rate (eta_max), reached at the end of the warmup."""
    min_lr: float = 0.0
    """Final learning rate (eta_min). The paper does not state it for stage I."""
    lr_warmup_iters: int = 0
    """Steps of linear warmup from lr_warmup_init to lr (the masking warmup uses the same steps)."""
    lr_warmup_init: float = 5e-5
    """Learning rate at step 0 of the warmup (paper: 5e-5)."""
    lr_decay_style: str = field(default="damped_cosine", metadata={"choices": LR_DECAY_STYLES})
    """Main-phase shape: one of LR_DECAY_STYLES."""
    cycles: int = 1
    """Damped cosine: number of cycles N (integer >= 1). The paper does not state its value."""
    damping: float = 1.0
    """Damped cosine: gamma in [0, 1]; the peak envelope falls from lr to gamma * lr. Not stated in the paper."""
    lr_wsd_decay_fraction: float = 0.1
    """WSD: fraction of the main phase spent decaying (the rest is stable at lr)."""
    lr_wsd_decay_style: str = field(default="linear", metadata={"choices": WSD_DECAY_STYLES})
    """WSD: decay shape, one of WSD_DECAY_STYLES (minus_sqrt: lr - (lr - min_lr) sqrt(q))."""
    mask_schedule: str = field(default="dynamic", metadata={"choices": MASK_SCHEDULES})
    """dynamic (15% -> 30% in warmup, 30% -> 15% after) or constant (mask_rate)."""
    mask_rate: float = 0.3
    """Masking rate of the constant schedule (ModernBERT's fixed 30%)."""
    mask_rate_min: float = 0.15
    """Dynamic schedule: rate at step 0 (when there is a warmup) and at the end of training."""
    mask_rate_max: float = 0.30
    """Dynamic schedule: rate at the end of the warmup."""

    def __post_init__(self):
        if not (isinstance(self.train_iters, int) and self.train_iters >= 1):
            raise ValueError(f"train_iters must be an integer >= 1, got {self.train_iters!r}")
        if not (isinstance(self.lr_warmup_iters, int) and 0 <= self.lr_warmup_iters < self.train_iters):
            raise ValueError(f"lr_warmup_iters must be an integer in [0, train_iters), got {self.lr_warmup_iters!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.lr_warmup_init < 0:
            raise ValueError(f"lr_warmup_init must be >= 0, got {self.lr_warmup_init}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        # A non-integer N would not end at min_lr: cos(pi (2N - 1)) = -1 only for integers.
        if not (isinstance(self.cycles, int) and self.cycles >= 1):
            raise ValueError(f"cycles must be an integer >= 1, got {self.cycles!r}")
        if not 0.0 <= self.damping <= 1.0:
            raise ValueError(f"damping must be in [0, 1], got {self.damping}")
        if not 0.0 < self.lr_wsd_decay_fraction <= 1.0:
            raise ValueError(f"lr_wsd_decay_fraction must be in (0, 1], got {self.lr_wsd_decay_fraction}")
        if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"lr_wsd_decay_style must be one of {WSD_DECAY_STYLES}, got {self.lr_wsd_decay_style!r}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got {self.mask_schedule!r}")
        for name in ("mask_rate", "mask_rate_min", "mask_rate_max"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.mask_rate_min > self.mask_rate_max:
            raise ValueError(f"mask_rate_min {self.mask_rate_min} > mask_rate_max {self.mask_rate_max}")

    @property
    def main_iters(self) -> int:
        """Steps after the warmup (>= 1 by validation)."""
        return self.train_iters - self.lr_warmup_iters

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ScheduleConfig":
        """Build from the flags that add_schedule_args defined (argparse turns '-' into '_')."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def progress(step: int, cfg: ScheduleConfig) -> float:
    """p in [0, 1]: fraction of the main phase done at `step` (0 during the warmup, 1 after the end)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(max(step - cfg.lr_warmup_iters, 0) / cfg.main_iters, 1.0)


def damped_cosine(p: float, lr: float, min_lr: float, cycles: int, damping: float) -> float:
    """Paper Eq. 1 at main-phase progress p."""
    peak = lr * (1.0 - (1.0 - damping) * p)
    valley = lr / 2.0 * (1.0 - p) + min_lr * p
    return (peak + valley) / 2.0 + (peak - valley) / 2.0 * math.cos(math.pi * (2 * cycles - 1) * p)


def _wsd(p: float, cfg: ScheduleConfig) -> float:
    stable = 1.0 - cfg.lr_wsd_decay_fraction
    if p <= stable:
        return cfg.lr
    q = (p - stable) / cfg.lr_wsd_decay_fraction  # progress through the decay, 0 -> 1
    if cfg.lr_wsd_decay_style == "linear":
        fall = q
    elif cfg.lr_wsd_decay_style == "cosine":
        fall = (1.0 - math.cos(math.pi * q)) / 2.0
    else:  # minus_sqrt: fast start, slow end (the "1-sqrt" cooldown of WSD papers)
        fall = math.sqrt(q)
    return cfg.lr - (cfg.lr - cfg.min_lr) * fall


def lr_at(step: int, cfg: ScheduleConfig) -> float:
    """Learning rate for the update that follows `step` completed optimizer steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.lr_warmup_iters:
        return cfg.lr_warmup_init + (cfg.lr - cfg.lr_warmup_init) * step / cfg.lr_warmup_iters
    p = progress(step, cfg)
    style = cfg.lr_decay_style
    if style == "damped_cosine":
        return damped_cosine(p, cfg.lr, cfg.min_lr, cfg.cycles, cfg.damping)
    if style == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * p)) / 2.0
    if style == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * p
    if style == "wsd":
        return _wsd(p, cfg)
    return cfg.lr  # constant (validated in ScheduleConfig)


def mask_rate_at(step: int, cfg: ScheduleConfig) -> float:
    """Masking rate for the batch of the update that follows `step` completed optimizer steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.mask_schedule == "constant":
        return cfg.mask_rate
    low, high = cfg.mask_rate_min, cfg.mask_rate_max
    if step < cfg.lr_warmup_iters:  # anti-curriculum: harder (more masking) while the LR warms up
        return low + (high - low) * step / cfg.lr_warmup_iters
    return high + (low - high) * progress(step, cfg)


def apply_lr(optimizer, step: int, cfg: ScheduleConfig) -> float:
    """Set every param group's lr to lr_at(step, cfg) (call before optimizer.step()); returns it."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def add_schedule_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The schedule flags shared by the trainer and tools/plot_schedules.py, generated from ScheduleConfig's
    fields (names, defaults, docstrings as help) like every training flag (megatron_cmbert/cli.py)."""
    from megatron_cmbert.cli import add_dataclass_args

    return add_dataclass_args(parser, ScheduleConfig)
