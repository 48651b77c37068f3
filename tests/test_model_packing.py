"""Packed varlen input: helpers with hand-computed values, packed == each document alone, padded-batch
helper, and the sliding window's reach (from depth) in an all-local model."""
import torch

from megatron_cmbert.model import CMBertForMaskedLM, get_preset
from megatron_cmbert.kernels.varlen import PackedLayout
from megatron_cmbert.model.padding import (cu_seqlens_from_lengths, pack_sequences, pad_output, run_padded,
                                           unpad_input)


def test_unpad_and_pad_hand_computed():
    ids = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    tokens, indices, cu, max_len = unpad_input(ids, mask)
    assert tokens.tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert indices.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert cu.tolist() == [0, 3, 4, 8] and cu.dtype == torch.int32 and max_len == 4
    assert pad_output(tokens * 10, indices, 3, 4).tolist() == [[50, 60, 70, 0], [80, 0, 0, 0],
                                                               [90, 100, 110, 120]]


def test_pack_pads_with_a_separate_sequence():
    tokens, cu, max_len = pack_sequences([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], pad_to_multiple_of=4,
                                         pad_token_id=0)
    assert tokens.tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert cu.tolist() == [0, 3, 5, 8] and max_len == 3
    assert pack_sequences([torch.tensor([1, 2])], pad_to_multiple_of=2)[1].tolist() == [0, 2]


def test_positions_restart_for_every_sequence():
    cu = cu_seqlens_from_lengths([3, 1, 4])
    assert PackedLayout.from_cu_seqlens(cu).positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def _tiny_model(dtype=torch.float64, **changes):
    torch.manual_seed(0)
    model = CMBertForMaskedLM(get_preset("tiny", kernels="reference", **changes)).to(dtype)
    return model.eval()


def _docs(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def test_packed_batch_equals_each_document_alone():
    model = _tiny_model(torch.float32)  # tiny has a global layer 0 and local layers 1, 2 (window 8)
    docs = _docs([5, 30, 1, 17], model.config.vocab_size)
    tokens, cu, max_len = pack_sequences(docs)
    with torch.no_grad():
        packed = model(tokens, cu, max_len).logits
        alone = torch.cat([model(d, cu_seqlens_from_lengths([len(d)]), len(d)).logits for d in docs])
    # Same math on different matrix shapes: fp32 rounding only.
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=0)


def test_padded_batch_helper_matches_documents_alone():
    model = _tiny_model(torch.float32)
    docs = _docs([9, 3, 14], model.config.vocab_size, seed=2)
    ids = torch.zeros(3, 14, dtype=torch.long)
    mask = torch.zeros(3, 14, dtype=torch.long)
    for row, d in enumerate(docs):
        ids[row, : len(d)], mask[row, : len(d)] = d, 1
    with torch.no_grad():
        padded = run_padded(model.model, ids, mask)
        for row, d in enumerate(docs):
            alone = model.model(d, cu_seqlens_from_lengths([len(d)]), len(d))
            torch.testing.assert_close(padded[row, : len(d)], alone, atol=2e-5, rtol=0)
            assert padded[row, len(d):].abs().sum() == 0


def test_sliding_window_reach_grows_with_depth_and_stops_at_documents():
    model = _tiny_model(global_attn_every_n_layers=0)  # 3 local layers, |i - j| <= 4 each
    config = model.config
    reach = config.num_layers * config.local_attention // 2  # 12 tokens after 3 layers
    first, second = _docs([40, 25], config.vocab_size, seed=3)
    j = 20
    changed = first.clone()
    changed[j] = (changed[j] + 1) % config.vocab_size
    with torch.no_grad():
        before = model.model(*pack_sequences([first, second]))
        after = model.model(*pack_sequences([changed, second]))
    differs = (after - before).abs().amax(dim=-1) > 0
    expected = torch.zeros(65, dtype=torch.bool)
    expected[j - reach: j + reach + 1] = True  # every position in reach changes, none outside
    assert differs.tolist() == expected.tolist()
    assert torch.equal(before[40:], after[40:])  # the other document is bit-for-bit untouched
    # and the edge of the reach really moves (fp64: far above rounding)
    assert (after - before)[j - reach].abs().max() > 1e-12 and (after - before)[j + reach].abs().max() > 1e-12


def test_global_layer_sees_the_whole_document():
    # tiny: layer 0 global, 1 and 2 local (reach 8 < 39): only the global layer can carry a change at
    # position 0 to position 39.
    model = _tiny_model()
    doc, = _docs([40], model.config.vocab_size, seed=4)
    changed = doc.clone()
    changed[0] = (changed[0] + 1) % model.config.vocab_size
    with torch.no_grad():
        before = model.model(*pack_sequences([doc]))
        after = model.model(*pack_sequences([changed]))
    assert ((after - before).abs().amax(dim=-1) > 0).all()
