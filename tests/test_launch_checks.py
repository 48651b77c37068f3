"""Configuration mistakes stop tools/pretrain.py before any process group exists: one line `error: ...`
on stderr from rank 0 only, exit status 2, no traceback, in seconds. Covers the checkpoint-directory rules
too: --load of a directory without a checkpoint, --save over another run's checkpoints, a resume with
another schedule."""
import os
import shutil
import subprocess
import sys

import pytest

from tools import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint_files(folder):
    """A --save directory's entries, without its writer lock (.writer.lock, held while a run writes there)."""
    return [name for name in os.listdir(folder) if name != ".writer.lock"]
PRETRAIN = os.path.join(REPO, "tools", "pretrain.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, news_prefix, inews_train):
    from megatron_cmbert.data.tokenizer import save_tokenizer, train_bpe

    root = tmp_path_factory.mktemp("launch")
    other = root / "other_tok"  # another tokenizer: different training text and size
    save_tokenizer(train_bpe(inews_train[2000:2400], vocab_size=1024, show_progress=False), str(other))
    common = ["--preset", "tiny", "--tokenizer-model", tokenizer_dir, "--data-path", news_prefix,
              "--split", "95,5,0", "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--train-iters", "4", "--lr-warmup-iters", "1", "--log-interval", "1", "--seed", "3"]
    return root, common, str(other)


pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def saved_run(setup):
    """A real run that saved checkpoints at steps 2 and 4."""
    root, common, _ = setup
    save = root / "run"
    res = subprocess.run([sys.executable, PRETRAIN, *common, "--save", str(save), "--save-interval", "2"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(checkpoint_files(save)) == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
    return save


def refused(argv, capsys, monkeypatch, world=None, rank=None) -> str:
    """Run main(argv) in this process; it must exit 2 with exactly one stderr line. Returns that line."""
    for name, value in (("WORLD_SIZE", world), ("RANK", rank)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    prefix = "error: " if rank in (None, 0) else f"error (rank {rank}): "
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def with_flag(common, flag, value):
    """`common` with flag's value replaced."""
    out = list(common)
    out[out.index(flag) + 1] = value
    return out


def test_data_prefix_mistakes_get_a_hint(setup, news_prefix, capsys, monkeypatch):
    _, common, _ = setup
    prefix, data = news_prefix, os.path.dirname(news_prefix)
    line = refused(with_flag(common, "--data-path", prefix[: -len("_text_document")]), capsys, monkeypatch)
    assert f"did you mean {prefix}?" in line  # forgot the _text_document suffix
    line = refused(with_flag(common, "--data-path", prefix + ".bin"), capsys, monkeypatch)
    assert f"pass {prefix}" in line
    line = refused(with_flag(common, "--data-path", os.path.join(data, "missing_text_document")), capsys, monkeypatch)
    assert "missing_text_document" in line and "tools/preprocess_data.py" in line


def test_dataset_built_with_another_tokenizer(setup, capsys, monkeypatch):
    _, common, other = setup
    line = refused(with_flag(common, "--tokenizer-model", other), capsys, monkeypatch)
    assert "news_text_document" in line and "tokenizer" in line


def test_a_tokenizer_dir_that_does_not_load(setup, capsys, monkeypatch, tmp_path):
    _, common, _ = setup
    line = refused(with_flag(common, "--tokenizer-model", str(tmp_path)), capsys, monkeypatch)
    assert f"--tokenizer-model {tmp_path}: no tokenizer.json there" in line
    (tmp_path / "tokenizer.json").write_text("{}")
    line = refused(with_flag(common, "--tokenizer-model", str(tmp_path)), capsys, monkeypatch)
    assert f"--tokenizer-model {tmp_path}: tokenizer.json does not load" in line


@pytest.mark.parametrize("change,world,message", [
    ({"--micro-batch-size": "4"}, 4, "--global-batch-size 8 must be a multiple of --micro-batch-size 4 x data-parallel size 4"),
    ({"--micro-batch-size": "3"}, None, "--global-batch-size 8 must be a multiple of --micro-batch-size 3"),
    ({"--tensor-model-parallel-size": "2"}, 3, "world size 3 (WORLD_SIZE) is not a multiple of --tensor-model-parallel-size 2"),
    ({"--tensor-model-parallel-size": "8"}, 8, "num_attention_heads 4 is not divisible by tensor_model_parallel_size 8"),
    ({"--seq-length": "1024"}, None, "--seq-length 1024 exceeds the model's 512 positions"),
    ({"--split": "a,b"}, None, "--split 'a,b': up to three train,valid,test shares such as 98,2,0"),
    ({"--lr-warmup-iters": "4"}, None, "lr_warmup_iters must be an integer in [0, train_iters)"),
])
def test_layout_and_value_mistakes(setup, capsys, monkeypatch, change, world, message):
    _, common, _ = setup
    argv = list(common)
    for flag, value in change.items():
        argv = with_flag(argv, flag, value) if flag in argv else argv + [flag, value]
    assert message in refused(argv, capsys, monkeypatch, world=world)


def test_unknown_or_missing_flags(setup, capsys, monkeypatch):
    _, common, _ = setup
    assert "unrecognized arguments: --trian-iters" in refused(common + ["--trian-iters", "5"], capsys, monkeypatch)
    assert "required: --tokenizer-model" in refused(["--train-iters", "5"], capsys, monkeypatch)


def test_other_ranks_wait_then_report_with_their_rank(setup, capsys, monkeypatch):
    """Rank 0 speaks first: another rank sleeps the grace period (torchrun ends it there when rank 0 failed
    too), then names itself, so a failure of that rank alone is not lost."""
    _, common, _ = setup
    from megatron_cmbert import cli

    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    line = refused(with_flag(common, "--micro-batch-size", "4"), capsys, monkeypatch, world=4, rank=1)
    assert slept == [cli.OTHER_RANK_GRACE_S] and "--micro-batch-size" in line
    cli.print_error(cli.one_line(ValueError("cannot read\n  /data/x on this node")), process_rank=3)
    assert capsys.readouterr().err == "error (rank 3): cannot read /data/x on this node\n"


def test_load_needs_a_checkpoint(setup, capsys, monkeypatch):
    root, common, _ = setup
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    for where in (empty, root / "typo"):
        line = refused(common + ["--load", str(where), "--save", str(where)], capsys, monkeypatch)
        assert str(where) in line and "a new run does not pass it" in line
    assert not os.listdir(empty)  # nothing trained, nothing written


@pytest.mark.slow
def test_save_over_another_runs_checkpoints_is_refused(setup, saved_run, capsys, monkeypatch):
    _, common, _ = setup
    before = {p: os.path.getmtime(saved_run / p) for p in os.listdir(saved_run)}
    line = refused(common + ["--save", str(saved_run)], capsys, monkeypatch)  # forgot --load
    assert "already holds checkpoints (newest iter_0000004)" in line and "--overwrite" in line
    # resuming an older checkpoint into the same directory would overwrite iter_0000004
    line = refused(common + ["--save", str(saved_run), "--load", str(saved_run / "iter_0000002")], capsys, monkeypatch)
    assert "after step 2 (newest iter_0000004)" in line
    # Stage II style (--finetune restarts at step 0) into a directory that holds checkpoints
    line = refused(common + ["--save", str(saved_run), "--load", str(saved_run), "--finetune"], capsys, monkeypatch)
    assert "after step 0" in line
    assert {p: os.path.getmtime(saved_run / p) for p in os.listdir(saved_run)} == before
    assert (saved_run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


@pytest.mark.slow
def test_resume_with_another_schedule_or_batch_is_refused(setup, saved_run, capsys, monkeypatch):
    _, common, _ = setup
    resume = common + ["--save", str(saved_run), "--load", str(saved_run)]
    line = refused(with_flag(resume, "--train-iters", "8"), capsys, monkeypatch)
    assert "--train-iters 8 (checkpoint: 4)" in line and "--override-schedule" in line
    line = refused(resume + ["--lr", "1e-3"], capsys, monkeypatch)
    assert "--lr 0.001 (checkpoint: 0.0008)" in line
    line = refused(with_flag(resume, "--global-batch-size", "16"), capsys, monkeypatch)
    assert "--global-batch-size 4" not in line and "trained with --global-batch-size 8, not 16" in line
    # accepted with --override-schedule (checks only: the run itself is covered in test_pretrain)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert pretrain.run(with_flag(resume, "--train-iters", "8") + ["--override-schedule", "--check-only"]) == []
    assert "checks passed" in capsys.readouterr().out


@pytest.mark.slow
def test_load_into_another_model_shape_is_refused(setup, saved_run, capsys, monkeypatch, tmp_path):
    _, common, _ = setup
    stage2 = common + ["--save", str(tmp_path / "stage2"), "--load", str(saved_run), "--finetune"]
    line = refused(stage2 + ["--hidden-size", "128"], capsys, monkeypatch)
    assert "--hidden-size 128 (checkpoint: 64)" in line and str(saved_run / "iter_0000004") in line
    line = refused(stage2 + ["--normalization", "LayerNorm"], capsys, monkeypatch)
    assert "--normalization LayerNorm (checkpoint: RMSNorm)" in line


def test_one_line_from_a_fresh_process_and_from_torchrun(setup, news_prefix, tmp_path):
    """The same, seen from outside: a plain launch, and two ranks under torchrun (torchrun adds its own
    failure report around the workers' output; the rank-0 line appears once, rank 1 is ended by torchrun
    during its grace period before it reports)."""
    _, common, _ = setup
    argv = with_flag(common, "--data-path", news_prefix[: -len("_text_document")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, PRETRAIN, *argv], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [res.stderr.strip()] and res.stderr.startswith("error: ")
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          PRETRAIN, *argv], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert res.returncode != 0
    assert (res.stdout + res.stderr).count("error: ") == 1 and "did you mean" in res.stderr
    assert "error (rank 1)" not in res.stderr



@pytest.mark.slow
def test_overwrite_starts_over_and_replaces_the_old_run(setup, saved_run, tmp_path):
    root, common, _ = setup
    save = tmp_path / "run"
    shutil.copytree(saved_run, save)
    res = subprocess.run([sys.executable, PRETRAIN, *with_flag(common, "--train-iters", "3"), "--save", str(save),
                          "--overwrite"], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    # the old steps 2 and 4 are gone (no mix of two runs); the marker names the new run's step
    assert sorted(checkpoint_files(save)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
