"""LR and masking schedules against formulas written out here (paper Eq. 1 and 3.2/3.7), the checks of
docs/TRAINING.md, and tools/plot_schedules.py end to end."""
import csv
import math

import pytest

from megatron_cmbert.training.schedules import (LR_DECAY_STYLES, ScheduleConfig, add_schedule_args, apply_lr,
                                                lr_at, mask_rate_at)

# Pure float64 arithmetic on both sides; only the order of operations differs.
REL = 1e-12


def cfg(**kw):
    base = dict(train_iters=1000, lr_warmup_iters=100, lr=8e-4, min_lr=8e-5, lr_warmup_init=5e-5)
    base.update(kw)
    return ScheduleConfig(**base)


def paper_eq1(s, S, W, eta_max, eta_min, N, gamma):
    """Paper Eq. 1 with p counted from the end of the warmup (W) to the end of training (S)."""
    p = (s - W) / (S - W)
    peak = eta_max * (1 - (1 - gamma) * p)
    valley = eta_max / 2 * (1 - p) + eta_min * p
    return (peak + valley) / 2 + (peak - valley) / 2 * math.cos(math.pi * (2 * N - 1) * p)


@pytest.mark.parametrize("N,gamma", [(1, 1.0), (1, 0.5), (2, 0.3), (3, 0.0), (5, 0.8)])
def test_damped_cosine_matches_eq1_at_several_steps(N, gamma):
    c = cfg(lr_decay_style="damped_cosine", cycles=N, damping=gamma)
    for s in (100, 101, 137, 250, 333, 550, 777, 901, 999, 1000):
        want = paper_eq1(s, 1000, 100, 8e-4, 8e-5, N, gamma)
        assert lr_at(s, c) == pytest.approx(want, rel=REL, abs=0), (s, N, gamma)


@pytest.mark.parametrize("N", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_damped_cosine_starts_at_peak_and_ends_at_min(N, gamma):
    c = cfg(cycles=N, damping=gamma)
    assert lr_at(100, c) == pytest.approx(8e-4, rel=REL)  # p = 0
    assert lr_at(1000, c) == pytest.approx(8e-5, rel=REL)  # p = 1: cos(pi (2N - 1)) = -1
    assert lr_at(5000, c) == pytest.approx(8e-5, rel=REL)  # past the end: stays at min


def test_damped_cosine_is_not_cosine_annealing_at_half():
    # N = 1, gamma = 1, p = 0.5: 0.625 eta_max + 0.25 eta_min (torch's cosine would give the mean)
    c = cfg(cycles=1, damping=1.0)
    assert lr_at(550, c) == pytest.approx(0.625 * 8e-4 + 0.25 * 8e-5, rel=REL)
    assert lr_at(550, cfg(lr_decay_style="cosine")) == pytest.approx((8e-4 + 8e-5) / 2, rel=REL)


@pytest.mark.parametrize("style", LR_DECAY_STYLES)
def test_warmup_is_linear_from_init_to_peak_and_comes_first(style):
    c = cfg(lr_decay_style=style)
    assert lr_at(0, c) == pytest.approx(5e-5, rel=REL)
    for s in (1, 25, 50, 99):
        assert lr_at(s, c) == pytest.approx(5e-5 + (8e-4 - 5e-5) * s / 100, rel=REL)
    assert lr_at(100, c) == pytest.approx(8e-4, rel=REL)  # every style starts its main phase at the peak


def test_no_warmup_starts_at_peak():
    c = cfg(lr_warmup_iters=0)
    assert lr_at(0, c) == pytest.approx(8e-4, rel=REL)
    assert lr_at(500, c) == pytest.approx(paper_eq1(500, 1000, 0, 8e-4, 8e-5, 1, 1.0), rel=REL)


def test_cosine_linear_constant_match_their_formulas():
    for s in (100, 200, 425, 700, 1000):
        p = (s - 100) / 900
        assert lr_at(s, cfg(lr_decay_style="cosine")) == pytest.approx(
            8e-5 + (8e-4 - 8e-5) * 0.5 * (1 + math.cos(math.pi * p)), rel=REL)
        assert lr_at(s, cfg(lr_decay_style="linear")) == pytest.approx(8e-4 - (8e-4 - 8e-5) * p, rel=REL)
        assert lr_at(s, cfg(lr_decay_style="constant")) == 8e-4


@pytest.mark.parametrize("shape,fall", [("linear", lambda q: q),
                                        ("cosine", lambda q: (1 - math.cos(math.pi * q)) / 2),
                                        ("minus_sqrt", math.sqrt)])
def test_wsd_is_flat_then_decays_over_the_last_fraction(shape, fall):
    c = cfg(lr_decay_style="wsd", lr_wsd_decay_fraction=0.2, lr_wsd_decay_style=shape)
    # main phase 900 steps: stable through step 100 + 720 = 820, then 180 steps of decay
    for s in (100, 400, 820):
        assert lr_at(s, c) == 8e-4
    for s in (821, 865, 910, 999, 1000):
        q = (s - 820) / 180
        assert lr_at(s, c) == pytest.approx(8e-4 - (8e-4 - 8e-5) * fall(q), rel=REL), (s, shape)


def test_dynamic_mask_rate_rises_in_warmup_and_decays_after():
    c = cfg(mask_schedule="dynamic")
    assert mask_rate_at(0, c) == pytest.approx(0.15, rel=REL)
    assert mask_rate_at(50, c) == pytest.approx(0.225, rel=REL)
    assert mask_rate_at(100, c) == pytest.approx(0.30, rel=REL)
    assert mask_rate_at(400, c) == pytest.approx(0.30 - 0.15 * 300 / 900, rel=REL)
    assert mask_rate_at(1000, c) == pytest.approx(0.15, rel=REL)
    assert mask_rate_at(2000, c) == pytest.approx(0.15, rel=REL)
    rates = [mask_rate_at(s, c) for s in range(1001)]
    assert all(a <= b for a, b in zip(rates[:100], rates[1:101])) and all(a >= b for a, b in zip(rates[100:], rates[101:]))


def test_constant_mask_rate():
    c = cfg(mask_schedule="constant", mask_rate=0.3)
    assert {mask_rate_at(s, c) for s in (0, 50, 100, 999, 1000)} == {0.3}


@pytest.mark.parametrize("bad", [dict(cycles=1.5), dict(cycles=0), dict(lr_warmup_iters=1000), dict(min_lr=1e-3),
                                 dict(damping=1.5), dict(lr_decay_style="cosine_annealing"),
                                 dict(mask_rate_min=0.4), dict(mask_schedule="random")])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        cfg(**bad)
    with pytest.raises(ValueError):
        lr_at(-1, cfg())


def test_flags_build_the_same_config_and_apply_lr_sets_every_group():
    import argparse

    args = add_schedule_args(argparse.ArgumentParser()).parse_args(
        "--train-iters 500 --lr-warmup-iters 50 --lr 1e-3 --min-lr 1e-4 --cycles 2 --damping 0.5 "
        "--lr-decay-style damped_cosine --mask-schedule constant --mask-rate 0.2".split())
    c = ScheduleConfig.from_args(args)
    assert c == ScheduleConfig(train_iters=500, lr_warmup_iters=50, lr=1e-3, min_lr=1e-4, cycles=2, damping=0.5,
                               mask_schedule="constant", mask_rate=0.2)

    class FakeOptimizer:
        param_groups = [{"lr": 0.0}, {"lr": 1.0}]

    opt = FakeOptimizer()
    assert apply_lr(opt, 200, c) == pytest.approx(paper_eq1(200, 500, 50, 1e-3, 1e-4, 2, 0.5), rel=REL)
    assert [g["lr"] for g in opt.param_groups] == [lr_at(200, c)] * 2


def test_plot_tool_writes_csv_matching_the_formulas(tmp_path):
    from tools.plot_schedules import main

    out_csv = tmp_path / "s.csv"
    flags = ["--train-iters", "200", "--lr-warmup-iters", "20", "--lr", "8e-4", "--min-lr", "1e-5",
             "--lr-decay-style", "damped_cosine", "--cycles", "2", "--damping", "0.5", "--mask-schedule", "dynamic"]
    assert main(flags + ["--csv", str(out_csv), "--no-plot"]) == 0
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(201))
    for s in (20, 63, 110, 200):
        assert float(rows[s]["lr"]) == pytest.approx(paper_eq1(s, 200, 20, 8e-4, 1e-5, 2, 0.5), rel=REL)
        assert float(rows[s]["mask_rate"]) == pytest.approx(0.30 - 0.15 * (s - 20) / 180, rel=REL)
    assert float(rows[10]["lr"]) == pytest.approx(5e-5 + (8e-4 - 5e-5) * 0.5, rel=REL)
    assert float(rows[10]["mask_rate"]) == pytest.approx(0.225, rel=REL)


def test_plot_tool_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the PNG needs matplotlib (pip install matplotlib)")
    from tools.plot_schedules import main

    png = tmp_path / "schedules.png"
    assert main(["--train-iters", "1000", "--lr-warmup-iters", "100", "--lr", "8e-4", "--min-lr", "8e-5",
                 "--lr-decay-style", "damped_cosine", "--cycles", "3", "--damping", "0.5",
                 "--mask-schedule", "dynamic", "--output", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # two axes with curves, not a blank canvas


def test_plot_tool_rejects_bad_flags_like_argparse(capsys):
    from tools.plot_schedules import main

    assert main(["--train-iters", "100", "--cycles", "0", "--csv", "x.csv", "--no-plot"]) == 2  # a user error
    err = capsys.readouterr().err
    assert "cycles" in err and err.startswith("error: ") and len(err.splitlines()) == 1
