"""Our checkpoint -> a Hugging Face model directory (tools/convert_to_hf.py).

LayerNorm models become a stock `ModernBertForMaskedLM`; RMSNorm models the same classes with the norms
swapped, shipped as remote code (`modeling_cmbert.py` beside the weights, registered in `auto_map`).
Everything is written into a temporary directory beside the output, checked (our packed model against the
exported one loaded back by transformers, padded), and renamed into place only when the check passes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from megatron_cmbert.checkpoint.reader import Checkpoint, build_model, read_checkpoint
from megatron_cmbert.hf import ConversionError, ExportCheckError
from megatron_cmbert.hf.common import DTYPES, is_remote_code, load_kwargs, rounded_state, sample_batch
from megatron_cmbert.model.hf_keymap import hf_config_kwargs, modernbert_config_dict, to_hf
from megatron_cmbert.tokens import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID

TOLERANCE = 1e-4
"""Largest |logit| difference accepted between our model and the export, in float32 (both load the same
float32 weights, so only summation order differs: ~1e-6 is typical)."""
REMOTE_CODE_FILE = "modeling_cmbert.py"
REMOTE_CLASSES = {"AutoConfig": "CMBertConfig", "AutoModel": "CMBertModel",
                  "AutoModelForMaskedLM": "CMBertForMaskedLM",
                  "AutoModelForSequenceClassification": "CMBertForSequenceClassification"}
SPECIAL_IDS = {"pad_token_id": PAD_ID, "unk_token_id": UNK_ID, "cls_token_id": CLS_ID, "bos_token_id": CLS_ID,
               "sep_token_id": SEP_ID, "eos_token_id": SEP_ID, "mask_token_id": MASK_ID}
@dataclass
class ExportReport:
    output: str
    remote_code: bool
    max_logit_diff: float
    embedding_diff: float | None = None
    onnx_diff: float | None = None
    notes: list = field(default_factory=list)


def hf_config(ck: Checkpoint, dtype: str) -> dict:
    """config.json of the export."""
    import transformers

    config = ck.config
    remote = is_remote_code(config)
    body = modernbert_config_dict(config) if remote else hf_config_kwargs(config)
    body.update(SPECIAL_IDS)
    # The trained length, not the preset's ceiling: a config claiming 8192 for a model trained at 1024
    # misleads users about what the model has seen.
    body["max_position_embeddings"] = ck.seq_length
    body.update(torch_dtype=dtype, dtype=dtype, transformers_version=transformers.__version__,
                # pipeline() in 4.4x finds the tokenizer of a remote-code config type only through this
                tokenizer_class="PreTrainedTokenizerFast")
    if remote:
        body.update(model_type="cmbert_modernbert", architectures=["CMBertForMaskedLM"], normalization="RMSNorm",
                    auto_map={auto: f"{REMOTE_CODE_FILE[:-3]}.{cls}" for auto, cls in REMOTE_CLASSES.items()})
    else:
        body.update(model_type="modernbert", architectures=["ModernBertForMaskedLM"])
    return body


def write_hf_dir(ck: Checkpoint, out: str, dtype: str = "float32") -> None:
    """Weights (safetensors), config.json, tokenizer and, for RMSNorm, the remote code, into `out`."""
    from safetensors.torch import save_file

    from megatron_cmbert.data.tokenizer import load_tokenizer, save_tokenizer

    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_hf(ck.state_dict, ck.config).items()}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(hf_config(ck, dtype), fh, indent=2, ensure_ascii=False)
    if is_remote_code(ck.config):
        shutil.copyfile(os.path.join(os.path.dirname(__file__), REMOTE_CODE_FILE), os.path.join(out, REMOTE_CODE_FILE))
    save_tokenizer(load_tokenizer(ck.tokenizer_dir), out, model_max_length=ck.seq_length)


def check_logits(ck: Checkpoint, out: str, dtype: str = "float32") -> float:
    """Largest |logit| difference: our packed model vs the export loaded by AutoModelForMaskedLM (float32,
    a padded batch), over real tokens and the unpadded vocabulary."""
    from transformers import AutoModelForMaskedLM

    from megatron_cmbert.model.padding import run_padded

    ids, mask = sample_batch(out, ck.seq_length)
    ours = build_model(ck.config, rounded_state(ck, dtype))
    hf = AutoModelForMaskedLM.from_pretrained(out, **load_kwargs(torch.float32, is_remote_code(ck.config))).eval()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        logits = run_padded(lambda *packed: ours(*packed).logits, ids, mask)
    real = mask.bool()
    vocab = ck.config.vocab_size
    if expected.shape[-1] != vocab:
        raise ConversionError(f"{out}: exported model has {expected.shape[-1]} logits, expected {vocab}")
    return (logits[real][:, :vocab] - expected[real]).abs().max().item()


def export_checkpoint(load: str, output: str, dtype: str = "float32", sentence_transformers: bool = False,
                      onnx: bool = False, force: bool = False, log=print) -> ExportReport:
    """The whole conversion; raises ConversionError (the output is then left untouched)."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: choose from {sorted(DTYPES)}")
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        raise ConversionError(f"{output}: already exists (remove it, or pass --force to replace it)")
    return export_loaded(read_checkpoint(load), output, dtype, sentence_transformers, onnx, log)


def export_loaded(ck: Checkpoint, output: str, dtype: str = "float32", sentence_transformers: bool = False,
                  onnx: bool = False, log=print) -> ExportReport:
    """export_checkpoint for a checkpoint already in memory (e.g. a fine-tuned model: tools/finetune_sts.py)."""
    output = os.path.abspath(output)
    if ck.config.global_attn_every_n_layers == 0:
        raise ConversionError(f"{ck.path}: global_attn_every_n_layers=0 has no HF ModernBERT equivalent")
    log(f"read {ck.path}: {ck.config.name} preset, {ck.config.normalization}, step {ck.state.step}")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        report = _build(ck, tmp, output, dtype, sentence_transformers, onnx, log)
        _publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {output}")
    return report


def _build(ck, tmp, output, dtype, sentence_transformers, onnx, log) -> ExportReport:
    from megatron_cmbert.hf import card

    write_hf_dir(ck, tmp, dtype)
    report = ExportReport(output=output, remote_code=is_remote_code(ck.config), max_logit_diff=check_logits(ck, tmp, dtype))
    log(f"parity: largest |logit difference| ours (packed) vs exported (padded batch) = {report.max_logit_diff:.3e}")
    if not report.max_logit_diff <= TOLERANCE:  # `not <=` also catches NaN
        raise ExportCheckError(f"exported model disagrees with the checkpoint: largest logit difference "
                              f"{report.max_logit_diff:.3e} > {TOLERANCE:g}; nothing written")
    if sentence_transformers:
        from megatron_cmbert.hf.sentence import check_sentence_transformers, write_sentence_transformers

        write_sentence_transformers(tmp, ck)
        report.embedding_diff = check_sentence_transformers(tmp, ck, dtype)
        log(f"sentence-transformers: largest |embedding difference| vs our mean pooling = {report.embedding_diff:.3e}")
        if not report.embedding_diff <= TOLERANCE:
            raise ExportCheckError(f"sentence-transformers embeddings differ by {report.embedding_diff:.3e} "
                                  f"> {TOLERANCE:g}; nothing written")
    if onnx:
        from megatron_cmbert.hf.onnx_export import export_onnx

        report.onnx_diff = export_onnx(tmp, ck, log=log)
        log(f"onnx: largest |hidden-state difference| onnxruntime vs PyTorch = {report.onnx_diff:.3e}")
        if not report.onnx_diff <= TOLERANCE:
            raise ExportCheckError(f"ONNX graph differs from PyTorch by {report.onnx_diff:.3e} > {TOLERANCE:g}; "
                                  f"nothing written")
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(card.model_card(ck, report, dtype))
    return report


def _publish(tmp: str, output: str) -> None:
    """Rename into place; an existing output (--force) is set aside first and removed last."""
    old = None
    if os.path.exists(output):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
        os.rmdir(old)
        os.replace(output, old)
    os.replace(tmp, output)
    os.chmod(output, 0o755)  # mkdtemp (and the safetensors writer) made them private
    for folder, _, files in os.walk(output):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    if old:
        shutil.rmtree(old, ignore_errors=True)
