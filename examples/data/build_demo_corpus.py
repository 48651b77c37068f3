#!/usr/bin/env python3
"""Rebuild examples/data/demo_corpus.jsonl from the npm package ``chinese-poetry`` (public-domain texts).

    npm pack chinese-poetry@2.0.1 && tar xzf chinese-poetry-2.0.1.tgz
    python examples/data/build_demo_corpus.py --package-dir package --output examples/data/demo_corpus.jsonl

A document is one chapter, essay, poem or lyric: its title on the first line, then its paragraphs.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Iterator, Optional

# (file inside dist/, source label) in the order they are written; classical prose first.
SOURCES = [
    ("lunyu/lunyu.json", "lunyu"),
    ("sishuwujing/daxue.json", "daxue"),
    ("sishuwujing/zhongyong.json", "zhongyong"),
    ("sishuwujing/mengzi.json", "mengzi"),
    ("mengxue/guwenguanzhi.json", "guwenguanzhi"),
    ("mengxue/sanzijing-new.json", "sanzijing"),
    ("mengxue/qianziwen.json", "qianziwen"),
    ("mengxue/zengguangxianwen.json", "zengguangxianwen"),
    ("mengxue/youxueqionglin.json", "youxueqionglin"),
    ("shijing/shijing.json", "shijing"),
    ("chuci/chuci.json", "chuci"),
    ("mengxue/tangshisanbaishou.json", "tangshisanbaishou"),
    ("songci/ci.song.0.json", "songci"),
    ("songci/ci.song.1000.json", "songci"),
    ("songci/ci.song.2000.json", "songci"),
]
TITLE_KEYS = ("title", "chapter", "rhythmic", "section")
BODY_KEYS = ("paragraphs", "content")


def documents(node) -> Iterator[str]:
    """Every dict holding a list of strings under paragraphs/content is one document."""
    if isinstance(node, list):
        for item in node:
            yield from documents(item)
    elif isinstance(node, dict):
        for key in BODY_KEYS:
            body = node.get(key)
            if isinstance(body, list) and body and all(isinstance(p, str) for p in body):
                title = next((node[k] for k in TITLE_KEYS if isinstance(node.get(k), str)), "")
                yield "\n".join(([title] if title else []) + [p.strip() for p in body if p.strip()])
                return
        for value in node.values():
            if isinstance(value, (list, dict)):
                yield from documents(value)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package-dir", required=True, help="unpacked chinese-poetry npm package")
    p.add_argument("--output", required=True, help="jsonl file to write")
    p.add_argument("--max-bytes", type=int, default=1_950_000, help="stop before the file exceeds this size")
    args = p.parse_args(argv)
    written = docs = 0
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for rel, label in SOURCES:
            with open(os.path.join(args.package_dir, "dist", rel), encoding="utf-8") as fh:
                tree = json.load(fh)
            for text in documents(tree):
                line = json.dumps({"text": text, "source": label}, ensure_ascii=False) + "\n"
                size = len(line.encode("utf-8"))
                if written + size > args.max_bytes:
                    break
                out.write(line)
                written += size
                docs += 1
    os.replace(tmp, args.output)
    print(f"wrote {docs} documents, {written:,} bytes to {args.output}")


if __name__ == "__main__":
    main()
