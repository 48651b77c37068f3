"""Evaluation of encoders (ours or Hugging Face): pseudo-perplexity across lengths, throughput (docs/EVAL.md)."""
