"""megatron_cmbert: Megatron-style pretraining of Chinese ModernBERT.

Layout (see docs/ARCHITECTURE.md): ``data/`` turns raw text into indexed datasets with whole-word
metadata; later packages hold the model, kernels and training loop.
"""

__version__ = "0.1.0"
