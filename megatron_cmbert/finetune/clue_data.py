"""The CLUE tasks as their official zips unpack, turned into examples the way the official baselines build them.

Input kinds (`KINDS`), after CLUEbenchmark/CLUE's `baselines/` readers:

- `single`: one text field (TNEWS, IFLYTEK: `sentence`).
- `pair`: two text fields, encoded `[CLS] a [SEP] b [SEP]` (AFQMC, CMNLI, OCNLI: `sentence1`, `sentence2`; CSL:
  `keyword`, `abst`). A field holding a list of strings is joined with spaces: CSL's keyword list, as the
  official CSL processor joins it before pairing it with the abstract.
- `wsc`: CLUEWSC2020's `text` with its nested `target` (`span1_index`, `span1_text`, `span2_index`,
  `span2_text`); single-sentence classification of the text with the candidate noun marked `_noun_` and the
  pronoun `[pronoun]` at their character offsets (each span is checked against its offset first).
- `multiple_choice`: C3's documents `[[context lines], [{question, choice, answer}], id]`, one example per
  question: the context lines joined by newlines, the question, 2 to 4 options; the label is the answer's
  index among the options (test questions carry an `id` instead of an answer).

Rows whose label is one of `drop_labels` (the NLI sets mark "no gold label" with `-`, which the official
baselines skip) are dropped and counted, never silently. Every error names `file:line`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_cmbert.finetune.records import ClueDataError, json_documents, json_objects

KINDS = ("single", "pair", "wsc", "multiple_choice")
DEFAULT_FIELDS = {"single": ("sentence",), "pair": ("sentence1", "sentence2"), "wsc": ("text", "target"),
                  "multiple_choice": ()}
MAX_OPTIONS = 4
MIN_OPTIONS = 2
SPAN_KEYS = ("span1_index", "span1_text", "span2_index", "span2_text")


@dataclass
class Example:
    where: str
    """`file:line` of the row (C3: of the document, and which question)."""
    text: str
    """single / wsc (marked): the text; pair: the first text; multiple_choice: the context."""
    pair: Optional[str] = None
    label: Optional[str] = None
    """None for test rows."""
    id: object = None
    """Test rows: the id the submission file must carry (the row's `id`, else its 0-based position)."""
    question: Optional[str] = None
    options: tuple = ()


@dataclass
class Split:
    files: list
    examples: list = field(default_factory=list)
    dropped: int = 0
    """Rows left out because their label is a drop label (e.g. `-`)."""


def mark_wsc_spans(text: str, target: dict, where: str) -> str:
    """`text` with span1 (the noun) wrapped in `_` and span2 (the pronoun) in `[` `]`, inserted at the given
    character offsets, after checking each span's text is found at its offset."""
    if not isinstance(target, dict):
        raise ClueDataError(f"{where}: 'target' is not an object with {', '.join(SPAN_KEYS)}")
    missing = [k for k in SPAN_KEYS if k not in target]
    if missing:
        raise ClueDataError(f"{where}: 'target' has no {', '.join(missing)}")
    marks = []
    for n, (left, right) in ((1, ("_", "_")), (2, ("[", "]"))):
        start, span = target[f"span{n}_index"], target[f"span{n}_text"]
        if not isinstance(start, int) or isinstance(start, bool) or not isinstance(span, str) or not span:
            raise ClueDataError(f"{where}: span{n}_index must be an integer and span{n}_text a non-empty string")
        if text[start:start + len(span)] != span:
            raise ClueDataError(f"{where}: span{n}_text {span!r} is not at span{n}_index {start} of the text "
                                f"(found {text[start:start + len(span)]!r})")
        marks += [(start, left), (start + len(span), right)]
    out = text
    for offset, mark in sorted(marks, key=lambda m: m[0], reverse=True):  # right to left: offsets stay valid
        out = out[:offset] + mark + out[offset:]
    return out


def _text(row: dict, name: str, where: str) -> str:
    value = row[name]
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return " ".join(value)  # CSL's keyword list, joined as the official processor joins it
    if not isinstance(value, str) or not value.strip():
        raise ClueDataError(f"{where}: field {name!r} is empty or not a string (a list of strings is joined)")
    return value


def _label(row: dict, label_field: str, where: str) -> str:
    if label_field not in row:
        raise ClueDataError(f"{where}: no label field {label_field!r} (fields here: {', '.join(sorted(row))})")
    value = row[label_field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ClueDataError(f"{where}: label {value!r} is not a string or an integer")
    return str(value)


def _rows(paths, kind: str, fields: tuple, label_field: str, labelled: bool, drop_labels, split: Split):
    position = 0
    for path in paths:
        for where, row in json_objects(path):
            missing = [f for f in fields if f not in row]
            if missing:
                raise ClueDataError(f"{where}: no field {', '.join(map(repr, missing))} "
                                    f"(fields here: {', '.join(sorted(row))})")
            label = _label(row, label_field, where) if labelled else None
            if label is not None and label in drop_labels:
                split.dropped += 1
                continue
            if kind == "wsc":
                text, pair = mark_wsc_spans(_text(row, fields[0], where), row[fields[1]], where), None
            else:
                text = _text(row, fields[0], where)
                pair = _text(row, fields[1], where) if kind == "pair" else None
            split.examples.append(Example(where, text, pair, label, None if labelled else row.get("id", position)))
            position += 1


def _questions(paths, labelled: bool, split: Split):
    position = 0
    for path in paths:
        for where, doc in json_documents(path):
            if not (isinstance(doc, list) and len(doc) >= 2 and isinstance(doc[0], list) and isinstance(doc[1], list)):
                raise ClueDataError(f"{where}: not a C3 document [[context lines], [questions], id]")
            if not doc[0] or not all(isinstance(s, str) for s in doc[0]):
                raise ClueDataError(f"{where}: the context must be a non-empty list of strings")
            context = "\n".join(doc[0])  # the lines joined as the official C3 reader joins them
            for j, q in enumerate(doc[1], 1):
                at = f"{where} question {j}"
                if not (isinstance(q, dict) and isinstance(q.get("question"), str)
                        and isinstance(q.get("choice"), list)):
                    raise ClueDataError(f"{at}: needs 'question' (a string) and 'choice' (a list of options)")
                options = q["choice"]
                if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS or not all(isinstance(o, str) and o for o in options):
                    raise ClueDataError(f"{at}: {len(options)} options; C3 questions have {MIN_OPTIONS} to "
                                        f"{MAX_OPTIONS} non-empty strings")
                label, qid = None, q.get("id", position)
                if labelled:
                    if q.get("answer") not in options:
                        raise ClueDataError(f"{at}: answer {q.get('answer')!r} is not one of the options {options}")
                    label, qid = str(options.index(q["answer"])), None
                split.examples.append(Example(at, context, None, label, qid, q["question"], tuple(options)))
                position += 1


def read_split(paths, kind: str, fields: Optional[tuple] = None, label_field: str = "label", labelled: bool = True,
               drop_labels=()) -> Split:
    """The examples of one split, read from one or more files in order (C3's d- and m- files together)."""
    if kind not in KINDS:
        raise ClueDataError(f"unknown input kind {kind!r}; choose from {', '.join(KINDS)}")
    fields = tuple(fields) if fields else DEFAULT_FIELDS[kind]
    split = Split(list(paths))
    if kind == "multiple_choice":
        _questions(split.files, labelled, split)
    else:
        _rows(split.files, kind, fields, label_field, labelled, set(drop_labels), split)
    if not split.examples:
        raise ClueDataError(f"{', '.join(split.files)}: no examples" + (f" ({split.dropped} rows dropped)"
                                                                       if split.dropped else ""))
    return split


def read_labels_file(path: str) -> list:
    """The label set of a task's `labels.json` (one object per line with a `label`), in file order."""
    labels = []
    for where, row in json_objects(path):
        labels.append(_label(row, "label", where))
    if not labels:
        raise ClueDataError(f"{path}: no labels")
    return labels


def check_labels(split: Split, labels, source: str) -> None:
    """ClueDataError at the first example whose label is not in `labels` (from `source`)."""
    allowed = set(labels)
    for ex in split.examples:
        if ex.label is not None and ex.label not in allowed:
            shown = ", ".join(list(labels)[:10]) + (", ..." if len(labels) > 10 else "")
            raise ClueDataError(f"{ex.where}: label {ex.label!r} is not one of {source} ({shown})")


# ---- the eight tasks of the paper's Table 3, as their zips unpack ------------------------------------------------
@dataclass(frozen=True)
class ClueTask:
    name: str
    title: str
    """The column heading of the paper's Table 3."""
    kind: str
    fields: tuple
    train: tuple
    dev: tuple
    tests: tuple
    """(file, submission file) pairs; every one present is predicted, at least one must be."""
    labels: Optional[tuple] = None
    """The official processors' label set; None: the task ships labels.json."""
    drop: tuple = ()


NLI = ("contradiction", "entailment", "neutral")
TASKS = {t.name: t for t in (
    ClueTask("afqmc", "AFQMC", "pair", ("sentence1", "sentence2"), ("train.json",), ("dev.json",),
             (("test.json", "afqmc_predict.json"),), ("0", "1")),
    ClueTask("tnews", "TNEWS", "single", ("sentence",), ("train.json",), ("dev.json",),
             (("test.json", "tnews11_predict.json"), ("test1.0.json", "tnews10_predict.json"))),
    ClueTask("iflytek", "IFLYTEK", "single", ("sentence",), ("train.json",), ("dev.json",),
             (("test.json", "iflytek_predict.json"),)),
    ClueTask("cmnli", "CMNLI", "pair", ("sentence1", "sentence2"), ("train.json",), ("dev.json",),
             (("test.json", "cmnli_predict.json"),), NLI, ("-",)),
    ClueTask("cluewsc2020", "WSC", "wsc", ("text", "target"), ("train.json",), ("dev.json",),
             (("test.json", "cluewsc11_predict.json"), ("test1.0.json", "cluewsc10_predict.json")), ("true", "false")),
    ClueTask("csl", "CSL", "pair", ("keyword", "abst"), ("train.json",), ("dev.json",),
             (("test.json", "csl_predict.json"),), ("0", "1")),
    ClueTask("ocnli", "OCNLI", "pair", ("sentence1", "sentence2"), ("train.50k.json",), ("dev.json",),
             (("test.json", "ocnli_50k_predict.json"),), NLI, ("-",)),
    ClueTask("c3", "C3", "multiple_choice", (), ("d-train.json", "m-train.json"), ("d-dev.json", "m-dev.json"),
             (("test1.1.json", "c311_predict.json"), ("test1.0.json", "c310_predict.json")), ("0", "1", "2", "3")),
)}
TASK_ORDER = ("afqmc", "tnews", "iflytek", "cmnli", "cluewsc2020", "csl", "ocnli", "c3")  # Table 3's columns


@dataclass
class TaskData:
    task: ClueTask
    folder: str
    train: Split
    dev: Split
    tests: list
    """[(Split, submission file name)]."""
    labels: list
    label_source: str


def task_folder(root: str, name: str) -> str:
    """`root/<name>` or `root/<name>_public` (how the official zips unpack)."""
    for candidate in (os.path.join(root, name), os.path.join(root, f"{name}_public")):
        if os.path.isdir(candidate):
            return candidate
    raise ClueDataError(f"{root}: no {name}/ or {name}_public/ folder (unpack {name}_public.zip there)")


def _need(folder: str, names) -> list:
    paths = [os.path.join(folder, n) for n in names]
    for p in paths:
        if not os.path.isfile(p):
            raise ClueDataError(f"{p}: missing (the {os.path.basename(folder)} release has "
                                f"{', '.join(names)})")
    return paths


def load_task(root: str, name: str, with_test: bool = True) -> TaskData:
    """Read one task's train, dev and test files and its label set; every problem is a ClueDataError."""
    if name not in TASKS:
        raise ClueDataError(f"unknown CLUE task {name!r}; choose from {', '.join(TASK_ORDER)}")
    task = TASKS[name]
    folder = task_folder(root, name)
    if task.labels is None:
        source = os.path.join(folder, "labels.json")
        labels = read_labels_file(_need(folder, ["labels.json"])[0])
    else:
        labels, source = list(task.labels), f"the {task.title} labels"
    read = lambda names, labelled: read_split(_need(folder, names), task.kind, task.fields, labelled=labelled,
                                              drop_labels=task.drop)
    train, dev = read(task.train, True), read(task.dev, True)
    for split in (train, dev):
        if task.kind != "multiple_choice":
            check_labels(split, labels, source)
    tests = []
    if with_test:
        present = [(f, sub) for f, sub in task.tests if os.path.isfile(os.path.join(folder, f))]
        if not present:
            raise ClueDataError(f"{os.path.join(folder, task.tests[0][0])}: missing (no test file of "
                                f"{', '.join(f for f, _ in task.tests)}; --no-test skips test predictions)")
        tests = [(read([f], False), sub) for f, sub in present]
    return TaskData(task, folder, train, dev, tests, labels, source)
