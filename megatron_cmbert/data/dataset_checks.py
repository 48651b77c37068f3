"""Launch-time checks that a token dataset exists and was built with the tokenizer a run is given.

A dataset built with one tokenizer and trained with another is otherwise never detected: an id past the
embedding fails deep inside F.embedding (TP=1) or shows up as an infinite loss (TP=2), and a different
tokenizer of the same size trains silently on garbage. tools/preprocess_data.py therefore writes a sidecar
``PREFIX.meta.json`` next to each token dataset ``PREFIX.bin/.idx``::

    {"tokenizer": {"sha256": <of tokenizer.json>, "vocab_size": int, "path": str},
     "documents": int, "tokens": int, "max_token_id": int | None, "json_key": str, "inputs": [...],
     "created_by": "tools/preprocess_data.py"}

The largest token id is read from the sidecar, never by scanning the data at every launch (a full scan reads
the whole token file: gigabytes of file pages on a large dataset). A dataset built before sidecars had it is
scanned once (memory-mapped, in chunks), saying so in one line, and the result recorded: into its older
sidecar, or into a sidecar of its own with no tokenizer entry (the tokenizer is not known), together with
the token file's size and mtime so that a rebuilt file is scanned again. Where the folder cannot be written,
each launch scans and says so. Every failure is a DataConfigError whose one-line message names the path, what is
wrong and what to pass instead; tools turn it into an exit message.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
import sys

import numpy as np

from megatron_cmbert.data.indexed import DTYPE_CODES, INDEX_HEADER
from megatron_cmbert.errors import UserError

META_SUFFIX = ".meta.json"
WORDSTART_SUFFIX = "_wordstart"
_SCAN_CHUNK = 1 << 24  # token ids per block of the fallback scan: bounded memory on any corpus size


class DataConfigError(UserError, ValueError):
    """A dataset that cannot be used as given; the message names the path, the problem and a hint."""


def meta_path(prefix: str) -> str:
    return prefix + META_SUFFIX


def _tokenizer_file(tokenizer_dir: str) -> str:
    return os.path.join(tokenizer_dir, "tokenizer.json") if os.path.isdir(tokenizer_dir) else tokenizer_dir


def tokenizer_fingerprint(tokenizer_dir: str) -> dict:
    """{"sha256": of the tokenizer.json bytes, "vocab_size": entries} for a tokenizer directory (or file)."""
    from megatron_cmbert.data.tokenizer import load_tokenizer

    file = _tokenizer_file(tokenizer_dir)
    if not os.path.isfile(file):
        raise DataConfigError(f"{tokenizer_dir}: no tokenizer.json; pass a directory written by "
                              f"tools/train_tokenizer.py")
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "vocab_size": load_tokenizer(file).get_vocab_size()}


def check_data_prefix(prefix: str) -> None:
    """PREFIX.bin/.idx and PREFIX_wordstart.bin/.idx must all exist; the hint names the likely intended
    prefix (a suffix given, or the ``_text_document`` name tools/preprocess_data.py writes)."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            raise DataConfigError(f"{prefix}: a data prefix is given without {suffix}; "
                                  f"pass {prefix[:-len(suffix)]}")
    files = [prefix + ext for ext in (".bin", ".idx")] + \
        [prefix + WORDSTART_SUFFIX + ext for ext in (".bin", ".idx")]
    missing = [f for f in files if not os.path.isfile(f)]
    if not missing:
        return
    built = sorted(p[:-len(".idx")] for p in glob.glob(glob.escape(prefix) + "_*_document.idx"))
    if os.path.isfile(prefix + "_text_document.idx"):
        hint = f"did you mean {prefix}_text_document?"
    elif built:
        hint = f"did you mean {' or '.join(built)}?"
    elif missing[0].startswith(prefix + WORDSTART_SUFFIX):
        hint = "the whole-word metadata is missing: rebuild the dataset with tools/preprocess_data.py"
    else:
        hint = "build it with tools/preprocess_data.py (it writes OUTPUT_PREFIX_text_document.bin/.idx)"
    raise DataConfigError(f"{prefix}: missing {', '.join(os.path.basename(f) for f in missing)}; {hint}")


def _read_meta(prefix: str) -> dict | None:
    """The sidecar's tokenizer ("sha256" None when it records none) and largest id ("max_token_id" absent when
    the sidecar predates it, or when a scan's record no longer matches the token file)."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
        tokenizer = meta.get("tokenizer")
        out = {"sha256": str(tokenizer["sha256"]) if tokenizer else None,
               "vocab_size": int(tokenizer["vocab_size"]) if tokenizer else None,
               "path": tokenizer.get("path") if tokenizer else None, "raw": meta}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataConfigError(f"{path}: unreadable dataset metadata ({error}); rebuild the dataset with "
                              f"tools/preprocess_data.py") from None
    if "max_token_id" in meta and (_bin_stamp(prefix) == meta.get("scanned") or "scanned" not in meta):
        out["max_token_id"] = meta["max_token_id"]
    return out


def _bin_stamp(prefix: str) -> dict:
    st = os.stat(prefix + ".bin")
    return {"bin_bytes": st.st_size, "bin_mtime_ns": st.st_mtime_ns}


def _log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one line per launch, not one per rank
        print(message, file=sys.stderr, flush=True)


def recorded_max_token_id(prefix: str, meta: dict | None, log=_log) -> int | None:
    """The largest token id of PREFIX: from its sidecar, or scanned once and recorded there (module doc)."""
    if meta is not None and "max_token_id" in meta:
        return meta["max_token_id"]
    largest = max_token_id(prefix)
    record = dict(meta["raw"]) if meta is not None else {
        "documents": None, "created_by": "megatron_cmbert.data.dataset_checks (a scan; the tokenizer is not known)"}
    record.update(max_token_id=largest, scanned=_bin_stamp(prefix))
    path = meta_path(prefix)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
        where = f"recorded in {os.path.basename(path)}, so later launches read it from there"
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        where = f"not recorded ({path}: {error.strerror}), so every launch scans it"
    what = "no max_token_id in its older sidecar" if meta is not None else "no sidecar (built before sidecars)"
    log(f"{prefix}: {what}: scanned the token file once for its largest id ({largest}), {where}")
    return largest


def _index_dtype(prefix: str) -> np.dtype:
    """The token dtype recorded in PREFIX.idx (Megatron's header: magic, version, dtype code)."""
    path = prefix + ".idx"
    with open(path, "rb") as fh:
        head = fh.read(len(INDEX_HEADER) + 9)
    codes = {code: np.dtype(t) for t, code in DTYPE_CODES.items()}
    if len(head) < len(INDEX_HEADER) + 9 or not head.startswith(INDEX_HEADER) \
            or struct.unpack("<B", head[-1:])[0] not in codes:
        raise DataConfigError(f"{path}: not a Megatron indexed-dataset index; rebuild the dataset with "
                              f"tools/preprocess_data.py")
    return codes[struct.unpack("<B", head[-1:])[0]]


def max_token_id(prefix: str) -> int | None:
    """Largest value in PREFIX.bin (None when empty), read memory-mapped in bounded chunks."""
    dtype = _index_dtype(prefix)
    size = os.path.getsize(prefix + ".bin") // dtype.itemsize
    if size == 0:
        return None
    values = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(size,))
    return max(int(values[lo:lo + _SCAN_CHUNK].max()) for lo in range(0, size, _SCAN_CHUNK))


def check_dataset_tokenizer(prefix: str, tokenizer_dir: str, log=_log) -> None:
    """The dataset at PREFIX must have been built with the tokenizer at tokenizer_dir: same tokenizer.json
    (sha256) per the sidecar, or, without a tokenizer recorded, no token id at or past the vocabulary size
    (the largest id read from the sidecar, or scanned once and recorded: module docstring)."""
    tokenizer = tokenizer_fingerprint(tokenizer_dir)
    vocab = tokenizer["vocab_size"]
    meta = _read_meta(prefix)
    if meta is not None and meta["sha256"] is not None:
        built_with = meta["path"] or "its original tokenizer"
        if meta["sha256"] != tokenizer["sha256"]:
            sizes = f"same size {vocab}" if meta["vocab_size"] == vocab else \
                f"{meta['vocab_size']} entries there, {vocab} here"
            raise DataConfigError(
                f"{prefix}: built with tokenizer {built_with} (sha256 {meta['sha256'][:12]}), but "
                f"{tokenizer_dir} is a different tokenizer (sha256 {tokenizer['sha256'][:12]}, {sizes}): "
                f"the ids would mean other text; pass --tokenizer-model {built_with} or rebuild the dataset "
                f"with tools/preprocess_data.py --tokenizer-model {tokenizer_dir}")
        largest = recorded_max_token_id(prefix, meta, log)
        if largest is not None and int(largest) >= vocab:  # a hand-edited sidecar; never trust it blindly
            raise DataConfigError(f"{prefix}: token ids up to {largest} but {tokenizer_dir} has {vocab} "
                                  f"entries; rebuild the dataset with tools/preprocess_data.py")
        return
    largest = recorded_max_token_id(prefix, meta, log)
    if largest is not None and largest >= vocab:
        raise DataConfigError(
            f"{prefix}: no {os.path.basename(meta_path(prefix))} sidecar (built before sidecars), and a scan "
            f"of the tokens finds id {largest}, past the {vocab} entries of {tokenizer_dir}: it was built with "
            f"another tokenizer; pass the tokenizer it was built with (--tokenizer-model) or rebuild it with "
            f"tools/preprocess_data.py")
