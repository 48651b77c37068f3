"""Data path: segmentation, tokenizer, indexed datasets with word-boundary metadata."""
