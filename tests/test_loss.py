"""The ReMask objective against its plain-torch definition in float64 (itself checked against a hand-worked example
and torch's own kl_div), plus its invariants, its errors on bad input, and the memory it adds at its peak (measured
in a process of its own by tests/loss_peak_memory.py)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TESTS
from remask import (IGNORE_INDEX, cross_entropy, remask_loss, remask_loss_parts, remask_loss_reference,
                    symmetric_kl)


def reference(logits_masked, logits_full, labels, kl_weight=0.1, kl_mask=None):
    """The definition (remask_loss_reference) in float64: LossParts(loss, ce_masked, ce_full, kl)."""
    return remask_loss_reference(logits_masked.double(), logits_full.double(), labels, kl_weight, kl_mask)


def random_case(seed, dtype=torch.float32, B=None, T=None, V=None, ignore=0.3, scale=None):
    g = torch.Generator().manual_seed(seed)
    B = B or int(torch.randint(1, 4, (), generator=g))
    T = T or int(torch.randint(2, 9, (), generator=g))
    V = V or int(torch.randint(2, 40, (), generator=g))
    scale = scale or float(torch.rand((), generator=g)) * 4 + 0.5
    logits_m = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    logits_f = (logits_m.float() + torch.randn(B, T, V, generator=g)).to(dtype)  # related passes, as in training
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore] = IGNORE_INDEX
    kl_mask = torch.rand(B, T, generator=g) < 0.6
    return logits_m, logits_f, labels, kl_mask, g


def grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves)


# ----------------------------------------------------------------------------- against the definition


@pytest.mark.parametrize("seed", range(16))
def test_matches_the_definition_in_value_and_gradient(seed):
    lm, lf, labels, kl_mask, g = random_case(seed)
    kl_mask = kl_mask if seed % 2 else None
    kl_weight = float(torch.rand((), generator=g)) * 2
    chunk = int(torch.randint(1, 20, (), generator=g))
    loss, (gm, gf) = grads_of(lambda a, b: remask_loss(a, b, labels, kl_weight, kl_mask, chunk_tokens=chunk), lm, lf)
    ref, (rm, rf) = grads_of(lambda a, b: reference(a, b, labels, kl_weight, kl_mask).loss, lm.double(), lf.double())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm.double(), rm, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gf.double(), rf, rtol=1e-4, atol=1e-7)
    parts = remask_loss_parts(lm, lf, labels, kl_weight, kl_mask, chunk_tokens=chunk)
    for got, want in zip(parts, reference(lm, lf, labels, kl_weight, kl_mask)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in parts[1:])  # only the loss is differentiable


@pytest.mark.parametrize("seed", range(4))
def test_gradcheck_float64(seed):
    lm, lf, labels, kl_mask, _ = random_case(seed, torch.float64, B=2, T=4, V=5)
    lm.requires_grad_(), lf.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: remask_loss(a, b, labels, 0.7, kl_mask, chunk_tokens=3), (lm, lf))
    assert torch.autograd.gradcheck(lambda a: cross_entropy(a, labels, chunk_tokens=2), (lm,))
    assert torch.autograd.gradcheck(lambda a, b: symmetric_kl(a, b, kl_mask), (lm, lf))


def test_hand_worked_example():
    # two tokens, one position graded: masked logits (0, 0) -> p = (1/2, 1/2);
    # full logits (log 3, 0) -> q = (3/4, 1/4)
    lm = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    lf = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]]).log()
    labels = torch.tensor([[IGNORE_INDEX, 0]])  # position 0 predicts token 0
    ce_m, ce_f = -torch.tensor(0.5).log(), -torch.tensor(0.75).log()
    kl_pq = 0.5 * torch.tensor(0.5 / 0.75).log() + 0.5 * torch.tensor(0.5 / 0.25).log()
    kl_qp = 0.75 * torch.tensor(0.75 / 0.5).log() + 0.25 * torch.tensor(0.25 / 0.5).log()
    for parts in (remask_loss_parts(lm, lf, labels, kl_weight=0.1), remask_loss_reference(lm, lf, labels, 0.1)):
        torch.testing.assert_close(parts.ce_masked, ce_m)
        torch.testing.assert_close(parts.ce_full, ce_f)
        torch.testing.assert_close(parts.kl, 0.5 * (kl_pq + kl_qp))
        torch.testing.assert_close(parts.loss, 0.5 * (ce_m + ce_f) + 0.1 * 0.5 * (kl_pq + kl_qp))


@pytest.mark.parametrize("seed", range(4))
def test_the_definition_agrees_with_torch_kl_div(seed):
    lm, lf, labels, kl_mask, _ = random_case(seed, torch.float64)
    log_p, log_q = F.log_softmax(lm[:, :-1], -1), F.log_softmax(lf[:, :-1], -1)  # (B, T-1, V)
    kl_pq = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(masked || full), (B, T-1)
    kl_qp = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(full || masked)
    on_kl = kl_mask[:, 1:]
    want = (0.5 * (kl_pq + kl_qp) * on_kl).sum() / on_kl.sum().clamp(min=1)
    torch.testing.assert_close(remask_loss_reference(lm, lf, labels, 0.1, kl_mask).kl, want)


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("seed", range(10))
def test_symmetric_kl_is_a_symmetric_nonnegative_divergence(seed):
    lm, lf, _, kl_mask, _ = random_case(seed)
    mask = kl_mask if seed % 2 else None
    d_ab, d_ba = symmetric_kl(lm, lf, mask), symmetric_kl(lf, lm, mask)
    assert d_ab >= 0
    torch.testing.assert_close(d_ab, d_ba, rtol=1e-5, atol=1e-7)
    assert symmetric_kl(lm, lm.clone(), mask).abs() < 1e-6
    labels_all = torch.zeros(lm.shape[:2], dtype=torch.long)  # the definition with every position a KL position
    on_kl = torch.ones(lm.shape[:2], dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(d_ab.double(), reference(lm, lf, labels_all, 1.0, on_kl).kl, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(8))
def test_invariant_to_a_constant_added_per_position(seed):
    lm, lf, labels, kl_mask, g = random_case(seed, torch.float64)
    shift = lambda x: x + torch.randn(*x.shape[:2], 1, generator=g, dtype=x.dtype) * 10  # (B, T, 1)
    f = lambda a, b: remask_loss(a, b, labels, 0.5, kl_mask)
    loss, grads = grads_of(f, lm, lf)
    loss_shifted, grads_shifted = grads_of(f, shift(lm), shift(lf))
    torch.testing.assert_close(loss, loss_shifted)
    for got, want in zip(grads_shifted, grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("ignore", [0.3, 1.0])  # 1.0: no labelled position, where the mean is 0 by definition
@pytest.mark.parametrize("seed", range(4))
def test_kl_weight_zero_is_the_mean_of_the_two_cross_entropies(seed, ignore):
    lm, lf, labels, kl_mask, _ = random_case(seed, ignore=ignore)
    want = reference(lm, lf, labels, 0.0)
    for got in (remask_loss(lm, lf, labels, kl_weight=0.0), remask_loss(lm, lf, labels, 0.0, kl_mask)):
        torch.testing.assert_close(got.double(), want.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(want.loss, 0.5 * (want.ce_masked + want.ce_full))
    torch.testing.assert_close(cross_entropy(lm, labels).double(), want.ce_masked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cross_entropy(lf, labels).double(), want.ce_full, rtol=1e-5, atol=1e-6)
    y = labels[:, 1:].reshape(-1)
    if ignore < 1:  # torch's own mean, which is NaN without any label
        torch_ce = F.cross_entropy(lm.double()[:, :-1].reshape(y.numel(), -1), y, ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(want.ce_masked, torch_ce)
    else:
        assert want.loss.item() == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_chunk_size_does_not_change_the_result(seed):
    lm, lf, labels, kl_mask, _ = random_case(seed, B=3, T=9)
    results = [grads_of(lambda a, b: remask_loss(a, b, labels, 0.3, kl_mask, chunk_tokens=c), lm, lf)
               for c in (1, 2, 5, 7, 1000)]
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(8))
def test_gradient_accumulation_with_step_counts_equals_one_big_batch(seed):
    lm, lf, labels, kl_mask, g = random_case(seed, B=5)
    kl_mask = kl_mask if seed % 2 else None
    loss_big, grads_big = grads_of(lambda a, b: remask_loss(a, b, labels, 0.2, kl_mask), lm, lf)
    n_labels = int((labels[:, 1:] != IGNORE_INDEX).sum())
    n_kl = None if kl_mask is None else int(kl_mask[:, 1:].sum())
    total, grads = 0.0, [torch.zeros_like(lm), torch.zeros_like(lf)]
    for rows in torch.randperm(5, generator=g).split(2):  # uneven micro-batches of 2, 2, 1 examples
        micro_mask = None if kl_mask is None else kl_mask[rows]
        loss, (gm, gf) = grads_of(lambda a, b: remask_loss(a, b, labels[rows], 0.2, micro_mask, num_tokens=n_labels,
                                                           num_kl_positions=n_kl), lm[rows], lf[rows])
        total += loss
        grads[0][rows] += gm
        grads[1][rows] += gf
    torch.testing.assert_close(total, loss_big, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_big):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_num_tokens_one_gives_token_sums(seed):
    lm, lf, labels, kl_mask, _ = random_case(seed)
    sums = remask_loss_parts(lm, lf, labels, 0.1, kl_mask, num_tokens=1, num_kl_positions=1)
    means = reference(lm, lf, labels, 0.1, kl_mask)
    n_labels = max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
    n_kl = max(int(kl_mask[:, 1:].sum()), 1)
    ce_masked, ce_full, kl = means.ce_masked * n_labels, means.ce_full * n_labels, means.kl * n_kl  # the sums
    want = (0.5 * (ce_masked + ce_full) + 0.1 * kl, ce_masked, ce_full, kl)
    for got, w in zip(sums, want):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-5)
    # without a kl_mask the KL positions are the label tokens, so num_tokens covers both
    torch.testing.assert_close(remask_loss(lm, lf, labels, num_tokens=n_labels), remask_loss(lm, lf, labels))


@pytest.mark.parametrize("seed", range(6))
def test_bf16_logits_give_bf16_gradients_close_to_the_definition(seed):
    lm, lf, labels, kl_mask, _ = random_case(seed, torch.bfloat16, V=64)
    loss, (gm, gf) = grads_of(lambda a, b: remask_loss(a, b, labels, 0.1, kl_mask), lm, lf)
    ref, (rm, rf) = grads_of(lambda a, b: reference(a, b, labels, 0.1, kl_mask).loss, lm.double(), lf.double())
    assert loss.dtype == torch.float32 and gm.dtype == gf.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)  # fp32 math on the bf16 values
    scale = max(rm.abs().max(), rf.abs().max())
    torch.testing.assert_close(gm.double(), rm, rtol=1e-2, atol=1e-2 * scale)  # rounded once, to bf16
    torch.testing.assert_close(gf.double(), rf, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_no_labels_gives_zero_and_zero_gradients(T):
    lm, lf = torch.randn(2, T, 7), torch.randn(2, T, 7)
    labels = torch.full((2, T), IGNORE_INDEX)
    labels[:, 0] = 3  # the first position's label is never predicted by anything
    for fn in (lambda a, b: remask_loss(a, b, labels), lambda a, b: remask_loss(a, b, labels, num_tokens=0),
               lambda a, b: cross_entropy(a, labels) + 0 * b.sum()):
        loss, grads = grads_of(fn, lm, lf)
        assert loss.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("seed", range(6))
def test_two_passes_as_halves_of_one_2b_batch(seed):
    lm, lf, labels, kl_mask, _ = random_case(seed)
    B = lm.shape[0]
    loss_sep, (gm, gf) = grads_of(lambda a, b: remask_loss(a, b, labels, 0.4, kl_mask), lm, lf)
    halves = (lambda x: x.chunk(2), lambda x: (x[:B], x[B:]), lambda x: x.split(B))
    both = torch.cat([lm, lf])  # (2B, T, V)
    for split in halves:
        loss, (g,) = grads_of(lambda x: remask_loss(*split(x), labels, 0.4, kl_mask), both)
        torch.testing.assert_close(loss, loss_sep)
        torch.testing.assert_close(g, torch.cat([gm, gf]))
    # the halves of a non-leaf (the model's output), with gradient flowing further back
    weight = torch.randn(lm.shape[-1], lm.shape[-1], requires_grad=True)
    for inputs in (both, torch.cat([lf, lm])):  # the second layout swaps which half is which
        out = inputs @ weight  # (2B, T, V)
        (g_stacked,) = torch.autograd.grad(remask_loss(*out.chunk(2), labels, 0.4, kl_mask), weight)
        a, b = (inputs @ weight).chunk(2)
        (g_plain,) = torch.autograd.grad(remask_loss(a.clone(), b.clone(), labels, 0.4, kl_mask), weight)
        torch.testing.assert_close(g_stacked, g_plain)


def test_halves_made_leaves_get_their_own_gradients():
    lm, lf, labels, kl_mask, _ = random_case(3, torch.float64)
    a, b = torch.cat([lm, lf]).chunk(2)  # views of a tensor without grad, then made leaves that require it
    a.requires_grad_(), b.requires_grad_()
    remask_loss(a, b, labels, 0.4, kl_mask).backward()
    _, (gm, gf) = grads_of(lambda x, y: remask_loss(x, y, labels, 0.4, kl_mask), lm, lf)
    torch.testing.assert_close(a.grad, gm)
    torch.testing.assert_close(b.grad, gf)


def test_same_tensor_as_both_passes_sums_both_gradients():
    lm, _, labels, _, _ = random_case(0, torch.float64)
    x = lm.requires_grad_()
    (g,) = torch.autograd.grad(remask_loss(x, x, labels, 0.3), x)
    (ga, gb) = grads_of(lambda a, b: remask_loss(a, b, labels, 0.3), lm, lm)[1]
    torch.testing.assert_close(g, ga + gb)


def test_scaled_loss_scales_the_gradient():
    lm, lf, labels, kl_mask, _ = random_case(1, torch.float64)
    _, (gm, gf) = grads_of(lambda a, b: remask_loss(a, b, labels, 0.3, kl_mask), lm, lf)
    _, (gm3, gf3) = grads_of(lambda a, b: 3.0 * remask_loss(a, b, labels, 0.3, kl_mask), lm, lf)
    torch.testing.assert_close(gm3, 3 * gm)
    torch.testing.assert_close(gf3, 3 * gf)


@pytest.mark.parametrize("stacked", [False, True])
def test_a_retained_graph_runs_backward_again_with_other_scales(stacked):
    """The first backward scales the saved gradients in place (no copy, no sync); later ones rescale from it."""
    lm, lf, labels, kl_mask, _ = random_case(4, torch.float64)
    _, (gm, gf) = grads_of(lambda a, b: remask_loss(a, b, labels, 0.3, kl_mask), lm, lf)
    both = torch.cat([lm, lf]).requires_grad_()  # (2B, T, V)
    loss = remask_loss(*both.chunk(2) if stacked else (both[:len(lm)] * 1, both[len(lm):] * 1), labels, 0.3, kl_mask)
    for scale in (2.0, 0.5, 0.0, 1.0):
        (g,) = torch.autograd.grad(loss, both, torch.tensor(scale, dtype=loss.dtype), retain_graph=True)
        torch.testing.assert_close(g, scale * torch.cat([gm, gf]))
    zeroed = remask_loss(lm.clone().requires_grad_(), lf, labels)
    zeroed.backward(torch.tensor(0.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="first backward had grad_loss 0"):
        zeroed.backward()


@pytest.mark.gpu
def test_labels_on_the_host_or_the_gpu_give_the_cpu_result():
    lm, lf, labels, kl_mask, _ = random_case(5, B=3, T=9, V=33)
    want = remask_loss_parts(lm, lf, labels, 0.2, kl_mask)
    for where in ("cpu", "cuda"):
        got = remask_loss_parts(lm.cuda(), lf.cuda(), labels.to(where), 0.2, kl_mask.to(where))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)


def test_only_inputs_that_require_grad_get_one():
    lm, lf, labels, _, _ = random_case(2, torch.float64)
    a = lm.clone().requires_grad_()
    (g,) = torch.autograd.grad(remask_loss(a, lf, labels, 0.3), a)
    _, (want, _) = grads_of(lambda x, y: remask_loss(x, y, labels, 0.3), lm, lf)
    torch.testing.assert_close(g, want)
    with torch.no_grad():  # evaluation: no gradient buffers either (their memory: the peak-memory test)
        loss = remask_loss(lm.clone().requires_grad_(), lf.clone().requires_grad_(), labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, remask_loss(lm, lf, labels))


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_positions_that_are_not_graded_get_exactly_zero_gradient(seed, stacked):
    lm, lf, labels, kl_mask, g = random_case(seed, B=3, T=8, ignore=0.5)
    kl_mask &= torch.rand(kl_mask.shape, generator=g) < 0.5  # some positions neither labelled nor in D
    both = torch.cat([lm, lf]).requires_grad_()  # (2B, T, V)
    if stacked:
        passes = both.chunk(2)
    else:
        passes = (both[:len(lm)] * 1, both[len(lm):] * 1)
    (grad,) = torch.autograd.grad(remask_loss(*passes, labels, 0.3, kl_mask), both)
    # logits[:, t] are graded where labels[:, t + 1] or kl_mask[:, t + 1] is; the last position never is
    graded = torch.zeros(lm.shape[:2], dtype=torch.bool)
    graded[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) | kl_mask[:, 1:]
    zero = ~torch.cat([graded, graded])  # (2B, T)
    assert zero.any() and torch.equal(grad[zero], torch.zeros_like(grad[zero]))
    assert (grad[~zero] != 0).any(dim=-1).all()


# ----------------------------------------------------------------------------- bad input


def with_label(labels, row, col, value):
    return labels.index_put((torch.tensor(row), torch.tensor(col)), torch.tensor(value))


BOOL_MASK = torch.ones(2, 5, dtype=torch.bool)
BAD_INPUT = [  # (the call on logits (2, 5, 7) and labels (2, 5), the message); the id says what is wrong
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf[:, :4], y), "logits_full .* does not match logits_masked",
                 id="passes-differ"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, y[:, :4]), r"labels must be \[B, T\]", id="labels-shape"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, y.float()), "labels must be an integer tensor",
                 id="labels-float"),
    pytest.param(lambda lm, lf, y: cross_entropy(lm, y > 2), "labels must be an integer tensor", id="labels-bool"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, with_label(y, 1, 3, 7)), r"labels\[1, 3\] = 7 is outside 0..6",
                 id="label-past-vocab"),
    pytest.param(lambda lm, lf, y: cross_entropy(lm, with_label(y, 0, 0, -1)), r"labels\[0, 0\] = -1 is outside",
                 id="label-negative"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, y, kl_mask=torch.ones(2, 5)), "kl_mask must be a bool tensor",
                 id="kl-mask-float"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, y, kl_mask=BOOL_MASK[:, :4]), r"kl_mask must be \[B, T\]",
                 id="kl-mask-shape"),
    pytest.param(lambda lm, lf, y: remask_loss(lm[0], lf[0], y), "logits_masked must be a floating-point tensor",
                 id="logits-2d"),
    pytest.param(lambda lm, lf, y: cross_entropy(lm.long(), y), "logits must be a floating-point tensor",
                 id="logits-integer"),
    pytest.param(lambda lm, lf, y: symmetric_kl(lm, lf[:1]), "logits_b .* does not match logits_a",
                 id="kl-passes-differ"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, y, kl_mask=BOOL_MASK, num_tokens=8), "pass num_kl_positions",
                 id="kl-mask-without-its-count"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, y, num_tokens=-1), "num_tokens must be a count",
                 id="num-tokens-negative"),
    pytest.param(lambda lm, lf, y: remask_loss_parts(lm, lf, y, num_kl_positions="8"),
                 "num_kl_positions must be a count", id="num-kl-positions-string"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, y, chunk_tokens=0), "chunk_tokens must be a positive int",
                 id="chunk-zero"),
    pytest.param(lambda lm, lf, y: remask_loss(lm, lf, y, chunk_tokens=2.5), "chunk_tokens must be a positive int",
                 id="chunk-float"),
]


@pytest.mark.parametrize("call, match", BAD_INPUT)
def test_bad_input_gives_clear_errors(call, match):
    lm, lf, labels = torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    with pytest.raises(ValueError, match=match):
        call(lm, lf, labels)


# ----------------------------------------------------------------------------- memory

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_extra_peak_memory_is_a_few_logits_tensors():
    # glibc then serves each large buffer with mmap and unmaps it on free: resident memory follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(TESTS / "loss_peak_memory.py"), str(ROOT)],
                         env=env, capture_output=True, text=True, check=True)
    both, no_grad, one = (float(line) for line in out.stdout.split())
    # the two bf16 gradients are 2x; any fp32 (B, T, V) temporary would add 2x more
    assert 2.0 <= both < 3.0, f"extra peak memory {both:.2f}x one logits tensor"
    # without a graph no gradient buffer (1x each) is made, and one is made only for an input that requires grad
    assert no_grad < 0.5, f"extra peak memory under no_grad {no_grad:.2f}x one logits tensor"
    assert 1.0 <= one < 2.0, f"extra peak memory with one gradient {one:.2f}x one logits tensor"
