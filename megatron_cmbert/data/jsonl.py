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
import zlib
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
    """An input that cannot be read as a corpus: a bad line in strict mode, a truncated or corrupt compressed
    file, a file that cannot be opened; the message names file (and line) and the reason."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A named input file (or glob) that matches nothing."""


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Files named directly or by glob, in the order given (each glob sorted); an error names the first that
    is missing or cannot be opened for reading (checked here, before any output is written)."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise InputNotFoundError(f"no input file matches {pattern!r}")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        elif os.path.isdir(pattern):
            raise InputNotFoundError(f"{pattern}: a folder, not an input file (give its files or a glob)")
        else:
            raise InputNotFoundError(f"input file not found: {pattern!r}")
    for path in paths:
        check_readable(path)
    return paths


def check_readable(path: str) -> None:
    """BadInputError naming `path` when it cannot be opened and read."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def is_gzip(path: str) -> bool:
    """True when the file starts with gzip's magic bytes (whatever its name)."""
    with open(path, "rb") as probe:
        return probe.read(2) == b"\x1f\x8b"


def open_binary(path: str):
    """Open a plain or gzip-compressed file for binary reading."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of a plain or gzip file; a truncated or corrupt gzip stream (or a read
    error) raises BadInputError naming the file and the last line read whole."""
    lineno = 0
    try:
        with open_binary(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                yield lineno, raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BadInputError(f"{path}: truncated or corrupt gzip data after line {lineno} ({exc}); "
                            f"recompress or re-download it") from None
    except OSError as exc:
        if exc.errno is None:  # gzip reports some damage as a bare OSError
            raise BadInputError(f"{path}: corrupt compressed data after line {lineno} ({exc})") from None
        raise BadInputError(f"{path}: read error after line {lineno} ({exc.strerror or exc})") from None


def iter_records(paths: Iterable[str], keep_raw: bool = False) -> Iterator[Record]:
    """Yield one Record per non-blank line of each file, in order. Never raises on bad content (a line);
    a file that cannot be read to its end (truncated .gz) raises BadInputError naming it and the line.
    ``keep_raw`` also keeps each line's bytes (newline included) so a filter can copy it unchanged."""
    for path in paths:
        for lineno, raw in _lines(path):
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

    def describe(self) -> str:
        """One line: each reason with its count and first location, most frequent first."""
        return ", ".join(f"{n:,} {reason} (first at {self.examples[reason][0]})"
                         for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary_lines(self) -> list[str]:
        lines = []
        for reason in sorted(self.counts):
            more = "" if self.counts[reason] <= len(self.examples[reason]) else ", ..."
            lines.append(
                f"  skipped {self.counts[reason]:>8d}  {reason:<15s} "
                f"(first at {', '.join(self.examples[reason])}{more})"
            )
        return lines
