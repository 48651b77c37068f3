"""Sharded preprocessing + tools/merge_datasets.py: the merge of K shard runs is byte-identical to one
preprocess_data.py run over all inputs (tokens, word starts, index files), every input file lands in exactly one
shard, mismatched inputs are refused with one line, and the merged prefix trains (megatron-core reads it)."""
import json
import os

import numpy as np
import pytest

from tools import merge_datasets, preprocess_data

pytestmark = pytest.mark.timeout(300)
SUFFIXES = (".bin", ".idx", "_wordstart.bin", "_wordstart.idx")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, inews_train):
    root = tmp_path_factory.mktemp("shards")
    files = []
    for i in range(5):  # uneven file sizes, one with a bad line (skipped the same way in any split)
        path = root / f"part{i}.jsonl"
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in inews_train[i * 23:(i + 1) * 23 - 3 * i]]
        if i == 2:
            lines.insert(4, "{not json")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(str(path))
    return root, files


def run_preprocess(files, tokenizer_dir, prefix, *extra):
    preprocess_data.run(["--input", *files, "--tokenizer-model", tokenizer_dir, "--output-prefix", str(prefix),
                          "--quiet", *extra])


def test_merged_shards_are_byte_identical_to_one_run(corpus, tokenizer_dir, tmp_path):
    root, files = corpus
    run_preprocess(files, tokenizer_dir, tmp_path / "single")
    listing = tmp_path / "inputs.txt"
    listing.write_text("# the corpus\n" + "\n".join(files) + "\n\n", encoding="utf-8")
    for i in range(3):
        preprocess_data.run(["--input-list", str(listing), "--tokenizer-model", tokenizer_dir, "--output-prefix",
                              str(tmp_path / "corpus"), "--shards", "3", "--shard-index", str(i), "--quiet"])
    shards = sorted(p.name for p in tmp_path.glob("corpus_shard*_text_document.idx"))
    assert shards == [f"corpus_shard{i:05d}-of-00003_text_document.idx" for i in range(3)]
    out = tmp_path / "merged_text_document"
    merge_datasets.run(["--input", str(tmp_path / "corpus_shard*-of-00003_text_document"),
                        "--output", str(out), "--quiet"])
    single = tmp_path / "single_text_document"
    for suffix in SUFFIXES:
        assert (tmp_path / (out.name + suffix)).read_bytes() == (tmp_path / (single.name + suffix)).read_bytes(), suffix
    meta_single = json.loads((tmp_path / (single.name + ".meta.json")).read_text())
    meta_merged = json.loads((tmp_path / (out.name + ".meta.json")).read_text())
    assert meta_merged.pop("created_by") == "tools/merge_datasets.py"
    meta_single.pop("created_by")
    assert meta_merged == meta_single
    assert not list(tmp_path.glob("*.partial-*"))

    # the merged prefix is what training reads: megatron-core's reader, document for document
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    merged, shard0 = IndexedDataset(str(out)), IndexedDataset(str(tmp_path / "corpus_shard00000-of-00003_text_document"))
    assert len(merged) == meta_single["documents"] and np.array_equal(merged[0], shard0[0])
    del merged, shard0


def test_shards_cover_every_input_once():
    paths = [f"f{i}" for i in range(10)]
    for k in (1, 3, 4, 10):
        blocks = [preprocess_data.shard_paths(paths, k, i) for i in range(k)]
        assert [p for b in blocks for p in b] == paths and all(blocks)


def test_empty_shard_and_bad_index_are_one_line_errors(corpus, tokenizer_dir, tmp_path, capsys):
    _, files = corpus
    assert preprocess_data.main(["--input", *files[:2], "--tokenizer-model", tokenizer_dir, "--output-prefix",
                                 str(tmp_path / "x"), "--shards", "3", "--shard-index", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gets no input file" in err[0], err
    assert preprocess_data.main(["--input", "a", "--tokenizer-model", "t", "--output-prefix", "o",
                                 "--shards", "2", "--shard-index", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --shard-index must be in 0..1")


def test_mismatched_tokenizer_is_refused(corpus, tokenizer_dir, tmp_path, capsys):
    _, files = corpus
    run_preprocess(files[:1], tokenizer_dir, tmp_path / "a")
    run_preprocess(files[1:2], tokenizer_dir, tmp_path / "b")
    meta_path = tmp_path / "b_text_document.meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "ab_text_document"
    assert merge_datasets.main(["--input", str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document"),
                                "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "another tokenizer" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("ab_text_document*"))
    # a truncated data file is named, and nothing is left behind
    meta["tokenizer"]["sha256"] = json.loads((tmp_path / "a_text_document.meta.json").read_text())["tokenizer"]["sha256"]
    meta_path.write_text(json.dumps(meta))
    data = tmp_path / "b_text_document.bin"
    data.write_bytes(data.read_bytes()[:-2])
    assert merge_datasets.main(["--input", str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document"),
                                "--output", str(out), "--quiet"]) == 2
    assert "b_text_document.bin" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ab_text_document")]


def test_slurm_array_example_runs_one_shard_per_task():
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                          "slurm_preprocess.sbatch")
    env = dict(os.environ, DRY_RUN="1", INPUT_LIST="files.txt", TOKENIZER="tok", OUT="data/corpus",
               SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_COUNT="8")
    out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    args = preprocess_data.parse_args(out.stdout.split()[2:])  # the printed command parses as the tool's flags
    assert (args.shards, args.shard_index, args.input_list) == (8, 5, "files.txt")
