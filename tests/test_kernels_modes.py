"""The interpreter guard (kernels/triton_common.interpreter_loop_problem): the kernels' runtime-bound loops run
under this Triton + numpy, and a Triton/numpy pair that cannot run them is named with its fix in one line."""
from kernel_env import INTERPRETED, fresh_process_only  # first: sets TRITON_INTERPRET before triton loads

import pytest

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter (the probe guards CPU runs)")


def test_this_triton_and_numpy_run_runtime_bound_loops():
    from megatron_cmbert.kernels import triton_common

    assert triton_common.interpreter_loop_problem() is None


def test_a_failing_probe_names_the_fix(monkeypatch):
    from megatron_cmbert.kernels import triton_common

    class Refusing:  # what Triton 3.6's interpreter does under numpy >= 2.4
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(triton_common, "_runtime_loop_probe", Refusing())
    problem = triton_common.interpreter_loop_problem()
    assert "cannot run a loop with a runtime bound under numpy" in problem and "install numpy<2.4" in problem


fresh_process_only(globals(), __file__)
