"""The training loop's parts, one process: the FLOP count and device peaks (meter.py, against hand-computed
values and the datasheet figures), the throughput meter (on a fake clock), the metrics log's resume
de-duplication, and the stop signal (signals to this process and to a forked child, the time limit)."""
import json
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from megatron_cmbert.model import get_preset
from megatron_cmbert.training import meter, preemption
from megatron_cmbert.training.meter import (ThroughputMeter, attention_pairs, device_peak_flops, model_flops,
                                            peak_by_name, train_flops_per_token)
from megatron_cmbert.training.metrics import MetricsLog
from megatron_cmbert.training.preemption import StopSignal


# -- FLOPs and peaks -------------------------------------------------------------------------------------------
def test_train_flops_per_token_by_hand():
    # The paper's body (28 x 1024, FFN 2624; 10 global layers, keys |i-j| <= 64 in the 18 local ones) with a
    # 32,000 vocabulary: linears 2*(4*1024^2 + 3*1024*2624)*28 = 686,292,992 per token; head
    # 2*(1024^2 + 32000*1024)*0.3 = 20,289,945.6 per token; training = 3x. A 512-token document's local layer
    # sees 512 + 2*(64*512 - 64*65/2) = 61,888 pairs (not 129*512: queries near the ends see fewer keys).
    large = get_preset("large", vocab_size=32000)
    attention_512 = 10 * 4 * 1024 * 512 + 18 * 4 * 1024 * 61_888 / 512  # = 29,883,392 per token
    assert train_flops_per_token(large, 512, 0.3) == pytest.approx(3 * (686_292_992 + attention_512 + 20_289_945.6),
                                                                   rel=1e-12)
    assert train_flops_per_token(large, 512, 0.3) == pytest.approx(2.21e9, rel=3e-3)  # the published 2.21 GFLOP
    # At 8192: global layers see 8192 keys; local 8192 + 2*(64*8192 - 2080) = 1,052,608 pairs.
    attention_8k = 10 * 4 * 1024 * 8192 + 18 * 4 * 1024 * 1_052_608 / 8192
    assert train_flops_per_token(large, 8192, 0.3) == pytest.approx(3 * (686_292_992 + attention_8k + 20_289_945.6),
                                                                    rel=1e-12)
    # tiny: H 64, FFN 96, V 1000, 3 layers (0 global, 1-2 local, keys |i-j| <= 4). Linears 2*(4*64^2 + 3*64*96)*3
    # = 208,896; head 2*(64^2 + 1000*64)*0.5 = 68,096. A document shorter than the window: every layer sees S.
    tiny = get_preset("tiny")
    assert train_flops_per_token(tiny, 4, 0.5) == pytest.approx(3 * (208_896 + 3 * 4 * 64 * 4 + 68_096), rel=1e-12)
    # S=100 local: 100 + 2*(4*100 - 10) = 880 pairs, 8.8 per token
    assert train_flops_per_token(tiny, 100, 0.5) == pytest.approx(
        3 * (208_896 + 4 * 64 * 100 + 2 * 4 * 64 * 8.8 + 68_096), rel=1e-12)


def test_model_flops_of_packed_documents_by_hand():
    # documents of 3 and 10 tokens, 4 predicted: global pairs 9 + 100; local (|i-j| <= 4): 3*3 (shorter than
    # the window) + 10 + 2*(4*10 - 10) = 70
    tiny = get_preset("tiny")
    assert attention_pairs([3, 10]) == 109 and attention_pairs([3, 10], 4) == 9 + 70
    brute = sum(1 for n in (3, 10) for i in range(n) for j in range(n) if abs(i - j) <= 4)
    assert attention_pairs([3, 10], 4) == brute  # against an enumeration of the pairs
    expected = 3 * (208_896 * 13 + 4 * 64 * 109 + 2 * 4 * 64 * 79 + 2 * (64 * 64 + 1000 * 64) * 4)
    assert model_flops(tiny, [3, 10], 4) == pytest.approx(expected, rel=1e-12)
    # padding and empty sequences are not model work: only the real lengths count
    assert model_flops(tiny, [3, 10, 0, 0], 4) == model_flops(tiny, [3, 10], 4)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA A10", 125e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("AMD Instinct MI300X", 1307e12), ("Tesla T4", None), ("NVIDIA A10G", None),
])
def test_peak_table_matches_device_names(name, peak):
    assert peak_by_name(name) == peak


def test_device_peak_flops(monkeypatch):
    assert device_peak_flops("cpu", torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops("cuda:0", torch.bfloat16) == 989e12
    assert device_peak_flops(torch.device("cuda", 0), torch.float16) == 989e12
    assert device_peak_flops("cuda:0", torch.float32) is None  # no single fp32 figure: tokens/s only


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_meter_excludes_paused_time_and_resets(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(meter, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(meter, "device_peak_flops", lambda device, dtype: 1e9)
    tiny = get_preset("tiny")
    m = ThroughputMeter(tiny, "cpu", torch.bfloat16, world_size=2)
    m.add(1000, 2.0e9)
    clock.now += 2.0
    with m.paused():
        clock.now += 30.0  # evaluation / a save
    m.add(600, 1.0e9)
    clock.now += 2.0
    out = m.report()
    assert out["tokens_per_s"] == pytest.approx(1600 / 4.0)
    assert out["mfu"] == pytest.approx(3.0e9 / 4.0 / (1e9 * 2))
    assert out["tflops_per_device"] == pytest.approx(3.0e9 / 4.0 / 2 / 1e12)
    m.add(300, 1.0)
    clock.now += 1.0
    assert m.report()["tokens_per_s"] == pytest.approx(300.0)  # counted from the previous report
    monkeypatch.setattr(meter, "device_peak_flops", lambda device, dtype: None)
    assert "mfu" not in ThroughputMeter(tiny, "cpu", torch.float32, 1).report()


# -- metrics log -----------------------------------------------------------------------------------------------
def test_metrics_log_resume_drops_rows_after_the_checkpoint(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)] + [{"note": "no step"}, {"step": 4, "valid_loss": 2.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    text += json.dumps({"step": 2, "text": "中文"}, ensure_ascii=False) + "\n"
    text += '{"step": 6, "lo'  # the crash cut this line short
    path.write_text(text, encoding="utf-8")
    log = MetricsLog(0, str(path), None, resume_step=3)
    log.log({"step": 4, "loss": 0.5}, "step 4 again")
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}, {"step": 3, "loss": 7.0}, {"note": "no step"},
        {"step": 2, "text": "中文"}, {"step": 4, "loss": 0.5}]
    assert lines[4] == '{"step": 2, "text": "中文"}'  # kept rows are kept verbatim
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left behind
    out = capsys.readouterr().out
    assert "dropped 4 rows after step 3" in out and "step 4 again" in out


def test_metrics_log_appends_without_resume_step(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    first = MetricsLog(0, str(path), None)
    first.log({"step": 1, "loss": 2.0}, "one")
    first.close()
    second = MetricsLog(0, str(path), None)
    second.log({"step": 1, "loss": 3.0}, "again")
    second.close()
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [2.0, 3.0]


def test_metrics_log_writes_nothing_off_rank_zero(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 9}\n')
    log = MetricsLog(1, str(path), str(tmp_path / "tb"), resume_step=0)
    log.log({"step": 1, "loss": 1.0}, "should not print")
    log.close()
    assert path.read_text() == '{"step": 9}\n'
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    assert capsys.readouterr().out == ""


def test_metrics_log_tensorboard_purges_after_resume(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the PyPI package tensorboard (TensorBoard output)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = str(tmp_path / "tb")
    first = MetricsLog(0, None, tb)
    for step in (1, 2, 3):
        first.log({"step": step, "loss": float(step), "skipped": False}, "")
    first.close()
    second = MetricsLog(0, None, tb, resume_step=1)
    second.log({"step": 2, "loss": 20.0}, "")
    second.close()
    events = EventAccumulator(tb)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 20.0)]
    assert "skipped" not in events.Tags()["scalars"]  # booleans are not curves


# -- stop signal -----------------------------------------------------------------------------------------------
def _wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def stop():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    s = StopSignal()
    s.install()
    yield s
    s.uninstall()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # put back as found


def test_sigterm_to_self_stops(stop):
    assert stop.check() is None
    os.kill(os.getpid(), signal.SIGTERM)
    _wait_for(lambda: stop.received)
    assert stop.check() == "SIGTERM" and stop.check(group=None) == "SIGTERM"


def test_first_ctrl_c_asks_to_stop_the_second_interrupts(stop):
    os.kill(os.getpid(), signal.SIGINT)
    _wait_for(lambda: stop.received)
    assert stop.check() == "SIGINT"
    os.kill(os.getpid(), signal.SIGTERM)  # torchrun follows a Ctrl-C with SIGTERM: the stop keeps its name
    time.sleep(0.2)
    assert stop.check() == "SIGINT" and stop.sigints == 1
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(lambda: False, seconds=5)


def test_a_second_ctrl_c_during_a_save_waits_for_it(stop):
    os.kill(os.getpid(), signal.SIGINT)
    _wait_for(lambda: stop.received)
    finished = []
    with pytest.raises(KeyboardInterrupt, match="after the checkpoint was written"):
        with stop.saving():
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-save: no exception here
            time.sleep(0.3)
            finished.append(True)
    assert finished == [True]


def test_sigterm_during_a_save_says_the_save_finishes_first(stop, capfd):
    with stop.saving():
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: stop.received)
    assert stop.check() == "SIGTERM"
    assert "SIGTERM: finishing the checkpoint being written, then stopping" in capfd.readouterr().err


def test_forked_child_ignores_ctrl_c_and_sigterm(stop):
    """A forked child (a loader worker, a checkpoint writer's helper) inherits the handlers: torchrun's stop
    reaches the whole process group, and the child must survive it until its parent ends it."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(20)
        finally:
            os._exit(0)
    status = None
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(pid, sig)
            time.sleep(0.3)
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), f"the child died of {sig.name}"
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert stop.received is None  # the parent was not asked to stop


def test_time_limit_from_construction(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(preemption, "time", SimpleNamespace(monotonic=clock))
    timed = StopSignal(exit_duration_mins=0.5)
    clock.now += 29.9
    assert timed.check() is None
    clock.now += 0.1
    assert timed.check() == "time limit"
    clock.now += 1e6
    assert StopSignal().check() is None  # 0 = no limit
