"""Plain-PyTorch building blocks: norms, packed positions, init, and `TorchSpec`, the single-process layer
spec that is also the TP=1 reference for every parallel layout.

A *layer spec* is the object the model asks for its linear / embedding / norm modules and for the few
token- and vocab-level collectives; megatron_cmbert/parallel/layer_spec.py is the one module that picks
which spec (plain PyTorch, megatron-core local, Transformer Engine) fills the model.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cmbert.kernels.reference import rms_norm_reference


# ---- initialisation (HF ModernBERT: truncated normal at +- cutoff * std) ---------------------------------
def truncated_normal_init(std: float, cutoff_factor: float = 2.0):
    """An init_method(tensor) filling a tensor in place; megatron-core calls it on the full (master) weight."""
    return partial(nn.init.trunc_normal_, mean=0.0, std=std, a=-cutoff_factor * std, b=cutoff_factor * std)


def init_methods(config) -> dict:
    """ModernBERT's stds: 0.02 for Wqkv, Wi, embeddings; 0.02 / sqrt(2 L) for attn.Wo, mlp.Wo, head.dense."""
    std_in = config.initializer_range
    std_out = config.initializer_range / math.sqrt(2.0 * config.num_layers)
    cut = config.initializer_cutoff_factor
    return {"in": truncated_normal_init(std_in, cut), "out": truncated_normal_init(std_out, cut),
            "embedding": truncated_normal_init(std_in, cut)}


# ---- modules ----------------------------------------------------------------------------------------------
class Linear(nn.Module):
    """Bias-free linear that allocates with torch.empty (so it can live on the meta device) and draws random
    numbers only through init_method, in the same order as megatron-core's CPU initialisation."""

    def __init__(self, in_features: int, out_features: int, init_method=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if init_method is not None:
            with torch.no_grad():
                init_method(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, init_method=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        if init_method is not None:
            with torch.no_grad():
                init_method(self.weight)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32. The model binds its KernelSet after building
    (`bind_kernels`); unbound, the reference runs."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.kernels = None

    def forward(self, x):
        if self.kernels is None:
            return rms_norm_reference(x, self.weight, self.eps)
        return self.kernels.rms_norm(x, self.weight, self.eps)


def bind_kernels(module: nn.Module, kernels) -> None:
    """Give every RMSNorm under `module` the model's KernelSet (the spec builds norms without knowing it)."""
    for m in module.modules():
        if isinstance(m, RMSNorm):
            m.kernels = kernels


class LayerNorm(nn.Module):
    """Bias-free LayerNorm (stock HF ModernBERT, norm_bias=False), computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), None, self.eps).to(x.dtype)


NORM_CLASSES = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}


# ---- the plain-PyTorch layer spec -------------------------------------------------------------------------
class TorchSpec:
    """Single process, no tensor parallelism: every slot is a plain PyTorch module."""

    tensor_parallel_size = 1
    sequence_parallel = False

    def embedding(self, num_embeddings, embedding_dim, init_method):
        return Embedding(num_embeddings, embedding_dim, init_method)

    def column_linear(self, in_features, out_features, init_method):
        """Output features are split over TP ranks (here: not split)."""
        return Linear(in_features, out_features, init_method)

    def row_linear(self, in_features, out_features, init_method):
        """Input features are split over TP ranks, the output is summed (here: not split)."""
        return Linear(in_features, out_features, init_method)

    def norm(self, normalization, hidden_size, eps, on_token_shards: bool):
        """on_token_shards: the norm sees this rank's slice of the tokens under sequence parallelism."""
        return NORM_CLASSES[normalization](hidden_size, eps)

    def vocab_bias(self, padded_vocab_size):
        return nn.Parameter(torch.zeros(padded_vocab_size))

    def vocab_range(self, padded_vocab_size):
        """[start, end) of the vocabulary ids whose logits this rank computes."""
        return 0, padded_vocab_size

    def gather_tokens(self, x):
        """Sequence-parallel token shards -> all tokens."""
        return x

    def lm_logits(self, x, weight, bias, vocab_size: int):
        """Logits of ids < vocab_size: the embedding's padding rows are left out of the matmul."""
        return F.linear(x, weight[:vocab_size], bias[:vocab_size])

    def cross_entropy(self, logits, targets):
        """Per-token loss, fp32."""
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def argmax(self, logits):
        """Token id of each row's largest logit (ids are global, whatever slice a rank holds)."""
        return logits.argmax(dim=-1)
