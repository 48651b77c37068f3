"""Streaming reader for .jsonl / .jsonl.gz corpora that reports bad lines instead of crashing.

Every tool that reads raw text goes through here, so "which line, what was wrong" is reported the
same way everywhere: a record carries its file and 1-based line number, and a skipped line carries
one of the reasons in ``SKIP_REASONS``.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from megatron_cmbert.errors import UserError

_SURROGATE = re.compile("[\ud800-\udfff]")
SKIP_REASONS = ("invalid_utf8", "malformed_json", "missing_key", "non_string", "empty_text")


@dataclass(frozen=True)
class Record:
    """One input line: ``obj`` is the parsed JSON object, or None with ``reason`` set."""

    path: str
    lineno: int
    obj: Optional[dict]
    reason: Optional[str] = None
    detail: str = ""
    nbytes: int = 0  # size of the raw line, for progress in MB/s
    raw: bytes = b""  # the line's bytes, only with iter_records(keep_raw=True) (byte-exact copies)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"


class BadInputError(UserError, ValueError):
    """Raised in strict mode at the first bad line, naming file:line and the reason."""


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Files named directly or by glob, in the order given (each glob sorted); error if none match."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"no input file matches {pattern!r}")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise FileNotFoundError(f"input file not found: {pattern!r}")
    return paths


def is_gzip(path: str) -> bool:
    """True when the file starts with gzip's magic bytes (whatever its name)."""
    with open(path, "rb") as probe:
        return probe.read(2) == b"\x1f\x8b"


def open_binary(path: str):
    """Open a plain or gzip-compressed file for binary reading."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def iter_records(paths: Iterable[str], keep_raw: bool = False) -> Iterator[Record]:
    """Yield one Record per non-blank line of each file, in order. Never raises on bad content.
    ``keep_raw`` also keeps each line's bytes (newline included) so a filter can copy it unchanged."""
    for path in paths:
        with open_binary(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                nbytes = len(raw)
                keep = raw if keep_raw else b""
                if not raw.strip():
                    continue  # blank lines (e.g. a trailing newline) are not documents
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield Record(path, lineno, None, "invalid_utf8", f"byte {exc.start}", nbytes, keep)
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg  # "Invalid control character at"
                    yield Record(path, lineno, None, "malformed_json", f"{msg} at column {exc.colno}", nbytes, keep)
                    continue
                if not isinstance(obj, dict):
                    yield Record(path, lineno, None, "malformed_json", "not a JSON object", nbytes, keep)
                    continue
                yield Record(path, lineno, obj, nbytes=nbytes, raw=keep)


def get_text(record: Record, key: str) -> tuple[Optional[str], Optional[str]]:
    """(text, None) when ``record`` has a usable string under ``key``, else (None, reason)."""
    if record.obj is None:
        return None, record.reason
    if key not in record.obj:
        return None, "missing_key"
    text = record.obj[key]
    if not isinstance(text, str):
        return None, "non_string"
    if not text.strip():
        return None, "empty_text"
    if _SURROGATE.search(text):
        return None, "invalid_utf8"  # lone surrogates from "\\ud800"-style JSON escapes can't be encoded
    return text, None


class SkipCounter:
    """Counts skipped lines by reason and remembers the first few locations of each."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.keep:
            shown.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary_lines(self) -> list[str]:
        lines = []
        for reason in sorted(self.counts):
            more = "" if self.counts[reason] <= len(self.examples[reason]) else ", ..."
            lines.append(
                f"  skipped {self.counts[reason]:>8d}  {reason:<15s} "
                f"(first at {', '.join(self.examples[reason])}{more})"
            )
        return lines
