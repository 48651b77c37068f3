"""Talking like a tool: eval_pppl keeps each length's result when stopped, plot_metrics names runs by their
folders, progress lines when stderr is a pipe, and one exit-code convention across the converted tools."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from faults.helpers import REPO, error_line, run_cli, write_jsonl

pytestmark = pytest.mark.timeout(240)
CONVERTED = ("preprocess_data.py", "train_tokenizer.py", "inspect_dataset.py", "dedup_minhash.py", "merge_datasets.py",
             "plot_metrics.py", "eval_pppl.py", "bench_loader.py", "bench_preprocess.py", "bench_data_scale.py")


def test_eval_pppl_stopped_after_one_length_keeps_that_result(tmp_path, tokenizer_dir, news_prefix, monkeypatch,
                                                               capsys):
    pytest.importorskip("transformers", reason="needs the optional package transformers (extra hf)")
    from eval_checkpoint import tiny_checkpoint

    from megatron_cmbert.eval import pppl
    from tools import eval_pppl

    ckpt, _ = tiny_checkpoint(tmp_path / "ckpt", tokenizer_dir, seq_length=32)
    argv = ["--load", str(ckpt), "--data-prefix", news_prefix, "--lengths", "16", "40", "--max-units", "30",
            "--pool-tokens", "400", "--bootstrap", "50", "--no-progress", "--device", "cpu"]
    full = eval_pppl.run(argv + ["--output-json", str(tmp_path / "full.json")])  # the uninterrupted reference
    real_cut, calls = pppl.cut_windows, []

    def stop_at_the_second_length(*args, **kwargs):  # Ctrl-C while the second length is being scored
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_cut(*args, **kwargs)
    monkeypatch.setattr(pppl, "cut_windows", stop_at_the_second_length)
    capsys.readouterr()
    out = tmp_path / "stopped.json"
    assert eval_pppl.main(argv + ["--output-json", str(out)]) == 130
    err = capsys.readouterr().err
    assert not out.exists()
    rows = [json.loads(line) for line in open(str(out) + ".partial", encoding="utf-8")]
    assert rows[0]["settings"]["lengths"] == [16, 40] and len(rows) == 2  # today's main: nothing at all
    first = {k: v for k, v in full["results"][0].items() if k != "beyond_trained_length"}
    assert rows[1] == first
    assert re.search(rf"^PPPL @ 16: {first['pppl']:.3f} \[.*\] over 30 units \(\d+ s so far; in {out}\.partial\)$",
                     err, re.M), err


def test_plot_metrics_labels_runs_by_their_folders(tmp_path):
    from tools import plot_metrics

    paths = []
    for run in ("run_a", "run_b"):
        (tmp_path / run).mkdir()
        paths.append(write_jsonl(tmp_path / run / "metrics.jsonl", []))
        open(paths[-1], "w").write(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    result = plot_metrics.run(["--metrics-file", paths[0], "--metrics-file", paths[1], "--output",
                               str(tmp_path / "c.png")])
    assert result["labels"] == ["run_a", "run_b"]  # today's main: "metrics.jsonl" twice


def test_preprocess_and_train_tokenizer_print_progress_lines_into_a_pipe(tmp_path, tokenizer_dir, inews_train):
    src = write_jsonl(tmp_path / "news.jsonl", inews_train[:30])
    size = os.path.getsize(src)
    res = run_cli("preprocess_data.py", "--input", src, "--tokenizer-model", tokenizer_dir, "--output-prefix",
                  tmp_path / "x")
    assert res.returncode == 0
    assert re.search(rf"^preprocess: {size:,}/{size:,} \(100%\) bytes, \d+ s$", res.stderr, re.M), res.stderr
    res = run_cli("train_tokenizer.py", "--input", src, "--vocab-size", "1024", "--pad-vocab", "--output-dir",
                  tmp_path / "tok")
    assert res.returncode == 0, res.stderr
    for name in ("counting characters", "training BPE"):
        assert re.search(rf"^train_tokenizer: {name}: {size:,} bytes read, \d+ s$", res.stderr, re.M), res.stderr


def test_progress_every_interval_when_not_a_terminal(monkeypatch):
    import io

    from megatron_cmbert import cli

    clock = iter(range(0, 1000, 10))  # every reading of the clock 10 s later than the one before
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()  # not a terminal
    with cli.Progress(8, "job", "steps", stream=stream) as bar:
        for _ in range(8):
            bar.update()
    lines = stream.getvalue().splitlines()  # a line once 30 s have passed since the last, and one at the end
    assert [re.sub(r", \d+ s$", "", line) for line in lines] == ["job: 3/8 (38%) steps", "job: 6/8 (75%) steps",
                                                                 "job: 8/8 (100%) steps"]


@pytest.mark.parametrize("tool", CONVERTED)
def test_every_converted_tool_exits_2_on_a_bad_flag_and_0_on_help(tool):
    res = run_cli(tool, "--no-such-flag", timeout=120)
    assert res.returncode == 2
    assert re.fullmatch(r"error: (the following arguments are required: .*|one of the arguments .* is required|"
                        r"unrecognized arguments: --no-such-flag)",
                        error_line(res)), error_line(res)
    res = run_cli(tool, "--help", timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("usage: "), res.stderr


@pytest.mark.parametrize("tool", CONVERTED)
def test_every_converted_tool_uses_the_shell(tool):
    """The pattern of megatron_cmbert/cli.py: run() does the work, main() returns run_tool's code, no SystemExit."""
    source = open(os.path.join(REPO, "tools", tool), encoding="utf-8").read()
    assert "SystemExit" not in source and "sys.exit(main())" in source
    assert re.search(r"^def run\(argv: Optional\[list\[str\]\] = None\)", source, re.M)
    assert re.search(r"^def main\(argv: Optional\[list\[str\]\] = None\) -> int:\n    return cli\.run_tool\(run, "
                     r"argv\)", source, re.M)


def test_a_user_error_is_2_and_an_internal_failure_1(tmp_path, tokenizer_dir):
    res = run_cli("inspect_dataset.py", "--data-prefix", tmp_path / "none", "--tokenizer-model", tokenizer_dir)
    assert res.returncode == 2 and error_line(res) == f"error: {tmp_path}/none.idx not found (a finished build " \
                                                      f"writes it last)"
    code = ("import sys; sys.argv[1:] = ['--input', 'x', '-o', 'y']\n"
            "from megatron_cmbert import cli\n"
            "def run(argv):\n    raise RuntimeError('a bug')\n"
            "sys.exit(cli.run_tool(run))")
    res = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ,
                         PYTHONPATH=REPO), timeout=60)
    assert res.returncode == 1 and "Traceback" in res.stderr  # a bug keeps its traceback
