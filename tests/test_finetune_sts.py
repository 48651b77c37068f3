"""tools/finetune_sts.py: Pearson/Spearman and InfoNCE against hand-computed values; contrastive training on
a tiny checkpoint lowers the loss and raises the correlation on pairs built by a rule; the saved model loads
with sentence-transformers and embeds like the in-memory one."""
import json
import math

import numpy as np
import pytest
import torch

from eval_checkpoint import tiny_checkpoint
from megatron_cmbert.finetune.sts import info_nce, pearson, ranks, spearman
from tools import finetune_sts

pytestmark = pytest.mark.timeout(300)
TOPICS = ["足球比赛", "股票市场", "天气预报", "电影首映", "手机发布", "大学招生", "高铁开通", "医院挂号"]


def test_correlations_and_loss_by_hand():
    assert ranks(np.array([3.0, 1.0, 1.0, 2.0])).tolist() == [4.0, 1.5, 1.5, 3.0]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # d^2 = 0+1+1+0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    t = 0.5  # row 0 logits (1.2, 0), target 0; row 1 logits (1.6, 2), target 1
    expected = (-math.log(math.exp(1.2) / (math.exp(1.2) + 1)) - math.log(math.exp(2) / (math.exp(1.6) + math.exp(2)))) / 2
    assert info_nce(a, b, t).item() == pytest.approx(expected, rel=1e-6)


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_contrastive_training_and_the_saved_model(tmp_path, tokenizer_dir):
    pytest.importorskip("sentence_transformers", reason="needs the PyPI package sentence-transformers")
    checkpoint = str(tiny_checkpoint(tmp_path / "ck", tokenizer_dir, seq_length=64)[0])
    # positives: two phrasings about one topic; the scored set: same topic 1, different topics 0
    train = write(tmp_path / "train.jsonl", [
        {"sentence1": f"关于{t}的新闻第{i}条", "sentence2": f"{t}今天有新消息", "label": "1"}
        for i in range(6) for t in TOPICS] + [{"sentence1": "无关", "sentence2": "负例", "label": "0"}])
    scored = write(tmp_path / "eval.jsonl", [
        {"sentence1": f"{t}的报道", "sentence2": f"最新{u}", "label": float(t == u)}
        for t in TOPICS for u in TOPICS])
    out = tmp_path / "run"
    assert finetune_sts.main(["--load", checkpoint, "--train", train, "--eval", scored, "--output-dir", str(out),
                              "--epochs", "4", "--lr", "3e-3", "--batch-size", "8", "--temperature", "0.1",
                              "--max-length", "32", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_pairs"] == 48  # the label-0 row is not a positive
    losses = results["loss_per_epoch"]
    assert losses[-1] < losses[0]
    # binary gold scores: Pearson is the informative one (Spearman sees mostly ties)
    assert results["after"]["pearson"] > results["before"]["pearson"] + 0.05, results

    from sentence_transformers import SentenceTransformer

    from megatron_cmbert.eval.encoders import load_encoder, ours_encoder
    from megatron_cmbert.finetune.sts import embed

    model = SentenceTransformer(str(out / "model"), device="cpu", trust_remote_code=True)
    texts = [f"{t}的报道" for t in TOPICS]
    got = torch.as_tensor(model.encode(texts, convert_to_numpy=True))
    # the exported weights read back into our packed model (the importer), embedded by our pooling
    from megatron_cmbert.hf.importer import read_hf_dir
    from megatron_cmbert.checkpoint.reader import build_model
    from megatron_cmbert.model.hf_keymap import from_hf

    config, hf_state = read_hf_dir(str(out / "model"))
    state = from_hf(hf_state, config)
    base = load_encoder(load=checkpoint)
    ours = ours_encoder(build_model(config, state), "exported", base.tokenizer, base.tokenizer_dir, 64, "cpu",
                        torch.float32)
    seqs = base.encode(texts, 32)
    assert torch.allclose(got, embed(ours.eval(), seqs), atol=1e-4)
    assert not torch.allclose(got, embed(base.eval(), seqs), atol=1e-3)  # training changed the model
