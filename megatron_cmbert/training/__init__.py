"""Training: the optimizer and schedules (model-independent, exported here), plus checkpoint.py (atomic
dist_checkpointing save/load) and trainer.py (the TP x DP loop), imported where used.

optimizer.py   StableAdamW (TP-aware update clipping), param_groups (ModernBERT's rule: every parameter
               with ndim > 1 decays, embeddings included; norm weights and biases do not;
               decay_embeddings=False exempts embeddings), clip_grad_norm (global grad norm across TP)
schedules.py   ScheduleConfig, lr_at (damped cosine, cosine, linear, wsd, constant), mask_rate_at
               (dynamic 15% -> 30% -> 15% or constant), add_schedule_args (the shared CLI flags)
"""
from megatron_cmbert.training.optimizer import StableAdamW, clip_grad_norm, no_weight_decay, param_groups
from megatron_cmbert.training.schedules import (LR_DECAY_STYLES, MASK_SCHEDULES, ScheduleConfig,
                                                add_schedule_args, apply_lr, lr_at, mask_rate_at)

__all__ = ["StableAdamW", "clip_grad_norm", "no_weight_decay", "param_groups", "LR_DECAY_STYLES",
           "MASK_SCHEDULES", "ScheduleConfig", "add_schedule_args", "apply_lr", "lr_at", "mask_rate_at"]
