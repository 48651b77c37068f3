"""Checkpoints that name what is wrong and fall back to the previous complete one.

In-process tests use a gloo world of one and the tiny model: every way users damage a checkpoint gives a
one-line CheckpointError naming the file, and load_latest falls back to the earlier checkpoint, whose
parameters (kept aside in memory when it was saved) are what ends up in the model. The torn-save test
kills a real tools/pretrain.py run (tests/dist/kill_in_save.py) and resumes it, comparing with an
uninterrupted run, then damages the newest checkpoint and checks that tools/pretrain.py falls back and
redoes the same steps; the two-rank test checks that the ranks agree when only one of them sees a failure.
"""
import os
import shutil
import sys

import pytest
import torch

from megatron_cmbert.checkpoint import store as ckpt
from megatron_cmbert.checkpoint.records import CheckpointError, NoCheckpointError, RunRecord, TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240


def _model_and_optimizer(seed=0):
    from megatron_cmbert.model import get_preset
    from megatron_cmbert.parallel.layer_spec import build_masked_lm
    from megatron_cmbert.training.optimizer import StableAdamW

    torch.manual_seed(seed)
    model = build_masked_lm(get_preset("tiny"))
    return model, StableAdamW(model.parameters(), lr=1e-2)


def _record(seed=0):
    from megatron_cmbert.model import get_preset

    return RunRecord(model=get_preset("tiny"), seq_length=64, args={"seed": seed})


def _fake_step(model, optimizer):
    """Random gradients and one optimizer step: parameters and moments change."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def _snapshot(model, optimizer):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    return params, moments


def _assert_holds(model, optimizer, snapshot):
    params, moments = snapshot
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    for p, m in zip(model.parameters(), moments):
        assert torch.equal(optimizer.state[p]["exp_avg"], m)


@pytest.fixture(scope="module")
def saved(gloo_world, tmp_path_factory):
    """SAVE/iter_0000005 and SAVE/iter_0000010 of one model, with what each held when saved."""
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = root / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"model": {}}')
    save = root / "save"
    model, optimizer = _model_and_optimizer()
    snapshots = {}
    for step in (5, 10):
        _fake_step(model, optimizer)
        snapshots[step] = _snapshot(model, optimizer)
        ckpt.save_checkpoint(str(save), step, model, optimizer, gloo_world,
                             TrainState(step=step, consumed_samples=8 * step), _record(step),
                             tokenizer_dir=str(tokenizer))
    return save, snapshots


@pytest.fixture
def damaged(saved, tmp_path):
    """A fresh copy of the save directory to damage."""
    copy = tmp_path / "save"
    shutil.copytree(saved[0], copy)
    return copy


def _data_files(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".distcp"))


def _truncate(name, size):
    return lambda d: os.truncate(d / name, size)


def _remove(name):
    return lambda d: os.remove(d / name)


def _write(name, text):
    return lambda d: (d / name).write_text(text)


# (damage to iter_0000010, the file the message must name, the reason it must give)
DAMAGE = {
    "data file truncated": (lambda d: os.truncate(d / _data_files(d)[-1], 1000), "<data>", "truncated (1,000 bytes"),
    "data file empty": (lambda d: os.truncate(d / _data_files(d)[0], 0), "<data0>", "truncated (0 bytes"),
    "data file missing": (lambda d: os.remove(d / _data_files(d)[-1]), "<data>", "missing (listed in .metadata)"),
    "metadata.json missing": (_remove("metadata.json"), "metadata.json", "missing"),
    "metadata.json other backend": (_write("metadata.json", '{"sharded_backend": "zarr"}'), "metadata.json",
                                    "sharded backend 'zarr'"),
    ".metadata missing": (_remove(".metadata"), ".metadata", "missing"),
    ".metadata truncated": (_truncate(".metadata", 100), ".metadata", "unreadable (UnpicklingError"),
    "common.pt missing": (_remove("common.pt"), "common.pt", "missing"),
    "common.pt truncated": (_truncate("common.pt", 50), "common.pt", "unreadable ("),
    "config.json garbage": (_write("config.json", "{not json"), "config.json", "unreadable"),
    "tokenizer.json empty": (_write("tokenizer/tokenizer.json", ""), "tokenizer.json", "unreadable"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_each_damage_is_named_and_load_latest_falls_back(gloo_world, saved, damaged, case):
    damage, filename, reason = DAMAGE[case]
    newest = damaged / "iter_0000010"
    if filename.startswith("<data"):
        filename = _data_files(newest)[0 if filename == "<data0>" else -1]
    damage(newest)
    with pytest.raises(CheckpointError) as error:
        ckpt.verify_checkpoint(str(newest))
    message = str(error.value)
    assert "\n" not in message and reason in message, message
    assert message.startswith(str(newest / filename) + ":") or message.startswith(str(newest / "tokenizer" / filename)), message

    model, optimizer = _model_and_optimizer(seed=1)  # a different model: the load must overwrite it all
    warnings = []
    path, state = ckpt.load_latest(str(damaged), model, optimizer, gloo_world, warn=warnings.append)
    assert path == str(damaged / "iter_0000005") and state.step == 5
    assert len(warnings) == 1 and f"skipping {newest}: {message}; falling back to {path}" in warnings[0]
    _assert_holds(model, optimizer, saved[1][5])


def test_the_undamaged_newest_checkpoint_loads_silently(gloo_world, saved):
    save, snapshots = saved
    ckpt.verify_checkpoint(str(save / "iter_0000005"))
    model, optimizer = _model_and_optimizer(seed=1)
    warnings = []
    path, state = ckpt.load_latest(str(save), model, optimizer, gloo_world, warn=warnings.append)
    assert (path, state, warnings) == (str(save / "iter_0000010"), TrainState(step=10, consumed_samples=80), [])
    _assert_holds(model, optimizer, snapshots[10])
    assert ckpt.read_train_state(path) == TrainState(step=10, consumed_samples=80)
    assert ckpt.read_run_record(path).args == {"seed": 10}


def test_a_failed_load_after_verification_falls_back(gloo_world, saved, damaged):
    """Bytes garbled inside a data file (same size): structure checks pass, the load itself fails."""
    newest = damaged / "iter_0000010"
    with open(newest / _data_files(newest)[0], "r+b") as fh:
        fh.write(b"\xff" * 64)  # the first stored item's serialised header
    ckpt.verify_checkpoint(str(newest))
    model, optimizer = _model_and_optimizer(seed=1)
    with pytest.raises(CheckpointError) as error:
        ckpt.load_checkpoint(str(newest), model, optimizer, gloo_world)
    assert str(error.value).startswith(f"{newest}: cannot load (rank 0: ") and "\n" not in str(error.value)
    warnings = []
    path, _ = ckpt.load_latest(str(damaged), model, optimizer, gloo_world, warn=warnings.append)
    assert path == str(damaged / "iter_0000005") and "cannot load" in warnings[0]
    _assert_holds(model, optimizer, saved[1][5])


@pytest.mark.parametrize("content, reason", [("", "empty"), ("abc\n", "'abc' is not a step number")])
def test_a_bad_marker_is_named_and_the_newest_complete_checkpoint_loads(gloo_world, saved, damaged, content, reason):
    marker = damaged / ckpt.LATEST
    marker.write_text(content)
    with pytest.raises(CheckpointError, match=f"^{marker}: {reason}"):
        ckpt.read_marker(str(damaged))
    model, optimizer = _model_and_optimizer(seed=1)
    warnings = []
    path, _ = ckpt.load_latest(str(damaged), model, optimizer, gloo_world, warn=warnings.append)
    assert path == str(damaged / "iter_0000010")
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {marker}: {reason}")
    assert warnings[0].endswith(f"; trying the newest complete checkpoint {path}")
    _assert_holds(model, optimizer, saved[1][10])


def test_a_marker_naming_a_deleted_checkpoint_falls_back(gloo_world, saved, damaged):
    shutil.rmtree(damaged / "iter_0000010")
    model, optimizer = _model_and_optimizer(seed=1)
    warnings = []
    path, _ = ckpt.load_latest(str(damaged), model, optimizer, gloo_world, warn=warnings.append)
    assert path == str(damaged / "iter_0000005")
    assert f"names step 10 but {damaged / 'iter_0000010'} is missing" in warnings[0]
    _assert_holds(model, optimizer, saved[1][5])


def test_an_explicit_checkpoint_has_no_fallback(gloo_world, damaged):
    os.remove(damaged / "iter_0000010" / "common.pt")
    model, optimizer = _model_and_optimizer(seed=1)
    warnings = []
    with pytest.raises(CheckpointError, match="common.pt: missing"):
        ckpt.load_latest(str(damaged / "iter_0000010"), model, optimizer, gloo_world, warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].endswith("no older checkpoint to fall back to")


def test_every_candidate_damaged_raises_the_last_error(gloo_world, damaged):
    for step in (5, 10):
        os.remove(damaged / f"iter_{step:07d}" / ".metadata")
    model, optimizer = _model_and_optimizer(seed=1)
    warnings = []
    with pytest.raises(CheckpointError, match=f"^{damaged / 'iter_0000005' / '.metadata'}: missing"):
        ckpt.load_latest(str(damaged), model, optimizer, gloo_world, warn=warnings.append)
    assert len(warnings) == 2 and "no older checkpoint to fall back to" in warnings[1]


def test_listing_and_resolving_are_pure_filesystem(tmp_path):
    save = tmp_path / "save"
    for name in ("iter_0000003", "iter_0000012", "iter_0000007.tmp", "iter_0000002.old", "other"):
        (save / name).mkdir(parents=True)
    (save / "iter_0000009").write_text("a file, not a checkpoint")
    it3, it12 = str(save / "iter_0000003"), str(save / "iter_0000012")
    assert ckpt.list_checkpoints(str(save)) == [(3, it3), (12, it12)]
    assert ckpt.list_checkpoints(str(tmp_path / "absent")) == []
    notes = []
    assert ckpt.resolve_load(str(save), warn=notes.append) == [it12, it3]  # no marker: all, newest first
    assert notes == [f"warning: {save / ckpt.LATEST}: missing; trying the newest complete checkpoint {it12}"]
    (save / ckpt.LATEST).write_text("3\n")  # a valid marker: start there (12 was never marked complete)
    assert ckpt.resolve_load(str(save), warn=pytest.fail) == [it3]
    (save / ckpt.LATEST).write_text("7\n")  # names a missing directory: every complete one
    assert ckpt.resolve_load(str(save)) == [it12, it3]
    assert ckpt.resolve_load(it3) == [it3]  # one checkpoint: exactly it
    with pytest.raises(CheckpointError, match="unfinished or discarded save"):
        ckpt.resolve_load(str(save / "iter_0000007.tmp"))
    with pytest.raises(NoCheckpointError, match="does not exist"):
        ckpt.resolve_load(str(tmp_path / "absent"))
    with pytest.raises(NoCheckpointError, match="no complete checkpoint"):
        ckpt.resolve_load(str(save / "other"))
    (save / "other" / ckpt.LATEST).write_text("7\n")
    with pytest.raises(NoCheckpointError, match=r"no complete checkpoint .*names step 7"):
        ckpt.resolve_load(str(save / "other"))


def test_keep_last_deletes_the_oldest_complete_checkpoints(gloo_world, tmp_path):
    save = tmp_path / "save"
    (save / "iter_0000009").mkdir(parents=True)  # another run's, newer than this run's steps: left alone
    (save / "iter_0000002.tmp").mkdir()  # a torn save: not a complete checkpoint, not touched
    model, optimizer = _model_and_optimizer()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(str(save), step, model, optimizer, gloo_world, TrainState(step=step), _record())
    assert [s for s, _ in ckpt.list_checkpoints(str(save))] == [1, 2, 3, 9]  # keep_last=0 keeps all
    ckpt.save_checkpoint(str(save), 4, model, optimizer, gloo_world, TrainState(step=4), _record(), keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(save))] == [3, 4, 9]
    assert sorted(os.listdir(save)) == ["iter_0000003", "iter_0000004", "iter_0000009", ckpt.LATEST]
    ckpt.save_checkpoint(str(save), 5, model, optimizer, gloo_world, TrainState(step=5), _record(), keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(str(save))] == [5, 9]
    assert ckpt.read_marker(str(save)) == 5
    ckpt.verify_checkpoint(str(save / "iter_0000005"))


# -- whole runs: tools/pretrain.py killed during a save, and two ranks that must agree ------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_dir, news_prefix):
    root = tmp_path_factory.mktemp("torn")
    common = ["--preset", "tiny", "--tokenizer-model", tokenizer_dir, "--data-path", news_prefix, "--split", "95,5,0",
              "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--train-iters", "12", "--lr-warmup-iters", "2", "--lr", "2e-3", "--log-interval", "1", "--seed", "3"]
    return root, common


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_a_kill_during_a_save(corpus, launch_logged):
    root, common = corpus
    pretrain = [sys.executable, os.path.join(REPO, "tools", "pretrain.py")]
    straight, _ = launch_logged(pretrain + common, root, "straight")
    save = root / "ckpt"
    killer = [sys.executable, os.path.join(REPO, "tests", "dist", "kill_in_save.py"), "10"]
    _, res = launch_logged(killer + common + ["--save", str(save), "--save-interval", "5"], root, "killed", expect_ok=False)
    assert res.returncode != 0
    assert (save / "iter_0000010.tmp").is_dir() and not (save / "iter_0000010").exists()
    assert (save / ckpt.LATEST).read_text().strip() == "5"
    resumed, res = launch_logged(pretrain + common + ["--save", str(save), "--save-interval", "5", "--load", str(save)],
                           root, "resumed")
    assert "at step 5" in res.stdout, res.stdout[-2000:]
    keys = ("step", "loss", "grad_norm", "lr", "mask_rate", "accuracy")
    assert [r["step"] for r in straight] == list(range(1, 13))
    assert [tuple(r[k] for k in keys) for r in resumed] == [tuple(r[k] for k in keys) for r in straight[5:]]
    assert ckpt.read_marker(str(save)) == 12 and ckpt.read_train_state(str(save / "iter_0000012")).step == 12
    # the newest checkpoint damaged: the run says so, falls back to step 10 and redoes 11-12 identically
    newest = save / "iter_0000012"
    os.truncate(newest / _data_files(newest)[0], 0)
    redone, res = launch_logged(pretrain + common + ["--save", str(save), "--load", str(save)], root, "fell_back")
    assert f"skipping {newest}: {newest / _data_files(newest)[0]}: truncated (0 bytes" in res.stdout + res.stderr
    assert [tuple(r[k] for k in keys) for r in redone] == [tuple(r[k] for k in keys) for r in straight[10:]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ranks_agree_when_one_of_them_sees_a_failure(torchrun):
    out = torchrun("tests/dist/checkpoint_agreement.py", timeout=TIMEOUT)
    assert "checkpoint agreement: ok" in out


def test_checkpoints_written_before_the_typed_records_still_load(gloo_world, saved, damaged):
    """The layout main wrote before RunRecord/TrainState (format version 1): config.json {"model" with the two
    kernel text fields, "train", "args" holding seq_length}, and train_state an untyped dict. Both read into
    the records, and the checkpoint loads as before."""
    import dataclasses
    import json

    from megatron_cmbert.checkpoint.reader import read_checkpoint
    from megatron_cmbert.kernels.registry import KernelChoice
    from megatron_cmbert.model import get_preset

    newest = damaged / "iter_0000010"
    model = {k: v for k, v in dataclasses.asdict(get_preset("tiny")).items() if k != "kernels"}
    legacy = {"model": {**model, "kernel_backend": "reference", "kernel_overrides": "attention=flex"},
              "train": {"seed": 3}, "args": {"seq_length": 96, "tensor_model_parallel_size": 2, "seed": 3}}
    (newest / "config.json").write_text(json.dumps(legacy))
    common = torch.load(newest / ckpt.COMMON, weights_only=True)
    common["train_state"] = {"step": 10, "consumed_samples": 80, "global_batch_size": 8, "train_loss": 3.5}
    torch.save(common, newest / ckpt.COMMON)

    record = ckpt.read_run_record(str(newest))
    assert (record.seq_length, record.tensor_model_parallel_size, record.args["seed"]) == (96, 2, 3)
    assert record.model.kernels == KernelChoice.parse("reference,attention=flex")
    assert record.model == get_preset("tiny")
    assert ckpt.read_train_state(str(newest)) == TrainState(step=10, consumed_samples=80, global_batch_size=8,
                                                            train_loss=3.5)
    model_, optimizer = _model_and_optimizer(seed=1)
    path, state = ckpt.load_latest(str(damaged), model_, optimizer, gloo_world, warn=pytest.fail)
    assert path == str(newest) and state.step == 10 and state.tokens_seen == 0
    _assert_holds(model_, optimizer, saved[1][10])
    assert read_checkpoint(str(damaged)).seq_length == 96
    # a record from a newer writer is refused in one line, not misread
    (newest / "config.json").write_text(json.dumps({**legacy, "version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        ckpt.read_run_record(str(newest))
