"""tools/pretrain.py end to end on CPU (gloo, torchrun): the same losses for TP=2, DP=2 and one process
at equal tokens per step; exact resume; a metrics file with every step once after a resume; SIGTERM (plain
and under torchrun) saves and exits 0, and the resumed run matches an uninterrupted one; loading a TP=2
checkpoint at TP=1; non-finite losses stop or skip. Every launch has a timeout."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint_files(folder):
    """A --save directory's entries, without its writer lock (.writer.lock, held while a run writes there)."""
    return [name for name in os.listdir(folder) if name != ".writer.lock"]
PRETRAIN = os.path.join(REPO, "tools", "pretrain.py")
TIMEOUT = 240
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, news_prefix):
    root = tmp_path_factory.mktemp("pretrain")
    common = ["--preset", "tiny", "--tokenizer-model", tokenizer_dir, "--data-path", news_prefix, "--split", "95,5,0",
              "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--train-iters", "20", "--lr-warmup-iters", "4", "--lr", "2e-3", "--log-interval", "1",
              "--seed", "7"]
    return root, common


def command(args, procs=1):
    if procs == 1:
        return [sys.executable, PRETRAIN] + args
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), PRETRAIN] + args


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def rows(metrics):
    return [json.loads(line) for line in open(metrics)] if metrics.exists() else []


def run(args, root, name, procs=1, expect_ok=True):
    metrics = root / f"{name}.jsonl"
    res = subprocess.run(command(args + ["--metrics-file", str(metrics)], procs), capture_output=True, text=True,
                         timeout=TIMEOUT, env=ENV, cwd=REPO)
    if expect_ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [r for r in rows(metrics) if "loss" in r], res


@pytest.fixture(scope="module")
def single(setup):
    root, common = setup
    return run(common, root, "single")[0]


def test_layouts_and_loader_workers_give_the_same_losses(setup, single):
    root, common = setup
    tp2, _ = run(common + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], root, "tp2", procs=2)
    dp2, _ = run(common, root, "dp2", procs=2)
    workers, _ = run(common + ["--num-workers", "2"], root, "workers")  # loader processes change nothing
    assert [r["step"] for r in single] == list(range(1, 21))
    assert [(r["loss"], r["grad_norm"]) for r in workers] == [(r["loss"], r["grad_norm"]) for r in single]
    for other in (tp2, dp2):
        assert len(other) == len(single)
        for a, b in zip(single, other):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
            assert b["mask_rate"] == a["mask_rate"] and b["lr"] == a["lr"]
    assert single[-1]["loss"] < single[0]["loss"]  # it learns


KEYS = ("step", "loss", "grad_norm", "lr", "mask_rate", "accuracy")


def same_steps(straight, resumed):
    """Bit for bit, as if never stopped."""
    assert [tuple(r[k] for k in KEYS) for r in resumed] == [tuple(r[k] for k in KEYS) for r in straight]


def test_20_steps_equal_10_plus_resume_10(setup, single):
    root, common = setup
    ckpt, cache = root / "ckpt_plain", root / "sample_cache"
    # Both halves read the sample indices from their own cache (the first builds it, the resume reuses it);
    # the uninterrupted run used the default cache beside the dataset.
    first, _ = run(common + ["--save", str(ckpt), "--save-interval", "10", "--exit-interval", "10",
                             "--data-cache-path", str(cache)], root, "first10")
    built = {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix == ".npy"}
    second, res = run(common + ["--save", str(ckpt), "--load", str(ckpt), "--data-cache-path", str(cache)],
                      root, "last10")
    assert "at step 10" in res.stdout
    same_steps(single, first + second)
    assert built and {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix == ".npy"} == built
    assert (ckpt / "iter_0000020" / "tokenizer" / "tokenizer.json").is_file()
    config = json.load(open(ckpt / "iter_0000020" / "config.json"))
    assert config["model"]["num_layers"] == 3 and config["train"]["schedule"]["train_iters"] == 20
    assert config["args"]["global_batch_size"] == 8 and config["args"]["load"] == str(ckpt)


def test_a_resume_after_a_crash_logs_every_step_once(setup, single):
    """Steps 11-20 were logged and then lost (the step-20 checkpoint is torn: a data file truncated, as by a
    node failure): --load DIR falls back to step 10 with a warning, and the resumed run replaces rows 11-20
    of the metrics file instead of appending duplicates. Then the explicit way back: --load DIR/iter_0000010
    --overwrite."""
    root, common = setup
    ckpt, metrics = root / "ckpt_crash", root / "crash.jsonl"
    args = common + ["--save", str(ckpt), "--save-interval", "10", "--metrics-file", str(metrics)]
    subprocess.run(command(args), check=True, capture_output=True, timeout=TIMEOUT, env=ENV, cwd=REPO)
    assert [r["step"] for r in rows(metrics)] == list(range(1, 21))
    torn = sorted((ckpt / "iter_0000020").glob("*.distcp"))[0]
    torn.write_bytes(torn.read_bytes()[:1000])
    for load in (["--load", str(ckpt)], ["--load", str(ckpt / "iter_0000010"), "--overwrite"]):
        res = subprocess.run(command(args + load), capture_output=True, text=True, timeout=TIMEOUT, env=ENV, cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "at step 10" in res.stdout
        if load == ["--load", str(ckpt)]:
            assert f"skipping {ckpt / 'iter_0000020'}" in res.stderr and str(torn) in res.stderr
        logged = [r for r in rows(metrics) if "loss" in r]
        assert [r["step"] for r in logged] == list(range(1, 21))  # each step exactly once
        same_steps(single, logged)
        assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "20"


def wait_for_rows(metrics, count, proc, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while len(rows(metrics)) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no training steps logged in time"
        time.sleep(0.2)


@pytest.mark.parametrize("procs", [1, 2])
def test_sigterm_saves_and_the_resumed_run_matches(setup, procs):
    """SIGTERM (to the process, or to both torchrun workers, as a scheduler's preemption does) finishes the
    step, saves, exits 0 and prints the resume command; the resumed run logs every step once, with the
    losses of an uninterrupted run. A long schedule (200 steps) so the signal always comes mid-run; both
    runs stop at step 12 (--exit-interval) to stay short."""
    root, common = setup
    long = common[:common.index("--train-iters")] + ["--train-iters", "200"] + common[common.index("--train-iters") + 2:]
    reference, _ = run(long + ["--exit-interval", "12"], root, f"ref{procs}", procs=procs)
    ckpt, metrics = root / f"ckpt_sigterm{procs}", root / f"sigterm{procs}.jsonl"
    args = long + ["--save", str(ckpt), "--save-interval", "50", "--metrics-file", str(metrics)]
    proc = subprocess.Popen(command(args, procs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO, start_new_session=True)
    try:
        wait_for_rows(metrics, 3, proc)
        if procs == 1:
            targets = [psutil.Process(proc.pid)]
        else:  # the two ranks torchrun started (not torchrun itself, nor their data-loader workers)
            targets = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if PRETRAIN in p.cmdline() and p.name() != "pt_data_worker"]
            assert len(targets) == 2
        for p in targets:
            p.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    stopped = rows(metrics)[-1]["step"]
    assert 3 <= stopped < 12
    assert f"saved step {stopped}; resume with: " in out and "Traceback" not in err
    printed = shlex.split(out.split("resume with: ", 1)[1].splitlines()[0])  # the command it suggests
    assert printed[printed.index("tools/pretrain.py") + 1:] == args + ["--load", str(ckpt)]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    resumed, res = run(args + ["--load", str(ckpt), "--exit-interval", "12", "--keep-last", "1"], root,
                       f"sigterm{procs}", procs=procs)
    assert f"at step {stopped}" in res.stdout
    assert sorted(checkpoint_files(ckpt)) == ["iter_0000012", "latest_checkpointed_iteration.txt"]  # --keep-last 1
    assert [r["step"] for r in resumed] == list(range(1, 13))  # the same file: every step once
    same_steps(reference, resumed)


def test_time_limit_stops_cleanly(setup):
    root, common = setup
    ckpt = root / "ckpt_time"
    records, res = run(common + ["--save", str(ckpt), "--exit-duration-in-mins", "0.0001"], root, "time")
    assert [r["step"] for r in records] == [1]
    assert "stopped by time limit: saved step 1; resume with: " in res.stdout
    assert (ckpt / "iter_0000001").is_dir()


def test_tp2_checkpoint_resumes_at_tp1(setup, single):
    root, common = setup
    ckpt = root / "ckpt_tp2"
    run(common + ["--tensor-model-parallel-size", "2", "--save", str(ckpt), "--save-interval", "10",
                  "--exit-interval", "10"], root, "tp2_first", procs=2)
    resumed, _ = run(common + ["--load", str(ckpt), "--save", str(ckpt)], root, "tp1_resumed")
    assert [r["step"] for r in resumed] == list(range(11, 21))
    for a, b in zip(single[10:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # Stage II style: weights only, longer samples, a new schedule (and a new directory)
    finetuned, res = run(common + ["--load", str(ckpt), "--finetune", "--train-iters", "3", "--lr-warmup-iters", "1",
                                   "--seq-length", "192", "--lr", "1e-4", "--min-lr", "5e-5",
                                   "--save", str(root / "ckpt_stage2")], root, "finetune")
    assert "--finetune" in res.stdout and [r["step"] for r in finetuned] == [1, 2, 3]


def test_non_finite_loss_stops_or_skips(setup):
    root, common = setup
    blowup = ["--lr", "1e30", "--lr-warmup-iters", "0", "--clip-grad", "1e30"]
    _, res = run(common + blowup, root, "nan_stop", expect_ok=False)
    assert res.returncode == 1 and "is not finite; stopping" in res.stderr and "Traceback" not in res.stderr
    records, _ = run(common + blowup + ["--skip-nan-steps"], root, "nan_skip")
    assert len(records) == 20 and any(r["skipped"] for r in records)


def test_pppl_validation_metric_matches_the_saved_model(setup, tmp_path):
    """--eval-pppl-lengths at TP=2 (sequence parallel) logs the PPPL that the saved weights give in one process
    (our reference model, the same windows): the in-loop metric is the model's, not an artefact of sharding."""
    import numpy as np

    from megatron_cmbert.data.pretrain_data import TokenDataset, split_ranges
    from megatron_cmbert.data.tokenizer import CLS_ID, MASK_ID, SEP_ID
    from megatron_cmbert.eval.pppl import evaluate_lengths, model_nll_fn, stream_from_prefix
    from megatron_cmbert.checkpoint.reader import build_model, read_checkpoint

    root, common = setup
    args = dict(zip(common[::2], common[1::2]))
    flags = common + ["--train-iters", "6", "--eval-interval", "6", "--eval-pppl-lengths", "32", "64",
                      "--eval-pppl-max-units", "12", "--save", str(tmp_path / "ck"), "--save-interval", "6",
                      "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    run(flags, root, "pppl", procs=2)
    logged = [r for r in rows(root / "pppl.jsonl") if "valid_pppl_32" in r]
    assert len(logged) == 1 and logged[0]["step"] == 6 and "valid_pppl_64" in logged[0]

    ck = read_checkpoint(str(tmp_path / "ck"))
    model = build_model(ck.config, ck.state_dict)
    prefix = args["--data-path"]
    valid = split_ranges(args["--split"], len(TokenDataset(prefix, check=False).lengths))[1]
    pool = stream_from_prefix(prefix, 2 * 64, doc_range=valid)
    expected = evaluate_lengths(model_nll_fn(model), *pool, [32, 64], cls_id=CLS_ID, sep_id=SEP_ID,
                                mask_id=MASK_ID, max_units=12, seed=int(args["--seed"]), bootstrap=0)
    for result in expected:
        got = logged[0][f"valid_pppl_{result.length}"]
        assert np.isclose(got, result.pppl, rtol=1e-4), (result.length, got, result.pppl)
        assert 1.0 < result.pppl < 5 * ck.config.vocab_size  # a real perplexity, not a placeholder
