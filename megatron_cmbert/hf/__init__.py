"""Hugging Face conversion: our checkpoints -> transformers / sentence-transformers / ONNX (export.py) and
HF ModernBERT -> our checkpoints (importer.py). See docs/HF.md. Needs the `hf` extra (transformers,
safetensors; sentence-transformers, onnx, onnxruntime, onnxscript for the optional outputs)."""
