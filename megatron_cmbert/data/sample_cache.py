"""Sample indices built once, cached on disk as ``.npy``, shared by every rank and loader worker.

What is cached (all under ``--data-cache-path``, default ``cache/`` beside each dataset):

* per (dataset, split document range, sequence length, seed, dataset index, min piece, epoch): the packed
  ``pieces`` (n, 3) int32 rows (document, start, length) and the ``offsets`` (samples + 1) int64 that cut
  them into samples -- the document shuffle of that epoch is folded into them and not kept;
* per dataset: a marker that its token and word-start documents line up (checked once, not per process);
* per blend (weights, samples, block): the per-dataset sample counts at each block start, from which any
  block of the blend index is recomputed in milliseconds (Megatron stores the whole index; ours is
  ``blocks x datasets`` integers, which matters at 10^9 samples).

Entries are named by a hash of everything they depend on (the dataset's fingerprint: path, sizes,
mtimes and the head and tail bytes of its ``.idx``), so a changed input gets a new name and stale files
are never read. One process builds an entry while the others wait on an ``fcntl`` lock beside it, so
ranks, loader workers and separate jobs need no torch.distributed; files appear by rename, and the
small ``.json`` written last marks an entry complete.

Nothing proportional to the number of documents is copied into a process: ``EpochCache.open`` and
``blend_starts`` give ``np.load(mmap_mode="r")`` arrays, and the per-sample path reads its few rows with
``os.pread`` (``EpochReader``, ``DocumentReader``), because a mapped file page counts as a process's
private memory (USS) until another process maps it too, and with the kernel's large page-cache folios
one sample's lookups mapped about 1 MB. Read, a rank's memory stays flat however long it trains and
however large the dataset (measured in docs/BENCHMARKS.md).

The builder's peak memory: the int32 document range shuffled in place (4 bytes/document; numpy draws the
same swaps for any dtype, so the order is the uncached implementation's) and its non-empty subset;
pieces stream to disk in chunks of ``CHUNK`` documents.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from typing import Iterator, Optional

import numpy as np

from megatron_cmbert.data import helpers
from megatron_cmbert.data.indexed import DTYPE_CODES, INDEX_HEADER
from megatron_cmbert.errors import UserError

FORMAT = 1        # bump when the meaning of a cached file changes
CHUNK = 1 << 22   # documents packed per C++ call while streaming pieces to disk
BUILDS = {"epoch": 0, "blend": 0, "check": 0}  # entries this process built (tests check reuse with it)


class SampleCacheError(UserError, RuntimeError):
    """A cache entry cannot be built or read (one line naming the path)."""


def default_cache_dir(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")


def dataset_fingerprint(prefix: str) -> dict:
    """What identifies a dataset's content cheaply: paths, sizes and mtimes of its four files, and a hash
    of the first and last MiB of each .idx (header, first lengths, last document indices)."""
    out = {"prefix": os.path.abspath(prefix)}
    for name in (prefix, prefix + "_wordstart"):
        for ext in (".idx", ".bin"):
            path = name + ext
            try:
                st = os.stat(path)
            except OSError as exc:
                raise SampleCacheError(f"{path}: {exc.strerror}") from None
            out[os.path.basename(path)] = [st.st_size, st.st_mtime_ns]
        with open(name + ".idx", "rb") as fh:
            digest = hashlib.blake2b(fh.read(1 << 20), digest_size=16)
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - (1 << 20)))
            digest.update(fh.read())
        out[os.path.basename(name) + ".idx.digest"] = digest.hexdigest()
    return out


def _key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Exclusive lock on ``path`` (created if needed), held across processes until the block ends."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _cached(meta_path: str, build) -> tuple[dict, bool]:
    """The entry's metadata, building it first (under its lock) when missing. Returns (meta, built here)."""
    meta = _read_json(meta_path)
    if meta is not None:
        return meta, False
    os.makedirs(os.path.dirname(meta_path), exist_ok=True)
    with _locked(meta_path[: -len(".json")] + ".lock"):
        meta = _read_json(meta_path)  # another process may have finished it while we waited
        if meta is not None:
            return meta, False
        meta = build()
        _write_json(meta_path, meta)
        return meta, True


class _NpyStream:
    """Rows appended chunk by chunk to a raw temp file, then turned into ``path`` (.npy) by rename."""

    def __init__(self, path: str, dtype, row_shape: tuple = ()):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), row_shape, 0
        self.raw = open(f"{path}.raw{os.getpid()}", "wb")

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self.raw.write(memoryview(rows).cast("B"))
        self.rows += len(rows)

    def finish(self) -> None:
        self.raw.close()
        tmp = f"{self.path}.tmp{os.getpid()}.npy"
        with open(tmp, "wb") as out, open(self.raw.name, "rb") as src:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (self.rows,) + self.row_shape}
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out, 16 << 20)
        os.remove(self.raw.name)
        os.replace(tmp, self.path)

    def abort(self) -> None:
        self.raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.raw.name)


def check_word_starts(tokens, word_starts, prefix: str, cache_dir: str, fingerprint: dict) -> None:
    """Token and word-start datasets must have equal document lengths; compared once per dataset version."""
    stem = os.path.basename(prefix)

    def build() -> dict:
        BUILDS["check"] += 1
        a, b = tokens.sequence_lengths, word_starts.sequence_lengths
        for lo in range(0, max(len(a), len(b)) or 1, CHUNK):  # blockwise: no full-size temporaries
            if len(a) != len(b) or not np.array_equal(a[lo:lo + CHUNK], b[lo:lo + CHUNK]):
                raise ValueError(f"{prefix}: token and word-start datasets have different document lengths")
        return {"format": FORMAT, "dataset": fingerprint, "documents": int(len(a))}

    _cached(os.path.join(cache_dir, f"{stem}-{_key({'check': fingerprint, 'format': FORMAT})}.checked.json"), build)


class _Pread:
    """Byte ranges of a file by ``os.pread``: no mapping, no file position (safe after fork)."""

    def __init__(self, path: str):
        self.path, self._fd = path, None

    def read(self, n: int, offset: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise SampleCacheError(f"{self.path}: {len(data)} of {n} bytes at {offset}: the file is truncated")
        return data

    def __getstate__(self) -> dict:  # a spawned process opens its own descriptor
        return {"path": self.path, "_fd": None}

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)


def _npy_data(path: str) -> tuple[int, np.dtype]:
    """(byte offset of the data, dtype) of a C-ordered .npy file."""
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        _, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        if fortran:
            raise SampleCacheError(f"{path}: not a C-ordered array")
        return fh.tell(), dtype


class DocumentReader:
    """Token ranges of a Megatron indexed dataset (``PREFIX.idx`` / ``.bin``), read with ``os.pread``."""

    def __init__(self, prefix: str):
        with open(prefix + ".idx", "rb") as fh:
            header = fh.read(34)
        if header[:9] != INDEX_HEADER:
            raise SampleCacheError(f"{prefix}.idx: not a Megatron indexed dataset")
        version, code, n_seqs, _ = struct.unpack("<QBQQ", header[9:])
        codes = {c: np.dtype(t) for t, c in DTYPE_CODES.items()}
        if version != 1 or code not in codes:
            raise SampleCacheError(f"{prefix}.idx: version {version}, dtype code {code} not supported")
        self.dtype, self.n = codes[code], n_seqs
        self.pointers = 34 + 4 * n_seqs  # byte offset of the int64 pointers, after the int32 lengths
        self.idx, self.bin = _Pread(prefix + ".idx"), _Pread(prefix + ".bin")

    def get(self, doc: int, start: int, length: int) -> np.ndarray:
        (pointer,) = struct.unpack("<q", self.idx.read(8, self.pointers + 8 * doc))
        size = self.dtype.itemsize
        return np.frombuffer(self.bin.read(length * size, pointer + start * size), dtype=self.dtype)


class EpochReader:
    """Sample ``local`` -> its (n, 3) piece rows of one cached epoch, read with ``os.pread``."""

    def __init__(self, paths: dict, samples: int):
        self.samples = samples
        (self.p0, pdtype), (self.o0, odtype) = _npy_data(paths["pieces"]), _npy_data(paths["offsets"])
        if (pdtype, odtype) != (np.dtype(np.int32), np.dtype(np.int64)):
            raise SampleCacheError(f"{paths['pieces']}: unexpected dtypes {pdtype}, {odtype}")
        self.pieces, self.offsets = _Pread(paths["pieces"]), _Pread(paths["offsets"])

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, local: int) -> np.ndarray:
        lo, hi = struct.unpack("<qq", self.offsets.read(16, self.o0 + 8 * local))
        return np.frombuffer(self.pieces.read(12 * (hi - lo), self.p0 + 12 * lo), dtype=np.int32).reshape(-1, 3)


class EpochCache:
    """The packed samples of one dataset's split, epoch by epoch, built on first use and memory-mapped.

    Epoch k visits the split's non-empty documents in ``default_rng([seed, dataset_index, k])``'s
    permutation and packs them with data/packing.py's rules.
    """

    def __init__(self, prefix: str, fingerprint: dict, doc_range: tuple[int, int], seq_length: int, seed: int,
                 dataset_index: int, min_piece: int, cache_dir: str):
        self.doc_range = (int(doc_range[0]), int(doc_range[1]))
        self.seq_length, self.seed, self.dataset_index, self.min_piece = seq_length, seed, dataset_index, min_piece
        self.inputs = {"format": FORMAT, "dataset": fingerprint, "doc_range": list(self.doc_range),
                       "seq_length": seq_length, "seed": seed, "dataset_index": dataset_index,
                       "min_piece": min_piece}
        self.stem = os.path.join(cache_dir, f"{os.path.basename(prefix)}-{_key(self.inputs)}")

    def paths(self, epoch: int) -> dict:
        base = f"{self.stem}-e{epoch}"
        return {"meta": base + ".json", "pieces": base + ".pieces.npy", "offsets": base + ".offsets.npy"}

    def ensure(self, epoch: int, lengths: np.ndarray) -> tuple[dict, bool]:
        """Build epoch ``epoch`` from the dataset's int32 document ``lengths`` unless cached. Returns (its
        metadata, whether this call built it)."""
        return _cached(self.paths(epoch)["meta"], lambda: self._build(epoch, lengths))

    def open(self, epoch: int, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(pieces, offsets, samples) of ``epoch``, memory-mapped read-only."""
        meta, _ = self.ensure(epoch, lengths)
        paths = self.paths(epoch)
        pieces, offsets = (np.load(paths[k], mmap_mode="r") for k in ("pieces", "offsets"))
        if len(pieces) != meta["pieces"] or len(offsets) != meta["samples"] + 1:
            raise SampleCacheError(f"{paths['meta']}: cached arrays do not match their metadata; delete the entry")
        return pieces, offsets, int(meta["samples"])

    def reader(self, epoch: int, lengths: np.ndarray) -> EpochReader:
        """The per-sample reader of ``epoch`` (built first if needed)."""
        meta, _ = self.ensure(epoch, lengths)
        return EpochReader(self.paths(epoch), int(meta["samples"]))

    def _build(self, epoch: int, lengths: np.ndarray) -> dict:
        BUILDS["epoch"] += 1
        lo, hi = self.doc_range
        # int32 keeps the shuffle at 4 bytes/document; numpy's shuffle draws the same swaps for any
        # dtype, so the order equals that of permuting the int64 range (the uncached implementation).
        # permutation(x) is shuffle(copy of x): shuffling in place saves the copy.
        order = np.arange(lo, hi, dtype=np.int32 if hi <= np.iinfo(np.int32).max else np.int64)
        np.random.default_rng([self.seed, self.dataset_index, epoch]).shuffle(order)
        keep = np.empty(len(order), dtype=bool)
        for start in range(0, len(order), CHUNK):  # blockwise: no full-size gathered lengths
            keep[start:start + CHUNK] = lengths[order[start:start + CHUNK]] > 0
        order = order[keep]
        paths = self.paths(epoch)
        pieces = _NpyStream(paths["pieces"], np.int32, (3,))
        ends = _NpyStream(paths["offsets"], np.int64)
        try:
            ends.append(np.zeros(1, dtype=np.int64))
            used = 0
            for start in range(0, len(order), CHUNK):
                chunk_pieces, chunk_ends, used = helpers.pack_chunk(
                    lengths, order[start:start + CHUNK], self.seq_length, self.min_piece, used)
                ends.append(chunk_ends + pieces.rows)
                pieces.append(chunk_pieces)
            if used:
                ends.append(np.array([pieces.rows], dtype=np.int64))
            pieces.finish()
            ends.finish()
        except BaseException:
            pieces.abort()
            ends.abort()
            raise
        return {**self.inputs, "epoch": epoch, "documents": int(len(order)), "pieces": pieces.rows,
                "samples": ends.rows - 1}


def blend_starts(weights: np.ndarray, n_samples: int, block: int, cache_dir: Optional[str]) -> np.ndarray:
    """(blocks + 1, datasets) int64: samples given to each dataset before each block of the blend index,
    cached under ``cache_dir`` (or computed in memory when it is None)."""
    n_blocks = -(-int(n_samples) // int(block))

    def compute() -> np.ndarray:
        starts = np.zeros((n_blocks + 1, len(weights)), dtype=np.int64)
        counts = np.zeros(len(weights), dtype=np.int64)
        for b in range(n_blocks):
            lo = b * block
            helpers.blend_block(weights, counts, lo, min(block, n_samples - lo))
            starts[b + 1] = counts
        return starts

    if cache_dir is None or n_blocks <= 1:  # one block: nothing worth a file
        return compute()
    inputs = {"format": FORMAT, "weights": [float(w) for w in weights], "samples": int(n_samples),
              "block": int(block)}
    base = os.path.join(cache_dir, f"blend-{_key(inputs)}")

    def build() -> dict:
        BUILDS["blend"] += 1
        starts = compute()
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, starts)
        os.replace(tmp, base + ".npy")
        return {**inputs, "blocks": n_blocks}

    _cached(base + ".json", build)
    return np.load(base + ".npy", mmap_mode="r")
