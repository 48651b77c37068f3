"""The training step ready for a GPU, checked on CPU: --compile (torch.compile per encoder layer) compiles once
per layer kind and never for data (static shapes) and gives the eager losses; a step reads the device at most
twice (the counts' all-reduce and the gradient norm's finiteness), nothing per micro-batch or per layer."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "tools", "pretrain.py")


def _flags(tokenizer_dir, news_prefix, metrics):
    return ["--preset", "tiny", "--tokenizer-model", tokenizer_dir, "--data-path", news_prefix, "--split", "98,2,0",
            "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "30",
            "--lr-warmup-iters", "3", "--log-interval", "5", "--seed", "3", "--metrics-file", str(metrics)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compile_recompiles_only_per_layer_kind_and_matches_eager(tokenizer_dir, news_prefix, tmp_path):
    import json

    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        metrics = tmp_path / f"{name}.jsonl"
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_LOGS="recompiles")
        res = subprocess.run([sys.executable, PRETRAIN, *_flags(tokenizer_dir, news_prefix, metrics), *extra],
                             capture_output=True, text=True, timeout=500, env=env, cwd=REPO)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        runs[name] = ([json.loads(line) for line in open(metrics)], res.stderr)
    (eager, _), (compiled, log) = runs["eager"], runs["compiled"]
    assert [r["step"] for r in eager] == [r["step"] for r in compiled] == [5, 10, 15, 20, 25, 30]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    # Each recompile names its frame and the guards that failed. The tiny model has two layer kinds (layer 0:
    # global, no attention pre-norm; layers 1-2: local), so each compiled frame may compile once more, for the
    # other kind; no guard may be about a size or stride (that would be the data changing shape).
    recompiled = re.findall(r"Recompiling function (\w+) in (\S+)", log)
    assert len(recompiled) == len(set(recompiled)), recompiled  # at most one recompile per frame
    guards = [m.group(1) for m in re.finditer(r"- \d+/\d+: (.*?)\s+#", log)]  # the guard, not the source shown
    assert recompiled and guards  # the log was read: TORCH_LOGS=recompiles really printed
    assert not [g for g in guards if re.search(r"size|stride|shape|len\(", g)], guards


class SyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for a GPU (reading values back, or shapes that depend on
    values). On CPU nothing waits, so the same calls are counted by name."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
             "masked_select", "unique", "__array__"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS or (name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor)
                                  and args[1].dtype == torch.bool):
            import traceback

            self.calls.append((name, "".join(traceback.format_stack(limit=6)[:-1])))
        return func(*args, **kwargs)


def test_a_train_step_with_two_micro_batches_reads_the_device_at_most_twice(tokenizer_dir, news_prefix, tmp_path):
    from megatron_cmbert.parallel.world import World
    from megatron_cmbert.training.run import resolve_run
    from megatron_cmbert.training.trainer import Trainer
    from tools import pretrain

    flags = _flags(tokenizer_dir, news_prefix, tmp_path / "m.jsonl") + ["--num-workers", "0"]
    trainer = Trainer(resolve_run(pretrain.parse_args(flags), World(1, 0, 0, 1)))
    loader = iter(trainer.run_loader())
    trainer.train_step(next(loader))  # the first step creates the optimizer state
    micro_batches = next(loader)
    assert len(micro_batches) == 2
    with SyncCounter() as counter:
        stats = trainer.train_step(micro_batches)
    assert stats is not None and stats["grad_norm"] > 0
    names = [name for name, _ in counter.calls]
    assert len(names) <= 2, "\n".join(f"{n}:\n{where}" for n, where in counter.calls)
    assert names == ["tolist", "__float__"]  # the step's counts, then the gradient norm
    # the counter sees what it is for: the evaluation path (predicted positions found from the labels) syncs
    mb = micro_batches[0].unpadded()
    with SyncCounter() as control:
        trainer.model(mb.input_ids, mb.cu_seqlens, mb.max_seqlen, labels=mb.labels)
    assert {"numpy", "nonzero"} <= {name for name, _ in control.calls}  # cu_seqlens to the host, the mask
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
