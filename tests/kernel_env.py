"""The Triton mode of the kernel tests. Import this module before anything that may import triton.

CPU runs use Triton's own interpreter, which Triton reads from TRITON_INTERPRET=1 when it is first imported;
GPU runs compile (tools/gpu_check.sh sets TRITON_INTERPRET=0). When another test module imported triton in
the other mode first (torch.compile and megatron-core import it), a kernel test module cannot run in this
process: `fresh_process_only(globals(), __file__)` then replaces its tests by one that runs the module in a
new process with the right environment, so the same assertions run either way.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")

from megatron_cmbert.kernels.triton_utils import interpreted, interpreter_requested  # noqa: E402

INTERPRETED = interpreter_requested()
DEVICE = "cpu" if INTERPRETED or not CUDA else "cuda"
MODE_OK = "triton" not in sys.modules or interpreted() == INTERPRETED
ROOT = Path(__file__).resolve().parents[1]


def fresh_process_only(namespace: dict, path: str, timeout: int = 600) -> None:
    """When this process imported triton in the other mode, swap the module's tests for one that runs them in
    a new pytest process (TRITON_INTERPRET as this process asks for it)."""
    if MODE_OK:
        return
    for name in [n for n in namespace if n.startswith("test_")]:
        del namespace[name]

    def test_module_in_fresh_process():
        env = {**os.environ, "TRITON_INTERPRET": "1" if INTERPRETED else "0"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    namespace["test_module_in_fresh_process"] = test_module_in_fresh_process
