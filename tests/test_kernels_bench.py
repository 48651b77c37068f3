"""tools/bench_kernels.py --smoke: the harness runs end to end (tiny shapes, CPU, Triton interpreter)."""
import csv

from tools import bench_kernels


def test_bench_smoke_writes_csv_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "bench.csv"
    assert bench_kernels.main(["--smoke", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["op"] for r in rows} == {"attention", "rope", "geglu", "rms_norm"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd_bwd"}
    assert all(float(r["ms"]) > 0 for r in rows)
    assert {"triton", "reference"} <= {r["impl"] for r in rows}
    printed = capsys.readouterr().out
    assert "measured peaks: copy" in printed and printed.rstrip().splitlines()[-1].startswith("rms_norm")
