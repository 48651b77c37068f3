"""Parity with the stock transformers ModernBertForMaskedLM (LayerNorm variant), through the one key map
(model/hf_keymap.py), on real Chinese news text with padding."""
import pytest
import torch

from megatron_cmbert.model import IGNORE_INDEX, CMBertForMaskedLM, get_preset
from megatron_cmbert.model.hf_keymap import (expected_hf_keys, from_hf, glu_from_hf, glu_to_hf, hf_config_kwargs,
                                             qkv_from_hf, qkv_to_hf, to_hf)
from megatron_cmbert.model.padding import run_padded, unpad_input

transformers = pytest.importorskip("transformers", reason="needs the optional package transformers")

# fp32 on both sides; different kernels (HF eager over a padded batch vs our per-sequence attention).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def chinese_batch(tokenizer_dir, inews_dev):
    """Three real news texts of different lengths (all longer than the tiny window 8), tokenized by the
    project's tokenizer (conftest: 8,192 entries trained on inews), padded with [PAD]=0 into one batch."""
    from megatron_cmbert.data.tokenizer import PAD_ID, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rows = [tok.encode(t, add_special_tokens=True).ids[:n] for t, n in zip(inews_dev[:3], (48, 23, 37))]
    ids = torch.full((3, 48), PAD_ID, dtype=torch.long)
    mask = torch.zeros(3, 48, dtype=torch.long)
    for row, seq in enumerate(rows):
        assert len(seq) == (48, 23, 37)[row]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask, tok.get_vocab_size()


def _models(vocab_size):
    # std 0.1 instead of 0.02: with the default init logits are so flat that a wrong RoPE theta moves them
    # by only ~3e-6, under the tolerance; at 0.1 it moves them by ~1e-2 while the parity error stays ~1e-6.
    config = get_preset("tiny", vocab_size=vocab_size, normalization="LayerNorm", initializer_range=0.1,
                        kernels="reference")
    torch.manual_seed(0)
    ours = CMBertForMaskedLM(config).eval()
    with torch.no_grad():  # norms and bias start at 1 / 0: randomise them so their mapping is tested too
        for name, p in ours.named_parameters():
            if "norm" in name or name == "decoder_bias":
                p.add_(0.1 * torch.randn_like(p))
    hf_config = transformers.ModernBertConfig(**hf_config_kwargs(config))
    hf_config._attn_implementation = "eager"
    hf = transformers.ModernBertForMaskedLM(hf_config).eval()
    state = to_hf(ours.state_dict(), config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == ["decoder.weight"]  # tied to the embedding, not stored
    assert hf.decoder.weight.data_ptr() == hf.model.embeddings.tok_embeddings.weight.data_ptr()
    return config, ours, hf


def test_logits_equal_stock_hf_on_padded_chinese_text(chinese_batch):
    ids, mask, vocab = chinese_batch
    config, ours, hf = _models(vocab)
    # HF got our thetas and window, both through the transformers 5 keys it reads.
    assert hf.config.layer_types == config.layer_types and hf.config.sliding_window == 4
    inv_freq = 1.0 / 80_000.0 ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(hf.model.rotary_emb.full_attention_inv_freq, inv_freq)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        logits = run_padded(lambda *packed: ours(*packed).logits, ids, mask)
    real = mask.bool()
    assert logits.shape[-1] == config.padded_vocab_size() and expected.shape[-1] == vocab
    diff = (logits[real][:, :vocab] - expected[real]).abs().max().item()
    assert diff <= TOLERANCE, f"max |ours - HF| = {diff}"
    assert torch.isinf(logits[real][:, vocab:]).all()


def test_sparse_prediction_logits_and_loss_equal_hf(chinese_batch):
    ids, mask, vocab = chinese_batch
    _, ours, hf = _models(vocab)
    labels = torch.full_like(ids, IGNORE_INDEX)
    chosen = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.3) & mask.bool()
    labels[chosen] = ids[chosen]
    tokens, indices, cu, max_len = unpad_input(ids, mask)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(tokens, cu, max_len, labels=labels.flatten()[indices])
    assert out.num_predicted == int(chosen.sum()) > 0
    diff = (out.logits[:, :vocab] - expected.logits[chosen]).abs().max().item()
    assert diff <= TOLERANCE, f"max |ours - HF| = {diff}"
    # Vocabulary padding is masked, so the loss is HF's unpadded-vocabulary cross-entropy.
    assert abs(out.loss.item() - expected.loss.item()) <= TOLERANCE


def test_key_map_round_trip_and_layout():
    config = get_preset("tiny", normalization="LayerNorm")
    torch.manual_seed(1)
    state = CMBertForMaskedLM(config).state_dict()
    hf_state = to_hf(state, config)
    assert sorted(hf_state) == sorted(expected_hf_keys(config))
    assert "model.layers.0.attn_norm.weight" not in hf_state
    assert hf_state["model.embeddings.tok_embeddings.weight"].shape == (config.vocab_size, config.hidden_size)
    back = from_hf(hf_state, config)
    assert back.keys() == state.keys()
    vocab_rows = ("model.embeddings.tok_embeddings.weight", "decoder_bias")
    for key in set(state) - set(vocab_rows):
        assert torch.equal(back[key], state[key]), key
    for key in ("model.embeddings.tok_embeddings.weight", "decoder_bias"):
        assert torch.equal(back[key][: config.vocab_size], state[key][: config.vocab_size])
        assert back[key][config.vocab_size:].abs().sum() == 0


def test_fused_layouts_by_hand():
    # 2 heads, head_dim 1: ours per head [q0, k0, v0, q1, k1, v1] -> HF [q0, q1, k0, k1, v0, v1]
    ours = torch.tensor([[10.], [20.], [30.], [11.], [21.], [31.]])
    assert qkv_to_hf(ours, 2).flatten().tolist() == [10, 11, 20, 21, 30, 31]
    assert torch.equal(qkv_from_hf(qkv_to_hf(ours, 2), 2), ours)
    # FFN 3: ours [in0, gate0, in1, gate1, in2, gate2] -> HF [in0, in1, in2, gate0, gate1, gate2]
    wi = torch.tensor([[1.], [-1.], [2.], [-2.], [3.], [-3.]])
    assert glu_to_hf(wi).flatten().tolist() == [1, 2, 3, -1, -2, -3]
    assert torch.equal(glu_from_hf(glu_to_hf(wi)), wi)


def test_rmsnorm_models_refuse_the_stock_hf_config():
    with pytest.raises(ValueError, match="only bias-free LayerNorm"):
        hf_config_kwargs(get_preset("tiny"))


def test_config_from_hf_reads_both_spellings():
    from megatron_cmbert.model.hf_keymap import model_config_from_hf

    config = get_preset("tiny", vocab_size=640, normalization="LayerNorm", global_attn_every_n_layers=2)
    # transformers' own serialisation (5.x drops the 4.x keys) and our config.json (both key sets)
    v5 = transformers.ModernBertConfig(**hf_config_kwargs(config)).to_dict()
    for hf in (v5, hf_config_kwargs(config)):
        back = model_config_from_hf(hf)
        assert back.replace(name=config.name) == config
    stock_large = dict(hf_config_kwargs(get_preset("large", normalization="LayerNorm")), global_rope_theta=160_000.0)
    del stock_large["rope_parameters"], stock_large["layer_types"]  # a 4.x config.json
    assert model_config_from_hf(stock_large).global_rope_theta == 160_000.0
    with pytest.raises(ValueError, match="attention_bias"):
        model_config_from_hf(dict(v5, attention_bias=True))
