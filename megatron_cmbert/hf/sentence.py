"""sentence-transformers files for an export: the encoder, mean pooling over real tokens, L2 normalisation."""
from __future__ import annotations

import json
import os

import torch


def write_sentence_transformers(out: str, ck) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {"word_embedding_dimension": ck.config.hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True}
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": ck.seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": None,
                                              "similarity_fn_name": "cosine"},
        os.path.join("1_Pooling", "config.json"): pooling,
    }
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
            json.dump(content, fh, indent=2)


def check_sentence_transformers(out: str, ck, dtype: str = "float32") -> float:
    """Largest |difference| between SentenceTransformer(out).encode and our model's mean-pooled,
    normalised encoder output on the sample texts."""
    from sentence_transformers import SentenceTransformer

    from megatron_cmbert.hf.common import SAMPLE_TEXTS, is_remote_code, mean_pooled_embeddings

    remote = is_remote_code(ck.config)
    model = SentenceTransformer(out, device="cpu", trust_remote_code=remote,
                                model_kwargs={"dtype": torch.float32} if _new_kwargs() else {"torch_dtype": torch.float32})
    got = torch.as_tensor(model.encode(list(SAMPLE_TEXTS), convert_to_numpy=True, batch_size=len(SAMPLE_TEXTS)))
    return (got - mean_pooled_embeddings(ck, SAMPLE_TEXTS, dtype)).abs().max().item()


def _new_kwargs() -> bool:
    from megatron_cmbert.hf.common import load_kwargs

    return "dtype" in load_kwargs()
