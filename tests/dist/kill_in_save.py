"""Run tools/pretrain.py and SIGKILL the whole process group in the middle of the save of step N, as a node
failure would: right after the data files of iter_N.tmp are written, before config.json, the rename and the
marker. Test-only fault injection, kept out of the library.

    python tests/dist/kill_in_save.py N <tools/pretrain.py arguments>

Launch it in a session of its own (subprocess start_new_session=True): it kills its process group.
"""
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
    kill_step, pretrain_args = int(argv[0]), argv[1:]
    sys.path.insert(0, REPO)
    from megatron.core import dist_checkpointing

    from tools import pretrain

    real_save = dist_checkpointing.save
    doomed = f"iter_{kill_step:07d}.tmp"

    def save(state, checkpoint_dir, *args, **kwargs):
        result = real_save(state, checkpoint_dir, *args, **kwargs)
        if os.path.basename(os.path.normpath(str(checkpoint_dir))) == doomed:
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the checkpoint writer's helper processes too
        return result

    dist_checkpointing.save = save  # checkpoint.py looks it up on the module at each call
    pretrain.main(pretrain_args)


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer re-imports the main module
    main(sys.argv[1:])
