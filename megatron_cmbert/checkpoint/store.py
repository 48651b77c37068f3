"""Checkpoints through megatron-core ``dist_checkpointing``: sharded, reshardable across TP sizes, atomic,
verified before loading, with a fallback to the previous complete checkpoint.

Layout of ``--save DIR``::

    DIR/iter_0000010/            one checkpoint (dist_checkpointing files + config.json + tokenizer/)
    DIR/latest_checkpointed_iteration.txt   the step of the newest complete checkpoint

A checkpoint is written under ``iter_XXXXXXX.tmp`` and renamed when every rank has finished; the
``latest`` marker is replaced last. A run killed during a save leaves a ``.tmp`` directory that is never
loaded, and the marker still names the previous checkpoint.

Every TP-split parameter (and its Adam moments) is stored as one logical tensor sliced along its
``partition_dim``, so a checkpoint saved at TP=2 loads at TP=1 or TP=4.

What a checkpoint holds (torch_dist format, megatron-core 0.16): ``metadata.json`` (which backend wrote it),
``.metadata`` (torch.distributed.checkpoint ``Metadata``, pickled: ``storage_data`` maps every stored item
to a data file, a byte offset and a length), the data files ``__R_K.distcp`` it names, ``common.pt`` (the
non-tensor state: ``train_state``, optimizer step counts, world size; a torch.save'd dict), and
``config.json`` (a RunRecord, checkpoint/records.py) / ``tokenizer/``. ``verify_checkpoint`` checks all of
that from the filesystem alone (no collectives, same answer on every rank), so a damaged checkpoint is named
before the collective load starts; failures are ``CheckpointError`` with one line naming the file and the
reason.

What is stored is generic: the model's parameters by name, and whatever the optimizer hands over through
``checkpoint_state(names)`` / ``load_checkpoint_state(names, loaded)`` (tensors shaped like a parameter are
sharded like it; the rest is common state), so this module knows nothing of any optimizer's internals.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_cmbert.checkpoint.records import CheckpointError, NoCheckpointError, RunRecord, TrainState
from megatron_cmbert.parallel.world import Ranks

LATEST = "latest_checkpointed_iteration.txt"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index file (FileSystemWriter's name for it)
COMMON = "common.pt"        # megatron-core's non-sharded state (dist_checkpointing.strategies.common)
_ITER = re.compile(r"iter_(\d+)")


def _sharded(key: str, tensor: torch.Tensor, param, ranks: Ranks):
    from megatron.core.dist_checkpointing import ShardedTensor

    if getattr(param, "tensor_model_parallel", False):
        return ShardedTensor.from_rank_offsets(key, tensor, (param.partition_dim, ranks.tp_rank, ranks.tp_size),
                                               replica_id=(0, ranks.dp_rank))
    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=(ranks.tp_rank, ranks.dp_rank))


def sharded_state_dict(model, optimizer, ranks: Ranks, train_state: Optional[TrainState] = None) -> dict:
    """The dict handed to dist_checkpointing.save / load (tensors are the live ones: load fills them)."""
    from megatron.core.dist_checkpointing import ShardedObject

    state = {}
    names = {}
    for name, p in model.named_parameters():
        names[p] = name
        state[f"model.{name}"] = _sharded(f"model.{name}", p.data, p, ranks)
    if optimizer is not None:
        tensors, common = optimizer.checkpoint_state(names)
        for key, (tensor, param) in tensors.items():
            state[key] = _sharded(key, tensor, param, ranks)
        state.update(common)  # common (rank 0) state: identical on every rank
    # RNG states per rank, restored when the world size is unchanged. Today nothing draws from them after
    # initialisation (no dropout; masks use per-sample generators); kept so that adding dropout cannot
    # silently break exact resume.
    rng = {"torch": torch.get_rng_state()}
    state["rng"] = ShardedObject("rng", rng, (ranks.world,), (ranks.rank,), replica_id=0)
    state["world_size"] = ranks.world
    if train_state is not None:
        state["train_state"] = train_state.to_json()
    return state


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (library errors can span pages)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _describe_load_error(exc: BaseException) -> str:
    """torch.distributed.checkpoint reports a rank's failure as a multi-page CheckpointException: keep the
    first failing rank's own exception."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = sorted(failures.items(), key=lambda kv: kv[0])[0]
        inner = getattr(pair, "exception", None) or (pair[0] if isinstance(pair, tuple) else pair)
        return f"rank {rank}: {_one_line(inner)}"
    return _one_line(exc)


def _gather(value) -> list:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a process group of more than one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _agree(error: Optional[str]) -> Optional[str]:
    """Every rank's view of one outcome -> the same answer everywhere: the first failing rank's message,
    or None when every rank succeeded."""
    return next((e for e in _gather(error) if e), None)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# -- listing and resolving (filesystem only: usable before distributed set-up) ----------------------------
def read_marker(save_dir: str) -> Optional[int]:
    """The step in ``save_dir``'s latest marker; None when there is no marker; CheckpointError when it is
    unreadable, empty or not a step number."""
    marker = os.path.join(save_dir, LATEST)
    if not os.path.lexists(marker):
        return None
    try:
        with open(marker, encoding="utf-8", errors="replace") as fh:
            text = fh.read().strip()
    except OSError as exc:
        raise CheckpointError(f"{marker}: unreadable ({_one_line(exc)})") from exc
    if not text:
        raise CheckpointError(f"{marker}: empty (it should hold the step of the newest checkpoint)")
    if not text.isdigit():
        raise CheckpointError(f"{marker}: {text[:40]!r} is not a step number")
    return int(text)


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``save_dir`` as (step, path), ascending. Only ``iter_N`` directories count:
    ``.tmp`` (a save in progress or torn) and ``.old`` (set aside or being deleted) never do."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = _ITER.fullmatch(name)
        path = os.path.join(save_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_load(load_path: str, warn: Optional[Callable[[str], None]] = None) -> list[str]:
    """Checkpoints to try for ``--load load_path``, newest first.

    An ``iter_N`` directory (or any directory holding ``metadata.json``) is exactly that checkpoint, with no
    fallback. A save directory gives its complete checkpoints, newest first, starting at the one its marker
    names; when the marker is missing, unreadable or names a missing directory, every complete checkpoint
    is a candidate and ``warn`` (if given) is told why.
    """
    if not os.path.isdir(load_path):
        what = "not a directory" if os.path.exists(load_path) else "does not exist"
        raise NoCheckpointError(f"{load_path}: {what}")
    name = os.path.basename(os.path.normpath(load_path))
    if name.endswith((".tmp", ".old")) and _ITER.fullmatch(name.rsplit(".", 1)[0]):
        raise CheckpointError(f"{load_path}: an unfinished or discarded save ({name.rsplit('.', 1)[1]}), "
                              f"never loaded; use its parent directory to load the newest complete checkpoint")
    if _ITER.fullmatch(name) or os.path.isfile(os.path.join(load_path, "metadata.json")):
        return [load_path]
    found = list_checkpoints(load_path)
    newest_first = [path for _, path in reversed(found)]
    problem = None
    try:
        step = read_marker(load_path)
    except CheckpointError as exc:
        problem = str(exc)
    else:
        marker = os.path.join(load_path, LATEST)
        if step is None:
            problem = f"{marker}: missing" if found else None
        elif step not in dict(found):
            problem = f"{marker}: names step {step} but {os.path.join(load_path, f'iter_{step:07d}')} is missing"
        else:  # newer directories were never marked complete by a finished save
            newest_first = [path for s, path in reversed(found) if s <= step]
    if not newest_first:
        raise NoCheckpointError(f"{load_path}: no complete checkpoint (iter_NNNNNNN directory)"
                                + (f"; {problem}" if problem else ""))
    if problem and warn:
        warn(f"warning: {problem}; trying the newest complete checkpoint {newest_first[0]}")
    return newest_first


# -- reading and verifying (filesystem only, deterministic) ------------------------------------------------
def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({_one_line(exc)})") from exc


def _read_common(path: str) -> dict:
    file = os.path.join(path, COMMON)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing (the checkpoint's common state)")
    try:  # weights_only=True, as megatron-core loads it
        common = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (zip, pickle, EOF) for one cause: bad bytes
        raise CheckpointError(f"{file}: unreadable ({_one_line(exc)})") from exc
    if not isinstance(common, dict):
        raise CheckpointError(f"{file}: holds a {type(common).__name__}, expected a dict")
    return common


def _read_dcp_index(path: str):
    from torch.distributed.checkpoint.metadata import Metadata

    file = os.path.join(path, DCP_METADATA)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing (the index of the tensor data files)")
    try:
        with open(file, "rb") as fh:
            index = pickle.load(fh)  # the same load torch.distributed.checkpoint does
    except Exception as exc:  # truncated/garbled pickle: EOFError, UnpicklingError, ...
        raise CheckpointError(f"{file}: unreadable ({_one_line(exc)})") from exc
    if not isinstance(index, Metadata) or not isinstance(index.storage_data, dict):
        raise CheckpointError(f"{file}: holds a {type(index).__name__}, not a torch.distributed.checkpoint Metadata")
    return index


def verify_checkpoint(path: str) -> None:
    """Check ``path`` without collectives or loading tensors: metadata.json names the torch_dist backend,
    ``.metadata`` unpickles, every data file it references exists and is long enough, ``common.pt`` loads
    and holds a dict, and config.json / tokenizer/tokenizer.json parse when present. Raises CheckpointError."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: missing (not a directory)")
    backend = _read_json(os.path.join(path, "metadata.json"), "dist_checkpointing's format record")
    if not isinstance(backend, dict) or backend.get("sharded_backend") != "torch_dist":
        found = backend.get("sharded_backend") if isinstance(backend, dict) else backend
        raise CheckpointError(f"{os.path.join(path, 'metadata.json')}: sharded backend {found!r}, "
                              f"expected 'torch_dist' (the format this code writes)")
    index = _read_dcp_index(path)
    needed: dict[str, int] = {}  # data file -> bytes the index says it holds at least
    for info in index.storage_data.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative, end in sorted(needed.items()):
        file = os.path.join(path, relative)
        try:
            size = os.path.getsize(file)
        except OSError:
            raise CheckpointError(f"{file}: missing (listed in {DCP_METADATA})") from None
        if size < end:
            raise CheckpointError(f"{file}: truncated ({size:,} bytes; {DCP_METADATA} needs {end:,})")
    common = _read_common(path)
    if "train_state" in common:
        TrainState.from_json(common["train_state"], f"{os.path.join(path, COMMON)} train_state")
    if os.path.exists(os.path.join(path, "config.json")):
        read_run_record(path)
    tokenizer = os.path.join(path, "tokenizer")
    if os.path.isdir(tokenizer):
        _read_json(os.path.join(tokenizer, "tokenizer.json"), "tokenizer")


def read_run_record(path: str) -> RunRecord:
    """The checkpoint's config.json (what was trained, and how), any version."""
    file = os.path.join(path, "config.json")
    return RunRecord.from_json(_read_json(file, "the run's configuration"), file)


def read_train_state(path: str) -> TrainState:
    """The TrainState saved with the checkpoint (step, consumed samples, ...), read without a model."""
    state = _read_common(path).get("train_state")
    where = f"{os.path.join(path, COMMON)} train_state"
    if state is None:
        raise CheckpointError(f"{os.path.join(path, COMMON)}: holds no train_state")
    return TrainState.from_json(state, where)


# -- save ----------------------------------------------------------------------------------------------------
def _delete_older(save_dir: str, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints up to ``step`` (``step``'s own included); delete
    older ones. A directory is renamed to ``.old`` first, so a kill mid-delete never leaves a half-deleted
    ``iter_N`` that looks complete. Checkpoints newer than ``step`` (another run's) are left alone."""
    older = [path for s, path in list_checkpoints(save_dir) if s < step]
    for path in older[:max(len(older) - (keep_last - 1), 0)]:
        doomed = path + ".old"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def delete_after(save_dir: str, step: int, ranks: Ranks, log=print) -> None:
    """Delete every complete checkpoint of ``save_dir`` after ``step`` (rank 0; every rank waits): what
    --overwrite does before a run's first save, so the directory never mixes two runs."""
    if ranks.rank == 0:
        for s, path in list_checkpoints(save_dir):
            if s > step:
                shutil.rmtree(path)
                log(f"--overwrite: deleted {path}")
    _barrier()


def _ignore_stop_signals() -> None:
    """Initializer of the writer's queue manager (module level: a spawned process imports it): deaf to the
    stop signals, and killed by the kernel when the rank that started it dies, however it dies (Linux
    PR_SET_PDEATHSIG), so it can never outlive the run holding the run's output pipes."""
    import ctypes
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the manager's own finaliser still shuts it down
        pass


_WRITER_MANAGER = None


def _writer_queue_survives_stop_signals() -> None:
    """megatron-core's checkpoint writer sends its results through a queue held by a multiprocessing manager,
    a spawned process of its own in this process group. torchrun stops a run by signalling the rank's whole
    group, so that manager died of SIGTERM (or Ctrl-C) in the middle of the stop's save (BrokenPipeError,
    ConnectionResetError). Start it here, first, with the stop signals ignored: the rank decides when to
    stop, and the manager ends with it."""
    global _WRITER_MANAGER
    from multiprocessing.managers import SyncManager

    import torch.multiprocessing as mp
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _WRITER_MANAGER = SyncManager(ctx=mp.get_context("spawn"))
        _WRITER_MANAGER.start(_ignore_stop_signals)
        filesystem_async._results_queue = _WRITER_MANAGER.Queue()


def save_checkpoint(save_dir: str, step: int, model, optimizer, ranks: Ranks, train_state: TrainState,
                    record: RunRecord, tokenizer_dir: Optional[str] = None, keep_last: int = 0) -> str:
    """Write ``save_dir/iter_{step}`` atomically (see module docstring); returns its path. ``record`` becomes
    its config.json. With ``keep_last`` > 0, older complete checkpoints beyond the newest ``keep_last`` are
    deleted once the new one and the marker are in place (nothing is deleted when the save fails)."""
    from megatron.core import dist_checkpointing

    final = os.path.join(save_dir, f"iter_{step:07d}")
    tmp = final + ".tmp"
    _writer_queue_survives_stop_signals()

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    def extras():
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(record.to_json(), fh, indent=2, ensure_ascii=False)
        if tokenizer_dir:
            shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))

    # Each phase agreed by every rank: a full disk or a read-only folder on any rank is one CheckpointError
    # on all of them, the torn .tmp removed and the previous checkpoint (and the marker) untouched.
    try:
        _agreed(tmp, prepare if ranks.rank == 0 else (lambda: None), _save_error)
        _agreed(tmp, lambda: dist_checkpointing.save(sharded_state_dict(model, optimizer, ranks, train_state), tmp),
                _save_error)
        _agreed(tmp, extras if ranks.rank == 0 else (lambda: None), _save_error)
    except CheckpointError:
        if ranks.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ranks.rank == 0:
        old = final + ".old"
        if os.path.exists(final):  # set aside, not deleted, until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        marker = os.path.join(save_dir, LATEST)
        with open(marker + ".tmp", "w") as fh:
            fh.write(f"{step}\n")
        os.replace(marker + ".tmp", marker)
        if keep_last > 0:
            _delete_older(save_dir, step, keep_last)
    _barrier()
    return final


# -- load ----------------------------------------------------------------------------------------------------
def _request(path: str, model, optimizer, ranks: Ranks) -> tuple[dict, bool]:
    request = sharded_state_dict(model, optimizer, ranks)
    same_world = _read_common(path).get("world_size") == ranks.world
    if not same_world:
        request.pop("rng")  # saved by another number of ranks: nothing to map it onto
    return request, same_world


def _fill(path: str, loaded: dict, model, optimizer, same_world: bool) -> TrainState:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(loaded[f"model.{name}"])
        if optimizer is not None:
            optimizer.load_checkpoint_state({p: n for n, p in model.named_parameters()}, loaded)
    if same_world:
        torch.set_rng_state(loaded["rng"]["torch"])
    return TrainState.from_json(loaded.get("train_state") or {}, f"{os.path.join(path, COMMON)} train_state")


def _save_error(path: str, exc: BaseException) -> str:
    """One line for a failed save: a full disk or a folder that cannot be written named as such."""
    inner = exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:  # torch.distributed.checkpoint's per-rank failures
        pair = sorted(failures.items(), key=lambda kv: kv[0])[0][1]
        inner = getattr(pair, "exception", None) or (pair[0] if isinstance(pair, tuple) else pair)
    seen, chain = set(), inner
    while chain is not None and id(chain) not in seen:  # the OSError may be a cause of a wrapper
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied"}[chain.errno]
            free = shutil.disk_usage(os.path.dirname(path)).free if os.path.isdir(os.path.dirname(path)) else 0
            return (f"{path}: cannot save ({reason}; {free / 2**30:.2f} GiB free): nothing of it is kept, the "
                    f"previous checkpoint and the latest marker are untouched; make room and resume with --load")
        chain = chain.__cause__ or chain.__context__
    folder = os.path.dirname(path)
    usage = shutil.disk_usage(folder) if os.path.isdir(folder) else None
    if usage and usage.free < max(4 << 20, usage.total // 200):  # torch's serializer words ENOSPC its own way
        return (f"{path}: cannot save (the filesystem is full: {usage.free / 2**30:.2f} GiB free; "
                f"{_one_line(inner)[:120]}): nothing of it is kept, the previous checkpoint and the latest marker "
                f"are untouched; make room and resume with --load")
    return f"{path}: cannot save ({_one_line(inner)})"


def _agreed(path: str, phase, describe=None):
    """Run one phase of a load (or save); when it fails on any rank, every rank raises the same
    CheckpointError (`describe(path, exc)` words an unexpected exception)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    error, cause, result = None, None, None
    try:
        result = phase()
    except CheckpointError as exc:
        error, cause = str(exc), exc
    except (Exception, CheckpointException) as exc:
        error = describe(path, exc) if describe else f"{path}: cannot load ({_describe_load_error(exc)})"
        cause = exc
    error = _agree(error)
    if error:
        raise CheckpointError(error) from cause
    return result


def load_checkpoint(path: str, model, optimizer, ranks: Ranks) -> TrainState:
    """Fill the model (and the optimizer when given) from ``path``; returns the saved TrainState.

    Collective. Three phases, each agreed by every rank before the next, so a rank that fails alone never
    leaves the others waiting inside a collective: preparing the request (local), the read (collective;
    torch.distributed.checkpoint gathers every rank's read failures itself and raises on all ranks), and
    filling the live tensors (local). A failure anywhere raises the same CheckpointError on every rank."""
    from megatron.core import dist_checkpointing

    request, same_world = _agreed(path, lambda: _request(path, model, optimizer, ranks))
    loaded = _agreed(path, lambda: dist_checkpointing.load(request, path))
    return _agreed(path, lambda: _fill(path, loaded, model, optimizer, same_world))


def load_latest(load_path: str, model, optimizer, ranks: Ranks,
                warn: Callable[[str], None] = print) -> tuple[str, TrainState]:
    """Load the newest usable checkpoint of ``resolve_load(load_path)``; returns (path, its TrainState).

    Each candidate is verified (filesystem only), the ranks agree on the outcome, then it is loaded
    collectively. A candidate that fails either way is skipped with ``warn`` and the next older one tried;
    every rank takes the same decision because both outcomes are agreed over all ranks. Trying the next
    one after a failed load is safe: a successful load overwrites every parameter, moment, step count and
    RNG state, so nothing a failed attempt left half-filled survives. Raises the last CheckpointError (or
    NoCheckpointError) when no candidate loads."""
    notes: list[str] = []
    candidates, error = [], None  # error: (NoCheckpointError or not, message)
    try:
        candidates = resolve_load(load_path, warn=notes.append)
    except CheckpointError as exc:
        error = (isinstance(exc, NoCheckpointError), str(exc))
    views = _gather((error, candidates))
    error = next((e for e, _ in views if e), None)
    if error:
        raise (NoCheckpointError if error[0] else CheckpointError)(error[1])
    other = next((r for r, (_, c) in enumerate(views) if c != views[0][1]), None)
    if other is not None:
        raise CheckpointError(f"{load_path}: the ranks see different checkpoints there (rank 0 would load "
                              f"{views[0][1][0]}, rank {other} {views[other][1][0]}); is it on a filesystem "
                              f"every rank shares?")
    for note in notes:
        warn(note)
    last = None
    for i, path in enumerate(candidates):
        reason = None
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            reason = str(exc)
        except Exception as exc:  # anything else must still reach the agreement below, or the peers hang
            reason = f"{path}: cannot verify ({_one_line(exc)})"
        reason = _agree(reason)
        if reason is None:
            try:
                return path, load_checkpoint(path, model, optimizer, ranks)
            except CheckpointError as exc:  # already agreed by every rank
                reason = str(exc)
        last = CheckpointError(reason)
        after = (f"falling back to {candidates[i + 1]}" if i + 1 < len(candidates)
                 else "no older checkpoint to fall back to")
        warn(f"warning: skipping {path}: {reason}; {after}")
    raise last
