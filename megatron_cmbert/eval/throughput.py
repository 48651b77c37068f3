"""The paper's Table 4 (inference throughput) and Table 5 (tokenizer compression, parameter budget) protocol
for any Encoder (docs/EVAL.md).

Table 4: Chinese text in two buckets, <= 8,192 characters at batch 8 and <= 512 characters at batch 32.
Each input of a bucket is exactly that many characters of the held-out text (documents joined in order,
cut at the limit), tokenized by the model's own tokenizer with its special tokens ([CLS]/[SEP]). One run is one forward of the
encoder body (no head) over the whole batch, under inference_mode: ours packed varlen (no padding), an HF
model as transformers runs it (a padded batch). Tokens/s of a run = real tokens (padding not counted) /
seconds, CUDA synchronised; the figure is the mean over the timed runs after warm-up. A bucket whose inputs
need more tokens than the model's maximum length is N/A, as in the paper (no native support).

Table 5: parameters of the encoder body (embeddings + layers, no MLM head; ours without vocabulary padding
rows), the share held by embedding tables (every nn.Embedding: tokens, and positions/segments where the
model has them), the tokenizer's size, and characters per token of each bucket's text (special tokens
not counted, no truncation).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megatron_cmbert.errors import UserError

# The paper's own figures (one A100, bf16; docs/EVAL.md "The paper's figures"), matched to a model by name.
PAPER_TABLE4 = {  # name: (tokens/s long bucket 8k x 8, short bucket 512 x 32); None = N/A
    "Chinese ModernBERT (ours)": (180_100, 172_046),
    "gte-multilingual-base": (153_373, 322_227),
    "qwen3-embeddings-0.6B": (66_411, 67_965),
    "jina-embeddings-v2-base-zh": (29_890, 212_125),
    "chinese-roberta-wwm-ext-large": (None, 184_673),
}
PAPER_TABLE5 = {  # name: (params M, embedding %, vocab, chars/token long, chars/token short)
    "Chinese ModernBERT (ours)": (377.0, 9.0, 32_979, 1.41, 1.35),
    "gte-multilingual-base": (305.4, 62.9, 250_048, 1.43, 1.37),
    "qwen3-embeddings-0.6B": (595.8, 26.1, 151_669, 1.45, 1.39),
    "jina-embeddings-v2-base-zh": (160.8, 29.2, 61_056, 1.56, 1.52),
    "chinese-roberta-wwm-ext-large": (325.5, 6.8, 21_128, None, 1.10),
}
PAPER_BUCKETS = ((8192, 8), (512, 32))
"""(max characters, batch) of the long and the short bucket."""


class ThroughputError(UserError, ValueError):
    """A one-line reason the benchmark cannot run (no text, a bad input file); tools print it."""


@dataclass
class Bucket:
    max_chars: int
    batch: int
    texts: list = field(default_factory=list)
    repeated: bool = False
    """The held-out text was shorter than the bucket needs and was reused from its start."""

    @property
    def label(self) -> str:
        return f"{_short(self.max_chars)} x {self.batch}"


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 4096 and n % 1024 == 0 else str(n)


def make_bucket(docs: list[str], max_chars: int, batch: int) -> Bucket:
    """`batch` inputs of exactly max_chars characters: the documents joined in order, cut consecutively."""
    stream = "".join(d.strip() for d in docs if d and d.strip())
    if not stream:
        raise ThroughputError("no text to benchmark on")
    need = max_chars * batch
    repeated = len(stream) < need
    if repeated:
        stream = stream * math.ceil(need / len(stream))
    return Bucket(max_chars, batch, [stream[i * max_chars:(i + 1) * max_chars] for i in range(batch)], repeated)


def paper_name(name: str, kind: str) -> str | None:
    """The paper's row for a model: ours by kind, HF directories by a paper model name in their path."""
    if kind == "ours":
        return "Chinese ModernBERT (ours)"
    low = name.lower().replace("_", "-")
    return next((k for k in PAPER_TABLE4 if k.lower() in low), None)


# ---- Table 5 --------------------------------------------------------------------------------------------
def parameter_budget(encoder) -> dict:
    """Parameters (encoder body, no head), embedding share and vocabulary of one Encoder."""
    body = encoder.backbone
    total = sum(p.numel() for p in body.parameters())
    if encoder.kind == "ours":  # the vocabulary padding rows are a layout detail, not parameters
        table = body.embeddings.tok_embeddings.weight
        padding = (table.shape[0] - encoder.config.vocab_size) * table.shape[1]
        total, embedding = total - padding, table.numel() - padding
    else:
        embedding = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Embedding))
    return {"parameters": total, "embedding_parameters": embedding, "embedding_share": embedding / total,
            "vocab_size": len(encoder.tokenizer)}


def chars_per_token(tokenizer, texts) -> float:
    tokens = sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return sum(len(t) for t in texts) / tokens


# ---- Table 4 --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(encoder, seqs, runs: int = 10, warmup: int = 3) -> list[float]:
    """Tokens/s of each timed run (one forward of the encoder body over `seqs`)."""
    tokens = sum(len(s) for s in seqs)
    rates = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            _sync(encoder.device)
            start = time.perf_counter()
            encoder.hidden_states(seqs)
            _sync(encoder.device)
            if i >= warmup:
                rates.append(tokens / (time.perf_counter() - start))
    return rates


def measure_bucket(encoder, bucket: Bucket, runs: int, warmup: int) -> dict:
    """Table 4's cell of one bucket, plus the bucket's chars/token (Table 5)."""
    needed = [len(ids) for ids in encoder.tokenizer(bucket.texts, add_special_tokens=True)["input_ids"]]
    row = {"bucket": bucket.label, "max_chars": bucket.max_chars, "batch": bucket.batch,
           "chars_per_token": chars_per_token(encoder.tokenizer, bucket.texts), "max_tokens_needed": max(needed),
           "text_repeated": bucket.repeated}
    if max(needed) > encoder.max_length:
        row.update(tokens_per_s=None, reason=f"needs {max(needed)} tokens, model max {encoder.max_length}")
        return row
    seqs = encoder.encode(bucket.texts, max_length=max(needed))
    rates = time_forward(encoder, seqs, runs, warmup)
    mean = sum(rates) / len(rates)
    std = math.sqrt(sum((r - mean) ** 2 for r in rates) / max(len(rates) - 1, 1))
    row.update(tokens_per_s=mean, tokens_per_s_std=std, runs=len(rates), warmup=warmup, tokens=sum(needed),
               mean_tokens_per_input=sum(needed) / len(needed))
    return row


def describe(encoder) -> dict:
    """Table 4's architecture columns."""
    config = encoder.config
    if encoder.kind == "ours":
        local = any(not config.is_global_layer(i) for i in range(config.num_layers))
        return {"layers": config.num_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
                "arch": "ModernBERT", "posenc": "RoPE", "attn": "Local+Global" if local else "Global",
                "normalization": config.normalization}
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if encoder.length_limit() is not None:
        posenc = "Absolute"
    elif getattr(config, "position_embedding_type", "") == "alibi":
        posenc = "ALiBi"
    else:
        posenc = "RoPE" if any(k for k in config.to_dict() if "rope" in k.lower()) else "?"
    local = getattr(config, "local_attention", None) and getattr(config, "global_attn_every_n_layers", 1) > 1
    return {"layers": layers, "hidden": int(config.hidden_size), "heads": heads,
            "arch": getattr(config, "model_type", "?"), "posenc": posenc, "attn": "Local+Global" if local else "Global"}


def benchmark(encoder, buckets: list[Bucket], runs: int = 10, warmup: int = 3, progress=None) -> dict:
    """Table 4 and Table 5 figures of one encoder."""
    out = {"model": encoder.name, "kind": encoder.kind, "paper_row": paper_name(encoder.name, encoder.kind),
           "dtype": str(next(encoder.backbone.parameters()).dtype).replace("torch.", ""),
           "max_length": encoder.max_length, **describe(encoder), **parameter_budget(encoder), "buckets": []}
    for bucket in buckets:
        out["buckets"].append(measure_bucket(encoder, bucket, runs, warmup))
        if progress is not None:
            progress.update(1)
    return out
