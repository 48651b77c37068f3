"""Tensor parallelism on 2 CPU processes (gloo): one torchrun launch for all TP=2 vs single-device checks
(tests/dist/tp_equivalence.py), one for the documented smoke command (tools/smoke_model.py)."""
import json

import pytest

LAUNCH_TIMEOUT_S = 200  # as conftest.torchrun


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_tp2_equals_single_device_logits_loss_and_every_grad(torchrun):
    out = torchrun("tests/dist/tp_equivalence.py")
    # RMSNorm and LayerNorm, each without and with sequence parallelism
    assert out.count(" ok: ") == 4, out
    assert "TP-EQUIVALENCE OK" in out


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_documented_smoke_command_runs_forward_and_backward_at_tp2(torchrun, capsys, monkeypatch):
    out = torchrun("tools/smoke_model.py", "--preset", "tiny", "--tensor-model-parallel-size", "2",
                   "--sequence-parallel")
    report = json.loads([line for line in out.splitlines() if line.startswith("{")][0])
    assert report["tensor_model_parallel_size"] == 2 and report["predicted"] > 0
    # Same seed, same batch in one plain-PyTorch process: the TP=2 step must give the same numbers.
    from tools.smoke_model import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--preset", "tiny"]) == 0
    reference = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reference["tensor_model_parallel_size"] == 1 and 0 <= report["tokens"] - reference["tokens"] <= 1
    assert abs(report["loss"] - reference["loss"]) <= 1e-5
    assert abs(report["grad_norm"] - reference["grad_norm"]) <= 1e-5 * reference["grad_norm"]
