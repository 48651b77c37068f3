"""The attention tests' oracle: dense softmax attention in fp64 with the document x window mask built from
scratch (flash-attention's construct_local_mask), shared by test_model_attention.py and
test_kernels_attention.py (tests/ is on sys.path under pytest's default import mode)."""
import torch


def construct_local_mask(lengths, window, device=None):
    """(T, T) bool: same sequence and i - left <= j <= i + right (negative = unbounded)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    total = doc.numel()
    i = torch.arange(total, device=device)[:, None]
    j = torch.arange(total, device=device)[None, :]
    keep = doc[:, None] == doc[None, :]
    left, right = window
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def dense_fp64(q, k, v, lengths, window, scale=None):
    """softmax(q k^T * scale + mask) v over all tokens at once, in fp64 (default scale head_dim ** -0.5)."""
    q, k, v = (t.double() for t in (q, k, v))
    keep = construct_local_mask(lengths, window, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    return torch.einsum("hij,jhd->ihd", scores.masked_fill(~keep, float("-inf")).softmax(-1), v)
