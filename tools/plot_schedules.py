"""Plot the learning rate and the masking rate against the optimizer step, for the same flags as training.

    python tools/plot_schedules.py --train-iters 1000 --lr-warmup-iters 100 --lr 8e-4 --min-lr 8e-5 \\
        --lr-decay-style damped_cosine --cycles 3 --damping 0.5 --mask-schedule dynamic --output schedules.png
    python tools/plot_schedules.py --train-iters 1000 --lr-decay-style wsd --csv schedules.csv --no-plot

The values come from megatron_cmbert.training.schedules (lr_at, mask_rate_at), the functions the trainer
calls, at every step 0 .. train-iters. The PNG needs matplotlib (drawn with the Agg backend, no display);
--csv writes `step,lr,mask_rate` rows and needs nothing extra.
"""
from __future__ import annotations

import argparse
import csv
import sys

from megatron_cmbert.cli import ToolParser, run_tool
from megatron_cmbert.training.schedules import ScheduleConfig, add_schedule_args, lr_at, mask_rate_at


def parse_args(argv=None) -> argparse.Namespace:
    parser = ToolParser(description=__doc__)
    add_schedule_args(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="schedules.png", help="PNG to write (default schedules.png)")
    out.add_argument("--csv", default=None, help="also write step,lr,mask_rate to this CSV file")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG (e.g. without matplotlib); needs --csv")
    out.add_argument("--dpi", type=int, default=120, help="PNG resolution (default 120)")
    args = parser.parse_args(argv)
    if args.no_plot and not args.csv:
        parser.error("--no-plot without --csv would write nothing")
    try:
        args.config = ScheduleConfig.from_args(args)
    except ValueError as error:  # report config validation like any other bad flag
        parser.error(str(error))
    return args


def schedule_table(cfg: ScheduleConfig) -> list[tuple[int, float, float]]:
    """(step, lr, mask_rate) for every step 0 .. train_iters (the last row shows where training ends)."""
    return [(s, lr_at(s, cfg), mask_rate_at(s, cfg)) for s in range(cfg.train_iters + 1)]


def write_csv(rows, path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("step", "lr", "mask_rate"))
        # repr keeps every digit, so the CSV can be checked against the formulas exactly
        writer.writerows((s, repr(lr), repr(rate)) for s, lr, rate in rows)


def plot(rows, cfg: ScheduleConfig, path: str, dpi: int = 120) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    fig, (ax_lr, ax_mask) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax_lr.plot(steps, [r[1] for r in rows], color="tab:blue")
    ax_lr.set_ylabel("learning rate")
    title = (f"{cfg.lr_decay_style}: lr {cfg.lr:g} -> {cfg.min_lr:g}, "
             f"warmup {cfg.lr_warmup_iters} from {cfg.lr_warmup_init:g}")
    if cfg.lr_decay_style == "damped_cosine":
        title += f", N={cfg.cycles}, gamma={cfg.damping:g}"
    elif cfg.lr_decay_style == "wsd":
        title += f", decay {cfg.lr_wsd_decay_fraction:g} ({cfg.lr_wsd_decay_style})"
    ax_lr.set_title(title, fontsize=10)
    ax_mask.plot(steps, [100.0 * r[2] for r in rows], color="tab:orange")
    ax_mask.set_ylabel("masking rate (%)")
    ax_mask.set_xlabel("optimizer step")
    ax_mask.set_title(f"mask schedule: {cfg.mask_schedule}", fontsize=10)
    for ax in (ax_lr, ax_mask):
        ax.grid(alpha=0.3)
        if cfg.lr_warmup_iters:
            ax.axvline(cfg.lr_warmup_iters, color="gray", linestyle="--", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def run(argv=None) -> list[tuple[int, float, float]]:
    """The (step, lr, mask_rate) rows, written as asked."""
    args = parse_args(argv)
    rows = schedule_table(args.config)
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv} ({len(rows)} rows)")
    if not args.no_plot:
        plot(rows, args.config, args.output, args.dpi)
        print(f"wrote {args.output}")
    return rows


def main(argv=None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
