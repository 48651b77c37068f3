"""A Hugging Face ModernBERT directory -> a checkpoint that `tools/pretrain.py --load CKPT --finetune`
continues from (tools/convert_from_hf.py): continued pretraining from released weights.

Reads a stock ModernBERT of any size (its config.json becomes our ModelConfig) or our own export (RMSNorm
exports say so in config.json). The checkpoint is written by the training code's own save_checkpoint, as
`CKPT/iter_0000000`, so it reshards to any TP size like every other checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile


from megatron_cmbert.checkpoint.records import RunRecord, TrainState
from megatron_cmbert.hf import ConversionError
from megatron_cmbert.parallel.world import single_process_group
from megatron_cmbert.model.config import ModelConfig
from megatron_cmbert.model.hf_keymap import expected_hf_keys, from_hf, model_config_from_hf
from megatron_cmbert.model.layers import TorchSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_hf_dir(hf_dir: str) -> tuple[ModelConfig, dict]:
    """(our ModelConfig, HF state dict in float32) of a ModernBertForMaskedLM directory (safetensors)."""
    from safetensors.torch import load_file

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{config_path}: missing (not a Hugging Face model directory)")
    with open(config_path, encoding="utf-8") as fh:
        hf = json.load(fh)
    if hf.get("model_type") not in ("modernbert", "cmbert_modernbert"):
        raise ConversionError(f"{config_path}: model_type {hf.get('model_type')!r} is not ModernBERT")
    try:
        config = model_config_from_hf(hf, normalization=hf.get("normalization", "LayerNorm"),
                                      name=os.path.basename(os.path.normpath(hf_dir)))
    except (KeyError, ValueError) as exc:
        raise ConversionError(f"{config_path}: {exc}") from exc
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors weights (pickled .bin weights are not read)")
    state = {}
    for name in files:
        try:
            state.update(load_file(os.path.join(hf_dir, name)))
        except Exception as exc:  # safetensors raises its own error types
            raise ConversionError(f"{os.path.join(hf_dir, name)}: unreadable safetensors: {exc}") from exc
    # Some stock exports prefix the base model differently or carry the tied decoder weight; keep the MLM keys.
    state = {k: v.float() for k, v in state.items() if k != "decoder.weight"}
    missing = sorted(set(expected_hf_keys(config)) - set(state))
    if missing:
        raise ConversionError(f"{hf_dir}: weights lack {len(missing)} ModernBertForMaskedLM keys, e.g. {missing[0]}")
    return config, state


class _PaddedSpec(TorchSpec):
    """TorchSpec with the vocabulary padding of a TP-N run (the embedding rows a TP-N model has)."""

    def __init__(self, tensor_parallel_size: int):
        self.tensor_parallel_size = tensor_parallel_size


def import_hf(hf_dir: str, save: str, tensor_parallel_size: int = 1, log=print) -> str:
    """Write `save/iter_0000000` (+ latest marker, config.json, tokenizer/); returns the checkpoint path."""
    from megatron_cmbert.model import CMBertForMaskedLM
    from megatron_cmbert.parallel import cpu_shim
    from megatron_cmbert.checkpoint.store import save_checkpoint
    from megatron_cmbert.parallel.world import Ranks

    cpu_shim.install()  # the checkpoint writer synchronises CUDA, absent on CPU machines

    config, hf_state = read_hf_dir(hf_dir)
    try:
        config.validate_parallel(tensor_parallel_size)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    save = os.path.abspath(save)
    if os.path.exists(save):
        raise ConversionError(f"{save}: already exists (choose a new checkpoint directory)")
    log(f"read {hf_dir}: {config.num_layers} layers, hidden {config.hidden_size}, {config.normalization}, "
        f"vocabulary {config.vocab_size}")
    model = CMBertForMaskedLM(config, _PaddedSpec(tensor_parallel_size))
    model.load_state_dict(from_hf(hf_state, config, tensor_parallel_size), strict=True)
    record = RunRecord(model=config, seq_length=config.max_position_embeddings,
                       tensor_model_parallel_size=tensor_parallel_size, converted_from=os.path.abspath(hf_dir))
    os.makedirs(os.path.dirname(save), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save)}.tmp-", dir=os.path.dirname(save))
    try:
        tok = os.path.join(tmp, "_tokenizer")
        os.makedirs(tok)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tok, name))
        if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
            raise ConversionError(f"{os.path.join(hf_dir, 'tokenizer.json')}: missing (the checkpoint carries its tokenizer)")
        ckpt_dir = os.path.join(tmp, "ckpt")
        with single_process_group():
            path = save_checkpoint(ckpt_dir, 0, model, None, Ranks(0, 1, 0, 0, 1), TrainState(), record,
                                   tokenizer_dir=tok)
        os.replace(ckpt_dir, save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = os.path.join(save, os.path.basename(path))
    log(f"wrote {path} (continue with: tools/pretrain.py --load {save} --finetune ...)")
    return path


