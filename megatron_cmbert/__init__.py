"""megatron_cmbert: Megatron-style pretraining of Chinese ModernBERT.

Layout (see docs/ARCHITECTURE.md): ``data/`` (raw text -> indexed datasets -> masked micro-batches),
``model/`` (the encoder), ``parallel/`` (tensor parallelism applied to it), ``kernels/`` (attention and
fused ops behind one dispatch), ``training/`` (optimizer, schedules, checkpoints, the loop).
"""

__version__ = "0.1.0"
