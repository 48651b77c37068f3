"""The multi-node launch scripts: every value checked, and the command they build is one that
tools/pretrain.py accepts (DRY_RUN=1 prints it instead of launching); --load only when SAVE already holds a
checkpoint; the two stages together reach the paper's ~1.2T tokens; the Slurm file asks for a signal
before its time limit."""
import os
import shlex
import subprocess
import sys

import pytest

from tools import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("baike", "cci3_hq", "cci4_fineweb_3_4", "cci4_fineweb_4_5", "cosmopedia_zh")


@pytest.fixture
def fake_cluster(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in NAMES:
        for suffix in (".bin", ".idx", "_wordstart.bin", "_wordstart.idx"):
            (data / f"{name}_text_document{suffix}").write_bytes(b"")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "latest_checkpointed_iteration.txt").write_text("10\n")
    return dict(os.environ, DRY_RUN="1", NNODES="16", NODE_RANK="1", GPUS_PER_NODE="8", MASTER_ADDR="node0",
                DATA_DIR=str(data), TOKENIZER=str(tok), SAVE=str(tmp_path / "save"), STAGE1=str(stage1))


def launch(script, env):
    # a hang guard, not a speed goal: without DRY_RUN the script starts Python (torch import) on a shared CPU
    return subprocess.run(["bash", os.path.join(REPO, "examples", script)], env=env, capture_output=True,
                          text=True, timeout=120)


def pretrain_args(res):
    words = shlex.split(res.stdout.strip().splitlines()[-1])
    return words, pretrain.parse_args(words[words.index("tools/pretrain.py") + 1:])


@pytest.mark.parametrize("script,seq,tp", [("pretrain_stage1_1k.sh", 1024, 1), ("pretrain_stage2_8k.sh", 8192, 2)])
def test_scripts_build_a_valid_pretrain_command(fake_cluster, script, seq, tp):
    res = launch(script, fake_cluster)
    assert res.returncode == 0, res.stderr
    words, cfg = pretrain_args(res)
    assert words[0] == "torchrun" and words[words.index("--nnodes") + 1] == "16"
    assert words[words.index("--node_rank") + 1] == "1"
    data, sched = cfg.data, cfg.schedule
    assert data.seq_length == seq and cfg.parallel.tensor_model_parallel_size == tp and cfg.model.preset == "large"
    dp = 16 * 8 // tp
    assert data.global_batch_size % (data.micro_batch_size * dp) == 0
    # tokens per update stay about constant between the stages (paper Sec. 3.4)
    assert data.global_batch_size * seq == 4096 * 1024
    weights = [float(w) for w in data.data_path[0::2]]
    assert weights == [0.03, 0.57, 0.10, 0.10, 0.20]  # paper Table 1
    if script.startswith("pretrain_stage2"):
        assert cfg.checkpoint.finetune and sched.lr == 1e-4 and sched.min_lr == 5e-5
    else:
        assert (sched.lr, sched.lr_warmup_init, sched.mask_schedule) == (8e-4, 5e-5, "dynamic")


def test_the_stages_reach_the_papers_tokens(fake_cluster):
    tokens = 0
    for script in ("pretrain_stage1_1k.sh", "pretrain_stage2_8k.sh"):
        _, cfg = pretrain_args(launch(script, fake_cluster))
        tokens += cfg.schedule.train_iters * cfg.data.global_batch_size * cfg.data.seq_length
    assert tokens == pytest.approx(1.2e12, rel=0.01)  # paper: ~1.2T Chinese tokens


def test_stage1_passes_load_only_to_resume(fake_cluster, tmp_path):
    _, cfg = pretrain_args(launch("pretrain_stage1_1k.sh", fake_cluster))
    assert cfg.checkpoint.load is None and cfg.checkpoint.save == fake_cluster["SAVE"]  # a new run
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("2000\n")
    _, cfg = pretrain_args(launch("pretrain_stage1_1k.sh", fake_cluster))
    assert cfg.checkpoint.load == str(save) and not cfg.checkpoint.finetune


def test_slurm_file_asks_for_a_signal_before_the_limit_and_requeues():
    text = open(os.path.join(REPO, "examples", "slurm_pretrain.sbatch")).read()
    assert "#SBATCH --signal=B:USR1@600" in text and "#SBATCH --requeue" in text
    assert "scancel --signal=TERM" in text and "scontrol requeue" in text
    assert subprocess.run(["bash", "-n", os.path.join(REPO, "examples", "slurm_pretrain.sbatch")]).returncode == 0


@pytest.mark.parametrize("change,message", [
    ({"NODE_RANK": "16"}, "NODE_RANK 16 must be < NNODES 16"),
    ({"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE must be a whole number"),
    ({"GLOBAL_BATCH": "100"}, "must be a multiple of MICRO_BATCH"),
    ({"TP": "3"}, "TP 3 must divide GPUS_PER_NODE 8"),
    ({"DATA_DIR": "/nonexistent"}, "missing /nonexistent/baike_text_document.idx"),
])
def test_bad_values_are_refused_before_launch(fake_cluster, change, message):
    res = launch("pretrain_stage1_1k.sh", {**fake_cluster, **change})
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_without_dry_run_the_checks_run_before_torchrun(fake_cluster):
    """The fake cluster's tokenizer.json is not a tokenizer: tools/pretrain.py --check-only (run by the
    script for the whole world) stops the launch with its one line and exit 2, before torchrun starts."""
    env = {k: v for k, v in fake_cluster.items() if k != "DRY_RUN"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    res = launch("pretrain_stage1_1k.sh", env)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --tokenizer-model {env['TOKENIZER']}: tokenizer.json "
                                                   f"does not load ("), res.stderr
