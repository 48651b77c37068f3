"""Near-duplicate removal on HF datatrove's MinHash pipeline, configured for Chinese.

datatrove does the work that must scale (signatures written per task, buckets sorted and matched
per bucket, one clustering pass over duplicate pairs only, a filter per task); this module adds
what it does not know about our corpora:

- ``CorpusReader``: our jsonl reader (``data/jsonl.py``) as a datatrove step. Task ``r`` of ``T``
  reads the input files ``i`` with ``i % T == r`` in order, so the document index of stage 1 and of
  stage 4 is the same. Bad lines become documents with empty text: they get no signature (so are
  never removed) and are copied through unchanged, as before: dedup is not a quality filter.
- ``CharShingleSignature``: shingles are character n-grams of the NFKC text with punctuation,
  whitespace and control characters dropped (docs/DEDUP.md says why not words); ``--shingle word``
  uses rjieba word n-grams instead.
- ``LinesWriter``: copies each kept line byte for byte to ``OUT/<name>.jsonl``, under a temporary
  name renamed when the file is complete, and records what each source lost.
- ``ReportStep``: one task merging the per-task counts into ``OUT/dedup_report.json``.

``build_stages`` returns the five stages; ``tools/dedup_minhash.py`` runs them with datatrove's
local executor, ``examples/slurm_dedup.py`` with its Slurm executor.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WhitespaceTokenizer

from megatron_cmbert.data.jsonl import SkipCounter, get_text, iter_records
from megatron_cmbert.errors import UserError

SHINGLES = ("char", "word")
_U = np.uint64


class DedupError(UserError, ValueError):
    """A dedup run cannot start (bad inputs, settings, or a work folder from other inputs)."""


@dataclass(frozen=True)
class DedupSettings:
    ngram: int = 5  # shingle size: characters (char) or words (word)
    buckets: int = 10  # LSH bands; 10 x 11 puts the S-curve's midpoint at Jaccard ~0.81
    rows: int = 11  # hashes per band (docs/DEDUP.md: measured against the former tool)
    seed: int = 1
    json_key: str = "text"
    shingle: str = "char"

    def check(self) -> None:
        if min(self.ngram, self.buckets, self.rows) < 1:
            raise DedupError("--ngram, --buckets and --rows must be >= 1")
        if self.shingle not in SHINGLES:
            raise DedupError(f"--shingle must be one of {SHINGLES}, got {self.shingle!r}")

    @property
    def threshold(self) -> float:
        """Jaccard at which two documents share a band with probability ~1/2: (1/b)^(1/r)."""
        return (1.0 / self.buckets) ** (1.0 / self.rows)

    def minhash_config(self) -> MinhashConfig:
        # sha1 shingle hashing is datatrove's dependency-free choice; ours hashes shingles itself
        # (below), so datatrove's shingle hash is never used and xxhash is not needed.
        return MinhashConfig(n_grams=self.ngram, num_buckets=self.buckets,
                             hashes_per_bucket=self.rows, seed=self.seed,
                             hash_config=HashConfig(precision=64, hash_fc="sha1"))


def output_name(path: str) -> str:
    base = os.path.basename(path)
    return base[:-3] if base.endswith(".gz") else base


# --- shingles -------------------------------------------------------------------------------

def _drop_char(ch: str) -> bool:
    # Punctuation, separators, control and format characters (zero-width spaces, BOMs): "，" vs ","
    # or an inserted space would otherwise change every shingle spanning it.
    cat = unicodedata.category(ch)
    return cat[0] in "PZ" or cat in ("Cc", "Cf")


_BMP_DROP = np.array([_drop_char(chr(c)) for c in range(0x10000)], dtype=bool)


def normalize_codepoints(text: str) -> np.ndarray:
    """NFKC code points of ``text`` without punctuation/whitespace/control characters (uint32)."""
    cps = np.frombuffer(unicodedata.normalize("NFKC", text).encode("utf-32-le"), dtype="<u4")
    drop = np.zeros(len(cps), dtype=bool)
    bmp = cps < 0x10000
    drop[bmp] = _BMP_DROP[cps[bmp]]
    for i in np.flatnonzero(~bmp):  # astral characters are rare: checked one by one
        drop[i] = _drop_char(chr(int(cps[i])))
    return cps[~drop]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed 64-bit mixing, the same on every run (never Python's hash())."""
    x = x ^ (x >> _U(30))
    x = x * _U(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U(27))
    x = x * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def _ngram_hashes(units: np.ndarray, ngram: int) -> np.ndarray:
    """Sorted unique hashes of the ``ngram``-windows of ``units`` (uint64 ids); a sequence shorter
    than ``ngram`` is one shingle, an empty one has none (never compared, never removed)."""
    if len(units) == 0:
        return np.zeros(0, dtype=np.uint64)
    width = min(ngram, len(units))
    count = len(units) - width + 1
    h = np.full(count, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for j in range(width):
        h = _mix64(h * _U(0x100000001B3) + units[j: j + count])
    return np.unique(_mix64(h ^ _U(width)))  # a short text must not equal a longer shingle's prefix


def char_shingles(text: str, ngram: int) -> np.ndarray:
    return _ngram_hashes(normalize_codepoints(text).astype(np.uint64), ngram)


def word_shingles(text: str, ngram: int) -> np.ndarray:
    import rjieba

    norm = normalize_codepoints(text).astype("<u4").tobytes().decode("utf-32-le")
    words = rjieba.cut(norm)
    ids = np.array([_ngram_hashes(np.frombuffer(w.encode("utf-32-le"), dtype="<u4").astype(np.uint64),
                                  len(w))[0] for w in words], dtype=np.uint64)
    return _ngram_hashes(ids, ngram)


class CharShingleSignature(MinhashDedupSignature):
    """datatrove's stage 1 with our Chinese shingles (datatrove's own splits on words with spaCy)."""

    def __init__(self, output_folder: str, settings: DedupSettings):
        # Our get_shingles never calls a word tokenizer; passing one directly keeps datatrove from
        # loading spaCy (its default for both English and Chinese).
        super().__init__(output_folder, config=settings.minhash_config(),
                         language=WhitespaceTokenizer())
        self.settings = settings

    def get_shingles(self, text: str) -> np.ndarray:
        fn = char_shingles if self.settings.shingle == "char" else word_shingles
        return fn(text, self.settings.ngram).reshape(-1, 1)


# --- reading, writing, reporting -------------------------------------------------------------

def _task_files(paths: list[str], rank: int, world_size: int) -> list[int]:
    return list(range(rank, len(paths), world_size))


class CorpusReader(PipelineStep):
    """Our jsonl reader as datatrove's first step; counts per source go to ``stats_dir``."""

    name = "jsonl (file:line skip reasons)"
    type = "📖 - READER"

    def __init__(self, paths: list[str], json_key: str, keep_raw: bool = False,
                 stats_dir: str | None = None):
        super().__init__()
        self.paths, self.json_key, self.keep_raw, self.stats_dir = paths, json_key, keep_raw, stats_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = _task_files(self.paths, rank, world_size)
        stats = {self.paths[i]: {"docs_in": 0, "bad": SkipCounter()} for i in files}
        for i in files:
            for rec in iter_records([self.paths[i]], keep_raw=self.keep_raw):
                text, reason = get_text(rec, self.json_key)
                st = stats[rec.path]
                st["docs_in"] += 1
                if reason is not None:
                    st["bad"].add(reason, rec.where)
                self.stat_update("documents")
                yield Document(text=text or "", id=rec.where,
                               metadata={"file": i, "raw": rec.raw, "bad": reason})
        if self.stats_dir:
            _write_json(os.path.join(self.stats_dir, f"read_{rank:05d}.json"), {
                p: {"docs_in": s["docs_in"], "bad_counts": s["bad"].counts, "bad_examples": s["bad"].examples}
                for p, s in stats.items()})


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


class LinesWriter(PipelineStep):
    """Copies kept lines unchanged to ``out_dir/<name>``; each file appears by rename when done."""

    name = "jsonl lines (byte-exact)"
    type = "💽 - WRITER"

    def __init__(self, paths: list[str], out_dir: str, stats_dir: str):
        super().__init__()
        self.paths, self.out_dir, self.stats_dir = paths, out_dir, stats_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = _task_files(self.paths, rank, world_size)
        kept = {self.paths[i]: 0 for i in files}
        tmp_of = {i: os.path.join(self.out_dir, output_name(self.paths[i])) + f".tmp{os.getpid()}" for i in files}
        os.makedirs(self.out_dir, exist_ok=True)
        handles = {}
        try:
            for i in files:  # every owned file gets an output, even when all its lines go
                handles[i] = open(tmp_of[i], "wb")
            for doc in data:
                handles[doc.metadata["file"]].write(doc.metadata["raw"])
                kept[self.paths[doc.metadata["file"]]] += 1
                self.stat_update("kept")
            for fh in handles.values():
                fh.close()
        except BaseException:
            for i, fh in handles.items():
                try:
                    fh.close()  # on a full disk the flush in close fails; the file is closed all the same
                except OSError:
                    pass
                os.remove(tmp_of[i])
            raise
        for i in files:
            os.replace(tmp_of[i], os.path.join(self.out_dir, output_name(self.paths[i])))
        _write_json(os.path.join(self.stats_dir, f"write_{rank:05d}.json"), kept)
        return
        yield  # a generator step (datatrove iterates over every step)


class ReportStep(PipelineStep):
    """One task: merges every task's counts into ``out_dir/dedup_report.json`` (by rename)."""

    name = "documents lost per source"
    type = "📊 - REPORT"

    def __init__(self, paths: list[str], out_dir: str, stats_dir: str, settings: DedupSettings):
        super().__init__()
        self.paths, self.out_dir, self.stats_dir, self.settings = paths, out_dir, stats_dir, settings

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        read, kept = {}, {}
        for name in sorted(os.listdir(self.stats_dir)):
            if not STATS_NAME.fullmatch(name):  # e.g. a killed writer's read_00000.json.tmp<pid>
                continue
            with open(os.path.join(self.stats_dir, name), encoding="utf-8") as fh:
                (read if name.startswith("read_") else kept).update(json.load(fh))
        files = []
        for path in self.paths:
            r, k = read[path], kept[path]
            files.append({
                "path": path, "output": os.path.join(self.out_dir, output_name(path)),
                "docs_in": r["docs_in"], "removed": r["docs_in"] - k, "kept": k,
                "percent_lost": round(100.0 * (r["docs_in"] - k) / r["docs_in"], 3) if r["docs_in"] else 0.0,
                "bad_lines_passed": sum(r["bad_counts"].values()),
                "bad_line_reasons": dict(sorted(r["bad_counts"].items())),
                "bad_line_examples": r["bad_examples"],
            })
        report = {
            "engine": "datatrove MinHash (signatures -> buckets -> clusters -> filter)",
            "settings": {**asdict(self.settings), "threshold_estimate": round(self.settings.threshold, 4)},
            "files": files,
            "total": {k: sum(f[k] for f in files) for k in ("docs_in", "removed", "kept", "bad_lines_passed")},
        }
        _write_json(os.path.join(self.out_dir, "dedup_report.json"), report)
        return
        yield


STATS_NAME = re.compile(r"(read|write)_\d{5}\.json")


@dataclass(frozen=True)
class Stage:
    name: str
    pipeline: list
    tasks: int


def build_stages(paths: list[str], out_dir: str, work_dir: str, settings: DedupSettings,
                 tasks: int) -> list[Stage]:
    """The five stages, in order; stage 2 runs one task per band, stages 3 and 5 one task."""
    settings.check()
    cfg = settings.minhash_config()
    sigs, dups, remove = (os.path.join(work_dir, d) for d in ("signatures", "buckets", "remove_ids"))
    stats = os.path.join(work_dir, "stats")
    return [
        Stage("signatures", [CorpusReader(paths, settings.json_key),
                             CharShingleSignature(sigs, settings)], tasks),
        Stage("buckets", [MinhashDedupBuckets(sigs, dups, config=cfg)], settings.buckets),
        Stage("clusters", [MinhashDedupCluster(dups, remove, config=cfg)], 1),
        Stage("filter", [CorpusReader(paths, settings.json_key, keep_raw=True, stats_dir=stats),
                         MinhashDedupFilter(remove), LinesWriter(paths, out_dir, stats)], tasks),
        Stage("report", [ReportStep(paths, out_dir, stats, settings)], 1),
    ]


WORK_FORMAT = 2  # 2: written by a tool whose killed runs leave no task running (data/dedup_local.py)
WORK_ENTRIES = ("signatures", "buckets", "remove_ids", "stats", "logs", "manifest.json")


def work_manifest(paths: list[str], settings: DedupSettings, tasks: int, output_dir: str | None = None) -> dict:
    return {
        "format": WORK_FORMAT,
        "inputs": [{"path": os.path.abspath(p), "size": os.path.getsize(p),
                    "mtime_ns": os.stat(p).st_mtime_ns} for p in paths],
        "settings": asdict(settings), "tasks": tasks,
        "output_dir": os.path.abspath(output_dir) if output_dir else None,
    }


def read_manifest(work_dir: str) -> dict | None:
    path = os.path.join(work_dir, "manifest.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}  # unreadable: a work folder of no known run


def clear_work_dir(work_dir: str) -> None:
    """Remove what the stages wrote (only those entries: the folder may hold other things)."""
    for name in WORK_ENTRIES:
        path = os.path.join(work_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def other_run_error(work_dir: str) -> DedupError:
    return DedupError(f"{work_dir} holds a run with other inputs, settings, --tasks or output folder; "
                      "remove it, choose another --work-dir, or pass --force to start it over")


def same_run(found: dict | None, manifest: dict, work_dir: str) -> bool:
    """Whether the work folder's manifest is this run's (any format): its outputs are then this run's own.
    A folder of an older tool recorded no output folder: it is the default one's, OUTDIR/.dedup_work."""
    if not found or any(found.get(k) != manifest[k] for k in ("inputs", "settings", "tasks")):
        return False
    owner = found.get("output_dir", os.path.dirname(os.path.abspath(work_dir)) if "format" not in found else None)
    return owner == manifest["output_dir"]


def check_work_dir(work_dir: str, paths: list[str], settings: DedupSettings, tasks: int,
                   output_dir: str | None = None, restart: bool = False, log=None) -> str:
    """Resuming is only correct for the same inputs, settings and task count: the work folder records them
    on first use. Returns "new", "resume" or "restarted". A folder of other inputs or settings is refused
    (naming it), or started over with ``restart`` (--force); one written by an older version of the tool,
    whose killed runs could leave signatures written twice, is started over, saying so in one line."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    manifest = work_manifest(paths, settings, tasks, output_dir)
    found = read_manifest(work_dir)
    if found == manifest:
        return "resume"
    if found is not None:
        older = found.get("format") is None and all(found.get(k) == manifest[k] for k in ("inputs", "settings", "tasks"))
        if older:
            log(f"{work_dir}: a work folder of an older dedup_minhash.py (a killed run of it could leave "
                f"signatures written twice): starting it over")
        elif restart:
            log(f"{work_dir}: held a run with other inputs, settings, --tasks or output folder: starting it "
                f"over (--force)")
        else:
            raise other_run_error(work_dir)
        clear_work_dir(work_dir)
    _write_json(os.path.join(work_dir, "manifest.json"), manifest)
    return "new" if found is None else "restarted"
