"""tools/gpu_check.sh on a machine without a GPU: it must stop at the preflight, at once, with one line naming what
is missing and no benchmark started; --dry-run must show two device commands of at most 5 minutes."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path, *args, path=None, **env):
    environ = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"),
               "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no_wheels"), **env}
    if path is not None:
        environ["PATH"] = path
    begin = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=environ, capture_output=True, text=True,
                          timeout=120)
    return done, time.monotonic() - begin


def _path_without_nvidia_smi(tmp_path):
    # This machine's tools, minus any nvidia-smi: a CPU machine as CI has it.
    keep = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    return os.pathsep.join(keep)


def test_without_a_gpu_the_preflight_stops_at_once_with_one_line(tmp_path):
    done, seconds = run(tmp_path, path=_path_without_nvidia_smi(tmp_path))
    assert done.returncode == 1 and seconds < 60
    assert done.stdout.strip().splitlines() == [
        "preflight: nvidia-smi: not found (no NVIDIA driver: this machine has no GPU to check)"]
    steps = (tmp_path / "out" / "steps.tsv").read_text().splitlines()
    assert steps[1:] == [steps[1]] and steps[1].startswith("preflight\t1\t")  # no step ran


def test_a_driver_without_a_cuda_device_stops_in_the_python_checks(tmp_path):
    # nvidia-smi answers but torch sees no device (as on this machine): stopped before any step, in one line.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200 (stand-in), 143771 MiB, 0 MiB, 1980 MHz'\n")
    (fake / "nvidia-smi").chmod(0o755)
    done, seconds = run(tmp_path, path=f"{fake}{os.pathsep}{_path_without_nvidia_smi(tmp_path)}",
                        STEPS="attention")
    assert done.returncode == 1 and seconds < 60, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"preflight: torch CUDA: torch \S+ sees no CUDA device", lines[0]), lines
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "== attention" not in log and "bench_kernels" not in log


def test_dry_run_shows_two_device_commands_within_five_minutes(tmp_path):
    done, _ = run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for part in (1, 2):
        assert f'run(command="bash tools/gpu_check.sh --part {part}", carry=[".device"], timeout_s=300)' in out
        total = int(re.search(rf"--part {part}: 30 \+ \d+ = (\d+) s", out).group(1))
        assert total <= 300
    for step in ("tests", "train", "attention", "table4", "train_compile"):
        assert re.search(rf"^\d+\s+{step}\s+[12]\s+\d+s", out, re.M), step  # every required step in a part
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_unknown_steps_and_parts_are_refused(tmp_path):
    done, _ = run(tmp_path, STEPS="tests nonsense")
    assert done.returncode == 2 and "unknown step 'nonsense'" in done.stderr
    done, _ = run(tmp_path, "--part", "3")
    assert done.returncode == 2 and "--part takes 1 or 2" in done.stderr


FAKE_PYTHON = r"""#!/bin/bash
# Stands in for the device's python3: the preflight passes, the kernel tests pass, bench_kernels fails after 6 s.
case "$1 $2" in
  *preflight.py*) echo "preflight ok: stand-in GPU"; exit 0 ;;
  "-c import xdist") exit 1 ;;
  "-m pytest") echo "12 passed in 3.0s"; exit 0 ;;
  "-m megatron_cmbert.kernels.validation") echo '{"records": []}' > "$4"; echo "wrote $4"; exit 0 ;;
  "tools/bench_kernels.py "*) sleep 6; echo "Traceback (most recent call last):"; echo "RuntimeError: boom"; exit 1 ;;
esac
echo "unexpected: $*"; exit 3
"""


def test_every_step_exit_code_is_counted_and_the_deadline_holds(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200 (stand-in), 143771 MiB, 0 MiB, 1980 MHz'\n")
    (fake / "python").write_text(FAKE_PYTHON)
    for f in fake.iterdir():
        f.chmod(0o755)
    done, seconds = run(tmp_path, path=f"{fake}{os.pathsep}{os.environ['PATH']}", PYTHON=str(fake / "python"),
                        STEPS="tests attention table4", DEADLINE_S="29")
    out, log = done.stdout, (tmp_path / "out" / "gpu_check.log").read_text()
    assert done.returncode == 1, out + done.stderr
    assert "RuntimeError: boom" in out and "RuntimeError: boom" in log  # a failing step's traceback is shown
    assert (tmp_path / "out" / "gpu_validation.json").is_file()  # the tests passed: the record is written
    # 29 s for the command: after 6 s of the failing step, less than the 20 s a step needs are left (5 kept
    # in reserve), so what would not fit is not started
    assert "== table4: not run (deadline" in out
    rows = [line.split("\t")[:2] for line in (tmp_path / "out" / "steps.tsv").read_text().splitlines()[1:]]
    assert rows == [["preflight", "0"], ["tests", "0"], ["attention", "1"], ["table4", "deadline"]]
    assert out.rstrip().splitlines()[-1].startswith("== done in ") and "tests=0 attention=1 table4=deadline" in out
