"""Hugging Face conversion: our checkpoints -> transformers / sentence-transformers / ONNX (export.py) and
HF ModernBERT -> our checkpoints (importer.py). See docs/HF.md. Needs the `hf` extra (transformers,
safetensors; sentence-transformers, onnx, onnxruntime, onnxscript for the optional outputs)."""

from megatron_cmbert.errors import ToolFailure, UserError


class ConversionError(UserError, RuntimeError):
    """A one-line reason a conversion cannot go on (bad input: a directory, a file, a flag); exit status 2."""


class ExportCheckError(ToolFailure, RuntimeError):
    """The export disagrees with the checkpoint (a parity check failed): nothing was written; exit status 1."""
