"""Lilith against a trajectory of the original code (fixture) and a direct transcription of its update rule."""
import io
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from remask import Lilith

# Trajectories of the final original code (supertrainer2000 lilith.py at 8da52ce): default settings (EMA off),
# and every hyper-parameter away from its default with the EMA on.
GOLDEN = {"defaults": FIXTURES / "lilith" / "golden_defaults", "ema": FIXTURES / "lilith" / "golden_ema"}


def transcribed_lilith(p, grads, lr, eps=1e-8, beta1_m=0.9, beta2_m=0.99, beta_v=0.999, weight_decay=0.01,
                       g_norm_min=1e-4, ratio_min=1e-4, acceleration=1, ema_k=0, ema_beta=0.99):
    """The update rule written out step by step in float64, as in supertrainer2000's final lilith.py (8da52ce)."""
    p = p.double().clone()
    m1, m2, v, ema = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p), p.clone()
    trajectory = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if sum(g.shape) > 1:
            g = g * max(p.norm().item() / max(g.norm().item(), g_norm_min), ratio_min)
        m1_prev = m1
        m1 = beta1_m * (m1 + m2) + (1 - beta1_m) * g
        m2 = beta2_m * m2 + (1 - beta2_m) * (m1 - m1_prev)
        u = m1 + acceleration * m2
        v = beta_v * v + (1 - beta_v) * u ** 2
        u = u / torch.sqrt(v / (1 - beta_v ** t) + eps)
        p = p - lr * (u + weight_decay * p)
        if ema_k > 0:
            ema = ema_beta * ema + (1 - ema_beta) * p  # the original's ema.lerp_(p, 1 - ema_beta)
            if t % ema_k == 0:
                p = ema.clone()
        trajectory.append(p)
    return trajectory


def run_lilith(p0, grads, dtype=torch.float64, **hp):
    p = torch.nn.Parameter(p0.to(dtype, copy=True))
    opt = Lilith([p], **hp)
    trajectory = []
    for g in grads:
        p.grad = g.to(dtype, copy=True)
        opt.step()
        trajectory.append(p.detach().clone())
    return trajectory


# ----------------------------------------------------------------------------- the original's trajectory


@pytest.mark.parametrize("golden", sorted(GOLDEN))
def test_follows_the_original_code(golden):
    meta = json.loads(GOLDEN[golden].with_suffix(".json").read_text())
    data = load_file(GOLDEN[golden].with_suffix(".safetensors"))
    names, steps = meta["tensors"], meta["steps"]
    params = [torch.nn.Parameter(data[f"{name}.init"].clone()) for name in names]
    opt = Lilith(params, **meta["hyperparameters"])
    for t in range(steps):
        for name, p in zip(names, params):
            p.grad = data[f"{name}.grad.{t}"].clone()
        opt.step()
        for name, p in zip(names, params):
            torch.testing.assert_close(p.detach(), data[f"{name}.param.{t}"], rtol=0, atol=1e-6,
                                       msg=lambda m: f"{name} after step {t}: {m}")
    # the same trajectory in float64 by the transcription: the fixture checks the transcription too
    for name in names:
        grads = [data[f"{name}.grad.{t}"] for t in range(steps)]
        want = transcribed_lilith(data[f"{name}.init"], grads, **meta["hyperparameters"])
        torch.testing.assert_close(want[-1].float(), data[f"{name}.param.{steps - 1}"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- other settings


SHAPES = [(), (1,), (1, 1), (2,), (3, 4), (2, 3, 4)]


def random_settings(seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (), generator=g))]
    hp = dict(lr=pick([1e-3, 1e-2, 0.1]), eps=pick([1e-8, 1e-6, 1e-3]), beta1_m=pick([0.0, 0.5, 0.9]),
              beta2_m=pick([0.0, 0.9, 0.99]), beta_v=pick([0.9, 0.999]), weight_decay=pick([0.0, 0.01, 0.3]),
              g_norm_min=pick([1e-4, 1e-2]), ratio_min=pick([1e-4, 0.5]), acceleration=pick([0, 1, 2.5, -0.5]),
              ema_k=pick([0, 1, 2, 3]), ema_beta=pick([0.5, 0.9, 0.99]))
    shape = pick(SHAPES)
    grad_scale = pick([1.0, 1e-6])  # 1e-6: the gradient norm falls below g_norm_min
    p0 = torch.randn(shape, generator=g, dtype=torch.float64) * pick([0.0, 0.05, 1.0])  # 0: ratio_min decides
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) * grad_scale for _ in range(9)]
    return hp, p0, grads


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_transcription_for_other_settings(seed):
    hp, p0, grads = random_settings(seed)
    want = transcribed_lilith(p0, grads, **hp)
    for got, w in zip(run_lilith(p0, grads, torch.float64, **hp), want):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)
    for got, w in zip(run_lilith(p0, grads, torch.float32, **hp), want):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_is_rescaled_in_place_only_when_sum_of_shape_exceeds_one(shape):
    g = torch.Generator().manual_seed(0)
    p0, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    p = torch.nn.Parameter(p0.clone())
    p.grad = grad.clone()
    Lilith([p], lr=0.1, ratio_min=0.0).step()
    if sum(shape) > 1:  # the original's test: (1,) and () skip the trust ratio, (1, 1) does not
        torch.testing.assert_close(p.grad, grad * p0.norm() / grad.norm())
    else:
        assert torch.equal(p.grad, grad)


def test_groups_and_missing_gradients():
    hp, p0, grads = random_settings(3)
    a, b, idle = (torch.nn.Parameter(p0.clone()) for _ in range(3))
    opt = Lilith([{"params": [a]}, {"params": [b, idle], "lr": hp["lr"] * 3}], **hp)
    for grad in grads:
        a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
    torch.testing.assert_close(a.detach(), transcribed_lilith(p0, grads, **hp)[-1])
    torch.testing.assert_close(b.detach(), transcribed_lilith(p0, grads, **{**hp, "lr": hp["lr"] * 3})[-1])
    assert torch.equal(idle.detach(), p0) and idle not in opt.state


# ----------------------------------------------------------------------------- closure, precision, resume


def test_closure_runs_with_gradients_enabled_and_its_loss_is_returned():
    torch.manual_seed(1)
    x, target = torch.randn(8, 3), torch.randn(8)
    w1 = torch.nn.Parameter(torch.randn(3))
    w2 = torch.nn.Parameter(w1.detach().clone())
    opt1, opt2 = Lilith([w1], lr=0.05, ema_k=2), Lilith([w2], lr=0.05, ema_k=2)
    for _ in range(5):
        def closure():
            opt1.zero_grad()
            loss = ((x @ w1 - target) ** 2).mean()
            loss.backward()
            return loss
        with torch.no_grad():  # a training loop may call step under no_grad; the closure must still get a graph
            loss = opt1.step(closure)
        opt2.zero_grad()
        want = ((x @ w2 - target) ** 2).mean()
        want.backward()
        opt2.step()
        assert torch.equal(loss.detach(), want.detach())
        assert torch.equal(w1.detach(), w2.detach())


@pytest.mark.parametrize("dtype, state_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_state_precision(dtype, state_dtype):
    p = torch.nn.Parameter(torch.randn(4, 4).to(dtype))
    p.grad = torch.randn(4, 4).to(dtype)
    opt = Lilith([p], lr=1e-3, ema_k=2)
    opt.step()
    assert p.dtype == dtype
    assert all(opt.state[p][k].dtype == state_dtype for k in ("m_avg1", "m_avg2", "v_avg", "ema"))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_state_dict_equals_an_uninterrupted_run(seed, dtype):
    hp, _, _ = random_settings(seed)
    hp["ema_k"] = 3  # make sure the EMA and its step counting survive the round trip
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (1,)]
    inits = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(10)]

    def make():
        params = [torch.nn.Parameter(x.clone()) for x in inits]
        return params, Lilith([{"params": params[:2]}, {"params": params[2:], "lr": hp["lr"] / 2}], **hp)

    def train(params, opt, steps):
        for step_grads in steps:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            opt.step()

    params, opt = make()
    train(params, opt, grads)
    params_a, opt_a = make()
    train(params_a, opt_a, grads[:4])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_a], "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    params_b, opt_b = make()
    with torch.no_grad():
        for p, x in zip(params_b, saved["params"]):
            p.copy_(x)
    opt_b.load_state_dict(saved["optimizer"])
    assert all(opt_b.state[p]["v_avg"].dtype == torch.float32 for p in params_b)
    train(params_b, opt_b, grads[4:])
    for p, want in zip(params_b, params):
        assert torch.equal(p, want)


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("bad, match", [({"lr": -1.0}, "lr must be a number >= 0"),
                                        ({"beta1_m": 1.0}, "beta1_m must be in \\[0, 1\\)"),
                                        ({"beta_v": -0.1}, "beta_v must be in"),
                                        ({"ema_k": -1}, "ema_k must be an int >= 0"),
                                        ({"ema_k": 1.5}, "ema_k must be an int >= 0"),
                                        ({"eps": "1e-8"}, "eps must be a number")])
def test_bad_settings_give_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        Lilith([torch.nn.Parameter(torch.zeros(2))], **{"lr": 1e-3, **bad})


def test_sparse_gradients_are_refused():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Lilith([p], lr=1e-3).step()
