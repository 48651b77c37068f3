"""tools/bench_data_scale.py: its synthetic datasets are valid Megatron datasets (read back by megatron-core's
own reader) with sparse .bin files, and the smoke run measures every figure in separate processes."""
import json
import os

import numpy as np
import pytest

from tools import bench_data_scale
from tools.bench_data_scale import write_synthetic

pytestmark = pytest.mark.timeout(300)


def test_synthetic_datasets_read_back_with_megatron_core(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lengths = np.array([5, 0, 7, 3])
    dense = write_synthetic(str(tmp_path / "dense"), lengths, vocab=100, seed=0)
    for suffix, dtype in (("", np.uint16), ("_wordstart", np.uint8)):
        ds = IndexedDataset(dense + suffix)
        assert ds.sequence_lengths.tolist() == lengths.tolist() and len(ds) == 4
        assert ds[2].dtype == dtype and ds[2].size == 7
    ds = IndexedDataset(dense)  # kept: its views die with its memory map
    tokens = np.concatenate([ds[i] for i in range(4)])
    assert tokens.size == 15 and tokens.min() >= 6 and tokens.max() < 100  # never a special token
    big = np.full(1000, 100_000)  # 10^8 tokens: 200 MB of holes
    sparse = write_synthetic(str(tmp_path / "sparse"), big, sparse=True)
    st = os.stat(sparse + ".bin")
    assert st.st_size == 2 * 10**8 and st.st_blocks * 512 < 10**6
    ds = IndexedDataset(sparse)
    assert ds.get(999, offset=99_990, length=10).tolist() == [0] * 10


def test_smoke_run_measures_every_figure(tmp_path):
    out = tmp_path / "scale.json"
    result = bench_data_scale.run(["--smoke", "--workdir", str(tmp_path), "--output-json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (row,) = result["runs"]
    assert row["documents"] == 10_000 and row["tokens"] > 10_000
    assert 0 < row["build_s"] < 120 and 0 < row["import_s"] < row["first_s"] < 120
    assert row["cache_mb"] > 0 and row["peak_rss_mb"] > 0
    # the rank's own memory: the imports plus the data path's few MB (a blend block, buffers)
    assert row["import_uss_mb"] <= row["uss_mb"] < row["import_uss_mb"] + 100
    assert row["pss_total_mb"] > 0 and set(row["ratios"]) == {"uss", "first", "build"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]  # its temporary folder is gone
