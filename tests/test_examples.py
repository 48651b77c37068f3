"""The multi-node launch scripts: every value checked, and the command they build is one that
tools/pretrain.py accepts (DRY_RUN=1 prints it instead of launching)."""
import os
import shlex
import subprocess

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
    return subprocess.run(["bash", os.path.join(REPO, "examples", script)], env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("script,seq,tp", [("pretrain_stage1_1k.sh", 1024, 1), ("pretrain_stage2_8k.sh", 8192, 2)])
def test_scripts_build_a_valid_pretrain_command(fake_cluster, script, seq, tp):
    res = launch(script, fake_cluster)
    assert res.returncode == 0, res.stderr
    words = shlex.split(res.stdout.strip().splitlines()[-1])
    assert words[0] == "torchrun" and words[words.index("--nnodes") + 1] == "16"
    assert words[words.index("--node_rank") + 1] == "1"
    args = pretrain.parse_args(words[words.index("tools/pretrain.py") + 1:])
    assert args.seq_length == seq and args.tensor_model_parallel_size == tp and args.preset == "large"
    dp = 16 * 8 // tp
    assert args.global_batch_size % (args.micro_batch_size * dp) == 0
    # tokens per update stay about constant between the stages (paper Sec. 3.4)
    assert args.global_batch_size * seq == 4096 * 1024
    weights = [float(w) for w in args.data_path[0::2]]
    assert weights == [0.03, 0.57, 0.10, 0.10, 0.20]  # paper Table 1
    if script.startswith("pretrain_stage2"):
        assert args.finetune and args.lr == 1e-4 and args.min_lr == 5e-5
    else:
        assert (args.lr, args.lr_warmup_init, args.mask_schedule) == (8e-4, 5e-5, "dynamic")


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
