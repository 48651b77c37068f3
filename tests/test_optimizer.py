"""StableAdamW against the formula (fp64, textbook bias-corrected form), torch.optim.AdamW when update
clipping is idle, optimi.StableAdamW (the PyPI package torch-optimi), exact resume; the weight-decay groups
(ModernBERT's ndim rule, and the embedding ablation); clip_grad_norm against torch; and TP=2 vs TP=1 on
2 processes (tests/dist/tp_optimizer_check.py)."""
import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from megatron_cmbert.training import StableAdamW, clip_grad_norm, param_groups

SHAPES = [(5, 7), (13,), (3, 4, 2)]  # odd sizes, one 1-D "bias-like" tensor


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def grad_sequence(steps, growth, seed=1):
    """Per step, one grad per tensor: random directions, magnitude growth**t (growth > 1: rms > 1 spikes)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) * growth ** t for s in SHAPES] for t in range(steps)]


def shrinking_grad_sequence(steps, seed=2):
    """|g_t| elementwise non-increasing (fixed magnitudes times 0.85^t, random signs): g_t^2 <= v_hat_t, so
    rms <= 1 at every step and update clipping can never trigger."""
    g = torch.Generator().manual_seed(seed)
    mags = [torch.rand(s, generator=g, dtype=torch.float64) + 0.1 for s in SHAPES]
    return [[m * 0.85 ** t * (torch.randint(0, 2, m.shape, generator=g) * 2 - 1) for m in mags] for t in range(steps)]


def reference_stableadamw(params, grads, lr, betas, eps, wds):
    """Wortsman et al. in the textbook Adam form (biased EMAs divided by 1 - beta^t), fp64. Returns the
    final params and every (tensor, step) rms."""
    (b1, b2), ps = betas, [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    all_rms = []
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            rms = math.sqrt((g * g / torch.clamp(v_hat, min=eps * eps)).mean().item())
            all_rms.append(rms)
            lr_t = lr / max(1.0, rms)
            ps[i] = ps[i] * (1 - lr_t * wds[i]) - lr_t * m_hat / (v_hat.sqrt() + eps)
    return ps, all_rms


def run(optimizer, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(p.dtype)
        optimizer.step()


def groups(params, wd=0.1):
    # tensor 0 and 2 decay, the 1-D tensor does not (as a bias would)
    return [{"params": [params[0], params[2]], "weight_decay": wd}, {"params": [params[1]], "weight_decay": 0.0}]


WDS = [0.1, 0.0, 0.1]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_matches_formula_with_update_clipping_active(dtype, atol):
    # atol: fp64 agrees to rounding; fp32 params of size ~1 carry ~1e-7 rounding per step over 10 steps.
    params, grads = make_params(dtype), grad_sequence(10, growth=1.6)
    want, rms = reference_stableadamw(params, grads, 1e-2, (0.9, 0.95), 1e-6, WDS)
    assert sum(r > 1.0 for r in rms) >= 10 and sum(r <= 1.0 for r in rms) >= 3  # both branches exercised
    opt = StableAdamW(groups(params), lr=1e-2)  # paper defaults: betas (0.9, 0.95), eps 1e-6
    run(opt, params, grads)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=atol)
    assert opt.stats["tensors"] == 3 and opt.stats["max_rms"] == pytest.approx(max(rms[-3:]), rel=1e-5)


def test_equals_torch_adamw_when_clipping_is_idle():
    # Debiased betas make m, v equal Adam's m_hat, v_hat, and both divide by sqrt(v_hat) + eps: with rms <= 1
    # the updates are the same formula, so fp64 agrees to rounding.
    grads = shrinking_grad_sequence(12)
    _, rms = reference_stableadamw(make_params(torch.float64), grads, 1e-2, (0.9, 0.95), 1e-6, WDS)
    assert max(rms) <= 1.0 + 1e-12
    ours, theirs = make_params(torch.float64), make_params(torch.float64)
    run(StableAdamW(groups(ours), lr=1e-2), ours, grads)
    run(torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-6, foreach=False), theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_differs_from_torch_adamw_when_clipping_triggers():
    grads = grad_sequence(6, growth=2.0)
    ours, theirs = make_params(torch.float64), make_params(torch.float64)
    run(StableAdamW(groups(ours), lr=1e-2), ours, grads)
    run(torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-6), theirs, grads)
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) > 1e-3


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 9)
        self.norm = nn.LayerNorm(9)
        self.out = nn.Linear(9, 6, bias=False)

    def forward(self, ids):
        return self.out(self.norm(torch.tanh(self.fc(self.emb(ids)))))


def train(model, optimizer, steps, seed=3, growth=1.5, first_step=0):
    g = torch.Generator().manual_seed(seed)
    for t in range(first_step, first_step + steps):
        ids, target = torch.randint(0, 11, (4, 5), generator=g), torch.randn(4, 5, 6, generator=g)
        optimizer.zero_grad()
        (growth ** t * (model(ids) - target).pow(2).mean()).backward()  # growing: update clipping engages
        optimizer.step()


def test_matches_optimi_stableadamw():
    optimi = pytest.importorskip("optimi", reason="the oracle is the PyPI package torch-optimi")
    torch.manual_seed(0)
    ours = SmallNet()
    theirs = SmallNet()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = StableAdamW(param_groups(ours, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    opt_theirs = optimi.StableAdamW([{k: v for k, v in g.items() if k != "param_names"}
                                     for g in param_groups(theirs, 0.1)],
                                    lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, foreach=False,
                                    triton=False)
    clipped = 0
    for step in range(8):
        train(ours, opt_ours, 1, seed=step, first_step=step)
        train(theirs, opt_theirs, 1, seed=step, first_step=step)
        clipped += opt_ours.stats["clipped"]
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            # fp32, same operations in the same order up to the rms reduction: rounding only
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"step {step} {name}")
    assert clipped > 0


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    straight, resumed = SmallNet(), SmallNet()
    resumed.load_state_dict(straight.state_dict())
    opt = StableAdamW(param_groups(straight), lr=1e-2)
    train(straight, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "optimizer": opt.state_dict()}, buffer)
    train(straight, opt, 4, seed=9)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt2 = StableAdamW(param_groups(resumed), lr=1e-2)
    opt2.load_state_dict(saved["optimizer"])
    train(resumed, opt2, 4, seed=9)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert all(s["step"] == 7 for s in opt2.state.values())


def test_parameters_without_grad_are_untouched():
    params = make_params(torch.float32)
    before = params[1].detach().clone()
    opt = StableAdamW(params, lr=1e-2)
    params[0].grad, params[2].grad = torch.ones(SHAPES[0]), torch.ones(SHAPES[2])
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state and opt.stats["tensors"] == 2


class MyRMSNorm(nn.Module):  # any norm class: its 1-D weight is what exempts it
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class ProjectionNorm(nn.Module):  # a 2-D weight in a class whose name ends in "Norm": ndim decides, it decays
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))


class LayerNormLinear(nn.Module):  # a fused norm + linear, as Transformer Engine has
    def __init__(self, n):
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(n))
        self.weight = nn.Parameter(torch.randn(n, n))


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.ln = nn.LayerNorm(4)
        self.rms = MyRMSNorm(4)
        self.proj = ProjectionNorm(4)
        self.fused = LayerNormLinear(4)
        self.with_bias = nn.Linear(4, 4)
        self.no_bias = nn.Linear(4, 4, bias=False)
        self.tied = nn.Linear(4, 10, bias=False)
        self.tied.weight = self.emb.weight  # tied decoder: one parameter, listed once under its first name
        self.decoder_bias = nn.Parameter(torch.zeros(10))
        self.frozen = nn.Linear(4, 4, bias=False).requires_grad_(False)


# ModernBERT's main.py (param_groups_weight_decay): ndim <= 1 or a bias -> no decay, everything else decays.
# named_parameters() lists a module's own parameters (decoder_bias) before its children's.
ZOO_EXEMPT = ["decoder_bias", "ln.weight", "ln.bias", "rms.weight", "fused.layer_norm_weight", "with_bias.bias"]


def test_param_groups_follow_modernbert_embeddings_decay():
    decay, no_decay = param_groups(Zoo(), weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["param_names"] == ["emb.weight", "proj.weight", "fused.weight", "with_bias.weight",
                                    "no_bias.weight"]
    assert no_decay["param_names"] == ZOO_EXEMPT


def test_param_groups_ablation_exempts_embeddings_and_the_tied_decoder():
    zoo = Zoo()
    decay, no_decay = param_groups(zoo, weight_decay=0.1, decay_embeddings=False)
    assert decay["param_names"] == ["proj.weight", "fused.weight", "with_bias.weight", "no_bias.weight"]
    assert no_decay["param_names"] == ["decoder_bias", "emb.weight"] + ZOO_EXEMPT[1:]
    assert zoo.tied.weight is no_decay["params"][1]


# The tiny preset's parameters (3 layers, RMSNorm, tied decoder), by hand: what decays and what does not.
TINY_DECAY = ["model.embeddings.tok_embeddings.weight"] + [
    f"model.layers.{i}.{name}.weight" for i in range(3) for name in ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo")
] + ["head.dense.weight"]
TINY_NO_DECAY = ["decoder_bias", "model.embeddings.norm.weight", "model.layers.0.mlp_norm.weight"] + [
    f"model.layers.{i}.{name}.weight" for i in (1, 2) for name in ("attn_norm", "mlp_norm")
] + ["model.final_norm.weight", "head.norm.weight"]


def test_param_groups_on_the_cmbert_model():
    from megatron_cmbert.model import CMBertForMaskedLM, get_preset

    model = CMBertForMaskedLM(get_preset("tiny"))
    decay, no_decay = param_groups(model)
    assert decay["param_names"] == TINY_DECAY
    assert no_decay["param_names"] == TINY_NO_DECAY
    decay, no_decay = param_groups(model, decay_embeddings=False)
    assert decay["param_names"] == TINY_DECAY[1:]
    assert no_decay["param_names"] == ["decoder_bias", "model.embeddings.tok_embeddings.weight"] + TINY_NO_DECAY[1:]


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a, b = SmallNet(), SmallNet()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 11, (4, 5))
    for model in (a, b):
        (10 * model(ids).pow(2).mean()).backward()
    ours = clip_grad_norm((p for p in a.parameters()), 1.0)  # a generator is fine
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0, foreach=False)
    assert theirs.item() > 1.0  # clipping happened
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    grads = [p.grad.clone() for p in a.parameters()]
    assert clip_grad_norm(a.parameters(), 2.0).item() == pytest.approx(1.0, rel=1e-5)  # below max: unchanged
    assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), grads))


def test_clip_grad_norm_leaves_non_finite_grads_alone():
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([3.0, 4.0])
    assert math.isnan(clip_grad_norm([p, q], 1.0).item())
    assert torch.equal(q.grad, torch.tensor([3.0, 4.0]))


def test_optimizer_module_does_not_import_megatron():
    code = ("import sys, megatron_cmbert.training; "
            "assert not [m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


LAUNCH_TIMEOUT_S = 120  # a dead rank hangs its peer: never wait forever (the script also arms faulthandler)


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 30)
def test_tp2_stableadamw_and_grad_clip_equal_single_process(torchrun):
    pytest.importorskip("megatron.core", reason="the TP=2 check needs megatron-core")
    out = torchrun("tests/dist/tp_optimizer_check.py", timeout=LAUNCH_TIMEOUT_S)
    assert "TP-OPTIMIZER OK" in out, out


def _cmbert_with_grads(seed):
    from megatron_cmbert.model import CMBertForMaskedLM, get_preset

    torch.manual_seed(seed)
    return CMBertForMaskedLM(get_preset("tiny"))


@pytest.mark.parametrize("spike", [1.0, 30.0])  # 30: gradients far above their history, update clipping on
def test_multi_tensor_step_and_clip_equal_the_per_tensor_implementation(spike):
    """The multi-tensor StableAdamW and clip against the per-tensor ones they replaced (tests/
    reference_stable_adamw.py), on the tiny model's 30-odd tensors in both weight-decay groups, 6 steps,
    with clipping active: equal within 1e-6 (fp32; only rounding order differs)."""
    from reference_stable_adamw import PerTensorStableAdamW, clip_grad_norm as per_tensor_clip

    new, old = _cmbert_with_grads(0), _cmbert_with_grads(0)
    opt_new = StableAdamW(param_groups(new, 0.1), lr=1e-2, eps=1e-6)
    opt_old = PerTensorStableAdamW(param_groups(old, 0.1), lr=1e-2, eps=1e-6)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        for a, b in zip(new.parameters(), old.parameters()):
            a.grad = torch.randn(a.shape, generator=g) * (spike ** step)
            b.grad = a.grad.clone()
        norm_new, norm_old = clip_grad_norm(new.parameters(), 1.0), per_tensor_clip(old.parameters(), 1.0)
        torch.testing.assert_close(norm_new, norm_old, rtol=1e-6, atol=0)
        opt_new.step()
        opt_old.step()
        assert float(opt_new.stats["max_rms"]) == pytest.approx(opt_old.stats["max_rms"], rel=1e-6)
        if step:  # at step 1 v = g^2 exactly, so every rms is 1 and the two roundings fall either side of it
            assert int(opt_new.stats["clipped"]) == opt_old.stats["clipped"]
    if spike > 1:
        assert opt_old.stats["clipped"] > 0  # the clipped path was exercised
    for (name, a), b in zip(new.named_parameters(), old.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_tensors_at_different_step_counts_equal_the_per_tensor_implementation():
    """Tensors that skipped steps have their own step count, so the multi-tensor step batches them apart and
    the batches interleave in parameter order (here [1, 3] at one count, [0, 2] at another): each tensor
    still gets its own update-RMS scale, as the per-tensor reference computes it."""
    from reference_stable_adamw import PerTensorStableAdamW

    g = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (6,), (2, 5), (3, 3)]
    new = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    old = [nn.Parameter(p.detach().clone()) for p in new]
    opt_new = StableAdamW([{"params": new, "weight_decay": 0.1}], lr=1e-2)
    opt_old = PerTensorStableAdamW([{"params": old, "weight_decay": 0.1}], lr=1e-2)
    for step in range(4):
        with_grad = [1, 3] if step == 0 else [0, 1, 2, 3]  # 0 and 2 start a step later
        for i in range(len(shapes)):
            spike = 30.0 ** step if i == 2 else 1.0  # tensor 2's update clipped once it has a history
            grad = torch.randn(shapes[i], generator=g) * spike if i in with_grad else None
            new[i].grad, old[i].grad = grad, None if grad is None else grad.clone()
        opt_new.step()
        opt_old.step()
        if step >= 2:  # at a tensor's first step rms is exactly 1 and the roundings fall either side of it
            assert int(opt_new.stats["clipped"]) == opt_old.stats["clipped"] > 0
    assert [opt_new.state[p]["step"] for p in new] == [3, 4, 3, 4]
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_optimizer_launches_do_not_grow_with_the_number_of_tensors():
    """The step's kernels (top-level aten ops counted by the profiler on CPU) are per batch of tensors, not
    per tensor: 10x the tensors, the same number of ops (the per-tensor version grew linearly)."""
    def ops(n):
        params = [nn.Parameter(torch.randn(7, 5)) for _ in range(n)]
        opt = StableAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-3)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # state created
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
            clip_grad_norm(params, 1.0)
        # the ops the optimizer dispatches: aten ops not inside another aten op (on CPU a foreach op loops
        # inside itself, which the profiler shows as children; on a GPU it is a few multi-tensor kernel
        # launches). Their parent may be Optimizer.step's own record_function, so "no parent" would miss them.
        return [e.name for e in prof.events() if e.name.startswith("aten::")
                and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    few, many = ops(4), ops(40)
    assert len(many) == len(few), (len(few), len(many))
    # and no tensor built from a host list once the step's indices exist (torch.tensor(list) dispatches
    # lift_fresh): on a GPU each such copy waits for the device
    assert "aten::lift_fresh" not in many, [n for n in many if n == "aten::lift_fresh"]


def test_bench_optimizer_counts_a_step_without_device_reads():
    """tools/bench_optimizer.py (the docs' op counts): the tiny model's clip + step reads nothing back and
    builds no tensor from host lists (the per-tensor optimizer before it read one and built one)."""
    from tools import bench_optimizer

    (row,) = bench_optimizer.run(["--presets", "tiny"])
    assert row["tensors"] == len(list(_cmbert_with_grads(0).parameters()))
    assert 0 < row["ops"] < row["tensors"] * 4  # a handful per batch of tensors, not ~25 per tensor
    assert row["device_reads"] == 0 and row["host_built_tensors"] == 0
