"""A tiny checkpoint saved in-process, as training saves one (dist_checkpointing tensors, config.json with the
model and the trained --seq-length, the tokenizer): seconds instead of a tools/pretrain.py run. Shared by
the evaluation tests (test_eval_encoders, test_eval_pppl, test_bench_throughput)."""
import torch

from megatron_cmbert.checkpoint.records import RunRecord, TrainState
from megatron_cmbert.checkpoint.store import save_checkpoint

from megatron_cmbert.data.tokenizer import load_tokenizer
from megatron_cmbert.model import CMBertForMaskedLM
from megatron_cmbert.model.config import get_preset
from megatron_cmbert.parallel import cpu_shim
from megatron_cmbert.parallel.world import Ranks, single_process_group


def tiny_checkpoint(root, tokenizer_dir, normalization="RMSNorm", seed=0, seq_length=48, **overrides):
    """Save a randomly initialised `tiny` preset model (norm weights and decoder bias perturbed so that a
    norm or bias mix-up cannot pass) under `root`; returns (root, the model)."""
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    config = get_preset("tiny", vocab_size=vocab, normalization=normalization, **overrides)
    torch.manual_seed(seed)
    model = CMBertForMaskedLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    cpu_shim.install()  # dist_checkpointing's writer synchronises CUDA, absent on CPU machines
    with single_process_group():
        save_checkpoint(str(root), 1, model, None, Ranks(0, 1, 0, 0, 1), TrainState(step=1),
                        RunRecord(model=config, seq_length=seq_length), tokenizer_dir=tokenizer_dir)
    return root, model.eval()
