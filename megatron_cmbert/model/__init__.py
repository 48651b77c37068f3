"""Chinese ModernBERT in plain PyTorch math; parallel layouts plug in through a layer spec
(megatron_cmbert/parallel/layer_spec.py decides which).

config.py      ModelConfig, presets (tiny/base/large), count_parameters
layers.py      norms, packed positions, init, TorchSpec (single-process reference spec)
modernbert.py  CMBertModel (encoder), CMBertForMaskedLM (sparse-prediction MLM head)
padding.py     pack / unpad / repad helpers
hf_keymap.py   our state dict <-> HF ModernBertForMaskedLM
"""
from megatron_cmbert.model.config import (PRESETS, ModelConfig, ParameterCount, count_parameters,
                                          get_preset)
from megatron_cmbert.tokens import IGNORE_INDEX
from megatron_cmbert.model.modernbert import CMBertForMaskedLM, CMBertModel, MaskedLMOutput

__all__ = ["PRESETS", "ModelConfig", "ParameterCount", "count_parameters", "get_preset", "IGNORE_INDEX",
           "CMBertForMaskedLM", "CMBertModel", "MaskedLMOutput"]
