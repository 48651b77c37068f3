"""The typed records a checkpoint carries besides its tensors, each with a version and a JSON form.

    RunRecord   config.json: the model (ModelConfig), the training configuration, the flags, the trained
                sequence length and tensor-parallel size, where a converted checkpoint came from
    TrainState  common.pt["train_state"]: step, consumed samples, tokens seen, last losses, the schedule

`from_json` reads every version written so far: version 1 is the untyped dicts of before these classes
(config.json {"model", "train", "args"}, the trained length only as args["seq_length"]; train_state with
optional keys), so old checkpoints keep loading and resuming. Unknown keys are ignored (a newer writer's
additions do not stop an older reader); a value of the wrong type is a CheckpointError naming the file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_cmbert.errors import UserError
from megatron_cmbert.model.config import ModelConfig


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message (one line) names the file and what is wrong."""


class NoCheckpointError(CheckpointError):
    """A directory holds no complete checkpoint."""


def _typed(where: str, name: str, value, kinds, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise CheckpointError(f"{where}: {name} is {value!r}, expected {' or '.join(k.__name__ for k in kinds)}")
    return value


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint was trained as (its config.json)."""

    VERSION = 2
    model: ModelConfig
    """The architecture (and the kernels it trained with: another machine may load it with others)."""
    seq_length: int
    """The trained sequence length (the HF export's max_position_embeddings)."""
    tensor_model_parallel_size: int = 1
    """TP size of the run that wrote it (any TP size can load it)."""
    train: dict = field(default_factory=dict)
    """The training configuration tree (training/config.py TrainConfig.to_dict()); empty when converted."""
    args: dict = field(default_factory=dict)
    """The flags by name (TrainConfig.flat()): what the model card and a resume command read."""
    converted_from: Optional[str] = None
    """The Hugging Face directory a converted checkpoint came from (tools/convert_from_hf.py)."""
    stage: Optional[str] = None
    """What produced the weights after pretraining, e.g. "contrastive fine-tuning" (for the model card)."""

    def to_json(self) -> dict:
        return {"version": self.VERSION, "model": self.model.to_dict(), "seq_length": self.seq_length,
                "tensor_model_parallel_size": self.tensor_model_parallel_size, "train": self.train,
                "args": self.args, "converted_from": self.converted_from, "stage": self.stage}

    @classmethod
    def from_json(cls, obj: Any, where: str = "config.json") -> "RunRecord":
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: holds a {type(obj).__name__}, expected an object")
        version = obj.get("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise CheckpointError(f"{where}: format version {version!r}; this code reads up to {cls.VERSION} "
                                  f"(written by a newer megatron_cmbert?)")
        model = obj.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{where}: no usable model config ('model' is {type(model).__name__})")
        try:
            config = ModelConfig.from_dict(model)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: no usable model config ({exc})") from None
        args = _typed(where, "args", obj.get("args") or {}, (dict,))
        train = _typed(where, "train", obj.get("train") or {}, (dict,))
        if version == 1:  # the trained length and TP size lived among the flags
            seq_length = args.get("seq_length") or config.max_position_embeddings
            tp = args.get("tensor_model_parallel_size") or 1
            converted = args.get("converted_from")
        else:
            seq_length, tp, converted = obj.get("seq_length"), obj.get("tensor_model_parallel_size", 1), \
                obj.get("converted_from")
        return cls(model=config, seq_length=_typed(where, "seq_length", seq_length, (int,)),
                   tensor_model_parallel_size=_typed(where, "tensor_model_parallel_size", tp, (int,)),
                   train=train, args=args, converted_from=_typed(where, "converted_from", converted, (str,), True),
                   stage=_typed(where, "stage", obj.get("stage"), (str,), True))


@dataclass(frozen=True)
class TrainState:
    """Where a run stood when it saved (enough to resume exactly: with the seed, samples are a pure
    function of the step)."""

    VERSION = 2
    step: int = 0
    consumed_samples: int = 0
    global_batch_size: Optional[int] = None
    """None in converted checkpoints (no run to resume)."""
    seed: Optional[int] = None
    tokens_seen: int = 0
    train_loss: Optional[float] = None
    valid_loss: Optional[float] = None
    schedule: Optional[dict] = None
    """The ScheduleConfig fields (training/schedules.py) a resume must match."""

    def to_json(self) -> dict:
        return {"version": self.VERSION, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_json(cls, obj: Any, where: str = "train_state") -> "TrainState":
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: holds a {type(obj).__name__}, expected a dict")
        version = obj.get("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise CheckpointError(f"{where}: format version {version!r}; this code reads up to {cls.VERSION}")
        number = (int, float)
        return cls(step=_typed(where, "step", obj.get("step", 0), (int,)),
                   consumed_samples=_typed(where, "consumed_samples", obj.get("consumed_samples", 0), (int,)),
                   global_batch_size=_typed(where, "global_batch_size", obj.get("global_batch_size"), (int,), True),
                   seed=_typed(where, "seed", obj.get("seed"), (int,), True),
                   tokens_seen=_typed(where, "tokens_seen", obj.get("tokens_seen") or 0, (int,)),
                   train_loss=_typed(where, "train_loss", obj.get("train_loss"), number, True),
                   valid_loss=_typed(where, "valid_loss", obj.get("valid_loss"), number, True),
                   schedule=_typed(where, "schedule", obj.get("schedule"), (dict,), True))
