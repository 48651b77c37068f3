"""tools/bench_loader.py --smoke runs and reports consistent figures."""
from tools import bench_loader


def test_smoke_run(tmp_path):
    result = bench_loader.run(["--smoke", "--output-json", str(tmp_path / "out.json")])
    (run,) = result["runs"]
    assert run["tokens"] > 0 and run["loader_tokens_per_s"] > 0 and run["baseline_tokens_per_s"] > 0
    assert abs(run["ratio"] - run["loader_tokens_per_s"] / run["baseline_tokens_per_s"]) < 1e-12
    assert (tmp_path / "out.json").is_file()
