"""Static shapes (data/microbatch.py): every micro-batch of a run has the shapes its configuration fixes, it
holds the same data as the unpadded micro-batch of before, and training on it gives the same losses and
updates as the path it replaced (boolean-mask prediction on unpadded tokens, the per-tensor optimizer)."""
import numpy as np
import pytest
import torch

from megatron_cmbert.data.masking import IGNORE_INDEX, MaskingConfig
from megatron_cmbert.data.microbatch import DeviceBatch, MicroBatchShape
from megatron_cmbert.data.pretrain_data import MicroBatchSchedule, PretrainSamples
from megatron_cmbert.data.tokenizer import MASK_ID, PAD_ID, load_tokenizer

SEQ, MBS = 96, 4


@pytest.fixture(scope="module")
def samples(news_prefix, tokenizer_dir, tmp_path_factory):
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    masking = MaskingConfig(mask_token_id=MASK_ID, vocab_size=vocab)
    return PretrainSamples([news_prefix], "100,0,0", "train", SEQ, seed=3, num_samples=400, masking=masking,
                           cache_dir=str(tmp_path_factory.mktemp("cache"))), vocab


def test_every_micro_batch_has_the_configured_shapes_and_the_same_data(samples):
    data, _ = samples
    shape = MicroBatchShape.for_run(MBS, SEQ, 0.30)
    assert (shape.tokens, shape.sequences, shape.max_seqlen) == (MBS * SEQ, MBS * (SEQ // 3) + 1, SEQ)
    totals, pieces = set(), set()
    for k in range(40):
        rate = 0.15 + 0.15 * (k % 3) / 2
        mb = data.micro_batch(k * MBS, MBS, rate, shape)
        assert tuple(mb.input_ids.shape) == tuple(mb.labels.shape) == tuple(mb.positions.shape) == (shape.tokens,)
        assert mb.lengths.shape == (shape.sequences,) and tuple(mb.cu_seqlens.shape) == (shape.sequences + 1,)
        assert tuple(mb.predicted_index.shape) == (shape.predicted,) and mb.max_seqlen == SEQ
        plain = data.micro_batch(k * MBS, MBS, rate)  # the micro-batch as it was built before
        totals.add(plain.input_ids.numel())
        pieces.add(plain.lengths.size)
        back = mb.unpadded()
        for name in ("input_ids", "labels", "cu_seqlens", "positions", "predicted_index"):
            assert torch.equal(getattr(back, name), getattr(plain, name)), name
        np.testing.assert_array_equal(back.lengths, plain.lengths)
        # the padding: [PAD] tokens in one sequence of their own, predicting nothing; the rest empty sequences
        n = plain.input_ids.numel()
        assert (mb.input_ids[n:] == PAD_ID).all() and (mb.labels[n:] == IGNORE_INDEX).all()
        assert mb.lengths[plain.lengths.size] == shape.tokens - n and not mb.lengths[plain.lengths.size + 1:].any()
        # the head's index list: the predicted positions, then position 0 ([CLS], never predicted)
        assert mb.num_predicted == int((plain.labels != IGNORE_INDEX).sum()) == (mb.labels != IGNORE_INDEX).sum()
        assert (mb.labels[mb.predicted_index[mb.num_predicted:]] == IGNORE_INDEX).all()
    assert len(totals) > 1 and len(pieces) > 1  # the raw sizes vary from micro-batch to micro-batch


def test_a_schedule_hands_out_static_micro_batches(samples):
    data, _ = samples
    shape = MicroBatchShape.for_run(MBS, SEQ, 0.30)
    schedule = MicroBatchSchedule(data, 8, MBS, 1, 0, lambda step: 0.3, shape=shape)
    assert {tuple(schedule[k].input_ids.shape) for k in range(len(schedule))} == {(shape.tokens,)}
    with pytest.raises(ValueError, match="exceeds its static shape"):
        data.micro_batch(0, MBS + 1, 0.3, shape)


def _train(model, optimizer, batches, padded: bool):
    """Three optimizer steps as the trainer takes them; returns the losses."""
    from megatron_cmbert.training.optimizer import clip_grad_norm

    losses = []
    for step_batches in batches:
        for p in model.parameters():
            p.grad = None
        predicted = sum(mb.num_predicted for mb in step_batches)
        total = 0.0
        for mb in step_batches:
            if padded:
                b = DeviceBatch.of(mb, "cpu")
                out = model(b.input_ids, b.layout, labels=b.labels, predicted_index=b.predicted_index,
                            num_predicted=b.num_predicted)
            else:  # the old call: unpadded tokens, the predicted positions found from the labels
                plain = mb.unpadded()
                out = model(plain.input_ids, plain.cu_seqlens, plain.max_seqlen, labels=plain.labels)
            loss_sum = out.loss * out.num_predicted
            (loss_sum / predicted).backward()
            total += loss_sum.item()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        losses.append(total / predicted)
    return losses


def test_training_on_static_micro_batches_equals_the_unpadded_path(samples):
    from reference_stable_adamw import PerTensorStableAdamW
    from megatron_cmbert.model import CMBertForMaskedLM, get_preset
    from megatron_cmbert.training.optimizer import StableAdamW, param_groups

    data, vocab = samples
    shape = MicroBatchShape.for_run(MBS, SEQ, 0.30)
    batches = [[data.micro_batch((2 * s + j) * MBS, MBS, 0.3, shape) for j in range(2)] for s in range(3)]
    models = []
    for seed in (0, 0):
        torch.manual_seed(seed)
        models.append(CMBertForMaskedLM(get_preset("tiny", vocab_size=vocab, kernels="reference")))
    new = _train(models[0], StableAdamW(param_groups(models[0]), lr=3e-3), batches, padded=True)
    old = _train(models[1], PerTensorStableAdamW(param_groups(models[1]), lr=3e-3), batches, padded=False)
    np.testing.assert_allclose(new, old, rtol=1e-6)
    assert new[0] != new[-1]  # the steps changed the model
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # fp32 summation order only
