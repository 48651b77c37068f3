#!/usr/bin/env python3
"""Show documents of an indexed dataset with their whole-word units marked.

    python tools/inspect_dataset.py --data-prefix data/corpus_text_document --tokenizer-model tok32k --doc 0 3

Units are separated by " | " and tokens inside a unit by "·", so a masking unit is what lies
between two bars. Statistics of the whole dataset come first.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import numpy as np

from megatron_cmbert import cli
from megatron_cmbert.errors import UserError


class InspectError(UserError, ValueError):
    """A dataset or document that cannot be shown, in one line."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = cli.ToolParser(prog="inspect_dataset.py", description=__doc__)
    p.add_argument("--data-prefix", required=True,
                   help="PREFIX_text_document (the _wordstart dataset beside it is read too)")
    p.add_argument("--tokenizer-model", required=True, help="tokenizer directory used to build the data")
    p.add_argument("--doc", type=int, nargs="*", default=[0], help="document indices to show (default: 0)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens shown per document (default: 200)")
    return p.parse_args(argv)


def render_units(pieces: list[str], flags: np.ndarray) -> str:
    """Join token strings: ' | ' before a token that starts a unit, '·' inside a unit."""
    out = []
    for i, (piece, flag) in enumerate(zip(pieces, flags)):
        if i:
            out.append(" | " if flag else "·")
        out.append(piece)
    return "".join(out)


def token_strings(tokenizer, ids: np.ndarray) -> list[str]:
    """Readable piece per token; byte-fallback pieces of one character are shown as <0x..>."""
    return [tokenizer.id_to_token(int(i)).replace("\n", "\\n") for i in ids]


def run(argv: Optional[list[str]] = None) -> dict:
    """Print the statistics and the documents; returns {"documents", "tokens", "units", "shown"}."""
    args = parse_args(argv)
    from megatron_cmbert.data.pretrain_data import TokenDataset
    from megatron_cmbert.data.tokenizer import load_tokenizer

    for suffix in ("", "_wordstart"):
        if not os.path.exists(args.data_prefix + suffix + ".idx"):
            raise InspectError(f"{args.data_prefix + suffix}.idx not found (a finished build writes it last)")
    try:
        data = TokenDataset(args.data_prefix)  # checks that the two datasets line up
    except UserError:
        raise
    except ValueError as exc:
        raise InspectError(str(exc)) from None
    tokens, flags = data.tokens, data.word_starts
    tokenizer = load_tokenizer(args.tokenizer_model)
    n_tokens = int(tokens.sequence_lengths.sum())
    n_units = int(sum(int(flags[i].sum()) for i in range(len(flags))))
    print(f"{args.data_prefix}: {len(tokens):,} documents, {n_tokens:,} tokens, {n_units:,} whole-word units "
          f"({n_tokens / max(n_units, 1):.2f} tokens/unit), dtype {tokens.index.dtype.__name__}")
    for d in args.doc:  # every index checked before any document is printed
        if not 0 <= d < len(tokens):
            raise InspectError(f"--doc {d}: out of range (the dataset has documents 0..{len(tokens) - 1})")
    for d in args.doc:
        ids, fl = tokens[d][: args.max_tokens], flags[d][: args.max_tokens]
        more = "" if len(tokens[d]) <= args.max_tokens else f" ... (+{len(tokens[d]) - args.max_tokens} tokens)"
        print(f"\n--- document {d}: {len(tokens[d])} tokens, {int(flags[d].sum())} units")
        print(tokenizer.decode(ids.tolist()))
        print(render_units(token_strings(tokenizer, ids), fl) + more)
    return {"documents": len(tokens), "tokens": n_tokens, "units": n_units, "shown": list(args.doc)}


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
