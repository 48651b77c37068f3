"""tools/eval_pppl.py against a hand-written reference: the same windows and units rebuilt here from the raw
dataset, each unit masked in its own forward in float64, PPPL = exp(sum NLL / masked tokens). Our model
(packed, many copies per forward, float32) and a stock BertForMaskedLM (padded, via --hf) must give it."""
import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the optional package transformers (extra hf)")
from eval_checkpoint import tiny_checkpoint  # noqa: E402
from megatron_cmbert.data.encode import DocumentEncoder  # noqa: E402
from megatron_cmbert.data.tokenizer import CLS_ID, MASK_ID, SEP_ID  # noqa: E402
from megatron_cmbert.eval.encoders import wrap_tokenizer  # noqa: E402
from megatron_cmbert.eval.pppl import paired_ratio, stream_from_texts, summarize  # noqa: E402
from tools import eval_pppl  # noqa: E402

pytestmark = pytest.mark.timeout(300)
POOL = 150


def raw_stream(prefix, n_tokens):
    """The first n_tokens of the dataset's documents, read with megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, flags = IndexedDataset(prefix), IndexedDataset(prefix + "_wordstart")
    out_t, out_f = [], []
    for doc in range(len(tokens)):
        t, f = [int(x) for x in tokens[doc]], [int(x) for x in flags[doc]]
        f[0] = 1
        out_t += t
        out_f += f
        if len(out_t) >= n_tokens:
            break
    return out_t[:n_tokens], out_f[:n_tokens]


def reference_pppl(score_copy, tokens, flags, length, unit):
    """One masked copy per forward. Windows: consecutive slices of length-2 tokens; a unit is a start
    token and the non-start tokens after it (every token for unit="token"), never crossing a window."""
    body, nll, count = length - 2, 0.0, 0
    for w in range(len(tokens) // body):
        piece, f = tokens[w * body:(w + 1) * body], list(flags[w * body:(w + 1) * body])
        f[0] = 1
        starts = [i for i in range(body) if unit == "token" or f[i]] + [body]
        for a, b in zip(starts[:-1], starts[1:]):
            ids = [CLS_ID] + piece + [SEP_ID]
            for i in range(a + 1, b + 1):
                ids[i] = MASK_ID
            logp = score_copy(ids)
            for i in range(a + 1, b + 1):
                nll -= logp[i, piece[i - 1]].item()
                count += 1
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    ckpt, model = tiny_checkpoint(tmp_path_factory.mktemp("pppl") / "ckpt", tokenizer_dir, seq_length=32)
    return ckpt, model.double()


def test_batched_tool_equals_one_copy_per_forward_fp64(tiny, news_prefix, tmp_path):
    ckpt, model64 = tiny
    out = tmp_path / "pppl.json"
    returned = eval_pppl.run(["--load", str(ckpt), "--data-prefix", news_prefix, "--lengths", "16", "42",
                              "--max-units", "0", "--pool-tokens", str(POOL), "--tokens-per-forward", "300",
                              "--output-json", str(out), "--no-progress", "--device", "cpu"])
    report = json.loads(out.read_text())
    assert returned["results"] == report["results"] and not (tmp_path / "pppl.json.partial").exists()
    assert (tmp_path / "pppl.png").stat().st_size > 1000
    tokens, flags = raw_stream(news_prefix, POOL)

    def score_copy(ids):
        with torch.no_grad():
            logits = model64(torch.tensor(ids), torch.tensor([0, len(ids)], dtype=torch.int32), len(ids)).logits
        return torch.log_softmax(logits, dim=-1)

    for row, length in zip(report["results"], (16, 42)):
        expected, count = reference_pppl(score_copy, tokens, flags, length, "word")
        assert row["length"] == length and row["masked_tokens"] == count == (POOL // (length - 2)) * (length - 2)
        assert row["pppl"] == pytest.approx(expected, rel=1e-5)
        assert row["ci95"][0] < row["pppl"] < row["ci95"][1]
        assert row["beyond_trained_length"] == (length > 32)
    pair = report["results"][1]["vs_first"]
    assert pair["base_length"] == 16 and 0 < pair["shared_units"] < report["results"][1]["units"]
    assert pair["ci95"][0] <= pair["ratio"] <= pair["ci95"][1]
    assert report["results"][0]["units"] < report["results"][0]["masked_tokens"]  # some words span tokens


def test_hf_bert_on_jsonl_token_units(tmp_path, tokenizer_dir, inews_dev):
    """A stock BertForMaskedLM (absolute positions: 64) on a jsonl file, one token per unit."""
    tok = wrap_tokenizer(tokenizer_dir, 64)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(1)
    bert = transformers.BertForMaskedLM(config).eval()
    bert.save_pretrained(str(tmp_path / "bert"))
    tok.save_pretrained(str(tmp_path / "bert"))
    texts = inews_dev[:3]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in texts),
                                         encoding="utf-8")
    out = tmp_path / "bert.json"
    assert eval_pppl.main(["--hf", str(tmp_path / "bert"), "--input", str(tmp_path / "held.jsonl"), "--json-key", "body",
                           "--lengths", "24", "80", "--unit", "token", "--max-units", "0", "--pool-tokens", "110",
                           "--output-json", str(out), "--no-progress", "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows[1]["pppl"] is None and "64 positions" in rows[1]["reason"]
    tokens = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]][:110]
    bert64 = bert.double()

    def score_copy(ids):
        with torch.no_grad():
            return torch.log_softmax(bert64(input_ids=torch.tensor([ids])).logits[0], dim=-1)

    expected, count = reference_pppl(score_copy, tokens, [1] * len(tokens), 24, "token")
    assert rows[0]["masked_tokens"] == count == rows[0]["units"]
    assert rows[0]["pppl"] == pytest.approx(expected, rel=1e-5)


def test_word_units_of_any_tokenizer_match_preprocessing(tokenizer_dir, inews_dev):
    """stream_from_texts (offsets + rjieba, for any fast tokenizer) on our tokenizer gives the flags that
    tools/preprocess_data.py's encoder stores."""
    texts = inews_dev[3:8]
    chunk = DocumentEncoder(tokenizer_dir).encode(texts)
    tokens, flags = stream_from_texts(texts, wrap_tokenizer(tokenizer_dir, 512), 10 ** 9)
    assert np.array_equal(tokens, chunk.tokens) and np.array_equal(flags, chunk.word_starts)


def test_max_units_and_split(tiny, news_prefix, tmp_path):
    ckpt, _ = tiny
    out = tmp_path / "sub.json"
    assert eval_pppl.main(["--load", str(ckpt), "--data-prefix", news_prefix, "--lengths", "12", "40",
                           "--max-units", "20", "--pool-tokens", "400", "--split", "50,50,0", "--output-json",
                           str(out), "--plot", str(tmp_path / "p.png"), "--no-progress", "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["units"] for r in rows] == [20, 20] and (tmp_path / "p.png").exists()


def test_summarize_and_paired_ratio_by_hand():
    r = summarize(8, np.array([1.0, 3.0]), np.array([1, 3]), windows=1, bootstrap=0)
    assert r.pppl == pytest.approx(math.exp(1.0)) and r.masked_tokens == 4 and r.mean_nll == 1.0
    r.unit_nll = {(0, 1): (1.0, 1), (5, 8): (3.0, 3)}
    other = summarize(16, np.array([2.0, 2.0]), np.array([3, 1]), windows=1, bootstrap=0)
    other.unit_nll = {(5, 8): (2.0, 3), (9, 10): (2.0, 1)}  # only (5, 8) is shared: 2/3 vs 3/3 nats per token
    pair = paired_ratio(r, other, bootstrap=0)
    assert pair["shared_units"] == 1 and pair["ratio"] == pytest.approx(math.exp(2 / 3 - 1))


def test_errors_are_one_line(tiny, news_prefix, tmp_path, capsys):
    ckpt, _ = tiny
    args = ["--load", str(ckpt), "--output-json", str(tmp_path / "x.json"), "--no-progress"]
    assert eval_pppl.main(args + ["--data-prefix", news_prefix, "--lengths", "10000000"]) == 2  # a user error
    assert "fewer than one window" in capsys.readouterr().err
    assert eval_pppl.main(args + ["--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
