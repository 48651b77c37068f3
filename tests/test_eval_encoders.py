"""eval/encoders.py: our checkpoint (--load) and its HF export (--hf) through one interface give the hidden
states and MLM logits of the stock transformers model run on a padded batch (the independent reference);
a stock BertForMaskedLM built from a BertConfig works through the same interface."""
import argparse

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the optional package transformers (extra hf)")
from megatron_cmbert.eval.encoders import (EncoderError, add_encoder_args, encoder_from_args,  # noqa: E402
                                           load_encoder, random_init_like)
from megatron_cmbert.hf.export import load_kwargs, write_hf_dir  # noqa: E402
from megatron_cmbert.checkpoint.reader import read_checkpoint  # noqa: E402
from eval_checkpoint import tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(300)
SEQ = 48
TEXTS = ["中国的首都是北京，北京有很多名胜古迹。", "今天下午我们去公园散步。", "科学家发现了一种新的治疗方法，可以帮助更多的病人恢复健康。"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("eval_encoders")
    ckpt, _ = tiny_checkpoint(root / "ckpt", tokenizer_dir, seq_length=SEQ)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    write_hf_dir(read_checkpoint(str(ckpt)), str(hf_dir))
    return ckpt, hf_dir


def stock_padded(hf_dir, texts, head=True):
    """The independent reference: transformers' own tokenizer and model on a padded batch."""
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    batch = tok(texts, padding=True, return_tensors="pt")
    cls = transformers.AutoModelForMaskedLM if head else transformers.AutoModel
    model = cls.from_pretrained(str(hf_dir), **load_kwargs(torch.float32, remote_code=True)).eval()
    with torch.no_grad():
        out = model(**batch)
    real = batch["attention_mask"].bool()
    return batch, (out.logits if head else out.last_hidden_state)[real]


@pytest.mark.parametrize("kind", ["load", "hf"])
def test_ours_and_export_match_the_stock_padded_model(tiny, kind):
    ckpt, hf_dir = tiny
    enc = load_encoder(**{kind: str(ckpt if kind == "load" else hf_dir)})
    assert enc.kind == ("ours" if kind == "load" else "hf") and enc.max_length == SEQ and enc.hidden_size == 64
    assert enc.length_limit() is None  # rotary positions: no table to outgrow
    seqs = enc.encode(TEXTS)
    batch, logits_ref = stock_padded(hf_dir, TEXTS)
    assert seqs == [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert all(s[0] == enc.tokenizer.cls_token_id and s[-1] == enc.tokenizer.sep_token_id for s in seqs)
    with torch.no_grad():
        logits, cu = enc.mlm_logits(seqs)
        hidden, cu2 = enc.hidden_states(seqs)
    assert cu.tolist() == cu2.tolist() == [0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()]
    assert cu.dtype == torch.int32 and logits.shape == logits_ref.shape
    assert (logits - logits_ref).abs().max().item() < 1e-4
    _, hidden_ref = stock_padded(hf_dir, TEXTS, head=False)
    assert (hidden - hidden_ref).abs().max().item() < 1e-5


def test_pairs_truncation_and_gradients(tiny):
    ckpt, _ = tiny
    enc = load_encoder(load=str(ckpt))
    (seq,) = enc.encode(["今天天气很好。"], pair=["我们去公园。"])
    sep = enc.tokenizer.sep_token_id
    assert seq[0] == enc.tokenizer.cls_token_id and seq.count(sep) == 2 and seq[-1] == sep
    assert max(len(s) for s in enc.encode(TEXTS, max_length=10)) == 10
    enc.train()
    hidden, _ = enc.hidden_states(enc.encode(TEXTS[:2]))
    hidden.pow(2).mean().backward()
    grad = enc.backbone.embeddings.tok_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_random_init_is_fresh_and_seeded(tiny):
    ckpt, _ = tiny
    enc = load_encoder(load=str(ckpt))
    a, b, c = random_init_like(enc, 1), random_init_like(enc, 1), random_init_like(enc, 2)
    wa, wb, wc = (e.backbone.embeddings.tok_embeddings.weight for e in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not torch.equal(wa, enc.backbone.embeddings.tok_embeddings.weight)
    assert a.tokenizer is enc.tokenizer and a.max_length == enc.max_length


def test_stock_bert_through_the_same_interface(tmp_path, tokenizer_dir):
    """A BertForMaskedLM (segment embeddings, absolute positions) saved by transformers, with our tokenizer."""
    from megatron_cmbert.eval.encoders import wrap_tokenizer

    tok = wrap_tokenizer(tokenizer_dir, 64)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(config).eval()
    bert.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    parser = argparse.ArgumentParser()
    add_encoder_args(parser)
    enc = encoder_from_args(parser.parse_args(["--hf", str(tmp_path), "--device", "cpu"]))
    assert enc.kind == "hf" and enc.max_length == 64 and enc.uses_token_types and enc.length_limit() == 64
    seqs = enc.encode(TEXTS[:2], pair=TEXTS[1:])
    with torch.no_grad():
        logits, cu = enc.mlm_logits(seqs)
        batch = tok(TEXTS[:2], TEXTS[1:], padding=True, truncation=True, max_length=64, return_tensors="pt",
                    return_token_type_ids=True)
        ref = bert(**batch).logits[batch["attention_mask"].bool()]
    assert batch["token_type_ids"].sum() > 0  # the reference does use segment B
    assert logits.shape == ref.shape and (logits - ref).abs().max().item() < 1e-5
    assert cu[-1].item() == logits.shape[0]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(EncoderError, match="exactly one"):
        load_encoder()
    with pytest.raises(EncoderError, match=str(tmp_path)):
        load_encoder(hf=str(tmp_path))
    with pytest.raises(EncoderError, match=str(tmp_path)):
        load_encoder(load=str(tmp_path))
