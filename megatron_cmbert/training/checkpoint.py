"""Checkpoints through megatron-core ``dist_checkpointing``: sharded, reshardable across TP sizes, atomic.

Layout of ``--save DIR``::

    DIR/iter_0000010/            one checkpoint (dist_checkpointing files + config.json + tokenizer/)
    DIR/latest_checkpointed_iteration.txt   the step of the newest complete checkpoint

A checkpoint is written under ``iter_XXXXXXX.tmp`` and renamed when every rank has finished; the
``latest`` marker is replaced last. A run killed during a save leaves a ``.tmp`` directory that is never
loaded, and the marker still names the previous checkpoint.

Every TP-split parameter (and its Adam moments) is stored as one logical tensor sliced along its
``partition_dim``, so a checkpoint saved at TP=2 loads at TP=1 or TP=4.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

LATEST = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class Ranks:
    tp_rank: int
    tp_size: int
    dp_rank: int
    rank: int
    world: int


def _sharded(key: str, tensor: torch.Tensor, param, ranks: Ranks):
    from megatron.core.dist_checkpointing import ShardedTensor

    if getattr(param, "tensor_model_parallel", False):
        return ShardedTensor.from_rank_offsets(key, tensor, (param.partition_dim, ranks.tp_rank, ranks.tp_size),
                                               replica_id=(0, ranks.dp_rank))
    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=(ranks.tp_rank, ranks.dp_rank))


def _ensure_optimizer_state(optimizer) -> None:
    """Loading needs the moment tensors to exist: create them as zeros (step 0) where missing."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)


def sharded_state_dict(model, optimizer, ranks: Ranks, train_state: Optional[dict] = None) -> dict:
    """The dict handed to dist_checkpointing.save / load (tensors are the live ones: load fills them)."""
    from megatron.core.dist_checkpointing import ShardedObject

    state = {}
    names = {}
    for name, p in model.named_parameters():
        names[p] = name
        state[f"model.{name}"] = _sharded(f"model.{name}", p.data, p, ranks)
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
        steps = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                s = optimizer.state[p]
                for key in ("exp_avg", "exp_avg_sq"):
                    state[f"optimizer.{names[p]}.{key}"] = _sharded(f"optimizer.{names[p]}.{key}", s[key], p, ranks)
                steps[names[p]] = s["step"]
        state["optimizer_steps"] = steps  # common (rank 0) state: identical on every rank
    # RNG states per rank, restored when the world size is unchanged. Today nothing draws from them after
    # initialisation (no dropout; masks use per-sample generators); kept so that adding dropout cannot
    # silently break exact resume.
    rng = {"torch": torch.get_rng_state()}
    state["rng"] = ShardedObject("rng", rng, (ranks.world,), (ranks.rank,), replica_id=0)
    state["world_size"] = ranks.world
    if train_state is not None:
        state["train_state"] = train_state
    return state


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(save_dir: str, step: int, model, optimizer, ranks: Ranks, train_state: dict,
                    extra_files: Optional[dict] = None, tokenizer_dir: Optional[str] = None) -> str:
    """Write ``save_dir/iter_{step}`` atomically (see module docstring); returns its path."""
    from megatron.core import dist_checkpointing

    final = os.path.join(save_dir, f"iter_{step:07d}")
    tmp = final + ".tmp"
    if ranks.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_state_dict(model, optimizer, ranks, train_state), tmp)
    if os.environ.get("CMBERT_TEST_KILL_IN_SAVE") == str(step):
        # Fault injection for the torn-save test: the whole process group dies at once, as under a
        # node failure (the checkpoint writer's helper processes included). Tests run it in its own session.
        os.killpg(os.getpgrp(), signal.SIGKILL)
    if ranks.rank == 0:
        for name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                json.dump(content, fh, indent=2, ensure_ascii=False)
        if tokenizer_dir:
            shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))
    _barrier()
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
    _barrier()
    return final


def find_checkpoint(load_dir: str) -> Optional[str]:
    """The checkpoint named by ``load_dir/latest...`` or ``load_dir`` itself when it is one; None if none."""
    marker = os.path.join(load_dir, LATEST)
    if os.path.isfile(marker):
        with open(marker) as fh:
            step = int(fh.read().strip())
        path = os.path.join(load_dir, f"iter_{step:07d}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{marker} names step {step} but {path} is missing")
        return path
    if os.path.isfile(os.path.join(load_dir, "metadata.json")):
        return load_dir
    return None


def load_checkpoint(path: str, model, optimizer, ranks: Ranks) -> dict:
    """Fill the model (and the optimizer when given) from ``path``; returns the saved train_state."""
    from megatron.core import dist_checkpointing

    request = sharded_state_dict(model, optimizer, ranks)
    same_world = dist_checkpointing.load_common_state_dict(path).get("world_size") == ranks.world
    if not same_world:
        request.pop("rng")  # saved by another number of ranks: nothing to map it onto
    loaded = dist_checkpointing.load(request, path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(loaded[f"model.{name}"])
        if optimizer is not None:
            names = {p: n for n, p in model.named_parameters()}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    s = optimizer.state[p]
                    for key in ("exp_avg", "exp_avg_sq"):
                        s[key].copy_(loaded[f"optimizer.{names[p]}.{key}"])
                    s["step"] = loaded["optimizer_steps"][names[p]]
    if same_world:
        torch.set_rng_state(loaded["rng"]["torch"])
    return dict(loaded.get("train_state") or {})
