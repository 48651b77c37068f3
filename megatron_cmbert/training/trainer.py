"""The pretraining loop: TP x DP on megatron-core, gradient accumulation, StableAdamW, schedules,
logging, evaluation and exact-resume checkpoints. Launched by tools/pretrain.py (torchrun).

Loss normalisation: the loss of a step is the mean cross-entropy over every predicted token of the
global batch, whatever the layout: each micro-batch contributes sum(token losses) / (predicted tokens
of the global batch, all-reduced over DP before the backward passes), and gradients are summed over
DP. So TP=2, DP=2 and a single process give the same loss and the same update at equal tokens per step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_cmbert.data.masking import IGNORE_INDEX, MaskingConfig
from megatron_cmbert.data.pretrain_data import MicroBatchSchedule, PretrainSamples
from megatron_cmbert.data.tokenizer import MASK_ID, PAD_ID, load_tokenizer
from megatron_cmbert.training.checkpoint import Ranks, find_checkpoint, load_checkpoint, save_checkpoint
from megatron_cmbert.training.optimizer import StableAdamW, clip_grad_norm, param_groups
from megatron_cmbert.training.schedules import ScheduleConfig, apply_lr, lr_at, mask_rate_at

H100_BF16_PEAK = 989e12  # ../shared/ANCHORS.md: report MFU against the dense bf16 peak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(tp: int, seed: int) -> tuple[Ranks, torch.device]:
    """Process group (torchrun's, or a one-process one), megatron-core model parallel state."""
    from megatron.core import parallel_state

    from megatron_cmbert.parallel import cpu_shim

    if "RANK" not in os.environ:  # plain `python tools/pretrain.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world % tp:
        raise SystemExit(f"error: world size {world} is not a multiple of --tensor-model-parallel-size {tp}")
    cpu_shim.install()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(seed)  # same seed everywhere: the model's CPU init is TP-invariant
    ranks = Ranks(tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
                  dp_rank=parallel_state.get_data_parallel_rank(), rank=dist.get_rank(), world=world)
    return ranks, device


def train_flops_per_token(config, seq_len: int, predicted_share: float) -> float:
    """Training FLOPs per token (3x forward), counted as ../shared/ANCHORS.md does."""
    h, i, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    linear = 2 * (4 * h * h + 3 * h * i) * config.num_layers
    kinds = config.layer_types
    window = config.local_attention + 1
    attention = sum(4 * h * (seq_len if k == "full_attention" else min(window, seq_len)) for k in kinds)
    head = 2 * (h * h + v * h) * predicted_share
    return 3.0 * (linear + attention + head)


class Logger:
    """stdout on rank 0, plus --metrics-file (JSON lines) and TensorBoard when available."""

    def __init__(self, rank: int, metrics_file: Optional[str], tensorboard_dir: Optional[str]):
        self.active = rank == 0
        self.metrics = None
        self.tb = None
        if not self.active:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.metrics = open(metrics_file, "a", encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:
                print("note: tensorboard is not installed; --tensorboard-dir ignored (metrics still go "
                      "to stdout and --metrics-file)", flush=True)

    def log(self, record: dict, text: str) -> None:
        if not self.active:
            return
        print(text, flush=True)
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tb:
            for k, val in record.items():
                if isinstance(val, (int, float)) and k != "step":
                    self.tb.add_scalar(k, val, record["step"])

    def close(self):
        if self.metrics:
            self.metrics.close()
        if self.tb:
            self.tb.close()


def _identity(x):
    return x


class Trainer:
    def __init__(self, args, model_config):
        from megatron.core import parallel_state

        from megatron_cmbert.parallel.layer_spec import build_masked_lm

        self.args = args
        self.ranks, self.device = setup_distributed(args.tensor_model_parallel_size, args.seed)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.config = model_config
        self.model = build_masked_lm(model_config, transformer_impl=args.transformer_impl,
                                     sequence_parallel=args.sequence_parallel).to(self.device)
        self.model.set_attention_backend(args.attention_backend)
        self.optimizer = StableAdamW(param_groups(self.model, args.weight_decay), lr=args.lr,
                                     betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                     tp_group=self.tp_group if args.tensor_model_parallel_size > 1 else None)
        self.schedule = ScheduleConfig.from_args(args)
        self.step = 0
        self.consumed_samples = 0
        self.saved_step = None  # the step of the checkpoint on disk that this run wrote or loaded
        self.logger = Logger(self.ranks.rank, args.metrics_file, args.tensorboard_dir)
        self._load()
        vocab = load_tokenizer(args.tokenizer_model).get_vocab_size()
        masking = MaskingConfig(mask_token_id=MASK_ID, vocab_size=vocab, mask_prob=args.mask_prob,
                                random_prob=args.random_prob, granularity=args.masking)
        gbs = args.global_batch_size
        self.train_data = PretrainSamples(args.data_path, args.split, "train", args.seq_length, args.seed,
                                          args.train_iters * gbs, masking)
        self.valid_data = None
        if args.eval_interval and args.eval_iters:
            try:
                self.valid_data = PretrainSamples(args.data_path, args.split, "valid", args.seq_length,
                                                  args.seed, args.eval_iters * gbs, masking)
            except ValueError as exc:
                self._print(f"note: no validation ({exc})")

    def _print(self, text: str) -> None:
        if self.ranks.rank == 0:
            print(text, flush=True)

    # -- checkpoints -------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.args.load:
            return
        path = find_checkpoint(self.args.load)
        if path is None:
            self._print(f"note: no checkpoint in {self.args.load}; starting from scratch")
            return
        optimizer = None if self.args.finetune else self.optimizer
        state = load_checkpoint(path, self.model, optimizer, self.ranks)
        if self.args.finetune:
            self._print(f"loaded weights from {path} (--finetune: step, optimizer and data restart)")
            return
        self.step, self.consumed_samples = state["step"], state["consumed_samples"]
        if self.args.save and os.path.abspath(self.args.save) == os.path.abspath(self.args.load):
            self.saved_step = self.step
        if self.step > self.args.train_iters:
            raise SystemExit(f"error: {path} is at step {self.step}, beyond --train-iters {self.args.train_iters}")
        if state.get("global_batch_size") != self.args.global_batch_size:
            raise SystemExit(f"error: {path} was trained with --global-batch-size {state.get('global_batch_size')}; "
                             f"resuming needs the same value (or --finetune to start a new stage)")
        self._print(f"resumed from {path} at step {self.step} ({self.consumed_samples:,} samples consumed)")

    def save(self) -> None:
        state = {"step": self.step, "consumed_samples": self.consumed_samples,
                 "global_batch_size": self.args.global_batch_size, "seed": self.args.seed}
        config = {"model": dataclasses.asdict(self.config), "args": {k: v for k, v in vars(self.args).items()
                                                                      if isinstance(v, (int, float, str, bool, list, type(None)))}}
        path = save_checkpoint(self.args.save, self.step, self.model, self.optimizer, self.ranks, state,
                               extra_files={"config.json": config}, tokenizer_dir=self.args.tokenizer_model)
        self.saved_step = self.step
        self._print(f"saved checkpoint {path}")

    # -- one step ----------------------------------------------------------------------------------
    def _pad_for_sequence_parallel(self, mb):
        tp = self.ranks.tp_size
        extra = (-mb.input_ids.numel()) % tp if self.args.sequence_parallel else 0
        if not extra:
            return mb.input_ids, mb.labels, mb.cu_seqlens, mb.max_seqlen
        ids = torch.cat([mb.input_ids, torch.full((extra,), PAD_ID, dtype=mb.input_ids.dtype)])
        labels = torch.cat([mb.labels, torch.full((extra,), IGNORE_INDEX, dtype=mb.labels.dtype)])
        cu = torch.cat([mb.cu_seqlens, mb.cu_seqlens[-1:] + extra])  # padding is a sequence of its own
        return ids, labels, cu, max(mb.max_seqlen, extra)

    def _accuracy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        values, index = logits.float().max(dim=-1)
        start, _ = self.model.spec.vocab_range(self.config.padded_vocab_size(self.ranks.tp_size))
        index = index + start
        if self.ranks.tp_size > 1:  # vocab-parallel logits: the best id is the best over the TP ranks
            vals = [torch.empty_like(values) for _ in range(self.ranks.tp_size)]
            idxs = [torch.empty_like(index) for _ in range(self.ranks.tp_size)]
            dist.all_gather(vals, values.contiguous(), group=self.tp_group)
            dist.all_gather(idxs, index.contiguous(), group=self.tp_group)
            best = torch.stack(vals).argmax(dim=0)
            index = torch.stack(idxs).gather(0, best[None]).squeeze(0)
        return (index == targets).sum()

    def _forward(self, mb):
        ids, labels, cu, max_len = self._pad_for_sequence_parallel(mb)
        dev = self.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            out = self.model(ids.to(dev), cu.to(dev), max_len, labels=labels.to(dev))
        loss_sum = out.loss.float() * out.num_predicted
        targets = labels[labels != IGNORE_INDEX].to(dev)
        correct = self._accuracy(out.logits.detach(), targets)
        return loss_sum, correct, out.num_predicted

    def _dp_sum(self, values: list) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def train_step(self, micro_batches) -> dict:
        from megatron_cmbert.parallel.sharding import allreduce_sequence_parallel_grads

        self.model.train()
        for p in self.model.parameters():
            p.grad = None
        local_predicted = sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in micro_batches)
        global_predicted = self._dp_sum([local_predicted])[0]
        loss_sum = correct = 0.0
        for mb in micro_batches:
            ls, c, _ = self._forward(mb)
            (ls / max(global_predicted, 1.0)).backward()
            loss_sum += ls.item()
            correct += c.item()
        if self.args.sequence_parallel:
            allreduce_sequence_parallel_grads(self.model)
        if self.dp_size > 1:  # sum (not average): the loss is already normalised by the global count
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dp_group)
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        loss_sum, correct = self._dp_sum([loss_sum, correct])
        loss = loss_sum / max(global_predicted, 1.0)
        grad_norm = clip_grad_norm(self.model.parameters(), self.args.clip_grad,
                                   self.tp_group if self.ranks.tp_size > 1 else None).item()
        lr = apply_lr(self.optimizer, self.step, self.schedule)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        elif not self.args.skip_nan_steps:
            raise SystemExit(f"error: step {self.step + 1}: loss {loss}, grad norm {grad_norm} is not finite; "
                             f"stopping (--skip-nan-steps skips such steps instead)")
        return {"loss": loss, "accuracy": correct / max(global_predicted, 1.0), "lr": lr,
                "grad_norm": grad_norm, "predicted": int(global_predicted), "skipped": not finite}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_data is None:
            return None
        self.model.eval()
        schedule = MicroBatchSchedule(self.valid_data, self.args.global_batch_size, self.args.micro_batch_size,
                                      self.dp_size, self.ranks.dp_rank, lambda step: self.args.eval_mask_rate)
        loss_sum = predicted = 0.0
        for k in range(len(schedule)):
            ls, _, n = self._forward(schedule[k])
            loss_sum += ls.item()
            predicted += n
        loss_sum, predicted = self._dp_sum([loss_sum, predicted])
        return loss_sum / max(predicted, 1.0)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        args = self.args
        schedule = MicroBatchSchedule(self.train_data, args.global_batch_size, args.micro_batch_size,
                                      self.dp_size, self.ranks.dp_rank, lambda s: mask_rate_at(s, self.schedule),
                                      first_step=self.step, num_steps=args.train_iters - self.step)
        loader = torch.utils.data.DataLoader(schedule, batch_size=None, shuffle=False, collate_fn=_identity,
                                             num_workers=args.num_workers)
        per_step = schedule.per_step
        history, pending = [], []
        tokens_since, time_since = 0, time.perf_counter()
        seq_tokens = 0
        for mb in loader:
            pending.append(mb)
            if len(pending) < per_step:
                continue
            micro_batches, pending = pending, []
            local_tokens = sum(m.input_ids.numel() for m in micro_batches)
            seq_tokens = max(seq_tokens, max(m.max_seqlen for m in micro_batches))
            rate = micro_batches[0].mask_rate
            stats = self.train_step(micro_batches)
            self.step += 1
            self.consumed_samples += args.global_batch_size
            tokens_since += self._dp_sum([local_tokens])[0]  # one DP rank's tokens are shared by its TP ranks
            record = {"step": self.step, "loss": stats["loss"], "accuracy": stats["accuracy"], "lr": stats["lr"],
                      "mask_rate": rate, "grad_norm": stats["grad_norm"], "skipped": stats["skipped"]}
            history.append(record)
            if self.step % args.log_interval == 0 or self.step == args.train_iters:
                elapsed = time.perf_counter() - time_since
                record["tokens_per_s"] = tokens_since / max(elapsed, 1e-9)
                if self.device.type == "cuda":
                    flops = train_flops_per_token(self.config, seq_tokens, rate) * record["tokens_per_s"]
                    record["mfu"] = flops / (H100_BF16_PEAK * self.ranks.world)
                self.logger.log(record, self._format(record))
                tokens_since, time_since = 0, time.perf_counter()
            paused = time.perf_counter()  # tokens/s counts training time only, not eval or saves
            if args.eval_interval and self.step % args.eval_interval == 0:
                val = self.evaluate()
                if val is not None:
                    self.logger.log({"step": self.step, "valid_loss": val}, f"step {self.step:>7d} | valid loss {val:.4f}")
            if args.save and args.save_interval and self.step % args.save_interval == 0:
                self.save()
            time_since += time.perf_counter() - paused
            if args.exit_interval and self.step % args.exit_interval == 0:
                self._print(f"exiting after step {self.step} (--exit-interval {args.exit_interval})")
                break
        if args.save and self.step != self.saved_step:
            self.save()
        self.logger.close()
        return history

    def _format(self, r: dict) -> str:
        text = (f"step {r['step']:>7d} | loss {r['loss']:.4f} | acc {r['accuracy']:.4f} | lr {r['lr']:.3e} | "
                f"mask {r['mask_rate']:.3f} | grad norm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s")
        if "mfu" in r:
            text += f" | MFU {100 * r['mfu']:.1f}%"
        return text + (" | SKIPPED (non-finite)" if r["skipped"] else "")
