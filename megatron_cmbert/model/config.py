"""Model configuration of Chinese ModernBERT: one dataclass, named presets, an arithmetic parameter count.

The layout follows Hugging Face ModernBERT (docs/MODEL.md, docs/HF.md); the `large` preset is the seed
paper's model (28 x 1024, FFN 2624, RMSNorm, RoPE theta 80k global / 10k local).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megatron_cmbert.errors import UserError
from megatron_cmbert.kernels.registry import KernelChoice, KernelError

NORMALIZATIONS = ("RMSNorm", "LayerNorm")


class UnknownPresetError(UserError, KeyError):
    """A preset name that is not in PRESETS."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0])


@dataclass
class ModelConfig:
    """Shape and numerics of the encoder and its MLM head. Validated on construction."""

    vocab_size: int = 32979
    """Tokens the tokenizer can produce (the paper's vocabulary has 32,979)."""
    hidden_size: int = 1024
    """Width of the residual stream."""
    num_layers: int = 28
    """Number of transformer blocks."""
    num_attention_heads: int = 16
    """Attention heads per layer; head_dim = hidden_size / num_attention_heads."""
    ffn_hidden_size: int = 2624
    """Width of one GeGLU half; the fused input projection has 2 * ffn_hidden_size outputs."""
    global_attn_every_n_layers: int = 3
    """Layer i (0-based) attends globally when i % n == 0, otherwise locally. 0 = every layer is local
    (only for tests of the sliding window; such a model has no Hugging Face equivalent)."""
    local_attention: int = 128
    """Total sliding window of local layers, as in HF `local_attention`: keys with |i - j| <= window / 2."""
    global_rope_theta: float = 80_000.0
    """RoPE base of global layers (stock ModernBERT uses 160,000; the seed paper 80,000)."""
    local_rope_theta: float = 10_000.0
    """RoPE base of local layers."""
    normalization: str = "RMSNorm"
    """`RMSNorm` (the paper's) or bias-free `LayerNorm` (exports to the stock HF class)."""
    norm_eps: float = 1e-5
    """Epsilon of every norm."""
    max_position_embeddings: int = 8192
    """Longest sequence the model is meant to see (RoPE itself has no table to outgrow)."""
    initializer_range: float = 0.02
    """Std of the truncated-normal init of input projections and embeddings."""
    initializer_cutoff_factor: float = 2.0
    """Truncate the init normal at +- this many std (HF ModernBERT: 2)."""
    vocab_pad_multiple: int = 128
    """Embedding rows are padded to a multiple of this (and of the TP size) for fast, even vocab shards;
    logits of padding ids are masked to -inf so the loss is exactly the unpadded one."""
    pad_token_id: int = 0
    """Id used by the padded-batch helpers for padding (never seen by the packed model)."""
    kernels: KernelChoice = field(default_factory=KernelChoice, compare=False)
    """Backend per op for attention, RoPE, GeGLU and RMSNorm (`auto`, `reference`, `triton`; attention also
    `flex`, `flash_attn`), e.g. `triton,attention=flex` (docs/KERNELS.md). Also accepts that text or a dict.
    Not part of the architecture: a checkpoint loads with any kernels."""
    name: str = field(default="custom", compare=False)
    """Preset name, for logs only."""

    def __post_init__(self):
        def need(condition: bool, message: str):
            if not condition:
                raise ValueError(f"ModelConfig({self.name}): {message}")

        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                    "vocab_pad_multiple", "max_position_embeddings"):
            need(getattr(self, key) > 0, f"{key} must be positive, got {getattr(self, key)}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rotary embeddings")
        need(self.global_attn_every_n_layers >= 0, "global_attn_every_n_layers must be >= 0")
        need(self.local_attention >= 2 and self.local_attention % 2 == 0,
             f"local_attention must be an even window >= 2 (|i-j| <= window/2), got {self.local_attention}")
        need(self.normalization in NORMALIZATIONS,
             f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        need(self.norm_eps > 0, "norm_eps must be positive")
        need(self.global_rope_theta > 0 and self.local_rope_theta > 0, "RoPE thetas must be positive")
        need(0 <= self.pad_token_id < self.vocab_size, "pad_token_id must be a valid token id")
        try:
            self.kernels = KernelChoice.parse(self.kernels)
        except KernelError as error:
            need(False, str(error))

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of lcm(vocab_pad_multiple, TP size)."""
        multiple = math.lcm(self.vocab_pad_multiple, tensor_parallel_size)
        return -(-self.vocab_size // multiple) * multiple

    def is_global_layer(self, layer: int) -> bool:
        n = self.global_attn_every_n_layers
        return n > 0 and layer % n == 0

    @property
    def layer_types(self) -> list[str]:
        """Per layer `full_attention` / `sliding_attention` (the names HF 5.x uses)."""
        return ["full_attention" if self.is_global_layer(i) else "sliding_attention"
                for i in range(self.num_layers)]

    def attention_window(self, layer: int) -> tuple[int, int]:
        """(left, right) keys around each query; (-1, -1) = global."""
        if self.is_global_layer(layer):
            return (-1, -1)
        half = self.local_attention // 2
        return (half, half)

    def rope_theta(self, layer: int) -> float:
        return self.global_rope_theta if self.is_global_layer(layer) else self.local_rope_theta

    def validate_parallel(self, tensor_parallel_size: int):
        """Errors that only depend on how the model is split."""
        if self.num_attention_heads % tensor_parallel_size:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"tensor_model_parallel_size {tensor_parallel_size}")
        if self.ffn_hidden_size % tensor_parallel_size:
            raise ValueError(f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by "
                             f"tensor_model_parallel_size {tensor_parallel_size}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready fields (kernels as their {op: backend} mapping)."""
        out = dataclasses.asdict(self)
        out["kernels"] = self.kernels.as_dict()
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """From to_dict() output or an older config.json (kernel_backend / kernel_overrides fields);
        unknown keys are ignored, so a newer file's extra fields do not stop an older reader."""
        values = dict(values)
        if "kernels" not in values and ("kernel_backend" in values or "kernel_overrides" in values):
            values["kernels"] = KernelChoice.from_legacy(values.get("kernel_backend"), values.get("kernel_overrides"))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


PRESETS: dict[str, ModelConfig] = {
    # 3 layers so layer 0 is global and 1, 2 are local; window 8 keeps the window test meaningful at
    # short lengths; 4 heads so TP=2 splits heads.
    "tiny": ModelConfig(name="tiny", vocab_size=1000, hidden_size=64, num_layers=3, num_attention_heads=4,
                        ffn_hidden_size=96, local_attention=8, max_position_embeddings=512),
    "base": ModelConfig(name="base", hidden_size=768, num_layers=22, num_attention_heads=12,
                        ffn_hidden_size=1152),
    # The seed paper's model (Table 5: 377.0M parameters, 9.0% in the embedding at vocab 32,979).
    "large": ModelConfig(name="large"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. vocab_size=...)."""
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts by part; `parameters` is the paper's figure (embeddings + encoder, no MLM head,
    no vocab padding rows)."""

    embedding: int
    encoder: int
    mlm_head: int
    vocab_padding: int

    @property
    def parameters(self) -> int:
        return self.embedding + self.encoder

    @property
    def embedding_share(self) -> float:
        return self.embedding / self.parameters


def count_parameters(config: ModelConfig, tensor_parallel_size: int = 1) -> ParameterCount:
    """Count parameters by arithmetic (no model built). Norms are weight-only, linears bias-free; the
    decoder weight is tied to the embedding so the head adds dense + norm + decoder bias."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    per_layer = (3 * h * h + h * h) + (2 * f * h + f * h) + h  # attention, GeGLU MLP, mlp_norm
    attn_norms = (config.num_layers - 1) * h  # layer 0 reuses the embedding norm
    embedding = v * h  # the token embedding matrix; its norm counts with the encoder's norms
    encoder = config.num_layers * per_layer + attn_norms + 2 * h  # + embedding norm + final norm
    padded = config.padded_vocab_size(tensor_parallel_size)
    mlm_head = h * h + h + padded  # dense, norm, decoder bias (padded like the logits)
    return ParameterCount(embedding=embedding, encoder=encoder, mlm_head=mlm_head,
                          vocab_padding=(padded - v) * h)
