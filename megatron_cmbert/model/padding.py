"""Packing and padding helpers: the model runs on packed varlen tokens; these convert to and from the
padded (batch, seq) layout that inference code and stock HF models use."""
from __future__ import annotations

import torch


def cu_seqlens_from_lengths(lengths, device=None) -> torch.Tensor:
    """[3, 2] -> tensor([0, 3, 5]) (int32, as flash-attn wants)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def pack_sequences(sequences, pad_to_multiple_of: int = 1, pad_token_id: int = 0):
    """Concatenate 1-D token tensors. When the total is not a multiple of pad_to_multiple_of (sequence
    parallelism needs tokens divisible by TP), pad tokens are appended as one extra sequence of their own,
    so they attend to nothing real. Returns (tokens, cu_seqlens, max_seqlen)."""
    sequences = [torch.as_tensor(s) for s in sequences]
    lengths = [len(s) for s in sequences]
    extra = -sum(lengths) % pad_to_multiple_of
    if extra:
        sequences.append(torch.full((extra,), pad_token_id, dtype=sequences[0].dtype))
        lengths.append(extra)
    return torch.cat(sequences), cu_seqlens_from_lengths(lengths), max(lengths)


def unpad_input(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(batch, seq) ids + 0/1 mask -> (tokens, indices into the flattened batch, cu_seqlens, max_seqlen).
    Real tokens need not be contiguous from the left; each row's kept tokens form one sequence."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    tokens = input_ids.flatten()[indices]
    return tokens, indices, cu_seqlens_from_lengths(lengths, device=input_ids.device), int(lengths.max())


def pad_output(values: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input for per-token outputs (tokens, ...) -> (batch, seq, ...); zeros at padding."""
    out = values.new_zeros((batch * seqlen, *values.shape[1:]))
    out[indices] = values
    return out.view(batch, seqlen, *values.shape[1:])


def run_padded(fn, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """unpad -> fn(tokens, cu_seqlens, max_seqlen) -> per-token outputs -> repad to (batch, seq, ...).
    E.g. run_padded(model.model, ids, mask) for hidden states, or
    run_padded(lambda *a: model(*a).logits, ids, mask) for MLM logits of every token."""
    tokens, indices, cu_seqlens, max_seqlen = unpad_input(input_ids, attention_mask)
    return pad_output(fn(tokens, cu_seqlens, max_seqlen), indices, *input_ids.shape)


def pad_for_sequence_parallel(input_ids: torch.Tensor, layout, labels, multiple: int, pad_token_id: int = 0):
    """(input_ids, layout, labels) with the token count rounded up to `multiple` (sequence parallelism splits
    tokens evenly over the TP ranks): the extra tokens are one sequence of their own, predicting nothing.
    Unchanged when already a multiple (a training micro-batch's static budget is)."""
    from megatron_cmbert.kernels.varlen import PackedLayout
    from megatron_cmbert.tokens import IGNORE_INDEX

    extra = -input_ids.shape[0] % multiple
    if not extra:
        return input_ids, layout, labels
    input_ids = torch.cat([input_ids, input_ids.new_full((extra,), pad_token_id)])
    if labels is not None:
        labels = torch.cat([labels, labels.new_full((extra,), IGNORE_INDEX)])
    lengths = list(layout.lengths) + [extra]
    layout = PackedLayout.from_lengths(lengths, layout.device, max(layout.max_seqlen, extra))
    return input_ids, layout, labels
