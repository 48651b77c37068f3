"""Chinese ModernBERT encoder and MLM head on packed varlen input. Plain PyTorch math only: the linear,
embedding and norm modules come from a layer spec (model/layers.py TorchSpec, or the megatron-core specs
chosen in parallel/layer_spec.py), so this file never imports distributed code.

Weight layouts (chosen so a tensor-parallel shard is a contiguous slice of the full tensor at any TP size):
  attn.Wqkv rows: per head [q_h; k_h; v_h] (megatron-core's grouping; HF wants [Q; K; V], see hf_keymap.py)
  mlp.Wi rows:    per FFN channel [input_c; gate_c] interleaved (HF wants [all inputs; all gates])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cmbert.kernels.registry import KernelSet
from megatron_cmbert.kernels.varlen import PackedLayout
from megatron_cmbert.model.config import ModelConfig
from megatron_cmbert.model.layers import Linear, TorchSpec, bind_kernels, init_methods
from megatron_cmbert.model.padding import pad_for_sequence_parallel
from megatron_cmbert.tokens import IGNORE_INDEX


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, spec, inits, kernels: KernelSet):
        super().__init__()
        self.kernels = kernels
        self.head_dim = config.head_dim
        self.window = config.attention_window(layer)
        self.theta = config.rope_theta(layer)
        self.Wqkv = spec.column_linear(config.hidden_size, 3 * config.hidden_size, inits["in"])
        self.Wo = spec.row_linear(config.hidden_size, config.hidden_size, inits["out"])

    @property
    def backend(self) -> str:
        """The attention backend name this layer asks its KernelSet for."""
        return self.kernels.names["attention"]

    def forward(self, x, positions, plan):
        qkv = self.Wqkv(x)  # (tokens, 3 * local_heads * head_dim), all tokens even under sequence parallel
        q, k, v = qkv.view(qkv.shape[0], -1, 3, self.head_dim).unbind(dim=2)
        q, k = self.kernels.rope(q, k, positions, self.theta)
        out = self.kernels.attention(q, k, v, plan)
        return self.Wo(out.reshape(out.shape[0], -1))


class GeGLU(nn.Module):
    def __init__(self, config: ModelConfig, spec, inits, kernels: KernelSet):
        super().__init__()
        self.kernels = kernels
        self.Wi = spec.column_linear(config.hidden_size, 2 * config.ffn_hidden_size, inits["in"])
        self.Wo = spec.row_linear(config.ffn_hidden_size, config.hidden_size, inits["out"])

    def forward(self, x):
        # Wi rows are interleaved [input_c; gate_c]; exact erf GELU, like HF "gelu"
        return self.Wo(self.kernels.geglu(self.Wi(x), interleaved=True))


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, spec, inits, kernels: KernelSet):
        super().__init__()
        norm = lambda: spec.norm(config.normalization, config.hidden_size, config.norm_eps, on_token_shards=True)
        # Layer 0 has no attention pre-norm: the embedding norm plays that role.
        self.attn_norm = nn.Identity() if layer == 0 else norm()
        self.attn = Attention(config, layer, spec, inits, kernels)
        self.mlp_norm = norm()
        self.mlp = GeGLU(config, spec, inits, kernels)

    def forward(self, x, positions, plan):
        """plan: the attention plan of this layer's window for the micro-batch (shared by layers)."""
        x = x + self.attn(self.attn_norm(x), positions, plan)
        return x + self.mlp(self.mlp_norm(x))


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig, spec, inits):
        super().__init__()
        self.tok_embeddings = spec.embedding(config.padded_vocab_size(spec.tensor_parallel_size),
                                             config.hidden_size, inits["embedding"])
        self.norm = spec.norm(config.normalization, config.hidden_size, config.norm_eps, on_token_shards=True)

    def forward(self, input_ids):
        return self.norm(self.tok_embeddings(input_ids))


class CMBertModel(nn.Module):
    """Embeddings + encoder layers + final norm. Returns this rank's token slice under sequence parallelism.
    `kernels`: the KernelSet its layers call (default: from config.kernel_backend / kernel_overrides)."""

    def __init__(self, config: ModelConfig, spec=None, kernels: KernelSet | None = None):
        super().__init__()
        spec = spec or TorchSpec()
        config.validate_parallel(spec.tensor_parallel_size)
        self.config, self.spec = config, spec
        self.kernels = kernels or KernelSet.from_config(config)
        inits = init_methods(config)
        self.embeddings = Embeddings(config, spec, inits)
        self.layers = nn.ModuleList(EncoderLayer(config, i, spec, inits, self.kernels)
                                    for i in range(config.num_layers))
        self.final_norm = spec.norm(config.normalization, config.hidden_size, config.norm_eps, on_token_shards=True)
        bind_kernels(self, self.kernels)

    def forward(self, input_ids: torch.Tensor, layout, max_seqlen: int | None = None) -> torch.Tensor:
        """input_ids: packed (tokens,); layout: a PackedLayout (training: built by the loader from host-side
        lengths), or the int32 cu_seqlens tensor (read once to the host; evaluation and tests)."""
        layout = as_layout(layout, max_seqlen)
        total = input_ids.shape[0]
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be packed 1-D tokens, got shape {tuple(input_ids.shape)}")
        if layout.total != total:
            raise ValueError(f"the layout holds {layout.total} tokens but input_ids has {total}")
        if self.spec.sequence_parallel and total % self.spec.tensor_parallel_size:
            raise ValueError(f"sequence parallelism needs the token count ({total}) divisible by TP "
                             f"({self.spec.tensor_parallel_size}); CMBertForMaskedLM pads by itself")
        x = self.embeddings(input_ids)
        if torch.is_autocast_enabled(x.device.type):
            # bf16 activations: the residual stream (and every activation saved for backward) in the autocast
            # dtype; norms still compute in fp32 inside, the weights stay fp32 masters
            x = x.to(torch.get_autocast_dtype(x.device.type))
        dtype = x.dtype
        # One plan per distinct window, built once per micro-batch and shared by the layers.
        plans = {w: self.kernels.attention_plan(layout, w, dtype) for w in {l.attn.window for l in self.layers}}
        for layer in self.layers:
            x = layer(x, layout.positions, plans[layer.attn.window])
        return self.final_norm(x)


class PredictionHead(nn.Module):
    """dense -> GELU -> norm; runs on all tokens on every rank (replicated, so its grads need no reduction)."""

    def __init__(self, config: ModelConfig, spec, inits):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, inits["out"])
        self.norm = spec.norm(config.normalization, config.hidden_size, config.norm_eps, on_token_shards=False)

    def forward(self, x):
        return self.norm(F.gelu(self.dense(x), approximate="none"))


@dataclass
class MaskedLMOutput:
    logits: torch.Tensor
    """(predicted tokens, this rank's vocab slice); predicted tokens = labels != -100, or all without labels.
    Logits of vocabulary padding ids are -inf."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over predicted tokens (fp32)."""
    num_predicted: int = 0
    num_correct: torch.Tensor | None = None
    """Predicted tokens whose argmax over the whole vocabulary is the label (0-d, on the device)."""


class CMBertForMaskedLM(nn.Module):
    """Encoder + MLM head with sparse prediction; decoder weight tied to the token embedding, with a bias."""

    def __init__(self, config: ModelConfig, spec=None):
        super().__init__()
        spec = spec or TorchSpec()
        self.config, self.spec = config, spec
        inits = init_methods(config)
        self.model = CMBertModel(config, spec)
        self.kernels = self.model.kernels
        self.head = PredictionHead(config, spec, inits)
        bind_kernels(self.head, self.kernels)
        self.decoder_bias = spec.vocab_bias(config.padded_vocab_size(spec.tensor_parallel_size))

    def forward(self, input_ids, layout, max_seqlen=None, labels=None, predicted_index=None,
                num_predicted: int | None = None) -> MaskedLMOutput:
        """input_ids, labels: packed (tokens,); labels -100 where nothing is predicted. layout: as
        CMBertModel.forward. Under sequence parallelism the tokens are padded here to a multiple of TP (a
        padding sequence of its own, predicting nothing), so callers never need to know the layout.

        predicted_index (training: made by the loader on the host, a static number of rows) selects the
        positions the head scores, and num_predicted says how many of them are real (padding rows point at
        positions whose label is -100 and carry no loss): no boolean indexing, so nothing waits for the
        device. Without it the positions are found from the labels (a sync; evaluation and tests)."""
        layout = as_layout(layout, max_seqlen)
        total = input_ids.shape[0]
        if self.spec.sequence_parallel:
            input_ids, layout, labels = pad_for_sequence_parallel(input_ids, layout, labels,
                                                                  self.spec.tensor_parallel_size, self.config.pad_token_id)
        hidden = self.spec.gather_tokens(self.model(input_ids, layout))
        targets = None
        if labels is not None:
            if predicted_index is None:
                predicted_index = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
                num_predicted = predicted_index.numel()
            hidden, targets = hidden.index_select(0, predicted_index), labels.index_select(0, predicted_index)
        else:
            hidden = hidden[:total]
        # Logits of the unpadded vocabulary only (vocabulary padding rows never reach the loss or argmax).
        logits = self.spec.lm_logits(self.head(hidden), self.model.embeddings.tok_embeddings.weight,
                                     self.decoder_bias, self.config.vocab_size)
        if targets is None:
            return MaskedLMOutput(logits=logits, num_predicted=logits.shape[0])
        real = targets != IGNORE_INDEX
        # sum / count rather than mean(): a micro-batch with nothing to predict gives 0, not NaN. Padding
        # rows are multiplied out (megatron's vocab-parallel CE has no ignore_index).
        token_loss = self.spec.cross_entropy(logits, targets.clamp_min(0)) * real
        loss = token_loss.sum() / max(int(num_predicted), 1)
        correct = ((self.spec.argmax(logits.detach()) == targets) & real).sum()
        return MaskedLMOutput(logits=logits, loss=loss, num_predicted=int(num_predicted), num_correct=correct)


def as_layout(layout, max_seqlen: int | None = None) -> PackedLayout:
    """A PackedLayout as is, or one from a cu_seqlens tensor (read to the host once)."""
    if isinstance(layout, PackedLayout):
        return layout
    return PackedLayout.from_cu_seqlens(layout, max_seqlen)
