"""The one switch that lets `auto` pick a Triton kernel: a record that tools/gpu_check.sh passed on this GPU.

A record names the GPU (torch.cuda.get_device_name), the exact torch and triton versions, and per op the
sha256 of the kernel's source files, with the commit, date and test summary it came from. `auto` (registry.
pick_auto) takes the `triton` backend of an op on a CUDA device only when a record matches the device's name,
the running torch and triton, and the op's current source; anything else (another card, a Triton upgrade, a
kernel edited since) falls back to the next backend and says why in the auto log line. Naming `triton`
explicitly still works everywhere it can run; CPU (Triton's interpreter) is never picked by `auto`.

Records live in megatron_cmbert/kernels/gpu_validation.json (committed, reviewed like code: it is data, so
no code changes to turn a kernel on). The environment variable CMBERT_GPU_VALIDATION=FILE reads another
record file instead (e.g. the one gpu_check.sh just wrote on a long-lived GPU machine; empty: no records).

    python -m megatron_cmbert.kernels.validation write OUT.json --evidence "..."   # gpu_check.sh, on the GPU
    python -m megatron_cmbert.kernels.validation add OUT.json                      # then, into the repo's file
    python -m megatron_cmbert.kernels.validation show
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDS_FILE = HERE / "gpu_validation.json"
RECORDS_ENV = "CMBERT_GPU_VALIDATION"
_COMMON = ("triton_utils.py", "triton_common.py")
# The files each op's Triton kernel runs: a record holds their hash, so an edit needs a new gpu_check.sh pass.
SOURCES = {
    "attention": ("attention_triton.py", "attention_triton_kernels.py", "block_plan.py", *_COMMON),
    "rope": ("rope_triton.py", *_COMMON),
    "geglu": ("geglu_triton.py", *_COMMON),
    "rms_norm": ("rms_norm_triton.py", *_COMMON),
}


def source_hash(op: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES[op]:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return digest.hexdigest()


def current_identity(device) -> dict:
    """What a record must match: the CUDA device's name and the running torch and triton versions."""
    import torch
    import triton

    return {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__}


def records_path() -> Path | None:
    override = os.environ.get(RECORDS_ENV)
    if override is not None:
        return Path(override) if override else None
    return RECORDS_FILE


def load_records(path: Path | None = None) -> list[dict]:
    path = records_path() if path is None else path
    if path is None or not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return list(data.get("records", [])) if isinstance(data, dict) else []


def not_validated_reason(op: str, device) -> str | None:
    """None when a record says the `triton` kernel of op passed tools/gpu_check.sh on this device with this
    torch, triton and source; otherwise why not, in a few words (the auto log line shows it)."""
    if device.type != "cuda":
        return "Triton on CPU is its interpreter (tests only); auto picks Triton only on a validated GPU"
    identity = current_identity(device)
    where = records_path()
    same_stack = [r for r in load_records(where) if all(r.get(k) == v for k, v in identity.items())]
    label = f"{identity['gpu']}, torch {identity['torch']}, triton {identity['triton']}"
    if not same_stack:
        return (f"not validated on {label} (no record in {where or 'none: ' + RECORDS_ENV + ' is empty'}; "
                "tools/gpu_check.sh writes one, docs/KERNELS.md)")
    if not any(r.get("ops", {}).get(op) == source_hash(op) for r in same_stack):
        return f"validated on {label} for other {op} kernel source (edited since): run tools/gpu_check.sh again"
    return None


def make_record(device, ops, evidence: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {**current_identity(device), "ops": {op: source_hash(op) for op in ops}, "commit": commit,
            "date": datetime.date.today().isoformat(), "evidence": evidence}


def add_records(new: list[dict], path: Path = RECORDS_FILE) -> list[dict]:
    """Merge into `path` (written by rename): a record for the same GPU, torch and triton replaces the old."""
    key = lambda r: (r.get("gpu"), r.get("torch"), r.get("triton"))  # noqa: E731
    fresh = {key(r) for r in new}
    records = [r for r in load_records(path) if key(r) not in fresh] + list(new)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps({"records": records}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_cmbert.kernels.validation",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write this GPU's record (after the kernel tests passed on it)")
    write.add_argument("output")
    write.add_argument("--ops", default=",".join(SOURCES), help="ops whose tests passed (default all)")
    write.add_argument("--evidence", default="", help="what passed, e.g. the pytest summary line")
    add = sub.add_parser("add", help=f"merge record files into {RECORDS_FILE.name}")
    add.add_argument("files", nargs="+")
    sub.add_parser("show", help="the records auto reads, and whether each op's source still matches")
    args = parser.parse_args(argv)
    if args.command == "write":
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device: a record is written on the GPU it is for", file=sys.stderr)
            return 2
        ops = [op for op in args.ops.split(",") if op]
        unknown = sorted(set(ops) - set(SOURCES))
        if unknown:
            parser.error(f"--ops: unknown {unknown}; choose from {list(SOURCES)}")
        record = make_record(torch.device("cuda"), ops, args.evidence)
        Path(args.output).write_text(json.dumps({"records": [record]}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.output}: {record['gpu']}, torch {record['torch']}, triton {record['triton']}, "
              f"ops {', '.join(ops)}")
    elif args.command == "add":
        new = [r for f in args.files for r in load_records(Path(f))]
        records = add_records(new)
        print(f"{RECORDS_FILE}: {len(records)} records ({len(new)} added or replaced)")
    else:
        where = records_path()
        records = load_records(where)
        print(f"{where}: {len(records)} records")
        for r in records:
            ops = ", ".join(f"{op}{'' if h == source_hash(op) else ' (source changed since)'}"
                            for op, h in r.get("ops", {}).items())
            print(f"  {r.get('gpu')}, torch {r.get('torch')}, triton {r.get('triton')}, {r.get('date')}: {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
