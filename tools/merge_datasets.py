#!/usr/bin/env python3
"""Merge indexed datasets (token ids and their whole-word start flags together) into one.

    python tools/merge_datasets.py --input 'data/corpus_shard*-of-00064_text_document' \\
        --output data/corpus_text_document

Each input is a token-dataset prefix written by tools/preprocess_data.py (PREFIX.bin/.idx, its
PREFIX_wordstart.bin/.idx and PREFIX.meta.json); globs are expanded and sorted, so shard files
`..._shard00000-of-00064_...` merge in index order. The output is byte-identical to what one
preprocess_data.py run over the shards' inputs in that order writes (.bin and .idx of both datasets); its
meta.json has the same fields with "created_by": "tools/merge_datasets.py" (its max_token_id the inputs' largest:
an input whose sidecar predates that field is scanned once, saying so). Every input must record the same
tokenizer (sha256) and json key. Data is copied in blocks, never loaded whole, and the output appears by
rename only when complete: an interrupted merge removes its *.partial-<pid> files, and those of a killed one
are removed at the next start. The output folder must have room for the inputs' size before anything is
written; an existing output is replaced only with --force.

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

from megatron_cmbert import cli
from megatron_cmbert.data.dataset_checks import META_SUFFIX, max_token_id
from megatron_cmbert.data.indexed import IndexedDatasetWriter, IndexFormatError, commit_all, read_index_header
from megatron_cmbert.data.outputs import (check_free_space, check_writable, remove_stale, stale_temp_pattern,
                                          write_errors)
from megatron_cmbert.errors import UserError

WORDSTART = "_wordstart"


class MergeError(UserError, ValueError):
    """One line naming the input and what is wrong with it."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = cli.ToolParser(prog="merge_datasets.py", description=__doc__)
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX",
                   help="token-dataset prefixes (..._text_document) or globs of them, merged in the order given "
                        "(each glob sorted)")
    p.add_argument("--output", required=True, metavar="PREFIX", help="prefix of the merged token dataset")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, otherwise a line every 30 s)")
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
        tokenizer = meta.get("tokenizer")
        if not tokenizer:
            raise MergeError(f"{path}: records no tokenizer (a dataset built before sidecars); rebuild it with "
                             f"tools/preprocess_data.py")
        tokenizer["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MergeError(f"{path}: unreadable dataset metadata ({exc})") from None
    if "max_token_id" not in meta:  # a sidecar from before the field: the merged one must still have it
        meta["max_token_id"] = max_token_id(prefix)
        print(f"{prefix}: no max_token_id in its sidecar (an older build): scanned its tokens once "
              f"({meta['max_token_id']})", file=sys.stderr)
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
    tops = [m["max_token_id"] for m in metas if m["max_token_id"] is not None]  # None: an empty input
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
    out_dir = os.path.dirname(os.path.abspath(output))
    check_writable(out_dir, "--output")
    bases = [os.path.basename(output) + w for w in ("", WORDSTART)]
    remove_stale(out_dir, stale_temp_pattern([b + k for b in bases for k in (".bin", ".idx", ".lengths", META_SUFFIX)]))
    existing = [output + s for s in (".bin", ".idx", META_SUFFIX, WORDSTART + ".bin", WORDSTART + ".idx")
                if os.path.exists(output + s)]
    if existing and not force:
        raise MergeError(f"{existing[0]} exists; pass --force to replace it")
    metas = [read_meta(p) for p in prefixes]
    meta = merged_meta(metas, prefixes)
    if meta["documents"] == 0:
        raise MergeError(f"the inputs hold 0 documents ({', '.join(prefixes)}); nothing to merge")
    try:
        token_dtype = read_index_header(prefixes[0] + ".idx")[0]
    except IndexFormatError as exc:
        raise MergeError(str(exc)) from None
    sizes = sum(os.path.getsize(p + s) for p in prefixes for s in (".bin", ".idx", WORDSTART + ".bin", WORDSTART + ".idx"))
    # the merged files are the inputs' size (less their headers); the old output goes only after the new is in
    check_free_space(out_dir, sizes, "the merged dataset")
    writers = []

    def abort():
        for w in writers:
            w.abort()

    total = sum(os.path.getsize(p + s) for p in prefixes for s in (".bin", WORDSTART + ".bin"))
    bar = cli.Progress(total, "merge", "bytes", disable=not progress)
    try:
        with write_errors(output + "*", abort, kept="partial files removed, nothing written"):
            writers += [IndexedDatasetWriter(output, token_dtype.type),
                        IndexedDatasetWriter(output + WORDSTART, np.uint8)]
            merge_into(writers, prefixes, meta, bar)
    except BaseException as exc:
        abort()
        if isinstance(exc, IndexFormatError):
            raise MergeError(str(exc)) from None
        raise
    finally:
        bar.close()
    return meta


def merge_into(writers, prefixes: list[str], meta: dict, bar) -> None:
    """Append every input to the two writers, then finalize and move the result into place."""
    for prefix in prefixes:
        writers[0].append_dataset(prefix, bar)
        writers[1].append_dataset(prefix + WORDSTART, bar)
        if writers[0].num_documents != writers[1].num_documents:
            raise MergeError(f"{prefix}: its word-start dataset has another number of documents")
    for w in writers:
        w.finalize()
    writers[0].write_meta(meta)
    commit_all(writers)


def run(argv: Optional[list[str]] = None) -> dict:
    """Merge; returns the merged dataset's sidecar."""
    args = parse_args(argv)
    prefixes = expand_prefixes(args.input)
    try:
        meta = merge(prefixes, args.output, force=args.force, progress=not args.quiet)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("no output was written") from None
    print(f"merged {len(prefixes)} datasets: {meta['documents']:,} documents, {meta['tokens']:,} tokens -> "
          f"{args.output}.bin/.idx/{META_SUFFIX[1:]} and {args.output}{WORDSTART}.bin/.idx")
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
