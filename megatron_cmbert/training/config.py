"""The training configuration: one tree of frozen dataclasses, and the command line generated from it.

    TrainConfig
    ├── model       ModelOverrides   --preset, and every ModelConfig field (None = the preset's value), --kernels
    ├── parallel    ParallelConfig   TP size, sequence parallelism, bf16, linear implementation
    ├── data        DataConfig       tokenizer, datasets, split, lengths, batch sizes, masking
    ├── optimizer   OptimizerConfig  StableAdamW and clipping
    ├── schedule    ScheduleConfig   LR and masking-rate curves (training/schedules.py)
    ├── checkpoint  CheckpointConfig --save/--load rules, intervals, stopping
    ├── logging     LoggingConfig    intervals, metrics file, TensorBoard
    └── seed

The flags are generated from the fields by megatron_cmbert/cli.py (`add_dataclass_args`: the flag is the
field name with '-' for '_', the help its docstring); field names are unique across the tree, so a flat
argparse namespace maps back onto it (`TrainConfig.from_namespace`).
Validation lives in each `__post_init__`; its errors reach the caller as `ConfigError` (a ValueError).
This module is pure data: the checks against the filesystem and the world are training/run.py's resolve_run.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Optional

from megatron_cmbert.cli import add_dataclass_args, field_docs, flag_name, from_namespace
from megatron_cmbert.errors import UserError
from megatron_cmbert.kernels.registry import KernelChoice, KernelError, add_kernel_args
from megatron_cmbert.model.config import NORMALIZATIONS, PRESETS, ModelConfig, get_preset
from megatron_cmbert.training.schedules import ScheduleConfig


class ConfigError(UserError, ValueError):
    """A configuration mistake; the message is one line that names the flag and says what is wrong."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ---- the tree -------------------------------------------------------------------------------------------
def _model_overrides_class():
    """ModelOverrides is generated from ModelConfig so that every model field is a flag, with its docs."""
    hints = typing.get_type_hints(ModelConfig)
    docs = field_docs(ModelConfig)
    aliases = {"global_rope_theta": ("--rope-theta-global",), "local_rope_theta": ("--rope-theta-local",)}
    extra = {"normalization": {"choices": NORMALIZATIONS}}
    spec = [("preset", str, field(default="tiny", metadata={
        "help": "model preset: " + ", ".join(PRESETS) + "; the flags below override single fields",
        "choices": tuple(PRESETS)}))]
    for f in fields(ModelConfig):
        if f.name == "name":
            continue
        if f.name == "kernels":  # one text, written by --kernels and its spellings (kernels/registry.py)
            spec.append(("kernels", Optional[str], field(default=None, metadata={"add_arguments": add_kernel_args})))
            continue
        meta = {"help": docs.get(f.name, "") + " Default: the preset's value.",
                "aliases": aliases.get(f.name, ()), **extra.get(f.name, {})}
        if f.name == "vocab_size":
            meta["help"] = ("embedding rows before padding; default: the tokenizer's size (--tokenizer-model); "
                            "a larger value leaves unused rows")
        spec.append((f.name, Optional[hints[f.name]], field(default=None, metadata=meta)))

    def resolve(self, tokenizer_vocab: int) -> ModelConfig:
        """The preset with the given fields replaced; vocab_size defaults to the tokenizer's size; kernels
        still as named (auto included): resolve_run resolves them for the device."""
        changes = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("preset", "kernels") and getattr(self, f.name) is not None}
        try:
            changes["kernels"] = KernelChoice.parse(self.kernels, get_preset(self.preset).kernels)
        except KernelError as exc:
            raise ConfigError(f"--kernels: {exc}") from None
        changes.setdefault("vocab_size", tokenizer_vocab)
        if changes["vocab_size"] < tokenizer_vocab:
            raise ConfigError(f"--vocab-size {changes['vocab_size']} is smaller than the tokenizer's "
                              f"{tokenizer_vocab} tokens")
        try:
            return get_preset(self.preset, **changes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    cls = dataclasses.make_dataclass("ModelOverrides", spec, frozen=True, namespace={"resolve": resolve})
    cls.__doc__ = "The model: a preset and optional per-field overrides (None keeps the preset's value)."
    cls.__module__ = __name__
    cls.TITLE = "model (preset and overrides)"
    return cls


ModelOverrides = _model_overrides_class()


@dataclass(frozen=True)
class ParallelConfig:
    TITLE = "parallelism and precision"
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size; the data-parallel size is WORLD_SIZE / this."""
    sequence_parallel: bool = False
    """Shard activations between TP ranks (megatron-core sequence parallelism)."""
    bf16: bool = False
    """bf16 activations (the residual stream and what backward saves) under autocast; fp32 master weights
    and optimizer state, norms and softmax computed in fp32."""
    transformer_impl: str = field(default="local", metadata={"choices": ("local", "transformer_engine")})
    """Linear layers: megatron-core local or Transformer Engine."""
    compile: bool = False
    """torch.compile each encoder layer (once: micro-batches have static shapes; docs/TRAINING.md)."""

    def __post_init__(self):
        _check(self.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    TITLE = "data"
    tokenizer_model: str = field(metadata={"metavar": "DIR"})
    """Tokenizer directory (tools/train_tokenizer.py); the datasets must have been built with it."""
    data_path: list[str] = field(metadata={"metavar": "[WEIGHT] PREFIX"})
    """PREFIX_text_document (tools/preprocess_data.py's output prefix + _text_document), or weight/prefix
    pairs: 0.57 A_text_document 0.43 B_text_document (Megatron style)."""
    split: str = "98,2,0"
    """train,valid,test shares of each dataset's documents."""
    seq_length: int = 1024
    """Tokens per packed sample."""
    micro_batch_size: int = 4
    """Samples per micro-batch (one forward/backward)."""
    global_batch_size: int = 32
    """Samples per optimizer step, all data-parallel ranks and accumulation steps together."""
    masking: str = field(default="word", metadata={"choices": ("word", "token")})
    """Whole-word masking over the word-start units, or per-token masking (ablation)."""
    mask_prob: float = 0.8
    """Share of the selected tokens replaced by [MASK]."""
    random_prob: float = 0.1
    """Share of the selected tokens replaced by a random token (the rest stay)."""
    eval_mask_rate: float = 0.15
    """Fixed masking rate of the validation loss."""
    num_workers: int = 1
    """DataLoader worker processes per rank, building the next steps while the device trains (batches are
    identical with any number; 0 builds them in the training process)."""
    data_cache_path: Optional[str] = field(default=None, metadata={"metavar": "DIR"})
    """Where the sample indices (document order, packing, blend) are built once and read from by every rank;
    default: a cache/ folder beside each dataset. Must be shared by all ranks of a node or more."""

    def __post_init__(self):
        for name in ("seq_length", "micro_batch_size", "global_batch_size"):
            _check(getattr(self, name) >= 1, f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               f"--global-batch-size {self.global_batch_size} must be a multiple of --micro-batch-size "
               f"{self.micro_batch_size}")
        _check(0 <= self.mask_prob and 0 <= self.random_prob and self.mask_prob + self.random_prob <= 1,
               f"need --mask-prob + --random-prob <= 1, got {self.mask_prob} + {self.random_prob}")
        _check(0 < self.eval_mask_rate < 1, f"--eval-mask-rate must be in (0, 1), got {self.eval_mask_rate}")
        _check(self.num_workers >= 0, "--num-workers must be >= 0")


@dataclass(frozen=True)
class OptimizerConfig:
    TITLE = "optimizer (StableAdamW)"
    weight_decay: float = 0.1
    """Decoupled weight decay of every parameter with ndim > 1 (norm weights and biases never decay)."""
    decay_embeddings: bool = True
    """Decay the embedding too (ModernBERT's rule); --no-decay-embeddings exempts it (ablation)."""
    adam_beta1: float = 0.9
    """First-moment decay."""
    adam_beta2: float = 0.95
    """Second-moment decay (the paper's 0.95)."""
    adam_eps: float = 1e-6
    """Epsilon of the update denominator."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    skip_nan_steps: bool = False
    """Skip a step whose gradient norm is not finite instead of stopping the run."""

    def __post_init__(self):
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"{flag_name(name)} must be in [0, 1), got {getattr(self, name)}")
        _check(self.adam_eps > 0 and self.clip_grad > 0, "--adam-eps and --clip-grad must be > 0")


@dataclass(frozen=True)
class CheckpointConfig:
    TITLE = "checkpoints and stopping"
    save: Optional[str] = field(default=None, metadata={"metavar": "DIR"})
    """Checkpoint directory (iter_NNNNNNN/ per save). A new run refuses a directory that already holds
    checkpoints unless --overwrite."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and when stopped)."""
    load: Optional[str] = field(default=None, metadata={"metavar": "DIR"})
    """Resume: a save directory (its newest complete checkpoint, falling back to older ones when it does
    not load) or one DIR/iter_NNNNNNN. It must hold a checkpoint; a new run does not pass --load."""
    finetune: bool = False
    """With --load: take the weights only; step, optimizer, data order and schedule start afresh (Stage II)."""
    overwrite: bool = False
    """Allow writing into a --save directory that holds checkpoints after the step this run starts from
    (step 0 for a new run or --finetune): they are deleted at the run's first save."""
    keep_last: int = 0
    """Keep only the newest K checkpoints (0: keep all)."""
    override_schedule: bool = False
    """Resume even though the LR/masking schedule flags differ from the checkpoint's (the new schedule
    applies from the resumed step on)."""
    exit_interval: int = 0
    """Stop (after saving, with --save) once the step is a multiple of N."""
    exit_duration_in_mins: float = 0.0
    """Stop cleanly (save, exit 0) this many minutes after the training loop starts, e.g. before a job's
    time limit (0: no limit)."""

    def __post_init__(self):
        for name in ("save_interval", "keep_last", "exit_interval"):
            _check(getattr(self, name) >= 0, f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        _check(self.exit_duration_in_mins >= 0, "--exit-duration-in-mins must be >= 0")
        _check(not self.finetune or self.load, "--finetune needs --load (the checkpoint to take weights from)")


@dataclass(frozen=True)
class LoggingConfig:
    TITLE = "logging and evaluation"
    log_interval: int = 10
    """Log loss, accuracy, LR, masking rate, grad norm and throughput every N steps."""
    eval_interval: int = 0
    """Validation loss every N steps (0: never)."""
    eval_iters: int = 2
    """Global batches per validation."""
    eval_pppl_lengths: Optional[list[int]] = field(default=None, metadata={"metavar": "N"})
    """At each validation also the pseudo-perplexity of the first dataset's validation documents cut into
    windows of these many tokens (e.g. 128 512 1024), logged as valid_pppl_N (docs/EVAL.md)."""
    eval_pppl_max_units: int = 64
    """Whole-word units scored per --eval-pppl-lengths length (each one masked copy in a packed forward)."""
    metrics_file: Optional[str] = field(default=None, metadata={"metavar": "FILE"})
    """JSON lines, one per logged step, keyed by step (a resumed run drops rows after its checkpoint)."""
    tensorboard_dir: Optional[str] = field(default=None, metadata={"metavar": "DIR"})
    """TensorBoard event directory (if tensorboard is installed)."""

    def __post_init__(self):
        _check(self.log_interval >= 1, f"--log-interval must be >= 1, got {self.log_interval}")
        _check(self.eval_interval >= 0 and self.eval_iters >= 0, "--eval-interval and --eval-iters must be >= 0")
        _check(all(n >= 4 for n in self.eval_pppl_lengths or ()) and self.eval_pppl_max_units >= 1,
               "--eval-pppl-lengths must be >= 4 tokens ([CLS] + units + [SEP]) and --eval-pppl-max-units >= 1")
        _check(not self.eval_pppl_lengths or self.eval_interval > 0, "--eval-pppl-lengths needs --eval-interval")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pretraining run needs besides the world it runs in."""

    TITLE = "run"
    data: DataConfig
    """Datasets, tokenizer, lengths, batches, masking."""
    schedule: ScheduleConfig
    """Learning-rate and masking-rate schedules."""
    model: ModelOverrides = field(default_factory=ModelOverrides)
    """Preset and overrides."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout and precision."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """StableAdamW."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, loading and stopping."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logs and evaluation."""
    seed: int = 1234
    """Fixes initialisation, data order and masks."""

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return add_dataclass_args(parser, cls)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainConfig":
        """Build and validate; any validation error becomes a ConfigError."""
        try:
            return from_namespace(cls, ns)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:  # ScheduleConfig's and ModelConfig's own checks
            raise ConfigError(str(exc)) from None

    def flat(self) -> dict:
        """{flag dest: value} over the whole tree (the "args" of a checkpoint's config.json)."""
        out: dict = {}

        def walk(obj):
            for f in fields(obj):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    walk(value)
                else:
                    out[f.name] = list(value) if isinstance(value, (list, tuple)) else value

        walk(self)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The resolved configuration, one line per section (printed once by rank 0)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                items = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(value).items()
                                 if not (f.name == "model" and v is None))
                lines.append(f"  {f.name}: {items}")
            else:
                lines.append(f"  {f.name}: {value}")
        return "config:\n" + "\n".join(lines)
