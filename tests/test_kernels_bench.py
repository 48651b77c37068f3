"""tools/bench_kernels.py --smoke: the harness runs end to end (tiny shapes, CPU, Triton interpreter), times the
packed (demo corpus) case beside the equal-length one, and exits 1 when the Triton rows it exists for fail."""
import csv
import re

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
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd_bwd", "plan"}
    assert all(float(r["ms"]) > 0 for r in rows if r["mode"] != "plan")
    # the packed case (demo corpus lengths) beside the equal one, FlexAttention timed on it as the baseline
    attention = {(r["case"], r["mode"], r["impl"]) for r in rows if r["op"] == "attention"}
    for case in ("S=32 packed w=global", "S=32 packed w=16", "S=32 equal w=global"):
        assert {(case, "fwd", "triton"), (case, "fwd", "flex"), (case, "bwd", "triton"), (case, "plan", "flex"),
                (case, "plan", "triton")} <= attention
    assert not (tmp_path / "bench.csv.partial").exists()  # renamed to its final name once complete
    assert {"triton", "reference"} <= {r["impl"] for r in rows}
    printed = capsys.readouterr().out
    assert "measured peaks: copy" in printed and printed.rstrip().splitlines()[-1].startswith("rms_norm")
    assert "packed S=32: " in printed and "document lengths: characters / 1.35" in printed


def _broken(*args, **kwargs):
    raise RuntimeError("kernel broken on purpose")


@pytest.mark.parametrize("op,module,function", [("attention", "attention_triton", "attend"),
                                                 ("rms_norm", "rms_norm_triton", "rms_norm_triton")])
def test_bench_exits_nonzero_when_the_triton_rows_fail(tmp_path, capsys, monkeypatch, op, module, function):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import importlib

    monkeypatch.setattr(importlib.import_module(f"megatron_cmbert.kernels.{module}"), function, _broken)
    out = tmp_path / "bench.csv"
    assert bench_kernels.main(["--smoke", "--ops", op, "--modes", "fwd", "--impls", "reference",
                               "--csv", str(out)]) == 1
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["impl"] != "triton" or r["mode"] == "plan" for r in rows)  # the baselines still ran
    captured = capsys.readouterr()
    assert "triton: FAILED (RuntimeError: kernel broken on purpose)" in captured.out
    assert captured.err.startswith("error: ") and "Triton rows failed (0 ran)" in captured.err


def test_packed_lengths_are_a_training_micro_batch():
    doc_lengths, how = bench_kernels.corpus_lengths(bench_kernels.DEMO_CORPUS, None)
    assert len(doc_lengths) > 3000 and how == "characters / 1.35"
    lengths, about = bench_kernels.packed_lengths(doc_lengths, 1024, 65536)
    real = lengths[:int(re.match(r"(\d+) sequences", about).group(1))]  # then the padding one, then empties
    assert sum(lengths) == 65536 and len(lengths) == 65536 // 3  # the budget, in a fixed number of slots
    assert max(real) <= 1024 and 500 < len(real) < 700  # ~110-token documents, pieces of at most S
    assert lengths[len(real) + 1:] == [0] * (len(lengths) - len(real) - 1)


def test_attention_sweep_times_each_setting_against_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "bench.csv"
    assert bench_kernels.main(["--smoke", "--ops", "rms_norm", "--modes", "fwd", "--attention-sweep",
                               "--csv", str(out)]) == 0
    sweep = [r for r in csv.DictReader(out.open()) if r["op"] == "attention_sweep"]
    # two windows x three kernels x (default + the first alternative under --smoke)
    assert len(sweep) == 12
    assert {r["case"] for r in sweep} == {"S=32 packed w=global", "S=32 packed w=128"}
    for r in sweep:
        ms, ratio = float(r["ms"]), float(r["speedup_vs_this"])
        assert ms > 0 and (ratio == 1.0 if r["impl"].endswith("default") else ratio > 0)
    assert "sweep best S=32 packed w=global dkdv" in capsys.readouterr().out


fresh_process_only(globals(), __file__)
