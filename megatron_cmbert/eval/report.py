"""Outputs of the evaluation tools: files that appear by rename when complete, and the machine they ran on."""
from __future__ import annotations

import json
import os
import platform
import tempfile

import torch


def write_atomic(path: str, write) -> None:
    """write(tmp_path) into a temporary file beside `path` (same suffix), renamed into place when it returns."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(obj, path: str) -> None:
    """JSON (UTF-8, indented) at `path`, by rename."""
    def dump(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, ensure_ascii=False)
    write_atomic(path, dump)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> dict:
    """What the numbers were measured on."""
    device = torch.device(device)
    info = {"device": str(device), "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_threads']} threads)"
    return f"machine: {where}; torch {info['torch']}" + (f", transformers {info['transformers']}"
                                                          if "transformers" in info else "")
