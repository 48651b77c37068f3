"""tools/bench_vs_hf.py for a few steps of the tiny preset on the session's real news dataset (conftest): the
result's structure, the two models starting from the same loss (identical weights, the same batch), the HF
batch holding exactly the packed tokens, and one-line flag errors."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="needs the optional package transformers")
from tools import bench_vs_hf  # noqa: E402

pytestmark = pytest.mark.timeout(300)
# HF logit parity holds to 1e-5 (tests/test_model_hf_parity.py); a token's cross-entropy moves by at most twice
# the largest logit change (log-sum-exp and the label's logit each move by at most it), so the mean loss at
# step 0 may differ by 2e-5 at most. Measured: 0 to 1e-6 (one fp32 ulp of a loss near 10).
LOSS_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def report(news_prefix, tmp_path_factory):
    out = tmp_path_factory.mktemp("vs_hf") / "race.json"
    result = bench_vs_hf.run(["--data-path", news_prefix, "--presets", "tiny", "--seq-lengths", "64", "128",
                              "--tokens-per-step", "256", "--warmup-steps", "1", "--steps", "2", "--repeats", "2",
                              "--loss-steps", "2", "--kernels", "reference", "--device", "cpu", "--profile", "3",
                              "--json", str(out)])
    return result, out


def test_result_structure_and_json(report):
    result, out = report
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["norm"] == "LayerNorm (both)" and result["optimizer"].startswith("StableAdamW")
    assert result["machine"]["device"] == "cpu" and "torch" in result["machine"]
    assert [(c["preset"], c["seq_length"]) for c in result["cases"]] == [("tiny", 64), ("tiny", 128)]
    for case in result["cases"]:
        ours, hf = case["rows"]
        assert (ours["kind"], hf["kind"]) == ("ours", "hf") and case["baseline"] == hf["name"] == "HF sdpa"
        assert ours["kernels"] == "attention=reference,rope=reference,geglu=reference,rms_norm=reference"
        assert "attn_implementation=sdpa" in hf["kernels"]
        for row in (ours, hf):
            for what in ("train", "infer"):
                rates = row[f"{what}_tokens_per_s"]
                assert len(rates["repeats"]) == 2 and rates["min"] <= rates["median"] <= rates["max"]
                assert rates["min"] > 0
            assert row["train_peak_mb"] >= 0 and row["infer_peak_mb"] >= 0
            assert len(row["losses"]) == 3 and all(np.isfinite(row["losses"]))
            assert row["loss_last"] == pytest.approx(np.mean(row["losses"][-2:]))
            assert len(row["profile"]) == 3 and all(op["self_cpu_ms"] >= 0 for op in row["profile"])
        (ratio,) = case["ratios"]
        expected = [a / b for a, b in zip(ours["train_tokens_per_s"]["repeats"], hf["train_tokens_per_s"]["repeats"])]
        assert ratio["train"]["repeats"] == pytest.approx(expected)
        assert case["samples_per_step"] == 256 // case["seq_length"]
        assert case["real_tokens_per_step"] <= case["hf_padded_tokens_per_step"]


def test_both_models_start_from_the_same_loss(report):
    for case in report[0]["cases"]:
        ours, hf = case["rows"]
        assert abs(ours["loss_step0"] - hf["loss_step0"]) <= LOSS_TOLERANCE
        assert ours["loss_step0"] == pytest.approx(np.log(8192), abs=0.5)  # near uniform at initialisation


def test_hf_batch_holds_exactly_the_packed_tokens(news_prefix):
    args = bench_vs_hf.build_parser().parse_args(["--data-path", news_prefix])
    (batch,) = bench_vs_hf.make_batches(news_prefix, 64, 4, 1, 8192, args, torch.device("cpu"))
    lengths = batch.layout.lengths
    assert batch.hf_ids.shape == (len(lengths), lengths.max()) and batch.tokens == lengths.sum()
    mask = batch.hf_mask.bool()
    assert mask.sum(1).tolist() == lengths.tolist() and mask[:, 0].all()  # each piece from the left of its row
    assert torch.equal(batch.hf_ids[mask], batch.ids) and torch.equal(batch.hf_labels[mask], batch.labels)
    assert (batch.hf_labels[~mask] == -100).all() and (batch.hf_ids[~mask] == 0).all()


@pytest.mark.parametrize("flags,message", [
    (["--seq-lengths", "100"], "--tokens-per-step 4096 is not a whole number of 100-token samples"),
    (["--presets", "huge"], "--presets: unknown preset 'huge'"),
    (["--hf-attn", "flash_attention_2", "--device", "cpu"], "needs CUDA and the flash-attn package"),
    (["--kernels", "attention=flex", "--device", "cpu"], "--kernels: attention backend 'flex' cannot run on cpu"),
])
def test_flag_errors_are_one_line(news_prefix, capsys, flags, message):
    assert bench_vs_hf.main(["--data-path", news_prefix, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_missing_dataset_names_the_prefix(tmp_path, capsys):
    assert bench_vs_hf.main(["--data-path", str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err
