"""The aten ops one gradient clip + StableAdamW step dispatches, and its device reads, counted by the
PyTorch profiler (CPU): what becomes kernel launches and host syncs on a GPU.

    python tools/bench_optimizer.py --presets tiny large

An op counts when it is not inside another aten op (a foreach op's per-tensor loop on CPU is its children;
on a GPU it is a few multi-tensor launches). Device reads are `aten::_local_scalar_dense` (.item(), float()),
host-built tensors `aten::lift_fresh` (torch.tensor(list)), which on a GPU wait for the device. The first
step creates the moments and is not counted. Runs against any checkout of the package on PYTHONPATH (the
per-tensor optimizer before commit 82c5010 included).
"""
from __future__ import annotations

import sys

import torch

from megatron_cmbert.cli import ToolParser, run_tool


def count_step(preset: str, seed: int = 0) -> dict:
    from megatron_cmbert.model import CMBertForMaskedLM, get_preset
    from megatron_cmbert.training.optimizer import StableAdamW, clip_grad_norm, param_groups

    torch.manual_seed(seed)
    model = CMBertForMaskedLM(get_preset(preset))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = StableAdamW(param_groups(model), lr=1e-3)
    def step():
        for p in params:
            p.grad = torch.randn_like(p)
        clip_grad_norm(params, 1.0)
        optimizer.step()

    step()  # creates the moments: not counted
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    # aten ops, the grads' own drawing (inside the profiled call) left out
    events = [e for e in prof.events() if e.name.startswith("aten::") and e.name != "aten::randn_like"]
    dispatched = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"preset": preset, "tensors": len(params), "ops": len(dispatched),
            "device_reads": sum(e.name == "aten::_local_scalar_dense" for e in events),
            "host_built_tensors": sum(e.name == "aten::lift_fresh" for e in dispatched)}


def run(argv=None) -> list[dict]:
    parser = ToolParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "large"], help="model presets (default tiny large)")
    args = parser.parse_args(argv)
    rows = [count_step(preset) for preset in args.presets]
    print(f"{'preset':<8}{'tensors':>8}{'ops':>8}{'device reads':>14}{'host-built tensors':>20}")
    for r in rows:
        print(f"{r['preset']:<8}{r['tensors']:>8}{r['ops']:>8}{r['device_reads']:>14}{r['host_built_tensors']:>20}")
    print(f"torch {torch.__version__}, one clip + step after the first, counted by torch.profiler on CPU")
    return rows


def main(argv=None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
