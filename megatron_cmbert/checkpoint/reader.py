"""Read a pretraining checkpoint from one process, without an optimizer or a process group of the caller's:
its RunRecord, its TrainState, the full (TP-gathered) model tensors and its tokenizer directory; and build
our single-process model from them.

megatron-core's dist_checkpointing needs a process group even to read; `single_process_group()` gives a
gloo world of one when none exists. A checkpoint saved at any TP size loads into full tensors (every
TP-split tensor is stored as one logical tensor).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_cmbert.checkpoint import store
from megatron_cmbert.checkpoint.records import CheckpointError, RunRecord, TrainState
from megatron_cmbert.model.config import ModelConfig
from megatron_cmbert.parallel.world import single_process_group


@dataclass
class Checkpoint:
    path: str
    """The iter_N directory read."""
    record: RunRecord
    state: TrainState
    state_dict: dict
    """Our parameter names -> full fp32 tensors (embedding rows as saved, vocabulary padding included)."""
    tokenizer_dir: str

    @property
    def config(self) -> ModelConfig:
        return self.record.model

    @property
    def seq_length(self) -> int:
        """The trained sequence length (not the preset's maximum)."""
        return self.record.seq_length

    @property
    def args(self) -> dict:
        """The training flags by name (empty for a converted checkpoint)."""
        return self.record.args


def read_checkpoint(load: str) -> Checkpoint:
    """The model of checkpoint `load` (iter_N or save directory; for a save directory its newest complete
    checkpoint, as training's --load picks it). Raises CheckpointError naming the offending file."""
    from megatron.core import dist_checkpointing

    path = store.resolve_load(load)[0]
    store.verify_checkpoint(path)  # names a missing or truncated file before torch.distributed.checkpoint fails
    record = store.read_run_record(path)
    state = store.read_train_state(path)
    tokenizer_dir = os.path.join(path, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise CheckpointError(f"{os.path.join(tokenizer_dir, 'tokenizer.json')}: missing (the checkpoint "
                              f"carries its tokenizer)")
    with single_process_group():
        try:
            metadata = dist_checkpointing.load_tensors_metadata(path)
            wanted = {k: v for k, v in metadata.items() if k.startswith("model.")}
            loaded = dist_checkpointing.load(wanted, path, validate_access_integrity=False)
        except Exception as exc:  # torch.distributed.checkpoint raises many types; name the checkpoint
            raise CheckpointError(f"{path}: cannot read the model tensors "
                                  f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from exc
    # load() also returns the common (non-tensor) state; keep the model tensors only
    tensors = {k[len("model."):]: loaded[k].float() for k in wanted}
    if not tensors:
        raise CheckpointError(f"{path}: no model tensors in the checkpoint")
    return Checkpoint(path=path, record=record, state=state, state_dict=tensors, tokenizer_dir=tokenizer_dir)


def build_model(config: ModelConfig, state_dict: dict, kernels="reference"):
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
