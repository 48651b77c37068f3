"""TP=2 (megatron-core, gloo) against the single-process plain-PyTorch model, with and without sequence
parallelism: weights from the same seed, logits, loss and every gradient.

Launched by tests/test_model_parallel.py as
    torchrun --standalone --nproc_per_node 2 tests/dist/tp_equivalence.py
Exits non-zero on the first mismatch; rank 0 prints `TP-EQUIVALENCE OK` at the end.
"""
import faulthandler
import sys

import torch
import torch.distributed as dist

from megatron_cmbert.model import IGNORE_INDEX, CMBertForMaskedLM, get_preset
from megatron_cmbert.model.padding import pack_sequences
from megatron_cmbert.parallel.layer_spec import build_masked_lm
from megatron_cmbert.parallel.sharding import allreduce_sequence_parallel_grads, full_grads, full_state_dict

# fp32 throughout; TP only changes the order of the sums in the row-parallel / vocab reductions, which moves
# results by ~1e-7 relative. The bound is 1e-5.
TOLERANCE = 1e-5


def batch(config, tp_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Four documents, two longer than the tiny preset's window (8), 55 tokens: odd, so sequence parallelism
    # needs a padding sequence, which CMBertForMaskedLM appends itself (tp_size=1 here).
    docs = [torch.randint(0, config.vocab_size, (n,), generator=generator) for n in (17, 9, 24, 5)]
    tokens, cu_seqlens, max_seqlen = pack_sequences(docs, pad_to_multiple_of=tp_size)  # 1: the model pads for SP
    labels = torch.full_like(tokens, IGNORE_INDEX)
    chosen = torch.rand(55, generator=generator) < 0.3
    labels[:55][chosen] = tokens[:55][chosen]
    return tokens, cu_seqlens, max_seqlen, labels


def gather_vocab(logits):
    """Vocab-parallel logits -> full vocabulary (last dim)."""
    pieces = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, logits.contiguous())
    return torch.cat(pieces, dim=-1)


def max_diff(a, b):
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite], b[~finite]):
        return float("inf")  # -inf (vocab padding) must sit at the same places
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def check(config, sequence_parallel: bool, rank: int):
    tag = f"[sp={sequence_parallel} rank={rank}]"
    torch.manual_seed(1234)
    reference = CMBertForMaskedLM(config)
    torch.manual_seed(1234)
    model = build_masked_lm(config, sequence_parallel=sequence_parallel)
    assert model.spec.sequence_parallel == sequence_parallel, tag

    # Same seed -> the same logical weights at TP=2 (megatron-core CPU init slices full tensors).
    full = full_state_dict(model)
    reference_params = dict(reference.named_parameters())
    assert full.keys() == reference_params.keys(), f"{tag} names differ: {full.keys() ^ reference_params.keys()}"
    for name, value in full.items():
        assert torch.equal(value, reference_params[name]), f"{tag} init differs for {name}"

    tokens, cu_seqlens, max_seqlen, labels = batch(config, tp_size=1)
    out = model(tokens, cu_seqlens, max_seqlen, labels=labels)
    ref = reference(tokens, cu_seqlens, max_seqlen, labels=labels)
    out.loss.backward()
    ref.loss.backward()
    allreduce_sequence_parallel_grads(model)

    logits = gather_vocab(out.logits.detach())
    # TP keeps equal vocab slices, so its padding ids are there, masked; one process computes no padding logits
    assert torch.isinf(logits[:, config.vocab_size:]).all(), f"{tag} vocab padding not masked"
    assert ref.logits.shape[-1] == config.vocab_size, f"{tag} single-process logits carry vocab padding"
    logits = logits[:, :config.vocab_size]
    assert logits.shape == ref.logits.shape, f"{tag} logits {logits.shape} vs {ref.logits.shape}"
    # the vocab-parallel argmax (spec.argmax) counts the same correct predictions as one process's argmax
    assert out.num_correct.item() == ref.num_correct.item() == (ref.logits.argmax(-1) == labels[labels != -100]).sum()
    worst = {"logits": max_diff(logits, ref.logits.detach()),
             "loss": abs(out.loss.item() - ref.loss.item())}
    grads = full_grads(model)
    for name, param in reference.named_parameters():
        assert param.grad is not None and grads[name] is not None, f"{tag} no grad for {name}"
        assert param.grad.abs().max() > 0, f"{tag} reference grad of {name} is zero: nothing is compared"
        worst[f"grad {name}"] = max_diff(grads[name], param.grad)
    bad = {k: v for k, v in worst.items() if not v <= TOLERANCE}
    assert not bad, f"{tag} differences above {TOLERANCE}: {bad}"
    if rank == 0:
        print(f"{tag} ok: {len(grads)} grads; max |diff| logits {worst['logits']:.2e}, loss {worst['loss']:.2e}, "
              f"grads {max(v for k, v in worst.items() if k.startswith('grad')):.2e}", flush=True)


def main():
    faulthandler.dump_traceback_later(240, exit=True)  # a dead peer would otherwise hang this rank forever
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    for normalization in ("RMSNorm", "LayerNorm"):
        config = get_preset("tiny", normalization=normalization)
        for sequence_parallel in (False, True):
            check(config, sequence_parallel, rank)
    dist.barrier()
    if rank == 0:
        print("TP-EQUIVALENCE OK", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
