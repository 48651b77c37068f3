"""A run resolved once, then consumed: `resolve_run(cfg, world) -> Run` holds every check that needs no
process group, in the order a user would fix them; `Run.describe()` is what the tool prints, and
`Trainer(run)` builds exactly that (torchtitan's JobConfig -> trainer split).

Checks, each a one-line error (ConfigError, DataConfigError, CheckpointError, KernelError: UserErrors):
world size vs TP and the batch sizes; --data-path, --split, the tokenizer and each dataset (built with that
tokenizer, not empty); the sample-cache folder; the model (preset + flags, vocabulary from the tokenizer,
TP divisibility, --seq-length within its positions); the kernels, resolved for the device the ranks will
use (`auto` becomes a name; a backend that cannot run there is refused); the --load/--save/--overwrite
rules (docs/TRAINING.md) and the checkpoint's weight shapes.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from megatron_cmbert.checkpoint.records import CheckpointError, NoCheckpointError, TrainState
from megatron_cmbert.model.config import ModelConfig
from megatron_cmbert.parallel.world import World
from megatron_cmbert.training.config import ConfigError, TrainConfig, flag_name


class ResumeError(ConfigError):
    """A resume that would not continue the run its checkpoint holds."""


# The ModelConfig fields that set a weight's shape: a checkpoint loads only into the same values.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "normalization")


@dataclass(frozen=True)
class Run:
    """Everything a training process builds from, resolved and checked."""

    cfg: TrainConfig
    model: ModelConfig
    """The model the ranks build: preset + flags, the tokenizer's vocabulary, kernels resolved for the device."""
    world_size: int
    data_parallel_size: int
    device_type: str
    """Where the ranks compute: cuda when this machine has GPUs, else cpu."""
    start_step: int = 0
    """The step a resume continues from (the newest checkpoint under --load whose state reads); 0 otherwise."""

    def describe(self) -> str:
        """The resolved run, printed once by rank 0 before anything is built."""
        tp = self.cfg.parallel.tensor_model_parallel_size
        fields = {k: v for k, v in dataclasses.asdict(self.model).items() if k != "kernels"}
        return (f"{self.cfg.describe()}\n  resolved model: {' '.join(f'{k}={v}' for k, v in fields.items())}\n"
                f"  kernels ({self.device_type}): {self.model.kernels}\n"
                f"  layout: world {self.world_size} = TP {tp} x DP {self.data_parallel_size}"
                + (f"; resuming at step {self.start_step}" if self.start_step else ""))


def resolve_run(cfg: TrainConfig, world: World | int | None = None) -> Run:
    """Check `cfg` for `world` (default: the launcher's environment) and resolve what it leaves open."""
    from megatron_cmbert.data.dataset_checks import check_data_prefix, check_dataset_tokenizer
    from megatron_cmbert.data.pretrain_data import parse_data_path, split_ranges
    from megatron_cmbert.data.sample_cache import default_cache_dir
    from megatron_cmbert.data.tokenizer import load_tokenizer
    from megatron_cmbert.kernels.registry import KernelError

    world = World(world, 0, 0, world) if isinstance(world, int) else (world or World.from_env())
    size = world.size
    data, tp = cfg.data, cfg.parallel.tensor_model_parallel_size
    if size % tp:
        raise ConfigError(f"world size {size} (WORLD_SIZE) is not a multiple of --tensor-model-parallel-size {tp}")
    dp = size // tp
    if data.global_batch_size % (data.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {data.global_batch_size} must be a multiple of --micro-batch-size "
                          f"{data.micro_batch_size} x data-parallel size {dp} (world {size} / TP {tp})")
    try:
        weights, prefixes = parse_data_path(data.data_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for weight, prefix in zip(weights, prefixes):
        if not weight > 0:  # also NaN
            raise ConfigError(f"--data-path weight {weight:g} of {prefix}: blend weights must be positive "
                              f"(leave a dataset out instead of giving it weight 0)")
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
        for part in (prefix, prefix + "_wordstart"):
            check_dataset_files(part)
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
    device = world.device()
    dtype = torch.bfloat16 if cfg.parallel.bf16 else torch.float32
    try:
        model = model.replace(kernels=model.kernels.resolved(device, dtype))
    except KernelError as exc:
        raise ConfigError(f"--kernels: {exc}") from None
    start = check_checkpoint_dirs(cfg)
    if cfg.checkpoint.load:
        check_checkpoint_model(cfg.checkpoint.load, model)
    if cfg.checkpoint.save:
        check_save_dir(cfg.checkpoint.save, model, tp, lock_holder=world.rank == 0)
    return Run(cfg=cfg, model=model, world_size=size, data_parallel_size=dp, device_type=device.type,
               start_step=start)


def check_dataset_files(prefix: str) -> None:
    """PREFIX.idx holds documents and PREFIX.bin as many bytes as it says (a 0-document build, or a .bin cut
    short or emptied on the way to this node, would fail deep inside the loader). Reads the index header and
    its last entries only: cheap at a billion documents."""
    import struct

    import numpy as np

    from megatron_cmbert.data.dataset_checks import DataConfigError
    from megatron_cmbert.data.indexed import INDEX_HEADER, read_index_header

    idx, bin_ = prefix + ".idx", prefix + ".bin"
    dtype, n = read_index_header(idx)
    if n == 0:
        raise DataConfigError(f"{idx}: the dataset holds no documents (was every input line skipped? "
                              f"tools/preprocess_data.py reports the reasons); rebuild it or leave it out")
    head = len(INDEX_HEADER) + 25
    with open(idx, "rb") as fh:
        fh.seek(head + 4 * (n - 1))
        (last_size,) = struct.unpack("<i", fh.read(4))
        fh.seek(head + 4 * n + 8 * (n - 1))
        (last_pointer,) = struct.unpack("<q", fh.read(8))
    expected = last_pointer + last_size * np.dtype(dtype).itemsize
    size = os.path.getsize(bin_)
    if size != expected:
        raise DataConfigError(f"{bin_}: {size:,} bytes, but {os.path.basename(idx)} describes {expected:,} "
                              f"({'empty' if size == 0 else 'truncated' if size < expected else 'longer'}: "
                              f"copied incompletely to this node?)")


def checkpoint_bytes(model: ModelConfig, tp: int) -> int:
    """The size of one checkpoint: fp32 weights and the two fp32 Adam moments of every parameter."""
    from megatron_cmbert.model.config import count_parameters

    counts = count_parameters(model, tp)
    return 3 * 4 * (counts.parameters + counts.vocab_padding + counts.mlm_head)


def check_save_dir(save: str, model: ModelConfig, tp: int, lock_holder: bool = True) -> None:
    """--save can be written and has room for a checkpoint (known before the first save is attempted), and
    (asked of rank 0, the one that takes it) no other live run holds its lock."""
    import shutil

    from megatron_cmbert.checkpoint.lock import holder_of

    existing = save
    while not os.path.isdir(existing):
        parent = os.path.dirname(os.path.abspath(existing))
        if parent == existing:
            break
        existing = parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--save {save}: not writable ({existing} is read-only for this user)")
    need, free = checkpoint_bytes(model, tp), shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(f"--save {save}: {free / 2**30:.1f} GiB free on its filesystem, a checkpoint of this "
                          f"model needs {need / 2**30:.1f} GiB; free space or choose another --save")
    holder = holder_of(save) if lock_holder and os.path.isdir(save) else None
    if holder:
        raise ConfigError(f"--save {save} is in use by a run still going ({holder}); wait for it to finish, "
                          f"stop it, or choose another --save")


# ---- rules that compare the configuration with the checkpoints on disk (no process group needed) ---------
def check_resume(state: TrainState, cfg: TrainConfig, path: str) -> None:
    """Resuming from `path` (its saved TrainState) with `cfg` continues the same run: same global batch,
    same schedule (unless --override-schedule), and not past --train-iters."""
    gbs = state.global_batch_size
    if gbs is not None and gbs != cfg.data.global_batch_size:
        raise ResumeError(f"{path} was trained with --global-batch-size {gbs}, not {cfg.data.global_batch_size}; "
                          f"resuming needs the same value (--finetune starts a new stage instead)")
    saved = state.schedule
    if saved is not None and not cfg.checkpoint.override_schedule:
        now = dataclasses.asdict(cfg.schedule)
        # fields the checkpoint predates are not compared (a later default must not block old resumes)
        changed = [f"{flag_name(k)} {now[k]} (checkpoint: {saved[k]})" for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise ResumeError(f"{path} was trained with another schedule: {', '.join(changed)}; the LR and masking "
                              f"curves would change mid-run; pass --override-schedule to accept that")
    if state.step > cfg.schedule.train_iters:
        raise ResumeError(f"{path} is at step {state.step}, beyond --train-iters {cfg.schedule.train_iters}")


def check_checkpoint_dirs(cfg: TrainConfig) -> int:
    """The --load/--save/--overwrite rules, from the filesystem alone (see docs/TRAINING.md): --load must hold
    a checkpoint; a resume must match it (check_resume); and --save must not hold checkpoints after the step
    this run starts from (it would overwrite them, and move the "latest" marker backwards) unless
    --overwrite, or unless it is the directory being resumed. Returns the step the run starts from."""
    from megatron_cmbert.checkpoint.store import list_checkpoints, read_train_state, resolve_load

    ck = cfg.checkpoint
    start = 0
    if ck.load:
        try:
            candidates = resolve_load(ck.load)
        except NoCheckpointError as exc:
            raise ConfigError(f"--load {exc} (--load resumes a run; a new run does not pass it)") from None
        if not ck.finetune:
            error = None
            for path in candidates:  # the newest whose state reads; loading falls back the same way
                try:
                    state = read_train_state(path)
                except CheckpointError as exc:
                    error = exc
                    continue
                check_resume(state, cfg, path)
                start = state.step
                break
            else:
                raise error
    if not ck.save or ck.overwrite:
        return start
    resuming_own = ck.load and not ck.finetune and os.path.abspath(ck.load) == os.path.abspath(ck.save)
    later = [path for step, path in list_checkpoints(ck.save) if step > start]
    if later and not resuming_own:
        if not ck.load:
            raise ConfigError(f"--save {ck.save} already holds checkpoints (newest {os.path.basename(later[-1])}): "
                              f"resume that run with --load {ck.save}, or pass --overwrite to start over (its "
                              f"checkpoints are deleted at the first save)")
        raise ConfigError(f"--save {ck.save} holds checkpoints after step {start} (newest "
                          f"{os.path.basename(later[-1])}) that this run would overwrite; pass --overwrite to "
                          f"replace them")
    return start


def check_checkpoint_model(load: str, model: ModelConfig) -> None:
    """The model these flags build has the weight shapes of the checkpoint under --load (e.g. a converted
    stock ModernBERT needs its own --hidden-size ...; another tokenizer changes vocab_size)."""
    from megatron_cmbert.checkpoint.store import read_run_record, resolve_load

    path = resolve_load(load)[0]
    try:
        saved = read_run_record(path).model
    except CheckpointError:
        return  # an unreadable newest checkpoint: loading names it and falls back to an older one
    wrong = [f"--{k.replace('_', '-')} {getattr(model, k)} (checkpoint: {getattr(saved, k)})" for k in SHAPE_FIELDS
             if getattr(saved, k) != getattr(model, k)]
    if wrong:
        hint = "; the vocabulary size comes from --tokenizer-model" if any("vocab" in w for w in wrong) else ""
        raise ConfigError(f"--load {path} holds another model: {', '.join(wrong)}; pass the checkpoint's model "
                          f"flags (its config.json 'model'){hint}")
