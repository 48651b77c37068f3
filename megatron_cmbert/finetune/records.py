"""Reading the files the CLUE-family benchmarks release, each value with the line it starts on.

The releases use three layouts: JSON lines (AFQMC, TNEWS, CMNLI, SimCLUE, ...), JSON objects printed one after
another over several lines (how OCNLI's README shows its rows), and one JSON document per file (C3's array of
documents). `json_values` reads all three the same way: every top-level value with its 1-based starting line,
so an error can name `file:line`. T2Ranking ships TSV with a header line (`tsv_rows`).
"""
from __future__ import annotations

import json
import re
from typing import Iterator

from megatron_cmbert.errors import UserError

_SPACE = re.compile(r"\s*")


class ClueDataError(UserError, ValueError):
    """A data file or line that cannot be used, as `file:line: reason`."""


def read_text(path: str) -> str:
    """The whole file as text (UTF-8, a byte-order mark dropped); ClueDataError names a missing or bad file."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ClueDataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ClueDataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ClueDataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _values(path: str, text: str, pos: int = 0, line: int = 1, array: bool = False):
    """(line, start, end, value) of consecutive JSON values from `pos`; with `array`, the elements of the JSON
    array whose '[' has just been consumed (separated by commas, up to its ']')."""
    decoder = json.JSONDecoder()
    first = True
    while True:
        gap = _SPACE.match(text, pos).end()
        line += text.count("\n", pos, gap)
        pos = gap
        if array:
            if pos < len(text) and text[pos] == "]":
                return
            if not first:
                if pos >= len(text) or text[pos] != ",":
                    raise ClueDataError(f"{path}:{line}: malformed JSON (expected ',' or ']' between documents)")
                gap = _SPACE.match(text, pos + 1).end()
                line += text.count("\n", pos, gap)
                pos = gap
        if pos >= len(text):
            if array:
                raise ClueDataError(f"{path}:{line}: malformed JSON (the array is not closed)")
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ClueDataError(f"{path}:{line}: malformed JSON ({exc.msg} at line {exc.lineno} "
                                f"column {exc.colno})") from None
        yield line, pos, end, value
        line += text.count("\n", pos, end)
        pos, first = end, False


def json_values(path: str) -> Iterator[tuple[int, object]]:
    """(line, value) of every top-level JSON value of the file, whatever the layout (module docstring)."""
    for line, _, _, value in _values(path, read_text(path)):
        yield line, value


def json_objects(path: str) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) of each row of a JSON-lines file; a value that is not an object is an error
    (a C3 document given where rows are expected, a bare string, ...)."""
    for line, value in json_values(path):
        if not isinstance(value, dict):
            raise ClueDataError(f"{path}:{line}: not a JSON object (a {type(value).__name__}; "
                                f"this file should hold one object per line)")
        yield f"{path}:{line}", value


def _is_container(value) -> bool:
    """An array of C3 documents: its first element is a document, whose first element is the context list."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], list) and bool(value[0])
            and isinstance(value[0][0], list))


def json_documents(path: str) -> Iterator[tuple[str, object]]:
    """(`file:line`, document) of a C3-style file: one JSON array of documents (the release), or one document
    per line (a JSON-lines copy). Each document is returned as found; the caller checks its shape."""
    text = read_text(path)
    for line, start, _, value in _values(path, text):
        if _is_container(value):
            for inner_line, _, _, doc in _values(path, text, start + 1, line, array=True):
                yield f"{path}:{inner_line}", doc
        else:
            yield f"{path}:{line}", value


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def tsv_rows(path: str, columns: int, whitespace: bool = False) -> Iterator[tuple[str, list[str]]]:
    """(`file:line`, fields) of a TSV file whose first column is an integer id; a first line whose first field
    is not an integer is the header and is skipped. The last field keeps any further tabs (passages may hold
    them); no quoting is interpreted (T2Ranking's own reader uses none for its collection). `whitespace`
    splits on any run of spaces or tabs instead (id-only files such as qrels, which T2Ranking reads so)."""
    try:
        fh = open(path, encoding="utf-8-sig", newline="\n")
    except FileNotFoundError:
        raise ClueDataError(f"{path}: no such file") from None
    except OSError as exc:
        raise ClueDataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with fh:
        try:
            for number, raw in enumerate(fh, 1):
                text = raw.rstrip("\r\n")
                if not text.strip():
                    continue
                fields = text.split() if whitespace else text.split("\t", columns - 1)
                if number == 1 and not _is_int(fields[0]):
                    continue  # the header (qid/pid and the column names)
                if len(fields) != columns or not _is_int(fields[0]):
                    raise ClueDataError(f"{path}:{number}: expected {columns} tab-separated fields starting "
                                        f"with an integer id, got {text[:60]!r}")
                yield f"{path}:{number}", fields
        except UnicodeDecodeError as exc:
            raise ClueDataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
