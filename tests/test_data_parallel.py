"""Data parallelism (parallel/data_parallel.py) and the rank-agreed stop signal on 2 CPU processes (gloo):
one torchrun launch of tests/dist/data_parallel_check.py; plus the single-process fallback."""
import pytest
import torch
from torch import nn

from megatron_cmbert.parallel.data_parallel import LocalModule, data_parallel

LAUNCH_TIMEOUT_S = 200  # as conftest.torchrun


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_dp2_sums_gradients_like_one_process_and_ranks_agree_to_stop(torchrun):
    out = torchrun("tests/dist/data_parallel_check.py")
    assert "[small fp64 model] ok" in out, out
    assert "[tiny CMBert, megatron-core TP=1 DP=2] ok" in out, out
    assert "[group of one] ok" in out and "[stop signal] ok" in out, out
    assert "DATA-PARALLEL OK" in out, out


def test_without_a_process_group_the_model_is_passed_through():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    wrapped = data_parallel(model, None)
    assert isinstance(wrapped, LocalModule) and wrapped.module is model
    x = torch.randn(5, 4)
    with wrapped.no_sync():
        wrapped(x).sum().backward()
    expected = x.sum(0).expand(3, 4)  # d/dW of sum(W x + b) is the column sums of x, for every output row
    torch.testing.assert_close(model.weight.grad, expected)
    assert list(wrapped.module.state_dict()) == ["weight", "bias"]  # no `module.` prefix via .module
