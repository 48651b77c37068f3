"""megatron_cmbert.data.dataset_checks: missing or misnamed dataset files, and a dataset built with another
tokenizer (by its sidecar, or by scanning the tokens when a dataset predates sidecars)."""
import hashlib
import json
import os

import numpy as np
import pytest

from megatron_cmbert.data import dataset_checks
from megatron_cmbert.data.dataset_checks import (DataConfigError, check_data_prefix, check_dataset_tokenizer,
                                                 max_token_id, tokenizer_fingerprint)
from megatron_cmbert.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from tools import preprocess_data


def build(tmp_path, tokenizer_dir, texts, name="corpus"):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    prefix = str(tmp_path / "out" / name)
    preprocess_data.run(["--input", str(src), "--tokenizer-model", tokenizer_dir, "--output-prefix", prefix,
                          "--quiet"])
    return prefix


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_dir, inews_dev):
    """(output prefix as passed to preprocess_data, the dataset prefix it wrote, the texts)."""
    texts = inews_dev[:60]
    tmp = tmp_path_factory.mktemp("data")
    prefix = build(tmp, tokenizer_dir, texts)
    return prefix, prefix + "_text_document", texts


@pytest.fixture(scope="module")
def other_tokenizer_same_size(tmp_path_factory, tokenizer_dir, inews_dev):
    """A genuinely different tokenizer with as many entries as the session one (other training text)."""
    out = tmp_path_factory.mktemp("other_tok")
    size = load_tokenizer(tokenizer_dir).get_vocab_size()
    save_tokenizer(train_bpe(inews_dev[300:700], vocab_size=size, show_progress=False), str(out))
    assert load_tokenizer(str(out)).get_vocab_size() == size
    return str(out)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory, inews_dev):
    out = tmp_path_factory.mktemp("small_tok")
    save_tokenizer(train_bpe(inews_dev[:300], vocab_size=1024, show_progress=False), str(out))
    return str(out)


def test_missing_files_hint_the_text_document_prefix(dataset):
    output_prefix, prefix, _ = dataset
    with pytest.raises(DataConfigError, match=f"did you mean {prefix}\\?") as error:
        check_data_prefix(output_prefix)
    assert str(error.value).startswith(f"{output_prefix}: missing corpus.bin, corpus.idx")
    assert "\n" not in str(error.value)
    with pytest.raises(DataConfigError, match="tools/preprocess_data.py"):
        check_data_prefix(os.path.join(os.path.dirname(prefix), "nothing_here"))


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_a_prefix_given_with_its_suffix_gets_a_hint(dataset, suffix):
    _, prefix, _ = dataset
    with pytest.raises(DataConfigError, match=f"without \\{suffix}; pass {prefix}$"):
        check_data_prefix(prefix + suffix)


def test_missing_wordstart_files_are_named(tmp_path, dataset):
    _, prefix, _ = dataset
    copy = _copy(prefix, tmp_path, (".bin", ".idx"))
    with pytest.raises(DataConfigError, match="missing copy_text_document_wordstart.bin, "
                                              "copy_text_document_wordstart.idx; the whole-word metadata"):
        check_data_prefix(copy)


def test_good_dataset_passes_with_and_without_its_sidecar(tmp_path, dataset, tokenizer_dir):
    _, prefix, texts = dataset
    check_data_prefix(prefix)
    check_dataset_tokenizer(prefix, tokenizer_dir)
    # a dataset from before sidecars: the token scan finds every id inside the vocabulary
    legacy = _copy_without_sidecar(prefix, tmp_path)
    check_dataset_tokenizer(legacy, tokenizer_dir)
    ids = [i for e in load_tokenizer(tokenizer_dir).encode_batch(texts, add_special_tokens=False) for i in e.ids]
    assert max_token_id(legacy) == max(ids)


def test_fingerprint_is_the_file_hash_and_size(tokenizer_dir):
    data = open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb").read()
    assert tokenizer_fingerprint(tokenizer_dir) == {"sha256": hashlib.sha256(data).hexdigest(), "vocab_size": 8192}
    with pytest.raises(DataConfigError, match="no tokenizer.json"):
        tokenizer_fingerprint(os.path.join(tokenizer_dir, "missing"))


def test_same_size_different_tokenizer_is_refused_by_the_sidecar(dataset, tokenizer_dir, other_tokenizer_same_size):
    _, prefix, _ = dataset
    with pytest.raises(DataConfigError) as error:
        check_dataset_tokenizer(prefix, other_tokenizer_same_size)
    message = str(error.value)
    assert "different tokenizer" in message and "same size 8192" in message
    assert f"--tokenizer-model {os.path.abspath(tokenizer_dir)}" in message  # the one it was built with
    assert other_tokenizer_same_size in message and "\n" not in message


def test_vocabulary_too_small_is_found_by_scanning_when_the_sidecar_is_missing(tmp_path, dataset, small_tokenizer,
                                                                               monkeypatch):
    _, prefix, _ = dataset
    legacy = _copy_without_sidecar(prefix, tmp_path)
    tokens = np.fromfile(legacy + ".bin", dtype=np.uint16)  # the reference: the whole file at once
    assert tokens.max() >= 1024
    monkeypatch.setattr(dataset_checks, "_SCAN_CHUNK", 7)  # many chunks, a ragged last one
    assert max_token_id(legacy) == int(tokens.max())
    with pytest.raises(DataConfigError, match=f"no copy_text_document.meta.json sidecar .* finds id "
                                              f"{int(tokens.max())}, past the 1024 entries of {small_tokenizer}"):
        check_dataset_tokenizer(legacy, small_tokenizer)
    with pytest.raises(DataConfigError, match="different tokenizer"):  # with the sidecar: refused as well
        check_dataset_tokenizer(prefix, small_tokenizer)


def test_unreadable_sidecar_is_an_error(tmp_path, dataset, tokenizer_dir):
    _, prefix, _ = dataset
    legacy = _copy_without_sidecar(prefix, tmp_path)
    with open(legacy + ".meta.json", "w") as fh:
        fh.write("{not json")
    with pytest.raises(DataConfigError, match="copy_text_document.meta.json: unreadable dataset metadata"):
        check_dataset_tokenizer(legacy, tokenizer_dir)


def _copy(prefix, tmp_path, suffixes):
    copy = str(tmp_path / "copy_text_document")
    for suffix in suffixes:
        with open(prefix + suffix, "rb") as src, open(copy + suffix, "wb") as dst:
            dst.write(src.read())
    return copy


def _copy_without_sidecar(prefix, tmp_path):
    """The dataset as built before sidecars existed."""
    return _copy(prefix, tmp_path, (".bin", ".idx", "_wordstart.bin", "_wordstart.idx"))
