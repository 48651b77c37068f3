"""The checkpoint's on-disk contract, below training/, hf/ and eval/ (each reads or writes it from here).

records.py  RunRecord (config.json) and TrainState (the resume point): typed, versioned, to_json/from_json;
            every version written so far still reads
store.py    save / verify / load (collective, agreed by every rank) / fallback to the previous complete
            checkpoint / keep-last / list and resolve --load; the optimizer hands over its own state
reader.py   the full-tensor reader from one process (read_checkpoint) and our model built from it
"""
from megatron_cmbert.checkpoint.records import CheckpointError, NoCheckpointError, RunRecord, TrainState

__all__ = ["CheckpointError", "NoCheckpointError", "RunRecord", "TrainState"]
