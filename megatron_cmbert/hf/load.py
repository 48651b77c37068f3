"""Read a pretraining checkpoint from one process, without building a model or an optimizer: its
config.json, its train_state, the full (TP-gathered) model tensors and its tokenizer directory.

megatron-core's dist_checkpointing needs a process group even to read; `single_process_group()` gives a
gloo world of one when none exists. A checkpoint saved at any TP size loads into full tensors (every
TP-split tensor is stored as one logical tensor).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from megatron_cmbert.model.config import ModelConfig
from megatron_cmbert.parallel.world import single_process_group
from megatron_cmbert.training import checkpoint as ckpt
from megatron_cmbert.errors import UserError


class ConversionError(UserError, RuntimeError):
    """A one-line reason a conversion cannot go on (bad input, failed check); tools print it and exit 1."""


def run_tool(call) -> int:
    """The tools' exit code: 0, or 1 with `error: <one line>` on stderr for a ConversionError."""
    import sys

    try:
        call()
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


@dataclass
class Checkpoint:
    path: str
    """The iter_N directory read."""
    config: ModelConfig
    args: dict
    """Training flags ("args" of config.json; empty when absent)."""
    train_state: dict
    state_dict: dict
    """Our parameter names -> full fp32 tensors (embedding rows as saved, vocabulary padding included)."""
    tokenizer_dir: str

    @property
    def seq_length(self) -> int:
        """The trained sequence length (not the preset's maximum)."""
        return int(self.args.get("seq_length") or self.config.max_position_embeddings)


def read_checkpoint(load: str) -> Checkpoint:
    """The model of checkpoint `load` (iter_N or save directory; for a save directory its newest complete
    checkpoint, as training's --load picks it). Raises ConversionError naming the offending file."""
    from megatron.core import dist_checkpointing

    try:
        path = ckpt.resolve_load(load)[0]
        ckpt.verify_checkpoint(path)  # names a missing or truncated file before torch.distributed.checkpoint fails
        meta = ckpt.read_checkpoint_config(path)
        train_state = ckpt.read_train_state(path)
    except ckpt.CheckpointError as exc:
        raise ConversionError(str(exc)) from exc
    config_file = os.path.join(path, "config.json")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConversionError(f"{config_file}: no usable model config ({exc})") from exc
    tokenizer_dir = os.path.join(path, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise ConversionError(f"{os.path.join(tokenizer_dir, 'tokenizer.json')}: missing (the checkpoint "
                              f"carries its tokenizer)")
    with single_process_group():
        try:
            metadata = dist_checkpointing.load_tensors_metadata(path)
            wanted = {k: v for k, v in metadata.items() if k.startswith("model.")}
            loaded = dist_checkpointing.load(wanted, path, validate_access_integrity=False)
        except Exception as exc:  # torch.distributed.checkpoint raises many types; name the checkpoint
            raise ConversionError(f"{path}: cannot read the model tensors "
                                  f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from exc
    # load() also returns the common (non-tensor) state; keep the model tensors only
    state = {k[len("model."):]: loaded[k].float() for k in wanted}
    if not state:
        raise ConversionError(f"{path}: no model tensors in the checkpoint")
    return Checkpoint(path=path, config=config, args=dict(meta.get("args") or {}), train_state=train_state,
                      state_dict=state, tokenizer_dir=tokenizer_dir)


def reference_model(config: ModelConfig, state_dict: dict, kernels="reference"):
    """Our single-process CMBertForMaskedLM holding `state_dict` (vocabulary padding rows re-padded to this
    model's size: their logits are never computed). kernels: what it runs (default the reference ones,
    whatever the run trained with: a `triton` checkpoint must load on a CPU machine)."""
    from megatron_cmbert.model import CMBertForMaskedLM

    model = CMBertForMaskedLM(config.replace(kernels=kernels)).eval()
    own = model.state_dict()
    fitted = {}
    for key, value in state_dict.items():
        if key in own and own[key].shape[0] != value.shape[0] and key in (
                "model.embeddings.tok_embeddings.weight", "decoder_bias"):
            rows = own[key].shape[0]
            value = torch.cat([value[:config.vocab_size],
                               value.new_zeros((rows - config.vocab_size, *value.shape[1:]))])
        fitted[key] = value
    model.load_state_dict(fitted, strict=True)
    return model
