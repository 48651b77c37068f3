#!/usr/bin/env python3
"""Training curves from tools/pretrain.py's --metrics-file (JSON lines keyed by step) to one PNG.

    python tools/plot_metrics.py --metrics-file run_a/metrics.jsonl --metrics-file run_b/metrics.jsonl \\
        --output curves.png
    python tools/plot_metrics.py --metrics-file stage1.jsonl stage1_resumed.jsonl --label stage1 --output s1.png

Each --metrics-file is one run, drawn overlaid with the others; several files after one --metrics-file are the
pieces of one resumed run, joined in order: a step that appears twice (a run resumed from an earlier
checkpoint repeats the steps after it) keeps its last row, so every step is drawn once. Panels: train and
validation loss, MLM accuracy, learning rate, masking rate, gradient norm, tokens/s, and validation
pseudo-perplexity per length (valid_pppl_N) when logged. The PNG appears by rename when complete.

A run's legend name is its --label, or else the shortest end of its first file's path that tells the runs
apart: the folder names when every run's file has the same name (run_a/metrics.jsonl, run_b/metrics.jsonl ->
"run_a", "run_b"; more folders when those repeat too), the file names (without .jsonl) otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from megatron_cmbert import cli
from megatron_cmbert.errors import UserError

PANELS = [  # (title, metric keys drawn in it, y log scale)
    ("loss", ("loss", "valid_loss"), False),
    ("MLM accuracy", ("accuracy",), False),
    ("learning rate", ("lr",), False),
    ("masking rate", ("mask_rate",), False),
    ("gradient norm", ("grad_norm",), True),
    ("tokens/s", ("tokens_per_s",), False),
]


class MetricsError(UserError, ValueError):
    """A metrics file that cannot be read, with file:line."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = cli.ToolParser(prog="plot_metrics.py", description=__doc__)
    p.add_argument("--metrics-file", nargs="+", action="append", required=True, metavar="FILE",
                   help="one run's JSONL file(s), joined in order (repeat the flag for more runs)")
    p.add_argument("--label", action="append", default=None,
                   help="legend name per run, in --metrics-file order (default: the end of its path that tells the "
                        "runs apart, e.g. the run folder's name)")
    p.add_argument("--output", default="metrics.png", help="PNG to write (default metrics.png)")
    args = p.parse_args(argv)
    if args.label and len(args.label) != len(args.metrics_file):
        p.error(f"{len(args.label)} --label for {len(args.metrics_file)} runs")
    return args


def load_run(paths: list[str]) -> dict[int, dict]:
    """{step: row} of one run's files: rows of the same step merge (a training row and a validation row of
    one step are both kept), and a later file or line replaces a key logged again for that step."""
    rows: dict[int, dict] = {}
    for index, path in enumerate(paths):
        try:
            fh = open(path, encoding="utf-8")
        except OSError as exc:
            raise MetricsError(f"{path}: {exc.strerror}") from None
        with fh:
            seen_here: set[int] = set()
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    step = int(row["step"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise MetricsError(f"{path}:{number}: not a metrics row ({exc})") from None
                if index and step not in seen_here:  # a resumed piece logs the step anew: the earlier
                    rows.pop(step, None)                 # file's row of that step is replaced, not mixed in
                seen_here.add(step)
                rows.setdefault(step, {}).update(row)
    return dict(sorted(rows.items()))


def run_labels(paths: list[str]) -> list[str]:
    """Unique legend names: the shortest trailing part of each path that differs between the runs (module
    docstring); the same file given twice is numbered."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep)[1:] for p in paths]
    names = {q[-1] for q in parts}
    if len(names) == 1 and (len(parts) > 1 or names == {"metrics.jsonl"}):
        parts = [q[:-1] or q for q in parts]  # every file is called the same: their folders tell them apart
    else:
        parts = [q[:-1] + [q[-1][:-len(".jsonl")] if q[-1].endswith(".jsonl") else q[-1]] for q in parts]
    longest = max(len(q) for q in parts)
    for k in range(1, longest + 1):
        labels = ["/".join(q[-k:]) for q in parts]
        if len(set(labels)) == len(labels):
            return labels
    labels = [q[-1] for q in parts]  # one file given for two runs
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def series(run: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    points = [(step, float(row[key])) for step, row in run.items() if isinstance(row.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot(runs: list[dict[int, dict]], labels: list[str], output: str):
    """Draw the runs; returns the matplotlib figure (written to `output` by rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pppl_keys = sorted({k for run in runs for row in run.values() for k in row if k.startswith("valid_pppl_")},
                       key=lambda k: int(k.rsplit("_", 1)[1]))
    panels = PANELS + ([("validation pseudo-perplexity", tuple(pppl_keys), True)] if pppl_keys else [])
    cols = 3
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(5 * cols, 3.4 * ((len(panels) + 2) // 3)),
                             squeeze=False)
    for ax, (title, keys, log) in zip(axes.flat, panels):
        for run, label in zip(runs, labels):
            for key in keys:
                x, y = series(run, key)
                if x:
                    name = label if len(keys) == 1 else f"{label} {key.replace('valid_pppl_', 'len ')}"
                    ax.plot(x, y, marker="o" if key.startswith("valid") else None, markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log and ax.lines:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = f"{output}.partial-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, output)
    return fig


def run(argv: Optional[list[str]] = None) -> dict:
    """Draw the curves; returns {"output", "labels", "steps"} (steps per run)."""
    args = parse_args(argv)
    runs = [load_run(paths) for paths in args.metrics_file]
    labels = args.label or run_labels([paths[0] for paths in args.metrics_file])
    if not any(runs):
        raise MetricsError(f"the metrics files hold no rows: {', '.join(p for ps in args.metrics_file for p in ps)}")
    plot(runs, labels, args.output)
    print(f"wrote {args.output} ({len(runs)} run(s): {', '.join(labels)}; {sum(len(r) for r in runs)} steps)")
    return {"output": args.output, "labels": labels, "steps": [len(r) for r in runs]}


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
