"""one_cycle_lr against torch's own OneCycleLR (cosine, no cycle_momentum) at every step."""
import math

import pytest
import torch

from remask import one_cycle_lr

SETTINGS = [  # total_steps, max_lr, pct_start, div_factor, final_div_factor
    (696, 1e-5, 0.3, 25.0, 1e4),  # the card's recipe: 6 epochs x 116 optimizer steps
    (1, 1e-3, 0.3, 25.0, 1e4),
    (2, 1e-3, 0.3, 25.0, 1e4),
    (3, 0.1, 0.5, 10.0, 100.0),
    (7, 2e-4, 0.25, 25.0, 1e4),
    (100, 3e-3, 0.05, 5.0, 1e3),
    (101, 1.0, 0.9, 1.0, 1.0),
    (50, 1e-2, 0.0, 25.0, 1e4),
    (40, 1e-2, 0.99, 25.0, 1e4),
]


def torch_lrs(total_steps, max_lr, pct_start, div_factor, final_div_factor):
    """The learning rate torch's scheduler sets for steps 0..total_steps (it allows one step past the end)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps=total_steps, pct_start=float(pct_start),
                                                anneal_strategy="cos", cycle_momentum=False, div_factor=div_factor,
                                                final_div_factor=final_div_factor)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(total_steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("total_steps, max_lr, pct_start, div_factor, final_div_factor", SETTINGS)
def test_equals_torch_one_cycle_lr_at_every_step(total_steps, max_lr, pct_start, div_factor, final_div_factor):
    want = torch_lrs(total_steps, max_lr, pct_start, div_factor, final_div_factor)
    got = [one_cycle_lr(s, total_steps, max_lr, pct_start, div_factor, final_div_factor)
           for s in range(total_steps + 1)]
    for step, (g, w) in enumerate(zip(got, want)):
        assert math.isclose(g, w, rel_tol=1e-12, abs_tol=0), f"step {step}: {g} != {w}"


@pytest.mark.parametrize("seed", range(20))
def test_equals_torch_for_random_settings(seed):
    g = torch.Generator().manual_seed(seed)
    total_steps = int(torch.randint(1, 300, (), generator=g))
    pct_start = round(float(torch.rand((), generator=g)), 3)
    max_lr = 10 ** float(torch.empty(()).uniform_(-6, 0, generator=g))
    div, final_div = float(torch.randint(1, 50, (), generator=g)), 10 ** float(torch.randint(0, 5, (), generator=g))
    args = (total_steps, max_lr, pct_start, div, final_div)
    if pct_start * total_steps - 1 in (0.0, total_steps - 1):  # a zero-length phase: both raise, tested below
        pytest.skip("torch raises ZeroDivisionError for this draw")
    want = torch_lrs(*args)
    got = [one_cycle_lr(s, *args) for s in range(total_steps + 1)]
    for step, (a, b) in enumerate(zip(got, want)):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=0), f"{args} step {step}: {a} != {b}"


def test_shape_of_the_default_schedule():
    lrs = [one_cycle_lr(s, 100, 1e-5) for s in range(100)]
    assert math.isclose(lrs[0], 1e-5 / 25)  # the first optimizer step uses max_lr / div_factor
    assert max(lrs) == lrs[29] == 1e-5  # the peak at step pct_start * N - 1
    assert all(a < b for a, b in zip(lrs[:29], lrs[1:30])) and all(a > b for a, b in zip(lrs[29:], lrs[30:]))
    assert math.isclose(lrs[-1], 1e-5 / 25 / 1e4)


@pytest.mark.parametrize("args, kwargs, match", [((11, 10, 1e-3), {}, "step must be an int in 0..10"),
                                                 ((-1, 10, 1e-3), {}, "step must be an int"),
                                                 ((0.5, 10, 1e-3), {}, "step must be an int"),
                                                 ((0, 0, 1e-3), {}, "total_steps must be a positive int"),
                                                 ((0, 10, 1e-3), {"pct_start": 1.5}, "pct_start must be in"),
                                                 ((0, 10, 1e-3), {"pct_start": 0.1}, "a phase of zero steps")])
def test_bad_arguments_give_clear_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        one_cycle_lr(*args, **kwargs)


def test_torch_fails_where_a_phase_has_zero_steps_too():
    with pytest.raises(ZeroDivisionError):
        torch_lrs(10, 1e-3, 0.1, 25.0, 1e4)
