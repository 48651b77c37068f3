"""tools/plot_metrics.py: a resumed run's files join with each step once (the later file's rows win), runs
overlay, validation PPPL gets its panel, bad rows are named by file:line."""
import json

import pytest

from tools import plot_metrics

pytestmark = pytest.mark.timeout(120)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_row(step, loss):
    return {"step": step, "loss": loss, "accuracy": 0.1, "lr": 1e-3, "mask_rate": 0.3, "grad_norm": 1.0,
            "tokens_per_s": 100.0}


def test_resumed_run_joins_each_step_once_and_runs_overlay(tmp_path):
    # run A: steps 1..6 logged, checkpoint at 4, killed; resumed from 4 it logs 5..8 again with other values
    first = write(tmp_path / "a1.jsonl", [train_row(s, 10.0 - s) for s in range(1, 7)]
                  + [{"step": 6, "valid_loss": 9.9, "valid_pppl_64": 50.0}])
    second = write(tmp_path / "a2.jsonl", [train_row(s, 100.0 + s) for s in range(5, 9)]
                   + [{"step": 8, "valid_loss": 7.0, "valid_pppl_64": 40.0, "valid_pppl_128": 45.0}])
    other = write(tmp_path / "b.jsonl", [train_row(s, 5.0) for s in range(1, 4)])
    out = tmp_path / "curves.png"
    result = plot_metrics.run(["--metrics-file", first, second, "--metrics-file", other, "--label", "A",
                               "--label", "B", "--output", str(out)])
    assert result["labels"] == ["A", "B"] and result["steps"] == [8, 3]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = plot_metrics.load_run([first, second])
    steps, losses = plot_metrics.series(run, "loss")
    assert steps == list(range(1, 9))                                   # each step once
    assert losses == [9.0, 8.0, 7.0, 6.0, 105.0, 106.0, 107.0, 108.0]  # after the resume point, the resumed values
    assert plot_metrics.series(run, "valid_loss") == ([8], [7.0])      # step 6's old validation is gone with it

    fig = plot_metrics.plot([run, plot_metrics.load_run([other])], ["A", "B"], str(out))
    by_title = {ax.get_title(): ax for ax in fig.axes}
    loss_lines = {line.get_label(): list(line.get_xdata()) for line in by_title["loss"].lines}
    assert loss_lines == {"A loss": list(range(1, 9)), "A valid_loss": [8], "B loss": [1, 2, 3]}
    pppl = {line.get_label(): list(line.get_ydata()) for line in by_title["validation pseudo-perplexity"].lines}
    assert pppl == {"A len 64": [40.0], "A len 128": [45.0]}


def test_a_bad_row_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(train_row(1, 1.0)) + "\n{oops\n")
    assert plot_metrics.main(["--metrics-file", str(bad), "--output", str(tmp_path / "x.png")]) == 2
    assert f"{bad}:2: not a metrics row" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
