"""tools/bench_train.py: the timed-interval arithmetic against hand-computed values, a smoke run of the real
pretraining path at two lengths, flags passed through to pretrain, and a failing length reported by its
error instead of a number."""
import json

import pytest

from tools import bench_train

pytestmark = pytest.mark.timeout(300)


def test_timed_rate_drops_the_warmup_interval_and_combines_by_time():
    records = [{"step": 2, "tokens_per_s": 10.0, "mfu": 0.01},       # warm-up: dropped
               {"step": 2, "valid_loss": 3.0},                       # not a training record
               {"step": 4, "tokens_per_s": 200.0, "mfu": 0.2},
               {"step": 6, "tokens_per_s": 400.0, "mfu": 0.4}]
    # equal tokens per interval: 2 intervals in 1/200 + 1/400 s per token -> 266.67 tok/s
    rate = bench_train.timed_rate(records, warmup_steps=2)
    assert rate["tokens_per_s"] == pytest.approx(800 / 3) and rate["mfu"] == pytest.approx(0.8 / 3)
    assert "mfu" not in bench_train.timed_rate([{"step": 4, "tokens_per_s": 5.0}], 2)  # CPU / fp32: none
    with pytest.raises(ValueError, match="after step 6"):
        bench_train.timed_rate(records, warmup_steps=6)


def test_bad_sizes_are_refused():
    from megatron_cmbert.cli import UsageError

    with pytest.raises(UsageError):
        bench_train.parse_args(["--tokenizer-model", "t", "--data-path", "d", "--seq-lengths", "1000"])
    with pytest.raises(UsageError):
        bench_train.parse_args(["--tokenizer-model", "t", "--data-path", "d", "--warmup-steps", "3",
                                "--timed-steps", "4"])
    args, rest = bench_train.parse_args(["--tokenizer-model", "t", "--data-path", "d", "--",
                                         "--attention-backend", "reference"])
    assert rest == ["--attention-backend", "reference"] and args.seq_lengths == [1024, 8192]


def test_smoke_run_on_real_text(tokenizer_dir, news_prefix, tmp_path, capsys):
    out = tmp_path / "train.json"
    results = bench_train.run(["--tokenizer-model", tokenizer_dir, "--data-path", news_prefix, "--smoke",
                               "--kernels", "reference", "auto", "--output-json", str(out), "--",
                               "--attention-backend", "reference"])
    assert json.loads(out.read_text()) == results
    assert [(r["seq_length"], r["kernels"]) for r in results["runs"]] == [(64, "reference"), (64, "auto"),
                                                                          (128, "reference"), (128, "auto")]
    assert [r["micro_batch_size"] for r in results["runs"]] == [16, 16, 8, 8]  # 1,024 tokens per step
    # each row names the kernels that ran: auto resolved on this CPU machine, the attention flag passed through
    assert {r["kernels_ran"] for r in results["runs"]} == {
        "attention=reference,rope=reference,geglu=reference,rms_norm=reference"}
    for run in results["runs"]:
        assert "error" not in run, run
        assert run["tokens_per_s"] > 0 and 0.1 <= run["mask_rate"] <= 0.35
        baseline = results["baseline_matmul_flops_per_s"]
        assert run["ratio_to_matmul"] == pytest.approx(run["model_flops_per_s"] / baseline)
    assert results["pretrain_flags"] == ["--attention-backend", "reference"]
    printed = capsys.readouterr().out
    assert "baseline:" in printed and "vs matmul" in printed


def test_a_failing_length_reports_its_error_and_the_exit_status_says_so(tokenizer_dir, tmp_path, capsys):
    argv = ["--tokenizer-model", tokenizer_dir, "--data-path", str(tmp_path / "missing"), "--smoke",
            "--seq-lengths", "64"]
    results = bench_train.run(argv)
    (run,) = results["runs"]
    assert "tokens_per_s" not in run and "missing" in run["error"]
    assert bench_train.main(argv) == 1  # the rows it exists for failed: not a success
    assert "error (auto)" in capsys.readouterr().out
