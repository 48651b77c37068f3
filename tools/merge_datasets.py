#!/usr/bin/env python3
"""Merge indexed datasets (token ids and their whole-word start flags together) into one.

    python tools/merge_datasets.py --input 'data/corpus_shard*-of-00064_text_document' \\
        --output data/corpus_text_document

Each input is a token-dataset prefix written by tools/preprocess_data.py (PREFIX.bin/.idx, its
PREFIX_wordstart.bin/.idx and PREFIX.meta.json); globs are expanded and sorted, so shard files
`..._shard00000-of-00064_...` merge in index order. The output is byte-identical to what one
preprocess_data.py run over the shards' inputs in that order writes (.bin and .idx of both datasets); its
meta.json has the same fields with "created_by": "tools/merge_datasets.py". Every input must record the same
tokenizer (sha256) and json key. Data is copied in blocks, never loaded whole, and the output appears by
rename only when complete (an interrupted merge leaves *.partial-<pid> files only, which it removes).

Blending many prefixes with --data-path in tools/pretrain.py also works without merging; a merged dataset
keeps the number of files (and open maps per rank) small.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Optional

import numpy as np
from tqdm import tqdm

from megatron_cmbert.data.dataset_checks import META_SUFFIX
from megatron_cmbert.data.indexed import IndexedDatasetWriter, IndexFormatError, commit_all, read_index_header
from megatron_cmbert.errors import UserError

WORDSTART = "_wordstart"


class MergeError(UserError, ValueError):
    """One line naming the input and what is wrong with it."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX",
                   help="token-dataset prefixes (..._text_document) or globs of them, merged in the order given "
                        "(each glob sorted)")
    p.add_argument("--output", required=True, metavar="PREFIX", help="prefix of the merged token dataset")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def expand_prefixes(patterns: list[str]) -> list[str]:
    prefixes: list[str] = []
    for pattern in patterns:
        pattern = pattern[:-4] if pattern.endswith((".idx", ".bin")) else pattern
        if glob.has_magic(pattern):
            found = sorted(p[:-4] for p in glob.glob(pattern + ".idx") if not p[:-4].endswith(WORDSTART))
            if not found:
                raise MergeError(f"no dataset matches {pattern!r} (looked for {pattern}.idx)")
            prefixes.extend(found)
        else:
            prefixes.append(pattern)
    if len(set(prefixes)) != len(prefixes):
        raise MergeError("an input is named twice: " + ", ".join(sorted({p for p in prefixes if prefixes.count(p) > 1})))
    return prefixes


def read_meta(prefix: str) -> dict:
    path = prefix + META_SUFFIX
    for needed in (prefix + ".bin", prefix + ".idx", prefix + WORDSTART + ".bin", prefix + WORDSTART + ".idx", path):
        if not os.path.isfile(needed):
            raise MergeError(f"{needed}: missing (each input needs its tokens, word starts and meta.json, as "
                             f"tools/preprocess_data.py writes them)")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
        meta["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"{path}: unreadable dataset metadata ({exc})") from None
    return meta


def merged_meta(metas: list[dict], prefixes: list[str]) -> dict:
    first = metas[0]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        if meta["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            raise MergeError(f"{prefix}: built with another tokenizer (sha256 {meta['tokenizer']['sha256'][:12]}) "
                             f"than {prefixes[0]} ({first['tokenizer']['sha256'][:12]})")
        if meta.get("json_key") != first.get("json_key"):
            raise MergeError(f"{prefix}: json key {meta.get('json_key')!r}, but {prefixes[0]} has "
                             f"{first.get('json_key')!r}")
    tops = [m.get("max_token_id") for m in metas if m.get("max_token_id") is not None]
    # the field order of tools/preprocess_data.py, so the sidecars differ only in created_by
    return {"tokenizer": first["tokenizer"], "documents": sum(int(m["documents"]) for m in metas),
            "tokens": sum(int(m["tokens"]) for m in metas), "max_token_id": max(tops) if tops else None,
            "json_key": first.get("json_key"), "inputs": [p for m in metas for p in m.get("inputs", [])],
            "created_by": "tools/merge_datasets.py"}


def merge(prefixes: list[str], output: str, *, force: bool = False, progress: bool = True) -> dict:
    """Merge the datasets at `prefixes` into `output`; returns the merged meta."""
    if not prefixes:
        raise MergeError("no input datasets")
    if os.path.abspath(output) in {os.path.abspath(p) for p in prefixes}:
        raise MergeError(f"{output}: the output is also an input")
    if not force and any(os.path.exists(output + s) for s in (".idx", WORDSTART + ".idx")):
        raise MergeError(f"{output}.idx exists; pass --force to replace it")
    metas = [read_meta(p) for p in prefixes]
    meta = merged_meta(metas, prefixes)
    try:
        token_dtype = read_index_header(prefixes[0] + ".idx")[0]
    except IndexFormatError as exc:
        raise MergeError(str(exc)) from None
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    writers = [IndexedDatasetWriter(output, token_dtype.type), IndexedDatasetWriter(output + WORDSTART, np.uint8)]
    total = sum(os.path.getsize(p + s) for p in prefixes for s in (".bin", WORDSTART + ".bin"))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress or None, dynamic_ncols=True)
    try:
        for prefix in prefixes:
            writers[0].append_dataset(prefix, bar)
            writers[1].append_dataset(prefix + WORDSTART, bar)
            if writers[0].num_documents != writers[1].num_documents:
                raise MergeError(f"{prefix}: its word-start dataset has another number of documents")
        for w in writers:
            w.finalize()
        writers[0].write_meta(meta)
        commit_all(writers)
    except BaseException as exc:
        for w in writers:
            w.abort()
        if isinstance(exc, IndexFormatError):
            raise MergeError(str(exc)) from None
        raise
    finally:
        bar.close()
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        prefixes = expand_prefixes(args.input)
        meta = merge(prefixes, args.output, force=args.force, progress=not args.quiet)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    print(f"merged {len(prefixes)} datasets: {meta['documents']:,} documents, {meta['tokens']:,} tokens -> "
          f"{args.output}.bin/.idx/{META_SUFFIX[1:]} and {args.output}{WORDSTART}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
