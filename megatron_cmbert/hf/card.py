"""The model card (README.md) of an export, generated from what the checkpoint records."""
from __future__ import annotations

import json
import os

from megatron_cmbert.model.config import count_parameters
from megatron_cmbert.tokens import SPECIAL_TOKENS

NOT_RECORDED = "not recorded"


def _metrics_file_values(args: dict) -> dict:
    """Last train loss / valid loss in the run's --metrics-file (JSON lines), when that file still exists."""
    path = args.get("metrics_file")
    found = {}
    if not path or not os.path.isfile(path):
        return found
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row:
                found["train_loss"] = row["loss"]
            if row.get("valid_loss") is not None:
                found["valid_loss"] = row["valid_loss"]
            if "tokens_seen" in row:
                found["tokens_seen"] = row["tokens_seen"]
    return found


def training_summary(ck) -> dict:
    """steps, tokens seen, final train / valid loss: the TrainState first, then the metrics file."""
    state, from_file = ck.state, _metrics_file_values(ck.args)

    def pick(key):
        value = getattr(state, key)
        return value if value else from_file.get(key, value)

    step = state.step if ck.record.stage is None else f"{state.step} ({ck.record.stage})"
    return {"step": step, "consumed_samples": state.consumed_samples,
            "tokens_seen": pick("tokens_seen"), "train_loss": pick("train_loss"), "valid_loss": pick("valid_loss")}


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return NOT_RECORDED
    return format(value, spec) if spec else str(value)


def _data(args: dict) -> str:
    paths = args.get("data_path") or []
    if not paths:
        return NOT_RECORDED
    if len(paths) == 1:
        return f"`{paths[0]}` (weight 1)"
    return ", ".join(f"`{p}` (weight {w})" for w, p in zip(paths[::2], paths[1::2]))


def _masking(args: dict) -> str:
    schedule = args.get("mask_schedule")
    if schedule is None:
        return NOT_RECORDED
    kind = "whole-word" if args.get("masking", "word") == "word" else "token"
    if schedule == "constant":
        rate = f"constant rate {args.get('mask_rate')}"
    else:
        low, high = args.get("mask_rate_min"), args.get("mask_rate_max")
        rate = f"dynamic rate {low} -> {high} during the LR warmup, then back to {low} by the end"
    return f"{kind} masking, {rate} (of the chosen tokens {args.get('mask_prob')} become [MASK], {args.get('random_prob')} a random token, the rest stay)"


def model_card(ck, report, dtype: str) -> str:
    config, args = ck.config, ck.args
    summary = training_summary(ck)
    params = count_parameters(config).parameters
    remote = report.remote_code
    trust = ", trust_remote_code=True" if remote else ""
    arch = ("ModernBERT with RMSNorm (remote code `modeling_cmbert.py`: the stock HF classes with the norms "
            "swapped; load with `trust_remote_code=True`)" if remote else "stock `ModernBertForMaskedLM` (LayerNorm)")
    lines = [
        "---", "language: zh", "library_name: transformers", "pipeline_tag: fill-mask", "tags: [modernbert, chinese]",
        "---", "",
        f"# Chinese ModernBERT ({config.name} preset, {params / 1e6:.1f}M parameters)", "",
        f"Exported by `tools/convert_to_hf.py` (megatron_cmbert) from `{ck.path}`.", "",
        "| | |", "|---|---|",
        f"| architecture | {arch} |",
        f"| size | {config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
        f"FFN {config.ffn_hidden_size} (GeGLU), vocabulary {config.vocab_size} |",
        f"| attention | global every {config.global_attn_every_n_layers} layers (RoPE θ {config.global_rope_theta:g}), "
        f"otherwise a {config.local_attention}-token window (θ {config.local_rope_theta:g}) |",
        f"| trained sequence length | {ck.seq_length} (`max_position_embeddings`) |",
        f"| steps | {_fmt(summary['step'])} |",
        f"| samples seen | {_fmt(summary['consumed_samples'], ',')} |",
        f"| tokens seen | {_fmt(summary['tokens_seen'], ',')} |",
        f"| global batch | {_fmt(args.get('global_batch_size'))} sequences |",
        f"| data | {_data(args)} |",
        f"| masking | {_masking(args)} |",
        f"| learning rate | peak {_fmt(args.get('lr'))}, {_fmt(args.get('lr_decay_style'))} decay, "
        f"{_fmt(args.get('lr_warmup_iters'))} warm-up steps |",
        f"| final train loss | {_fmt(summary['train_loss'], '.4f')} |",
        f"| final valid loss | {_fmt(summary['valid_loss'], '.4f')} |",
        f"| weights | safetensors, {dtype} |",
        f"| export check | largest logit difference vs the checkpoint {report.max_logit_diff:.2e} (float32) |",
        "", "## Use", "", "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained(PATH{trust})",
        f"model = AutoModelForMaskedLM.from_pretrained(PATH{trust})",
        "fill = pipeline(\"fill-mask\", model=model, tokenizer=tokenizer)",
        "print(fill(\"北京是中国的[MASK]都。\"))",
        "```", "",
        f"Encoder only: `AutoModel.from_pretrained(PATH{trust})`. The tokenizer adds `[CLS] … [SEP]`; "
        f"special ids {' '.join(f'`{t}={i}`' for i, t in enumerate(SPECIAL_TOKENS))}. Inputs beyond {ck.seq_length} tokens "
        "were never seen in training.",
    ]
    if report.embedding_diff is not None:
        lines += ["", "Sentence embeddings (mean pooling, normalised):",
                  f"`SentenceTransformer(PATH{trust}).encode(texts)`."]
    if report.onnx_diff is not None:
        lines += ["", f"ONNX: `onnx/model.onnx` (inputs `input_ids`, `attention_mask`, dynamic batch and length; "
                      f"output `last_hidden_state`), checked with onnxruntime: largest difference "
                      f"{report.onnx_diff:.2e}."]
    return "\n".join(lines) + "\n"
