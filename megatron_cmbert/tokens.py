"""Token-id conventions every layer shares (tokenizer, masking, model, Hugging Face export), defined once.
Imports nothing, so data/, model/ and hf/ take them from here without importing each other."""

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
IGNORE_INDEX = -100
"""Label of positions that are not predicted (PyTorch's cross-entropy default)."""
