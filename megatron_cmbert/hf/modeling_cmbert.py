"""Chinese ModernBERT with RMSNorm, as Hugging Face remote code (copied next to the weights by
megatron_cmbert's tools/convert_to_hf.py; needs only torch and transformers >= 4.48 with ModernBERT).

The model is HF's ModernBERT with every LayerNorm replaced by an RMSNorm of the same shape: the key names,
the fused layouts and everything else are the stock classes', so the weights load unchanged. The norms are
swapped after the stock constructor runs, which keeps this file independent of ModernBERT's internals (they
differ a lot between transformers 4.x and 5.x).
"""
import torch
from torch import nn
from transformers.models.modernbert.configuration_modernbert import ModernBertConfig
from transformers.models.modernbert.modeling_modernbert import (ModernBertForMaskedLM, ModernBertForSequenceClassification,
                                                                ModernBertModel)


class CMBertConfig(ModernBertConfig):
    # Its own model type: registering the remote classes must never re-route the stock "modernbert" type.
    model_type = "cmbert_modernbert"


class ModernBertRMSNorm(nn.LayerNorm):
    """y = x / sqrt(mean(x^2) + eps) * weight, fp32 math. A LayerNorm subclass (bias-free) so that every
    transformers version initialises, casts and loads it as it does the stock norms."""

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def _swap_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.LayerNorm:
            norm = ModernBertRMSNorm(child.normalized_shape, eps=child.eps, bias=False,
                                     device=child.weight.device, dtype=child.weight.dtype)
            setattr(module, name, norm)
        else:
            _swap_norms(child)


class _WithRMSNorm:
    """Mixin: build the stock model, then swap its norms."""

    config_class = CMBertConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _swap_norms(self)


class CMBertModel(_WithRMSNorm, ModernBertModel):
    config_class = CMBertConfig


class CMBertForMaskedLM(_WithRMSNorm, ModernBertForMaskedLM):
    config_class = CMBertConfig


class CMBertForSequenceClassification(_WithRMSNorm, ModernBertForSequenceClassification):
    config_class = CMBertConfig
