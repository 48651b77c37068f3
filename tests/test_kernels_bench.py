"""tools/bench_kernels.py --smoke: the harness runs end to end (tiny shapes, CPU, Triton interpreter)."""
import csv

from kernel_env import fresh_process_only  # first: sets TRITON_INTERPRET before triton loads

import pytest

from tools import bench_kernels

pytestmark = pytest.mark.timeout(300)


def test_bench_smoke_writes_csv_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "bench.csv"
    assert bench_kernels.main(["--smoke", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["op"] for r in rows} == {"attention", "rope", "geglu", "rms_norm"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd_bwd"}
    assert all(float(r["ms"]) > 0 for r in rows)
    assert not (tmp_path / "bench.csv.partial").exists()  # renamed to its final name once complete
    assert {"triton", "reference"} <= {r["impl"] for r in rows}
    printed = capsys.readouterr().out
    assert "measured peaks: copy" in printed and printed.rstrip().splitlines()[-1].startswith("rms_norm")


def test_attention_sweep_times_each_setting_against_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "bench.csv"
    assert bench_kernels.main(["--smoke", "--ops", "rms_norm", "--modes", "fwd", "--attention-sweep",
                               "--csv", str(out)]) == 0
    sweep = [r for r in csv.DictReader(out.open()) if r["op"] == "attention_sweep"]
    # two windows x three kernels x (default + the first alternative under --smoke)
    assert len(sweep) == 12
    assert {r["case"] for r in sweep} == {"S=32 w=global", "S=32 w=128"}
    for r in sweep:
        ms, ratio = float(r["ms"]), float(r["speedup_vs_this"])
        assert ms > 0 and (ratio == 1.0 if r["impl"].endswith("default") else ratio > 0)
    assert "sweep best S=32 w=global dkdv" in capsys.readouterr().out


fresh_process_only(globals(), __file__)
