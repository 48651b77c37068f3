#!/usr/bin/env python3
"""Pretrain Chinese ModernBERT with whole-word masking: TP x DP on megatron-core, launched by torchrun.

    torchrun --nproc_per_node 2 tools/pretrain.py --preset tiny --tensor-model-parallel-size 2 \\
        --tokenizer-model tok --data-path data/corpus_text_document --split 98,2,0 \\
        --seq-length 256 --micro-batch-size 4 --global-batch-size 8 --train-iters 100 \\
        --lr 8e-4 --lr-warmup-iters 10 --save ckpt --save-interval 50

A plain `python tools/pretrain.py ...` runs as a world of one process.

Checkpoints: a new run does not pass --load, and refuses a --save directory that already holds checkpoints
(--overwrite replaces them). --load DIR resumes exactly (same losses as an uninterrupted run) from DIR's
newest complete checkpoint, falling back to an older one with a warning when it does not load;
--load DIR/iter_NNNNNNN picks one; --finetune --load loads weights only (Stage II: --seq-length 8192).
A resume with other schedule flags than the checkpoint's is refused unless --override-schedule.

Stopping: SIGTERM or Ctrl-C (SIGINT) makes every rank finish its step, save (with --save) and exit 0,
printing the command that resumes; --exit-duration-in-mins does the same before a wall-clock limit.

Mistakes in the flags, the data or the checkpoint directories are found before any process group is set
up and reported as one line `error: ...` by rank 0 with exit status 2 (another rank waits 10 s, so that
torchrun ends it once rank 0 has reported, then reports `error (rank N): ...` itself); --check-only runs
just those checks (WORLD_SIZE=N in the environment for N ranks). The configuration is a tree of
dataclasses (megatron_cmbert/training/config.py); every flag below is generated from one of its fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
import warnings
from typing import Optional

from megatron_cmbert.training.config import ConfigError, TrainConfig

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, reported by main() like every other configuration mistake
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    TrainConfig.add_args(parser)
    parser.add_argument("--check-only", action="store_true",
                        help="run the pre-launch checks for $WORLD_SIZE ranks (default 1) and exit 0 when they pass; "
                             "launch scripts run this before torchrun, whose own failure report would otherwise "
                             "surround the one-line error")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """The validated configuration tree (raises ConfigError)."""
    return TrainConfig.from_namespace(build_parser().parse_args(argv))


def world_size() -> int:
    """The number of ranks torchrun (or Slurm through torchrun) will start; 1 for a plain python run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_errors() -> tuple[type, ...]:
    """The typed errors a configuration mistake raises (turned into one line and exit status 2)."""
    from megatron_cmbert.data.dataset_checks import DataConfigError
    from megatron_cmbert.data.sample_cache import SampleCacheError
    from megatron_cmbert.training.checkpoint import CheckpointError

    return ConfigError, DataConfigError, CheckpointError, SampleCacheError


def check_launch(cfg: TrainConfig, world: int):
    """Every check that needs no process group, in the order a user would fix them. Returns the resolved
    ModelConfig. Raises ConfigError, DataConfigError or CheckpointError with a one-line message."""
    from megatron_cmbert.data.dataset_checks import check_data_prefix, check_dataset_tokenizer
    from megatron_cmbert.data.pretrain_data import parse_data_path, split_ranges
    from megatron_cmbert.data.sample_cache import default_cache_dir
    from megatron_cmbert.data.tokenizer import load_tokenizer
    from megatron_cmbert.training.config import check_checkpoint_dirs

    data, tp = cfg.data, cfg.parallel.tensor_model_parallel_size
    if world % tp:
        raise ConfigError(f"world size {world} (WORLD_SIZE) is not a multiple of --tensor-model-parallel-size {tp}")
    dp = world // tp
    if data.global_batch_size % (data.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {data.global_batch_size} must be a multiple of --micro-batch-size "
                          f"{data.micro_batch_size} x data-parallel size {dp} (world {world} / TP {tp})")
    try:
        _, prefixes = parse_data_path(data.data_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        split_ranges(data.split, 1)
    except ValueError as exc:
        raise ConfigError(f"--split {data.split!r}: up to three train,valid,test shares such as 98,2,0 ({exc})") from None
    if not os.path.isfile(os.path.join(data.tokenizer_model, "tokenizer.json")):
        raise ConfigError(f"--tokenizer-model {data.tokenizer_model}: no tokenizer.json there "
                          f"(build one with tools/train_tokenizer.py)")
    try:
        vocab = load_tokenizer(data.tokenizer_model).get_vocab_size()
    except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
        raise ConfigError(f"--tokenizer-model {data.tokenizer_model}: tokenizer.json does not load "
                          f"({' '.join(str(exc).split())})") from None
    for prefix in prefixes:
        check_data_prefix(prefix)
    for prefix in prefixes:
        check_dataset_tokenizer(prefix, data.tokenizer_model)
    for folder in [data.data_cache_path] if data.data_cache_path else {default_cache_dir(p) for p in prefixes}:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"sample index cache {folder}: cannot create it ({exc.strerror}); "
                              f"choose another with --data-cache-path") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"sample index cache {folder}: not writable; choose another with --data-cache-path")
    model = cfg.model.resolve(vocab)
    try:
        model.validate_parallel(tp)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if data.seq_length > model.max_position_embeddings:
        raise ConfigError(f"--seq-length {data.seq_length} exceeds the model's {model.max_position_embeddings} "
                          f"positions (--max-position-embeddings)")
    check_checkpoint_dirs(cfg)
    if cfg.checkpoint.load:
        check_checkpoint_model(cfg.checkpoint.load, model)
    return model


# The ModelConfig fields that set a weight's shape: a checkpoint loads only into the same values.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "normalization")


def check_checkpoint_model(load: str, model) -> None:
    """The model these flags build has the weight shapes of the checkpoint under --load (e.g. a converted
    stock ModernBERT needs its own --hidden-size ...; another tokenizer changes vocab_size)."""
    from megatron_cmbert.training.checkpoint import CheckpointError, read_checkpoint_config, resolve_load

    path = resolve_load(load)[0]
    try:
        saved = read_checkpoint_config(path).get("model") or {}
    except CheckpointError:
        return  # an unreadable newest checkpoint: loading names it and falls back to an older one
    wrong = [f"--{k.replace('_', '-')} {getattr(model, k)} (checkpoint: {saved[k]})" for k in SHAPE_FIELDS
             if k in saved and saved[k] != getattr(model, k)]
    if wrong:
        hint = "; the vocabulary size comes from --tokenizer-model" if any("vocab" in w for w in wrong) else ""
        raise ConfigError(f"--load {path} holds another model: {', '.join(wrong)}; pass the checkpoint's model "
                          f"flags (its config.json 'model'){hint}")


def resume_command(argv: list[str], save: str) -> str:
    """The command that continues this run: the same flags with --load SAVE (and without --overwrite,
    --finetune or an earlier --load, which a resume must not repeat)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--load",):
            skip = True
            continue
        if word.startswith("--load=") or word in ("--overwrite", "--finetune"):
            continue
        kept.append(word)
    if "LOCAL_WORLD_SIZE" in os.environ:  # started by torchrun
        launcher = ["torchrun", "--nproc_per_node", os.environ["LOCAL_WORLD_SIZE"]]
        if int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ["LOCAL_WORLD_SIZE"]):
            launcher += ["..."]  # multi-node: the same launcher flags as before
    else:
        launcher = ["python"]
    return shlex.join(launcher + ["tools/pretrain.py"] + kept + ["--load", save])


# How long a rank other than 0 waits before reporting its own failure. When every rank fails the same way,
# rank 0's line is the one wanted, but torchrun stops all workers as soon as one exits: a rank 1 that
# exited first could kill rank 0 before it printed (seen on a loaded machine). Waiting lets rank 0 report
# and exit, and torchrun then ends this rank silently; a failure of this rank alone is still reported.
OTHER_RANK_GRACE_S = 10.0


def _fail(exc, rank: int, status: int) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(OTHER_RANK_GRACE_S)
        print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    rank = int(os.environ.get("RANK", "0"))
    errors = launch_errors()
    try:
        namespace = build_parser().parse_args(argv)
        cfg = TrainConfig.from_namespace(namespace)
        model_config = check_launch(cfg, world_size())
    except errors as exc:
        _fail(exc, rank, USAGE_ERROR)
    if namespace.check_only:
        if rank == 0:
            print(f"checks passed for {world_size()} rank(s)", flush=True)
        return []
    # Third-party notices that say nothing about this run: optional TE/apex absent, torch's own
    # deprecations inside megatron-core and torch.distributed, and a GPU-only tuning hint.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*is deprecated.*")
    import torch

    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from megatron_cmbert.training.trainer import NonFiniteLossError, Trainer

    if rank == 0:
        model_fields = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(model_config).items())
        print(f"{cfg.describe()}\n  resolved model: {model_fields}", flush=True)
    try:
        trainer = Trainer(cfg, model_config)
        history = trainer.run()
    except errors as exc:  # e.g. no checkpoint under --load would load: the same on every rank
        _fail(exc, rank, USAGE_ERROR)
    except NonFiniteLossError as exc:
        _fail(exc, rank, 1)
    except KeyboardInterrupt:  # the second Ctrl-C: stop at once, without a traceback
        _fail("interrupted (second Ctrl-C): nothing saved since the last checkpoint", rank, 130)
    if rank == 0 and trainer.stop_reason:
        if trainer.saved_step == trainer.step and cfg.checkpoint.save:
            print(f"stopped by {trainer.stop_reason}: saved step {trainer.step}; resume with: "
                  f"{resume_command(argv, cfg.checkpoint.save)}", flush=True)
        else:
            print(f"stopped by {trainer.stop_reason} at step {trainer.step}; nothing saved (no --save)", flush=True)
    torch.distributed.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
    sys.exit(0)
