"""Streaming writer for Megatron's indexed dataset format (.bin + .idx), with atomic commit.

The files are byte-compatible with ``megatron.core.datasets.indexed_dataset.IndexedDataset``
(header ``MMIDIDX``, version 1, dtype code, then sequence lengths / pointers / document indices),
but unlike megatron-core's builder this writer keeps no per-document Python list: lengths are
spilled to a side file, so memory stays flat however large the corpus is.

Nothing appears under the final names until ``commit_all`` renames the finished temporary files;
an interrupted run leaves only ``*.partial-<pid>`` files, never a complete-looking ``.bin``/``.idx``.
A writer may carry a JSON sidecar (``<prefix>.meta.json``, see ``write_meta``), committed with its files.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from typing import Sequence

import numpy as np

from megatron_cmbert.errors import UserError

INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}
_CHUNK = 1 << 20  # elements per streamed block when writing the index


_COPY_BYTES = 64 << 20  # block size when merging data files


class IndexFormatError(UserError, ValueError):
    """A file that is not a dataset this package writes (one sequence per document), named with the reason."""


def read_index_header(path: str) -> tuple[np.dtype, int]:
    """(token dtype, number of documents) of a Megatron ``.idx`` written with one sequence per document."""
    codes = {code: np.dtype(t) for t, code in DTYPE_CODES.items()}
    with open(path, "rb") as fh:
        head = fh.read(len(INDEX_HEADER) + 25)
    if len(head) < len(INDEX_HEADER) + 25 or not head.startswith(INDEX_HEADER):
        raise IndexFormatError(f"{path}: not a Megatron indexed-dataset index")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
    if version != 1 or code not in codes:
        raise IndexFormatError(f"{path}: unsupported index version {version} or dtype code {code}")
    if documents != sequences + 1:
        raise IndexFormatError(f"{path}: {sequences} sequences in {documents - 1} documents; only datasets with "
                               f"one sequence per document (tools/preprocess_data.py) can be merged")
    return codes[code], sequences


@contextlib.contextmanager
def _naming(path: str):
    """A write error without a file name (a full disk: write() and close() give none) gets `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, path) from None
        raise


def token_dtype(vocab_size: int) -> type:
    """Smallest dtype for token ids, as Megatron chooses it (uint16 below 65,500 entries)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Writes one sequence per document to ``<prefix>.bin`` / ``<prefix>.idx``."""

    def __init__(self, prefix: str, dtype: type):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported dtype {dtype}")
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        suffix = f".partial-{os.getpid()}"
        self.bin_tmp = prefix + ".bin" + suffix
        self.idx_tmp = prefix + ".idx" + suffix
        self.len_tmp = prefix + ".lengths" + suffix
        self.meta_tmp = prefix + ".meta.json" + suffix
        self.has_meta = False
        self._bin = open(self.bin_tmp, "wb")
        self._lengths = open(self.len_tmp, "wb")
        self.num_documents = 0
        self.num_elements = 0
        self.max_value = None  # largest value written (None while empty): recorded in the sidecar

    def add_documents(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat array and the length of each document."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        lengths = np.ascontiguousarray(lengths, dtype=np.int32)
        if int(lengths.sum()) != values.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {values.size} values were given")
        with _naming(self.bin_tmp):
            self._bin.write(values.tobytes())
        with _naming(self.len_tmp):
            self._lengths.write(lengths.tobytes())
        self.num_documents += lengths.size
        self.num_elements += values.size
        if values.size:
            top = int(values.max())
            self.max_value = top if self.max_value is None else max(self.max_value, top)

    def append_dataset(self, prefix: str, progress=None) -> None:
        """Append every document of the finished dataset at ``prefix`` (``.bin``/``.idx``), streaming: the
        data file is copied in blocks and the lengths are read from its index, so nothing proportional to
        the dataset is held. The result is the bytes a single run over both inputs would have written."""
        dtype, n = read_index_header(prefix + ".idx")
        if dtype != self.dtype:
            raise IndexFormatError(f"{prefix}.idx: token dtype {dtype}, but the merge writes {self.dtype} "
                                   f"(datasets built with tokenizers of different sizes?)")
        header = len(INDEX_HEADER) + 8 + 1 + 8 + 8
        lengths = np.memmap(prefix + ".idx", dtype=np.int32, mode="r", offset=header, shape=(n,)) if n else \
            np.zeros(0, np.int32)
        total = 0
        for lo in range(0, n, _CHUNK):
            block = np.asarray(lengths[lo:lo + _CHUNK])
            total += int(block.sum(dtype=np.int64))
            with _naming(self.len_tmp):
                self._lengths.write(block.tobytes())
        del lengths
        expected = total * self.dtype.itemsize
        if os.path.getsize(prefix + ".bin") != expected:
            raise IndexFormatError(f"{prefix}.bin: {os.path.getsize(prefix + '.bin')} bytes, but its index "
                                   f"describes {expected} (an incomplete or mismatched pair)")
        with open(prefix + ".bin", "rb") as src, _naming(self.bin_tmp):
            while block := src.read(_COPY_BYTES):
                self._bin.write(block)
                if progress is not None:
                    progress.update(len(block))
        self.num_documents += n
        self.num_elements += total

    def write_meta(self, meta: dict) -> None:
        """Write the sidecar ``<prefix>.meta.json`` under a temporary name; commit_all moves it in place
        together with the data, before the ``.idx`` that makes the dataset look complete."""
        with _naming(self.meta_tmp), open(self.meta_tmp, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
        self.has_meta = True

    def finalize(self) -> None:
        """Close the data file and write the index, still under temporary names."""
        with _naming(self.bin_tmp):
            self._bin.close()
        with _naming(self.len_tmp):
            self._lengths.close()
        n = self.num_documents
        itemsize = self.dtype.itemsize
        with _naming(self.idx_tmp), open(self.idx_tmp, "wb") as idx, open(self.len_tmp, "rb") as lens:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype.type]))
            idx.write(struct.pack("<Q", n))       # sequences
            idx.write(struct.pack("<Q", n + 1))   # document boundaries: one sequence per document
            for _ in range(0, n, _CHUNK):          # sequence lengths
                idx.write(lens.read(4 * _CHUNK))
            lens.seek(0)
            offset = 0
            for _ in range(0, n, _CHUNK):          # byte pointers, a running sum carried across blocks
                block = np.frombuffer(lens.read(4 * _CHUNK), dtype=np.int32).astype(np.int64)
                ends = np.cumsum(block) * itemsize + offset
                idx.write((ends - block * itemsize).tobytes())
                offset = int(ends[-1])
            for lo in range(0, n + 1, _CHUNK):     # document indices 0..n
                idx.write(np.arange(lo, min(lo + _CHUNK, n + 1), dtype=np.int64).tobytes())
        os.remove(self.len_tmp)

    def abort(self) -> None:
        """Close and delete every temporary file (safe to call twice, and on a full disk: closing flushes
        the buffer, which fails there, but the file is closed all the same and removed, freeing the space)."""
        for fh in (self._bin, self._lengths):
            try:
                fh.close()
            except OSError:
                pass
        for path in (self.bin_tmp, self.idx_tmp, self.len_tmp, self.meta_tmp):
            if os.path.exists(path):
                os.remove(path)


def commit_all(writers: Sequence[IndexedDatasetWriter]) -> None:
    """Move finalized writers to their final names.

    Old final ``.idx`` files (and sidecars) are removed first, and every ``.idx`` is renamed after every
    ``.bin`` and sidecar, so at any instant each final ``.bin``/``.idx`` pair is either absent, incomplete
    (no ``.idx``), or new with its new sidecar: a stale sidecar never describes new data.
    """
    for w in writers:
        for old in (w.prefix + ".idx", w.prefix + ".meta.json"):
            if os.path.exists(old):
                os.remove(old)
    for w in writers:
        os.replace(w.bin_tmp, w.prefix + ".bin")
        if w.has_meta:
            os.replace(w.meta_tmp, w.prefix + ".meta.json")
    for w in writers:
        os.replace(w.idx_tmp, w.prefix + ".idx")
