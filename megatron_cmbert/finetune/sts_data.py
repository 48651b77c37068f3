"""The contrastive training and STS evaluation files as SimCLUE and T2Ranking release them.

SimCLUE (CLUEbenchmark/SimCLUE), JSON lines:
- `train_pair.json`: {"sentence1", "sentence2", "label": "0"|"1"}: labelled pairs; the positives (label 1) are
  training pairs, the others are counted and left out.
- `train_pair_postive.json` (sic): {"query", "title"}: positive pairs.
- `train_rank.json`: {"query", "title", "neg_title"}: a positive pair and a hard negative for its query.
- `dev.json`, `test_public.json`: {"sentence1", "sentence2", "label"}: scored pairs for Pearson / Spearman.
A training file may mix the layouts row by row; each row is read by the fields it has.

T2Ranking (THUIR/T2Ranking), TSV with a header line: `collection.tsv` (pid, passage), `queries.<split>.tsv`
(qid, query), `qrels.retrieval.<split>.tsv` (qid, pid: the relevant passages). Joined into (query, passage)
pairs; only the passages of the pairs used are kept while the collection is streamed (the released one is
3.5 GB).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Optional

from megatron_cmbert.finetune.records import ClueDataError, json_objects, tsv_rows


@dataclass
class Pair:
    a: str
    b: str
    negative: Optional[str] = None
    """A hard negative for `a` (SimCLUE's neg_title), scored with the batch's other candidates."""


@dataclass
class PairFile:
    path: str
    pairs: list = field(default_factory=list)
    rows: int = 0
    not_positive: int = 0
    """Labelled rows left out because their label is not 1."""
    hard_negatives: int = 0


def _text(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ClueDataError(f"{where}: field {name!r} is empty or not a string")
    return value


def read_training_pairs(path: str, hard_negatives: bool = True) -> PairFile:
    """Positive pairs (and hard negatives) of a SimCLUE training file, any of its three layouts."""
    out = PairFile(path)
    for where, row in json_objects(path):
        out.rows += 1
        if "query" in row and "title" in row:
            neg = _text(row, "neg_title", where) if hard_negatives and "neg_title" in row else None
            out.pairs.append(Pair(_text(row, "query", where), _text(row, "title", where), neg))
            out.hard_negatives += neg is not None
        elif "sentence1" in row and "sentence2" in row:
            a, b = _text(row, "sentence1", where), _text(row, "sentence2", where)
            if str(row.get("label", "1")) not in ("1", "1.0"):
                out.not_positive += 1
                continue
            out.pairs.append(Pair(a, b))
        else:
            raise ClueDataError(f"{where}: a SimCLUE training row has query, title (and neg_title) or sentence1, "
                                f"sentence2, label (fields here: {', '.join(sorted(row))})")
    if not out.pairs:
        raise ClueDataError(f"{path}: no positive pairs ({out.rows} rows, {out.not_positive} not labelled 1)")
    return out


def read_scored_pairs(path: str) -> list:
    """[(sentence1, sentence2, float score)] of a SimCLUE dev / test file (or any file of that layout)."""
    rows = []
    for where, row in json_objects(path):
        a, b = _text(row, "sentence1", where), _text(row, "sentence2", where)
        try:
            score = float(row["label"])
        except (KeyError, TypeError, ValueError):
            raise ClueDataError(f"{where}: needs a numeric 'label' (the gold score), got "
                                f"{row.get('label', 'none')!r}") from None
        rows.append((a, b, score))
    if len(rows) < 2:
        raise ClueDataError(f"{path}: fewer than 2 scored pairs; correlations need more")
    if len({r[2] for r in rows}) < 2:
        raise ClueDataError(f"{path}: every pair has the same score; correlations are undefined")
    return rows


def read_qp_jsonl(path: str) -> list:
    """[(query, passage)] of a JSON-lines file of {"query", "passage"} rows."""
    out = [(_text(row, "query", where), _text(row, "passage", where)) for where, row in json_objects(path)]
    if not out:
        raise ClueDataError(f"{path}: no query-passage pairs")
    return out


def _need(path: str) -> str:
    if not os.path.isfile(path):
        raise ClueDataError(f"{path}: missing (a T2Ranking folder has collection.tsv, queries.<split>.tsv and "
                            f"qrels.retrieval.<split>.tsv)")
    return path


def t2ranking_qrels(folder: str, splits) -> list:
    """[(where, query, pid)] of the relevant (query, passage id) pairs of the given splits."""
    out = []
    for split in splits:
        queries = {}
        for where, (qid, text) in tsv_rows(_need(os.path.join(folder, f"queries.{split}.tsv")), 2):
            queries[int(qid)] = text
        for where, (qid, pid) in tsv_rows(_need(os.path.join(folder, f"qrels.retrieval.{split}.tsv")), 2,
                                          whitespace=True):
            if int(qid) not in queries:
                raise ClueDataError(f"{where}: query {qid} is not in queries.{split}.tsv")
            out.append((where, queries[int(qid)], int(pid)))
    if not out:
        raise ClueDataError(f"{folder}: no relevant pairs in qrels.retrieval.{{{','.join(splits)}}}.tsv")
    return out


def t2ranking_passages(folder: str, pids: set) -> dict:
    """{pid: passage} for the wanted pids, streaming collection.tsv."""
    found = {}
    for _, (pid, text) in tsv_rows(_need(os.path.join(folder, "collection.tsv")), 2):
        if int(pid) in pids:
            found[int(pid)] = text
    return found


@dataclass
class Mix:
    pairs: list
    """The query-passage pairs mixed in, as Pair(query, passage)."""
    available: int
    wanted: int


def mix_query_passage(n_base: int, ratio: float, seed: int, qp_file: Optional[str] = None,
                      t2ranking: Optional[str] = None, splits=("train",)) -> Mix:
    """round(ratio * n_base / (1 - ratio)) query-passage pairs (so that they make `ratio` of the training pairs),
    drawn without replacement by `seed` from --qp and the T2Ranking join; all of them when fewer exist."""
    pool = [("qp", q, p) for q, p in read_qp_jsonl(qp_file)] if qp_file else []
    if t2ranking:
        pool += [("t2", where, query, pid) for where, query, pid in t2ranking_qrels(t2ranking, splits)]
    wanted = round(ratio * n_base / (1 - ratio))
    chosen = random.Random(seed).sample(pool, min(wanted, len(pool)))
    passages = t2ranking_passages(t2ranking, {c[3] for c in chosen if c[0] == "t2"}) if t2ranking else {}
    pairs = []
    for c in chosen:
        if c[0] == "qp":
            pairs.append(Pair(c[1], c[2]))
        elif c[3] not in passages:
            raise ClueDataError(f"{c[1]}: passage {c[3]} is not in {os.path.join(t2ranking, 'collection.tsv')}")
        else:
            pairs.append(Pair(c[2], passages[c[3]]))
    return Mix(pairs, len(pool), wanted)
