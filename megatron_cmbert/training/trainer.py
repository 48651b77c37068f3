"""The pretraining loop: TP x DP on megatron-core, gradient accumulation, StableAdamW, schedules, logging,
evaluation, exact-resume checkpoints and clean stops. Built from a resolved Run (training/run.py: the
configuration, checked, with the model it names), launched by tools/pretrain.py (torchrun). The loop is
layout-agnostic: building the model, data-parallel wrapping, finishing gradients and summing statistics
over replicas are the ParallelLayout's (parallel/layout.py).

    for micro_batches in loader:            # whole steps (data/pretrain_data.step_loader)
        stats = self.train_step(...)        # forward/backward per micro-batch, DDP reduction, clip, update
        log / self.evaluate() / self.save() at their intervals
        stop on SIGTERM, Ctrl-C or the time limit (agreed by every rank), after saving

Loss normalisation: the loss of a step is the mean cross-entropy over every predicted token of the
global batch, whatever the layout: each micro-batch contributes sum(token losses) / (predicted tokens
of the global batch, all-reduced over DP before the backward passes), and gradients are summed over
DP. So TP=2, DP=2 and a single process give the same loss and the same update at equal tokens per step.

Static shapes and host synchronisation: every micro-batch has the shapes its configuration fixes
(data/microbatch.py), and everything the step needs to know about it (lengths, real and predicted token
counts, the positions the head scores) comes from the loader on the host. A step reads the device twice:
one all-reduce of the step's counts, its model FLOPs and the ranks' stop requests (the normaliser is needed
before the first backward), and the gradient norm (it decides whether the update is taken). Loss and
accuracy sums stay on the device and are reduced once per logged step. With --compile each encoder layer is
compiled once (torch.compile per block, torchtitan's way); the static shapes keep it from recompiling.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from functools import partial
from typing import Optional

import torch

from megatron_cmbert.checkpoint.records import RunRecord, TrainState
from megatron_cmbert.checkpoint.store import delete_after, load_latest, save_checkpoint
from megatron_cmbert.data.masking import MaskingConfig
from megatron_cmbert.data.microbatch import DeviceBatch, MicroBatchShape
from megatron_cmbert.data.pretrain_data import MicroBatchSchedule, PretrainSamples, StepSchedule, step_loader
from megatron_cmbert.data.tokenizer import CLS_ID, MASK_ID, SEP_ID, load_tokenizer
from megatron_cmbert.errors import ToolFailure
from megatron_cmbert.parallel.layout import ParallelLayout
from megatron_cmbert.training.config import OptimizerConfig
from megatron_cmbert.training.meter import ThroughputMeter, model_flops
from megatron_cmbert.training.metrics import MetricsLog
from megatron_cmbert.training.optimizer import StableAdamW, clip_grad_norm, param_groups
from megatron_cmbert.training.preemption import REASONS, StopSignal
from megatron_cmbert.training.run import Run, check_resume
from megatron_cmbert.training.schedules import apply_lr, mask_rate_at


class NonFiniteLossError(ToolFailure, RuntimeError):
    """A step's gradient norm is not finite (and --skip-nan-steps was not given)."""


def _constant(rate: float, step: int) -> float:
    """The validation masking rate at any step (module level: loader workers pickle it)."""
    return rate


def end_workers(steps) -> None:
    """Shut a DataLoader iterator's worker processes down now (idempotent). They ignore the stop signals
    (data/pretrain_data.py), so they must be ended by their loader, not by the interpreter's exit."""
    shutdown = getattr(steps, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def max_mask_rate(schedule) -> float:
    """The highest masking rate the schedule reaches (it bounds the predicted tokens of a micro-batch)."""
    return schedule.mask_rate if schedule.mask_schedule == "constant" else schedule.mask_rate_max


def eager():
    """Run compiled modules eagerly inside the block (shapes other than training's)."""
    return torch.compiler.set_stance("force_eager")


def build_optimizer(model, opt: OptimizerConfig, lr: float, tp_group=None) -> StableAdamW:
    """StableAdamW over ModernBERT's weight-decay groups (--no-decay-embeddings exempts the embedding)."""
    groups = param_groups(model, opt.weight_decay, decay_embeddings=opt.decay_embeddings)
    return StableAdamW(groups, lr=lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps, tp_group=tp_group)


class Trainer:
    def __init__(self, run: Run):
        cfg = run.cfg
        self.run_spec, self.cfg, self.config, self.schedule = run, cfg, run.model, cfg.schedule
        par = cfg.parallel
        self.parallel = ParallelLayout(par.tensor_model_parallel_size, par.sequence_parallel, par.transformer_impl,
                                       cfg.seed)
        self.ranks, self.device = self.parallel.ranks, self.parallel.device
        self.model = self.parallel.build_model(run.model, compile=par.compile)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.schedule.lr, self.parallel.tp_group)
        self.step = self.consumed_samples = self.tokens_seen = 0
        self.train_loss: Optional[float] = None
        self.valid_loss: Optional[float] = None
        self.saved_step = None  # the step of the checkpoint in --save that this run wrote or loaded
        self.stop_reason: Optional[str] = None
        self.ctrl_c_received = False  # this process saw a Ctrl-C (the agreed stop_reason may name another)
        self._load()
        self.start_step = self.step
        self._clear_later_checkpoints = cfg.checkpoint.overwrite
        self.dp_model = self.parallel.data_parallel(self.model)  # after loading: replicas start equal
        self.dp_size = self.parallel.dp_size
        self.metrics = MetricsLog(self.ranks.rank, cfg.logging.metrics_file, cfg.logging.tensorboard_dir,
                                  resume_step=self.step)
        self._build_data()
        dtype = torch.bfloat16 if par.bf16 else torch.float32
        self.meter = ThroughputMeter(run.model, self.device, dtype, self.ranks.world)

    def _build_data(self) -> None:
        data, gbs = self.cfg.data, self.cfg.data.global_batch_size
        vocab = load_tokenizer(data.tokenizer_model).get_vocab_size()
        masking = MaskingConfig(mask_token_id=MASK_ID, vocab_size=vocab, mask_prob=data.mask_prob,
                                random_prob=data.random_prob, granularity=data.masking)
        seed = self.cfg.seed
        self.shape = MicroBatchShape.for_run(data.micro_batch_size, data.seq_length,
                                             max(max_mask_rate(self.schedule), data.eval_mask_rate),
                                             self.parallel.token_multiple)
        self.train_data = PretrainSamples(data.data_path, data.split, "train", data.seq_length, seed,
                                          self.schedule.train_iters * gbs, masking, cache_dir=data.data_cache_path)
        self.valid_data = None
        log = self.cfg.logging
        if log.eval_interval and log.eval_iters:
            try:
                self.valid_data = PretrainSamples(data.data_path, data.split, "valid", data.seq_length, seed,
                                                  log.eval_iters * gbs, masking, cache_dir=data.data_cache_path)
            except ValueError as exc:
                self._print(f"note: no validation ({exc})")
        self.pppl_pool = self._pppl_pool() if log.eval_pppl_lengths else None

    def _pppl_pool(self):
        """(tokens, word-start flags) of the first dataset's validation documents, enough for the longest
        --eval-pppl-lengths window twice; None (with a note) when that split is empty."""
        from megatron_cmbert.data.pretrain_data import TokenDataset, parse_data_path, split_ranges
        from megatron_cmbert.eval.pppl import PPPLError, stream_from_prefix

        data = self.cfg.data
        prefix = parse_data_path(data.data_path)[1][0]
        valid = split_ranges(data.split, len(TokenDataset(prefix, check=False).lengths))[1]
        try:
            return stream_from_prefix(prefix, 2 * max(self.cfg.logging.eval_pppl_lengths), doc_range=valid)
        except PPPLError as exc:
            self._print(f"note: no pseudo-perplexity ({exc})")
            return None

    @torch.no_grad()
    def evaluate_pppl(self) -> dict:
        """{"valid_pppl_N": PPPL} per --eval-pppl-lengths N. Every rank runs the same windows (tensor
        parallelism needs that; data-parallel replicas repeat the work, which is small by design)."""
        from megatron_cmbert.eval.pppl import evaluate_lengths, model_nll_fn

        if self.pppl_pool is None:
            return {}
        self.model.eval()
        log = self.cfg.logging
        with eager():  # its windows have other shapes than training's: not worth compiling
            results = evaluate_lengths(model_nll_fn(self.model), *self.pppl_pool, log.eval_pppl_lengths,
                                       cls_id=CLS_ID, sep_id=SEP_ID, mask_id=MASK_ID,
                                       max_units=log.eval_pppl_max_units, seed=self.cfg.seed, bootstrap=0,
                                       device=self.device)
        return {f"valid_pppl_{r.length}": r.pppl for r in results}

    def _print(self, text: str, file=None) -> None:
        if self.ranks.rank == 0:
            print(text, flush=True, file=file or sys.stdout)

    # -- checkpoints -------------------------------------------------------------------------------
    def _load(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.load:
            return
        optimizer = None if ck.finetune else self.optimizer
        path, state = load_latest(ck.load, self.model, optimizer, self.ranks,
                                  warn=lambda text: self._print(text, file=sys.stderr))
        if ck.finetune:
            self._print(f"loaded weights from {path} (--finetune: step, optimizer and data restart)")
            return
        check_resume(state, self.cfg, path)  # the one that loaded (resolve_run checked the newest)
        self.step, self.consumed_samples, self.tokens_seen = state.step, state.consumed_samples, state.tokens_seen
        self.train_loss, self.valid_loss = state.train_loss, state.valid_loss
        if ck.save and os.path.abspath(os.path.dirname(path)) == os.path.abspath(ck.save):
            self.saved_step = self.step
        self._print(f"resumed from {path} at step {self.step} ({self.consumed_samples:,} samples consumed)")

    def train_state(self) -> TrainState:
        return TrainState(step=self.step, consumed_samples=self.consumed_samples,
                          global_batch_size=self.cfg.data.global_batch_size, seed=self.cfg.seed,
                          tokens_seen=self.tokens_seen, train_loss=self.train_loss, valid_loss=self.valid_loss,
                          schedule=dataclasses.asdict(self.schedule))

    def run_record(self) -> RunRecord:
        return RunRecord(model=self.config, seq_length=self.cfg.data.seq_length,
                         tensor_model_parallel_size=self.ranks.tp_size, train=self.cfg.to_dict(), args=self.cfg.flat())

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if self._clear_later_checkpoints:  # --overwrite: before this run's first save, so no mix of two runs
            self._clear_later_checkpoints = False
            delete_after(ck.save, self.start_step, self.ranks, log=self._print)
        path = save_checkpoint(ck.save, self.step, self.model, self.optimizer, self.ranks, self.train_state(),
                               self.run_record(), tokenizer_dir=self.cfg.data.tokenizer_model, keep_last=ck.keep_last)
        self.saved_step = self.step
        self._print(f"saved checkpoint {path}")

    # -- one step ----------------------------------------------------------------------------------
    def _forward(self, model, mb):
        """(sum of token losses, correct predictions) of one micro-batch, on the device; nothing read back."""
        batch = DeviceBatch.of(mb, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.parallel.bf16):
            out = model(batch.input_ids, batch.layout, labels=batch.labels, predicted_index=batch.predicted_index,
                        num_predicted=batch.num_predicted)
        return out.loss.float() * mb.num_predicted, out.num_correct

    def train_step(self, micro_batches, stop: Optional[StopSignal] = None) -> Optional[dict]:
        """One optimizer step over this rank's micro-batches, or None (nothing trained) when any rank was
        asked to stop: that request travels with the step's one all-reduce. The loss/accuracy sums are left
        on the device (reduce them with `step_metrics` when logging)."""
        self.model.train()
        for p in self.model.parameters():
            p.grad = None
        counts = [sum(mb.num_predicted for mb in micro_batches), sum(mb.num_tokens for mb in micro_batches),
                  sum(model_flops(self.config, mb.real_lengths, mb.num_predicted) for mb in micro_batches)]
        code = REASONS.index(stop.local_reason() if stop else None)
        sums, requests = self.parallel.step_sums(counts, [int(code == c) for c in range(1, len(REASONS))])
        global_predicted, global_tokens, flops = sums
        asked = [REASONS[c + 1] for c, n in enumerate(requests) if n]
        if asked:
            self.stop_reason = asked[-1]  # the most severe reason any rank has
            return None
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro_batches):
            # DDP reduces the gradients once, during the last micro-batch's backward
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.dp_model.no_sync():
                ls, c = self._forward(self.dp_model, mb)
                (ls / max(global_predicted, 1.0)).backward()
            loss_sum += ls.detach().double()
            correct += c.double()
        self.parallel.finish_grads(self.model)
        opt = self.cfg.optimizer
        grad_norm = float(clip_grad_norm(self.model.parameters(), opt.clip_grad, self.parallel.tp_group))
        lr = apply_lr(self.optimizer, self.step, self.schedule)
        finite = math.isfinite(grad_norm)  # a non-finite loss on any rank makes every gradient non-finite
        if finite:
            self.optimizer.step()
        elif not opt.skip_nan_steps:
            raise NonFiniteLossError(f"step {self.step + 1}: grad norm {grad_norm} is not finite; stopping "
                                     f"(--skip-nan-steps skips such steps instead)")
        return {"loss_sum": loss_sum, "correct": correct, "predicted": global_predicted, "tokens": int(global_tokens),
                "flops": flops, "lr": lr, "grad_norm": grad_norm, "skipped": not finite,
                "mask_rate": micro_batches[0].mask_rate}

    def step_metrics(self, stats: dict) -> dict:
        """The logged row of a step: its loss and accuracy reduced over DP (one all-reduce, one sync)."""
        loss_sum, correct = self.parallel.dp_sum([stats["loss_sum"], stats["correct"]])
        n = max(stats["predicted"], 1.0)
        return {"step": self.step, "loss": loss_sum / n, "accuracy": correct / n, "lr": stats["lr"],
                "mask_rate": stats["mask_rate"], "grad_norm": stats["grad_norm"], "skipped": stats["skipped"]}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_data is None:
            return None
        self.model.eval()
        data = self.cfg.data
        schedule = MicroBatchSchedule(self.valid_data, data.global_batch_size, data.micro_batch_size,
                                      self.dp_size, self.ranks.dp_rank, partial(_constant, data.eval_mask_rate),
                                      shape=self.shape)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        predicted = 0
        for k in range(len(schedule)):
            mb = schedule[k]
            ls, _ = self._forward(self.model, mb)
            loss_sum += ls.double()
            predicted += mb.num_predicted
        loss_sum, predicted = self.parallel.dp_sum([loss_sum, torch.tensor(float(predicted), device=self.device)])
        return loss_sum / max(predicted, 1.0)

    # -- the loop ----------------------------------------------------------------------------------
    def run_loader(self):
        """The steps from the current one to --train-iters, each a list of this rank's micro-batches, built
        ahead by --num-workers loader processes (pinned for asynchronous copies on CUDA)."""
        data, total = self.cfg.data, self.schedule.train_iters
        return step_loader(StepSchedule(self.train_data, data.global_batch_size, data.micro_batch_size,
                                        self.dp_size, self.ranks.dp_rank, partial(mask_rate_at, cfg=self.schedule),
                                        first_step=self.step, num_steps=total - self.step, shape=self.shape),
                           data.num_workers, pin_memory=self.device.type == "cuda")

    def run(self) -> list[dict]:
        """Train to --train-iters or until stopped; returns the logged rows."""
        cfg, data = self.cfg, self.cfg.data
        log, ck, total = cfg.logging, cfg.checkpoint, self.schedule.train_iters
        loader = self.run_loader()
        if self.step >= total:
            self._print(f"nothing to do: step {self.step} is --train-iters {total}")
        stop = StopSignal(ck.exit_duration_in_mins)
        stop.install()
        history, steps = [], None
        try:
            steps = iter(loader)
            for micro_batches in steps:
                # the stop requests travel with the next step's all-reduce: none before this run's first step,
                # so a stop comes after a step, as before
                stats = self.train_step(micro_batches, stop if self.step > self.start_step else None)
                if stats is None:  # a rank was asked to stop: agreed before the step, nothing trained
                    break
                self.step += 1
                self.consumed_samples += data.global_batch_size
                self.tokens_seen += stats["tokens"]
                self.meter.add(stats["tokens"], stats["flops"])
                if self.step % log.log_interval == 0 or self.step == total:
                    history.append(self._log(stats))
                do_eval = log.eval_interval and self.step % log.eval_interval == 0
                do_save = ck.save and ck.save_interval and self.step % ck.save_interval == 0
                if do_eval or do_save:  # paused() syncs the GPU: only around the steps that pause
                    with self.meter.paused():  # tokens/s counts training time only
                        if do_eval:
                            self._evaluate_and_log()
                        if do_save:
                            with stop.saving():
                                self.save()
                if ck.exit_interval and self.step % ck.exit_interval == 0:
                    self.stop_reason = f"--exit-interval {ck.exit_interval}"
                    break
            stop.finishing()  # a Ctrl-C from here on cannot interrupt the loader's shutdown or the last save
            end_workers(steps)
            if ck.save and self.step != self.saved_step:
                with self.meter.paused(), stop.saving():
                    self.save()
        finally:
            end_workers(steps)  # on an error too: the workers ignore SIGTERM, so exit would wait for them
            self.ctrl_c_received = stop.received == "SIGINT"
            stop.uninstall()
            self.metrics.close()
        return history

    def _log(self, stats: dict) -> dict:
        record = self.step_metrics(stats)
        record.update(self.meter.report())
        self.train_loss = record["loss"]
        self.metrics.log(record, self._format(record))
        return record

    def _evaluate_and_log(self) -> None:
        val = self.evaluate()
        pppl = self.evaluate_pppl()
        if val is not None or pppl:
            self.valid_loss = val if val is not None else self.valid_loss
            row = {"step": self.step, **({"valid_loss": val} if val is not None else {}), **pppl}
            text = " | ".join([f"step {self.step:>7d}"] + ([f"valid loss {val:.4f}"] if val is not None else [])
                              + [f"pppl@{k.rsplit('_', 1)[1]} {v:.2f}" for k, v in pppl.items()])
            self.metrics.log(row, text)

    def _format(self, r: dict) -> str:
        text = (f"step {r['step']:>7d} | loss {r['loss']:.4f} | acc {r['accuracy']:.4f} | lr {r['lr']:.3e} | "
                f"mask {r['mask_rate']:.3f} | grad norm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s")
        text += f" | {r['tflops_per_device']:.3g} TFLOP/s/device"
        if "mfu" in r:
            text += f" | MFU {100 * r['mfu']:.1f}%"
        return text + (" | SKIPPED (non-finite)" if r["skipped"] else "")
