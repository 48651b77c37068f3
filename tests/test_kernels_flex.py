"""FlexAttention's plan (kernels/attention_flex.py): block masks built once per micro-batch from the host lengths,
checked against the dense document x window mask built from scratch (tests/dense_attention.py).

FlexAttention run eagerly (CPU) evaluates mask_mod over every pair and ignores the block tables, so a forward
check alone would pass with wrong tables; the tables are therefore checked directly: expanded to tokens
(full block: all pairs, partial block: mask_mod per pair, absent block: none) they must equal the dense mask,
and no listed block may be empty (visited for nothing). The forward on CPU then checks mask_mod and the
plumbing against fp64 dense attention (fp32 inputs: a few ulps, atol 2e-6 as in test_model_attention.py).
"""
import numpy as np
import pytest
import torch

flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="needs torch with FlexAttention")

from megatron_cmbert.kernels import attention_flex  # noqa: E402
from megatron_cmbert.kernels.varlen import PackedLayout  # noqa: E402

from dense_attention import construct_local_mask, dense_fp64  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
# One long sequence among many short ones, one-token and zero-length sequences, lengths not multiples of the
# block, zero-length padding at the end; 300 tokens: two whole 128-blocks and a partial one.
SKEWED = [0, 150, 1, 0, 0, 5, 2, 3, 0, 37, 1, 3, 0, 64, 1, 33] + [0] * 30
WINDOWS = [(-1, -1), (64, 64), (0, 0), (3, 1), (-1, 2), (5, -1)]


def expand(tables, block, total, mask_mod):
    """Token-level (total, total) mask that flex computes from the tables."""
    kv_num, kv_idx, full_num, full_idx = tables
    out = torch.zeros(total + block, total + block, dtype=torch.bool)
    q_idx, kv_pos = torch.arange(total + block)[:, None], torch.arange(total + block)[None, :]
    pairs = mask_mod(0, 0, q_idx.clamp(max=total - 1), kv_pos.clamp(max=total - 1))
    for i in range(kv_num.shape[0]):
        rows = slice(i * block, (i + 1) * block)
        for j in kv_idx[i, :kv_num[i]].tolist():
            cols = slice(j * block, (j + 1) * block)
            out[rows, cols] = pairs[rows, cols]
        for j in full_idx[i, :full_num[i]].tolist():
            out[rows, j * block:(j + 1) * block] = True
    return out[:total, :total]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("block", [16, 128])
def test_block_tables_expand_to_the_dense_mask(window, block):
    layout = PackedLayout.from_lengths(SKEWED)
    total = layout.total
    tables = attention_flex.block_tables(layout.lengths, window, total, block)
    n = -(-total // block)
    assert [t.shape for t in tables] == [(n,), (n, n)] * 4
    bounded = torch.tensor([w if w >= 0 else total for w in window])
    mask_mod = attention_flex._mask_mod(layout.positions, bounded)
    dense = construct_local_mask(SKEWED, window)
    assert torch.equal(expand([torch.from_numpy(t) for t in tables[:4]], block, total, mask_mod), dense)
    kv_num, kv_idx, full_num, full_idx = tables[:4]
    for i in range(n):  # every listed block holds a pair that is attended; a full block only such pairs
        rows = dense[i * block:(i + 1) * block]
        for j in kv_idx[i, :kv_num[i]]:
            assert rows[:, j * block:(j + 1) * block].any()
        for j in full_idx[i, :full_num[i]]:
            assert rows[:, j * block:(j + 1) * block].all()
        assert not set(kv_idx[i, :kv_num[i]]) & set(full_idx[i, :full_num[i]])


@pytest.mark.parametrize("window", WINDOWS)
def test_key_block_side_is_flex_own_transpose(window):
    # The backward walks the key-block side (q_num_blocks, q_indices); the plan computes it on the host, and
    # it must be what BlockMask.from_kv_blocks derives on the device from the query-block side.
    layout = PackedLayout.from_lengths(SKEWED)
    ours = attention_flex.plan(layout, window).block_mask
    theirs = flex.BlockMask.from_kv_blocks(ours.kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks,
                                           ours.full_kv_indices, BLOCK_SIZE=attention_flex.BLOCK,
                                           seq_lengths=(layout.total, layout.total))
    for num, idx in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        assert torch.equal(getattr(ours, num), getattr(theirs, num))
        for row, count in enumerate(getattr(ours, num)[0, 0].tolist()):
            assert torch.equal(getattr(ours, idx)[0, 0, row, :count], getattr(theirs, idx)[0, 0, row, :count])


@pytest.mark.parametrize("window", [(-1, -1), (64, 64), (3, 1)])
def test_flex_forward_on_cpu_matches_dense_fp64(window):
    layout = PackedLayout.from_lengths(SKEWED, max_seqlen=256)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.total, 2, 16, generator=g) for _ in range(3))
    out = attention_flex.attend(q, k, v, attention_flex.plan(layout, window))
    torch.testing.assert_close(out.double(), dense_fp64(q, k, v, SKEWED, window), atol=2e-6, rtol=0)


def test_plan_shapes_depend_only_on_the_token_budget_and_one_compile_serves_all():
    # Three micro-batches of one 256-token budget: different lengths, sequence counts (padded with empty
    # sequences) and windows. Their block masks have the same shapes and the mask function the same code, so
    # a compiled caller (dynamo guards on the code, the tensors are inputs) compiles once.
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda q, k, v, p: attention_flex.attend(q, k, v, p), backend=backend, fullgraph=True)
    shapes = set()
    for lengths, window in [([100, 156, 0, 0], (-1, -1)), ([3] * 80 + [16] + [0] * 50, (64, 64)), ([256], (3, 1))]:
        layout = PackedLayout.from_lengths(lengths)
        plan = attention_flex.plan(layout, window)
        mask = plan.block_mask
        shapes.add(tuple(tuple(t.shape) for t in (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                                  mask.full_kv_indices, mask.q_num_blocks, mask.q_indices)))
        q, k, v = (torch.randn(256, 2, 16) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v, plan).double(), dense_fp64(q, k, v, lengths, window),
                                   atol=2e-6, rtol=0)
    assert len(shapes) == 1 and len(graphs) == 1


def test_plan_reads_no_device_offsets():
    # Built from the host lengths alone: a layout whose device offsets are poisoned gives the same mask.
    layout = PackedLayout.from_lengths(SKEWED)
    poisoned = PackedLayout(layout.lengths, torch.full_like(layout.cu_seqlens, -7), layout.positions,
                            layout.max_seqlen)
    a, b = (attention_flex.plan(x, (64, 64)).block_mask for x in (layout, poisoned))
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert np.all(a.to_dense().numpy() == b.to_dense().numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention reads the tables)")
def test_cuda_compiled_flex_on_a_packed_micro_batch_follows_the_rule():
    # Compiled flex is what uses the block tables (eager flex ignores them): forward and backward in bf16 on
    # a packed 16k-token micro-batch against the fp64 per-sequence reference, within 2x PyTorch's own bf16
    # error (flash-attention's rule), for both windows with one compiled kernel.
    from megatron_cmbert.kernels import attention_reference as reference
    from tools.bench_kernels import DEMO_CORPUS, corpus_lengths, packed_lengths

    lengths, _ = packed_lengths(corpus_lengths(DEMO_CORPUS, None)[0], 1024, 16384)
    layout = PackedLayout.from_lengths(lengths, "cuda", max_seqlen=1024)
    g = torch.Generator().manual_seed(9)
    q, k, v, grad = (torch.randn(layout.total, 4, 64, generator=g).cuda().bfloat16() for _ in range(4))

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(dtype))
        return [out.detach()] + [t.grad for t in leaves]

    for window in ((-1, -1), (64, 64)):
        reference_plan, flex_plan = reference.plan(layout, window), attention_flex.plan(layout, window)
        exact = run(lambda *t: reference.attend(*t, reference_plan), torch.float64)
        low = run(lambda *t: reference.attend(*t, reference_plan), torch.bfloat16)
        mine = run(lambda *t: attention_flex.attend(*t, flex_plan), torch.bfloat16)
        for name, m, t, e in zip(("out", "dq", "dk", "dv"), mine, low, exact):
            err, torch_err = (m.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
            assert err <= 2 * torch_err + 1e-6, f"{window} {name}: flex error {err:.3g} > 2 x torch's {torch_err:.3g}"
