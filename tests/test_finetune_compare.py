"""examples/finetune_compare.sh end to end at toy size (10 pretraining steps, one seed, 64 training
examples): every tool it chains accepts its flags, both arms are fine-tuned from the same checkpoint, and the
summary and the PPPL table come out. The real experiment's figures are in docs/FINETUNE.md."""
import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_the_experiment_runs_at_toy_size(tmp_path):
    env = {**os.environ, "PRETRAIN_STEPS": "10", "SEEDS": "0", "MAX_TRAIN": "64", "LR": "1e-3"}
    proc = subprocess.run(["bash", "examples/finetune_compare.sh", str(tmp_path / "fc")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ft = tmp_path / "fc" / "ft_mean_lr1e-3"
    runs = {arm: json.loads((ft / f"{arm}_0" / "results.json").read_text()) for arm in ("pretrained", "random")}
    assert runs["pretrained"]["random_init"] is False and runs["random"]["random_init"] is True
    assert {r["train_examples"] for r in runs.values()} == {64} and {r["pooling"] for r in runs.values()} == {"mean"}
    for arm, r in runs.items():  # the summary line prints each arm's own result file
        assert f"{arm:<16} {r['dev_accuracy']:>18.4f}" in proc.stdout
    pppl = json.loads((tmp_path / "fc" / "pppl.json").read_text())
    assert [r["length"] for r in pppl["results"]] == [32, 64, 128, 256, 512] and pppl["trained_length"] == 128
    assert all(r["pppl"] > 1 for r in pppl["results"]) and "PPPL of" in proc.stdout
    assert (tmp_path / "fc" / "pretrain_curves.png").stat().st_size > 0
