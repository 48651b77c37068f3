"""tools/pretrain.py end to end on CPU (gloo, torchrun): the same losses for TP=2, DP=2 and one process
at equal tokens per step; exact resume (also after a run killed during a save); loading a TP=2
checkpoint at TP=1; non-finite losses stop or skip. Every launch has a timeout."""
import json
import os
import subprocess
import sys

import pytest

from tools import preprocess_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "tools", "pretrain.py")
TIMEOUT = 240
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, inews_dev):
    root = tmp_path_factory.mktemp("pretrain")
    src = root / "news.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in inews_dev[:200]),
                   encoding="utf-8")
    preprocess_data.main(["--input", str(src), "--tokenizer-model", tokenizer_dir,
                          "--output-prefix", str(root / "news"), "--quiet"])
    common = ["--preset", "tiny", "--tokenizer-model", tokenizer_dir,
              "--data-path", str(root / "news_text_document"), "--split", "95,5,0",
              "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--train-iters", "20", "--lr-warmup-iters", "4", "--lr", "2e-3", "--log-interval", "1",
              "--seed", "7"]
    return root, common


def run(args, root, name, procs=1, env_extra=None, expect_ok=True):
    metrics = root / f"{name}.jsonl"
    if procs == 1:
        cmd = [sys.executable, PRETRAIN]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), PRETRAIN]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    res = subprocess.run(cmd + args + ["--metrics-file", str(metrics)], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env, cwd=REPO,
                         start_new_session=True)  # its own process group (see CMBERT_TEST_KILL_IN_SAVE)
    if expect_ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = [json.loads(line) for line in open(metrics)] if metrics.exists() else []
    return [r for r in records if "loss" in r], res


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


def same_steps(straight, resumed):
    """Bit for bit, as if never stopped."""
    keys = ("step", "loss", "grad_norm", "lr", "mask_rate", "accuracy")
    assert [tuple(r[k] for k in keys) for r in resumed] == [tuple(r[k] for k in keys) for r in straight]


def test_20_steps_equal_10_plus_resume_10(setup, single):
    root, common = setup
    ckpt = root / "ckpt_plain"
    first, _ = run(common + ["--save", str(ckpt), "--save-interval", "10", "--exit-interval", "10"], root, "first10")
    second, res = run(common + ["--save", str(ckpt), "--load", str(ckpt)], root, "last10")
    assert "at step 10" in res.stdout
    same_steps(single, first + second)
    assert (ckpt / "iter_0000020" / "tokenizer" / "tokenizer.json").is_file()
    assert json.load(open(ckpt / "iter_0000020" / "config.json"))["model"]["num_layers"] >= 1


def test_resume_after_a_kill_during_a_save(setup, single):
    root, common = setup
    ckpt = root / "ckpt_torn"
    save = ["--save", str(ckpt), "--save-interval", "5"]
    # killed (SIGKILL) while writing the step-10 checkpoint: the step-5 checkpoint stays the latest
    _, res = run(common + save, root, "killed", env_extra={"CMBERT_TEST_KILL_IN_SAVE": "10"}, expect_ok=False)
    assert res.returncode != 0
    assert (ckpt / "iter_0000010.tmp").is_dir() and not (ckpt / "iter_0000010").exists()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    resumed, res = run(common + save + ["--load", str(ckpt)], root, "resumed")
    assert "resumed from" in res.stdout and "at step 5" in res.stdout
    same_steps(single[5:], resumed)


def test_tp2_checkpoint_resumes_at_tp1(setup, single):
    root, common = setup
    ckpt = root / "ckpt_tp2"
    run(common + ["--tensor-model-parallel-size", "2", "--save", str(ckpt), "--save-interval", "10",
                  "--exit-interval", "10"], root, "tp2_first", procs=2)
    resumed, _ = run(common + ["--load", str(ckpt)], root, "tp1_resumed")
    assert [r["step"] for r in resumed] == list(range(11, 21))
    for a, b in zip(single[10:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # Stage II style: weights only, longer samples, a new schedule
    finetuned, res = run(common + ["--load", str(ckpt), "--finetune", "--train-iters", "3", "--lr-warmup-iters", "1",
                                   "--seq-length", "192", "--lr", "1e-4", "--min-lr", "5e-5"], root, "finetune")
    assert "--finetune" in res.stdout and [r["step"] for r in finetuned] == [1, 2, 3]


def test_non_finite_loss_stops_or_skips(setup):
    root, common = setup
    blowup = ["--lr", "1e30", "--lr-warmup-iters", "0", "--clip-grad", "1e30"]
    _, res = run(common + blowup, root, "nan_stop", expect_ok=False)
    assert res.returncode != 0 and "is not finite; stopping" in res.stdout + res.stderr
    records, _ = run(common + blowup + ["--skip-nan-steps"], root, "nan_skip")
    assert len(records) == 20 and any(r["skipped"] for r in records)
