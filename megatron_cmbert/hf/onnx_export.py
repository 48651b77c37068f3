"""ONNX graph of an exported encoder (input_ids, attention_mask -> last_hidden_state), dynamic batch and
sequence axes, checked with onnxruntime against the same model in PyTorch.

Why it works where ModernBERT exports often fail: the model is loaded with eager attention (no
flash-attn unpadding, no torch.compile), and traced by torch.export (the `dynamo=True` exporter), which
keeps the sliding-window mask as arithmetic on the sequence axis rather than baking in the example length.
The check runs shapes other than the traced one, longer than the local window, with padding.
"""
from __future__ import annotations

import os

import torch

ONNX_FILE = os.path.join("onnx", "model.onnx")
OPSET = 18


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _load_encoder(out: str, remote_code: bool):
    from transformers import AutoModel

    from megatron_cmbert.hf.common import load_kwargs

    return AutoModel.from_pretrained(out, attn_implementation="eager",
                                     **load_kwargs(torch.float32, remote_code)).eval()


def check_shapes(window: int, max_length: int) -> list[tuple[int, int]]:
    """(batch, seq) pairs other than the traced one: short, past the local window, past twice the window."""
    return [(b, min(max_length, n)) for b, n in ((1, 7), (3, window + 9), (2, 2 * window + 13))]


def export_onnx(out: str, ck, log=print) -> float:
    """Writes out/onnx/model.onnx; returns the largest |difference| onnxruntime vs PyTorch over real tokens."""
    import onnxruntime

    from megatron_cmbert.hf.common import is_remote_code

    encoder = _Encoder(_load_encoder(out, is_remote_code(ck.config))).eval()
    config = ck.config
    path = os.path.join(out, ONNX_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(5, config.vocab_size, (2, min(ck.seq_length, config.local_attention + 5)),
                            generator=generator)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with torch.no_grad():
        torch.onnx.export(encoder, (example, torch.ones_like(example)), path, dynamo=True, opset_version=OPSET,
                          dynamic_shapes=dynamic, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for b, n in check_shapes(config.local_attention, ck.seq_length):
        ids = torch.randint(5, config.vocab_size, (b, n), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, max(1, n // 2):] = 0  # a padded row
        with torch.no_grad():
            expected = encoder(ids, mask)
        got = torch.as_tensor(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        diff = (got - expected)[mask.bool()].abs().max().item()
        log(f"onnx: batch {b} x {n} tokens: largest difference {diff:.3e}")
        if diff != diff:  # NaN
            return diff
        worst = max(worst, diff)
    return worst
