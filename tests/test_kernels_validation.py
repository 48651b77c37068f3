"""`auto` and the GPU validation record (kernels/validation.py): both states on a CPU machine.

There is no CUDA device here, so the device's identity (name, torch, triton) and the backends' own
availability are stood in for; what is tested is the decision: a Triton kernel only where a record matches
the GPU, the versions and the kernel's current source, the next backend (with the reason in the auto log)
everywhere else.
"""
import json
import logging

import pytest
import torch

from megatron_cmbert.kernels import registry, validation

CUDA = torch.device("cuda")
H200 = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0"}


@pytest.fixture
def gpu_machine(monkeypatch, tmp_path):
    """A CUDA machine as the registry sees it: every backend runs except flash_attn (not installed)."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(validation, "current_identity", lambda device: dict(H200))
    monkeypatch.setattr(registry.Kernel, "unavailable_reason",
                        lambda self, device, dtype: "not importable" if self.backend == "flash_attn" else None)
    records = tmp_path / "gpu_validation.json"
    monkeypatch.setenv(validation.RECORDS_ENV, str(records))
    return records


def write(path, **changes):
    record = {**H200, "ops": {op: validation.source_hash(op) for op in validation.SOURCES}, "commit": "x",
              "date": "2026-12-01", "evidence": "test", **changes}
    path.write_text(json.dumps({"records": [record]}))


def test_without_a_record_auto_keeps_the_faster_non_triton_backends(gpu_machine):
    picked = {op: registry.pick_auto(op, CUDA, torch.bfloat16) for op in registry.OPS}
    assert {op: name for op, (name, _) in picked.items()} == {"attention": "flex", "rope": "reference",
                                                              "geglu": "reference", "rms_norm": "reference"}
    assert any("triton: not validated on NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0" in s
               for s in picked["rope"][1])


def test_a_matching_record_turns_every_triton_kernel_on(gpu_machine):
    write(gpu_machine)
    assert {op: registry.pick_auto(op, CUDA, torch.bfloat16)[0] for op in registry.OPS} == dict.fromkeys(
        registry.OPS, "triton")
    # the choice a run prints and builds with
    assert set(registry.KernelChoice().resolved(CUDA, torch.bfloat16).as_dict().values()) == {"triton"}


@pytest.mark.parametrize("changes,why", [
    ({"triton": "3.7.0"}, "not validated on"),
    ({"gpu": "NVIDIA A100-SXM4-80GB"}, "not validated on"),
    ({"ops": {"rope": "0" * 64}}, "for other rope kernel source (edited since)"),
])
def test_a_record_for_another_gpu_version_or_source_does_not(gpu_machine, changes, why, caplog):
    write(gpu_machine, **changes)
    kernels = registry.KernelSet()
    with caplog.at_level(logging.INFO, logger="megatron_cmbert.kernels.registry"):
        assert kernels.entry("rope", CUDA, torch.bfloat16).backend == "reference"
    assert why in caplog.text


def test_only_the_recorded_ops_are_turned_on(gpu_machine):
    write(gpu_machine, ops={"rms_norm": validation.source_hash("rms_norm")})
    assert registry.pick_auto("rms_norm", CUDA, torch.bfloat16)[0] == "triton"
    assert registry.pick_auto("geglu", CUDA, torch.bfloat16)[0] == "reference"


def test_cpu_never_auto_picks_the_interpreter_even_with_a_record(gpu_machine):
    write(gpu_machine)
    name, skipped = registry.pick_auto("geglu", torch.device("cpu"), torch.float32)
    assert name == "reference" and "interpreter" in skipped[0]


def test_explicit_names_and_the_environment_override_still_win(gpu_machine, monkeypatch):
    assert registry.KernelChoice.parse("triton").resolved(CUDA, torch.bfloat16).rope == "triton"  # no record
    write(gpu_machine)
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert registry.pick_auto("rope", CUDA, torch.bfloat16)[0] == "reference"


def test_the_committed_record_file_reads_and_add_replaces_same_stack(tmp_path, monkeypatch):
    monkeypatch.delenv(validation.RECORDS_ENV, raising=False)
    assert isinstance(validation.load_records(), list)  # the repository's file parses
    target = tmp_path / "records.json"
    first = {**H200, "ops": {}, "date": "1"}
    validation.add_records([first, {**first, "gpu": "NVIDIA H100 80GB HBM3"}], target)
    merged = validation.add_records([{**first, "date": "2"}], target)
    assert sorted((r["gpu"], r["date"]) for r in merged) == [("NVIDIA H100 80GB HBM3", "1"), ("NVIDIA H200", "2")]
    monkeypatch.setenv(validation.RECORDS_ENV, "")  # empty: no records at all
    assert validation.load_records() == []


def test_write_refuses_a_machine_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert validation.main(["write", str(tmp_path / "r.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
