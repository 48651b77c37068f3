"""The one map between our (full, TP-gathered) state dict and Hugging Face ModernBertForMaskedLM's.

Key names are the same as HF's except `decoder_bias` -> `decoder.bias`; two weights change layout:
  attn.Wqkv: ours per head [q_h; k_h; v_h]        <-> HF [all Q; all K; all V]
  mlp.Wi:    ours per channel [input_c; gate_c]   <-> HF [all inputs; all gates] (inputs go through GELU)
and our vocabulary padding rows are dropped (to_hf) or zero-filled (from_hf). HF's `decoder.weight` is tied
to `model.embeddings.tok_embeddings.weight` and is not written.
See docs/HF.md; megatron_cmbert/hf/ (the converters) uses this module.
"""
from __future__ import annotations

import re

import torch

from megatron_cmbert.model.config import ModelConfig

# Our key -> HF key for the keys whose name differs; every other key keeps its name.
RENAMED = {"decoder_bias": "decoder.bias"}
_QKV = re.compile(r"model\.layers\.\d+\.attn\.Wqkv\.weight")
_WI = re.compile(r"model\.layers\.\d+\.mlp\.Wi\.weight")
_VOCAB_ROWS = ("model.embeddings.tok_embeddings.weight", "decoder_bias")


def expected_hf_keys(config: ModelConfig) -> list[str]:
    """The safetensors keys of HF ModernBertForMaskedLM for this config (docs/HF.md)."""
    keys = ["model.embeddings.tok_embeddings.weight", "model.embeddings.norm.weight"]
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        keys += [prefix + "attn_norm.weight"] if i > 0 else []
        keys += [prefix + k for k in ("attn.Wqkv.weight", "attn.Wo.weight", "mlp_norm.weight",
                                      "mlp.Wi.weight", "mlp.Wo.weight")]
    return keys + ["model.final_norm.weight", "head.dense.weight", "head.norm.weight", "decoder.bias"]


def qkv_to_hf(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(heads * 3 * d, H) per-head grouped -> (3 * heads * d, H) grouped by Q, K, V."""
    d = weight.shape[0] // (3 * num_heads)
    return weight.view(num_heads, 3, d, -1).transpose(0, 1).reshape(weight.shape)


def qkv_from_hf(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    d = weight.shape[0] // (3 * num_heads)
    return weight.view(3, num_heads, d, -1).transpose(0, 1).reshape(weight.shape)


def glu_to_hf(weight: torch.Tensor) -> torch.Tensor:
    """(F * 2, H) channel-interleaved -> (2 * F, H) [inputs; gates]."""
    return weight.view(-1, 2, weight.shape[-1]).transpose(0, 1).reshape(weight.shape)


def glu_from_hf(weight: torch.Tensor) -> torch.Tensor:
    return weight.view(2, -1, weight.shape[-1]).transpose(0, 1).reshape(weight.shape)


def to_hf(state_dict: dict, config: ModelConfig) -> dict:
    """Our full state dict (any vocabulary padding) -> HF ModernBertForMaskedLM state dict (no decoder.weight)."""
    out = {}
    for key, value in state_dict.items():
        if key in _VOCAB_ROWS:
            value = value[: config.vocab_size]
        if _QKV.fullmatch(key):
            value = qkv_to_hf(value, config.num_attention_heads)
        elif _WI.fullmatch(key):
            value = glu_to_hf(value)
        out[RENAMED.get(key, key)] = value.contiguous()
    missing = set(expected_hf_keys(config)) - set(out)
    extra = set(out) - set(expected_hf_keys(config))
    if missing or extra:
        raise KeyError(f"state dict does not match the ModernBERT layout: missing {sorted(missing)}, "
                       f"unexpected {sorted(extra)}")
    return out


def from_hf(hf_state_dict: dict, config: ModelConfig, tensor_parallel_size: int = 1) -> dict:
    """HF ModernBertForMaskedLM state dict -> our full state dict, vocabulary padded with zero rows."""
    inverse = {hf: ours for ours, hf in RENAMED.items()}
    padded = config.padded_vocab_size(tensor_parallel_size)
    out = {}
    for hf_key, value in hf_state_dict.items():
        if hf_key == "decoder.weight":  # tied to the token embedding
            continue
        key = inverse.get(hf_key, hf_key)
        if _QKV.fullmatch(key):
            value = qkv_from_hf(value, config.num_attention_heads)
        elif _WI.fullmatch(key):
            value = glu_from_hf(value)
        elif key in _VOCAB_ROWS:
            value = torch.cat([value, value.new_zeros((padded - value.shape[0], *value.shape[1:]))])
        out[key] = value.contiguous()
    return out


def hf_config_kwargs(config: ModelConfig) -> dict:
    """Arguments for the stock transformers.ModernBertConfig (LayerNorm models only; RMSNorm models export
    as remote code with `modernbert_config_dict`)."""
    if config.normalization != "LayerNorm":
        raise ValueError("the stock HF ModernBERT class has only bias-free LayerNorm; RMSNorm models need "
                         "the self-contained remote-code export")
    return modernbert_config_dict(config)


def modernbert_config_dict(config: ModelConfig) -> dict:
    """ModernBERT config.json fields of any of our models (the norm type aside). Both the transformers 5 RoPE
    keys (`rope_parameters`, `layer_types`) and the 4.x keys are written: 4.57 reading only the v5 keys
    silently resets the global theta to 160,000, and 5.x prefers `rope_parameters` when both are there."""
    if config.global_attn_every_n_layers == 0:
        raise ValueError("HF ModernBERT always makes layer 0 global; global_attn_every_n_layers=0 has no "
                         "HF equivalent")
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads, "hidden_activation": "gelu",
        "classifier_activation": "gelu", "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "initializer_cutoff_factor": config.initializer_cutoff_factor,
        "norm_eps": config.norm_eps, "norm_bias": False, "attention_bias": False, "mlp_bias": False,
        "decoder_bias": True, "tie_word_embeddings": True, "pad_token_id": config.pad_token_id,
        # HF's defaults are ModernBERT-English ids; the converter sets the tokenizer's.
        "bos_token_id": None, "eos_token_id": None, "cls_token_id": None, "sep_token_id": None,
        "local_attention": config.local_attention,
        "global_attn_every_n_layers": config.global_attn_every_n_layers,
        "global_rope_theta": config.global_rope_theta, "local_rope_theta": config.local_rope_theta,
        "layer_types": config.layer_types,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        },
    }


def model_config_from_hf(hf: dict, normalization: str = "LayerNorm", name: str = "hf") -> ModelConfig:
    """A ModernBERT config.json dict (transformers 4 or 5 spelling) -> our ModelConfig. Fails on what our
    encoder cannot express (biases, a non-GELU activation, a layer pattern other than every n-th global)."""
    for key in ("norm_bias", "attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{key}=true: this encoder has no biases in the body")
    if not hf.get("decoder_bias", True):
        raise ValueError("decoder_bias=false: this MLM head always has a decoder bias")
    if hf.get("hidden_activation", "gelu") != "gelu":
        raise ValueError(f"hidden_activation {hf.get('hidden_activation')!r}: only exact GELU ('gelu') is supported")
    layers = hf["num_hidden_layers"]
    every = hf.get("global_attn_every_n_layers")
    if every is None:  # 5.x spelling: recover n from layer_types
        types = hf.get("layer_types") or []
        every = next((i for i, t in enumerate(types) if i and t == "full_attention"), layers) if types else 3
    rope = hf.get("rope_parameters") or {}
    config = ModelConfig(
        name=name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers,
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        global_attn_every_n_layers=every, local_attention=hf.get("local_attention", 128),
        global_rope_theta=float(rope.get("full_attention", {}).get("rope_theta", hf.get("global_rope_theta", 160_000.0))),
        local_rope_theta=float(rope.get("sliding_attention", {}).get("rope_theta", hf.get("local_rope_theta", 10_000.0))),
        normalization=normalization, norm_eps=hf.get("norm_eps", 1e-5),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        initializer_range=hf.get("initializer_range", 0.02),
        initializer_cutoff_factor=hf.get("initializer_cutoff_factor", 2.0),
        pad_token_id=hf.get("pad_token_id") or 0)
    if hf.get("layer_types") and hf["layer_types"] != config.layer_types:
        raise ValueError("layer_types is not 'every n-th layer global, starting at layer 0'; this encoder "
                         "cannot express that pattern")
    return config
