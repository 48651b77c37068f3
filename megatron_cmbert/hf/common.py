"""What the Hugging Face export, its sentence-transformers and ONNX checks and the evaluation tools share:
the dtypes, the sample texts of the parity checks, the from_pretrained arguments, our model's pooled
embeddings. Imports no other module of hf/, so nothing here forms a cycle."""
from __future__ import annotations

import torch

from megatron_cmbert.checkpoint.reader import Checkpoint, build_model
from megatron_cmbert.tokens import CLS_ID, PAD_ID, SEP_ID

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Sample texts of the parity check (of different lengths, so the batch is padded; longer than the windows
# of small models, so sliding-window layers are exercised).
SAMPLE_TEXTS = (
    "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。",
    "今天天气很好。",
    "人工智能技术正在改变人们的生活方式，从智能手机上的语音助手到自动驾驶汽车，各种应用层出不穷，"
    "研究人员也在不断探索新的模型结构和训练方法。",
    "他在2023年3月15日去了上海，参观了博物馆。",
)


def is_remote_code(config) -> bool:
    return config.normalization != "LayerNorm"


def load_kwargs(dtype=torch.float32, remote_code: bool = False) -> dict:
    """from_pretrained arguments that mean the same in transformers 4.48+ and 5.x (`torch_dtype` became
    `dtype` in 4.56; 5.x loads in the stored dtype unless told)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: dtype, "trust_remote_code": remote_code}


def sample_batch(tokenizer_dir: str, max_length: int, texts=SAMPLE_TEXTS):
    """[CLS] text [SEP] rows padded with [PAD]=0 into (batch, seq) ids and a 0/1 mask. A text longer than
    max_length is cut before its [SEP], as transformers' tokenizers (and so sentence-transformers) cut it."""
    from megatron_cmbert.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rows = [[CLS_ID, *tok.encode(t, add_special_tokens=False).ids[:max_length - 2], SEP_ID] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def rounded_state(ck: Checkpoint, dtype: str) -> dict:
    """Our weights as the export stores them (rounded to `dtype`), in float32."""
    return {k: v.to(DTYPES[dtype]).float() for k, v in ck.state_dict.items()}


def mean_pooled_embeddings(ck: Checkpoint, texts, dtype: str = "float32") -> torch.Tensor:
    """Mean over each text's tokens ([CLS] and [SEP] included) of our encoder's output, L2-normalised."""
    from megatron_cmbert.model.padding import run_padded

    ids, mask = sample_batch(ck.tokenizer_dir, ck.seq_length, texts)
    ours = build_model(ck.config, rounded_state(ck, dtype))
    with torch.no_grad():
        hidden = run_padded(ours.model, ids, mask)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)
