"""Where training metrics go: stdout, a JSON-lines file (--metrics-file) and TensorBoard when installed.

Only rank 0 writes. A resumed run continues the same file: rows past the step it resumes from (logged after
the checkpoint it loaded, then lost with the crash) are dropped first, so every step appears once and a
plot of the file is the run's real history.
"""
from __future__ import annotations

import json
import os
from typing import Optional


def truncate_after(metrics_file: str, step: int) -> int:
    """Rewrite `metrics_file` (atomically, by rename) keeping rows with "step" <= `step` and rows without a
    step; a line that is not a JSON object (cut short by a crash) is dropped. Returns the rows dropped."""
    kept, dropped = [], 0
    with open(metrics_file, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            later = isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step
            if not isinstance(row, dict) or later:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")  # verbatim
    tmp = f"{metrics_file}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, metrics_file)
    return dropped


class MetricsLog:
    """`log(record, text)`: print `text`, append `record` to the JSON-lines file, add its numbers to
    TensorBoard (keyed by record["step"]). Everything is a no-op off rank 0.

    resume_step: the step the run starts from (0 for a fresh start over an old file); rows after it are
    removed from the file and TensorBoard is told to purge its events after it. None appends as is.
    """

    def __init__(self, rank: int, metrics_file: Optional[str], tensorboard_dir: Optional[str],
                 resume_step: Optional[int] = None):
        self.active = rank == 0
        self.file = None
        self.tb = None
        if not self.active:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            if resume_step is not None and os.path.exists(metrics_file):
                dropped = truncate_after(metrics_file, resume_step)
                if dropped:
                    print(f"note: dropped {dropped} rows after step {resume_step} from {metrics_file}",
                          flush=True)
            self.file = open(metrics_file, "a", encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: tensorboard is not installed; --tensorboard-dir ignored (metrics still go "
                      "to stdout and --metrics-file)", flush=True)
            else:
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(tensorboard_dir, purge_step=purge)

    def log(self, record: dict, text: str) -> None:
        if not self.active:
            return
        print(text, flush=True)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.tb:
            self.tb.close()
            self.tb = None
