"""remask: fine-tune a causal language model with ReMask, from the loss to the command line.

ReMask (euclaise, ReMask-3B model card) runs the model twice on each example, once with some target tokens of the
input replaced by a mask token and once on the full input, and minimises

    loss = 0.5 * (CE(masked) + CE(full)) + w * 0.5 * (KL(full || masked) + KL(masked || full))      (w = 0.1)

so that the model predicts the same thing whether or not its context was corrupted. This file holds everything
that turns batches into parameter updates:

1. the objective: cross-entropy with ignore index, the symmetric KL between two passes and the ReMask loss, as one
   chunked autograd function with an analytic gradient, so that no fp32 copy of the logits is ever held;
2. Lilith, the optimizer of the ReMask recipe, reproducing euclaise's original step for step;
3. the one-cycle cosine learning-rate schedule (torch's OneCycleLR without cycle_momentum) as a pure function;
4. the training loop for the three modes of the card's table (sft, masked-thought, remask);
5. the command line.
It brings model.py (StableLM), data.py (tokenizer, formats, masking) and quantize.py (LLM.int8) together.

Deliberately left out: temperature in the KL (the card uses 1), a fused matmul + loss kernel (the logits are
materialised once, in the model's dtype), foreach/fused optimizer kernels (one readable loop over tensors) and
second derivatives of the loss.

References: the ReMask-3B model card; R-TeaFor (regularized teacher-forcing, EMNLP 2022) for the two passes
with forward + reverse KL; Masked Thought (Chen et al., arXiv 2403.02178); Lilith in euclaise/supertrainer2000,
src/supertrainer2k/optim/lilith.py; the one-cycle policy (Smith & Topin, arXiv 1708.07120) and
torch.optim.lr_scheduler.OneCycleLR; chunked losses with gradients computed in the forward pass as in
Liger-Kernel (arXiv 2410.10989).
"""
import math
from typing import NamedTuple, Optional, Union

import torch

# ----------------------------------------------------------------------------- objective
# Labels follow the Hugging Face convention: labels[:, t] is the token at position t, so logits[:, t] are graded
# on labels[:, t + 1] and the shift happens inside. A kl_mask is aligned the same way.

IGNORE_INDEX = -100  # label value that grades nothing (Hugging Face / torch convention)
CHUNK_TOKENS = 128  # positions per fp32 chunk: ~6 fp32 (chunk, V) buffers live, 154 MB at V = 50304


class LossParts(NamedTuple):
    loss: torch.Tensor  # the differentiable objective
    ce_masked: torch.Tensor  # cross-entropy of the masked pass (detached, normalised like the loss)
    ce_full: torch.Tensor  # cross-entropy of the full pass (detached)
    kl: torch.Tensor  # D = mean of KL(full||masked) and KL(masked||full) over the KL positions (detached)


Count = Union[int, float, torch.Tensor]


def _chunk_terms(logits_a, logits_b, b, b_of_b, t, y, on_kl, ca, cb, ck, need_a, need_b):
    """One chunk of n positions (b, t) of side a, (b_of_b, t) of side b: the sums of CE_a, CE_b and D, and
    their gradients in the logits' dtype.

    The formulas are in _ChunkedObjective's docstring. A function of its own so that the chunk's fp32 buffers
    die on return, before the next chunk allocates.
    """
    compute = torch.promote_types(logits_a.dtype, torch.float32)
    has_y = y != IGNORE_INDEX  # (n,)
    y_col = y.clamp(min=0).unsqueeze(1)  # (n, 1) gather index; unlabelled rows are zeroed through has_y
    log_p = logits_a[b, t].to(compute)  # (n, V): advanced indexing copies, so in-place ops are safe
    log_p -= torch.logsumexp(log_p, dim=1, keepdim=True)
    sums = [torch.where(has_y, -log_p.gather(1, y_col).squeeze(1), 0).sum()]
    p = log_p.exp()  # (n, V)
    row_a = ca * has_y  # (n,) CE weight per row
    if logits_b is None:  # cross-entropy only: dCE/da = p - onehot(y)
        grad_a = p.mul_(row_a[:, None]).scatter_add_(1, y_col, -row_a[:, None]).to(logits_a.dtype) if need_a else None
        return sums, grad_a, None
    log_q = logits_b[b_of_b, t].to(compute)  # (n, V)
    log_q -= torch.logsumexp(log_q, dim=1, keepdim=True)
    sums.append(torch.where(has_y, -log_q.gather(1, y_col).squeeze(1), 0).sum())
    q = log_q.exp()  # (n, V)
    d = log_p.sub_(log_q)  # (n, V) log p - log q, in log p's buffer
    del log_q
    kl_pq = torch.einsum("nv,nv->n", p, d)  # (n,) row dot products, computed without an (n, V) temporary
    kl_qp = -torch.einsum("nv,nv->n", q, d)
    sums.append((0.5 * (kl_pq + kl_qp) * on_kl).sum())
    row_k = ck * on_kl  # (n,) KL weight per row
    grads = []
    for need, own, other, sign, kl_own, row_ce in ((need_a, p, q, 1.0, kl_pq, row_a),
                                                   (need_b, q, p, -1.0, kl_qp, cb * has_y)):
        if not need:
            grads.append(None)
            continue
        # own * (row_ce + row_k * (1 + sign * d - KL_own)) - row_k * other - row_ce * onehot(y)
        g = torch.add((1 - kl_own)[:, None], d, alpha=sign)  # (n, V)
        g *= row_k[:, None]
        g += row_ce[:, None]
        g *= own
        g.addcmul_(other, row_k[:, None], value=-1)
        g.scatter_add_(1, y_col, -row_ce[:, None])
        grads.append(g.to(logits_a.dtype))
        del g
    return sums, *grads


class _ChunkedObjective(torch.autograd.Function):
    """loss = wa * sum CE(a) / n_lab + wb * sum CE(b) / n_lab + wk * sum D(a, b) / n_kl over selected positions.

    For one position (one row of V logits): a = masked-pass logits, b = full-pass logits, p = softmax(a),
    q = softmax(b), y = the label, d = log p - log q. Then

        CE_a = logsumexp(a) - a_y                   dCE_a/da = p - onehot(y)
        KL(p||q) = sum_v p (log p - log q)          d/da = p * (d - KL(p||q))      d/db = q - p
        KL(q||p) = sum_v q (log q - log p)          d/da = p - q                   d/db = q * (-d - KL(q||p))
        D = 0.5 * (KL(p||q) + KL(q||p))             dD/da = 0.5 * (p * (1 + d - KL(p||q)) - q)
                                                    dD/db = 0.5 * (q * (1 - d - KL(q||p)) - p)

    (d/da KL(p||q) = p * (d - KL): the change of p weighs d, while sum_v p * dlog p/da = p - p = 0.) With these
    closed forms the forward pass computes loss and gradients together, chunk by chunk in fp32, and keeps only
    the gradients, in the logits' dtype: no fp32 (B, T, V) tensor is ever allocated; backward hands them over.
    Side b's rows are logits_b[rows_b + offset_b, rows_t]: offset_b > 0 means both sides live in one stacked
    tensor (logits_b is logits_a), whose single gradient buffer then holds both halves.
    """

    @staticmethod
    def forward(ctx, logits_a, logits_b, offset_b, rows_b, rows_t, targets, kl_rows, n_lab, n_kl, wa, wb, wk,
                chunk_tokens):
        # logits_a/b: (B, T, V) or one (2B, T, V) twice, logits_b may be None; rows_b, rows_t, targets: (R,) long
        ctx.stacked = offset_b > 0
        need_a = ctx.needs_input_grad[0]
        need_b = logits_b is not None and ctx.needs_input_grad[1]
        grad_a = torch.zeros_like(logits_a) if need_a else None  # (B, T, V) in the logits' dtype
        grad_b = grad_a if ctx.stacked else torch.zeros_like(logits_b) if need_b else None
        weights = (wa / n_lab, wb / n_lab, 0.5 * wk / n_kl)  # per-position weights; D's 0.5 folded into the KL one
        sums = torch.zeros(3, dtype=n_lab.dtype, device=logits_a.device)  # sum CE_a, sum CE_b, sum D
        for start in range(0, rows_b.numel(), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            b, t = rows_b[rows], rows_t[rows]
            chunk_sums, g_a, g_b = _chunk_terms(logits_a, logits_b, b, b + offset_b, t, targets[rows],
                                                kl_rows[rows], *weights, need_a, need_b)
            sums[:len(chunk_sums)] += torch.stack(chunk_sums)
            if need_a:
                grad_a[b, t] = g_a
            if need_b:
                grad_b[b + offset_b, t] = g_b
        ctx.save_for_backward(grad_a, None if ctx.stacked else grad_b)
        ce_a, ce_b, kl = sums[0] / n_lab, sums[1] / n_lab, sums[2] / n_kl
        loss = wa * ce_a + wb * ce_b + wk * kl
        ctx.mark_non_differentiable(ce_a, ce_b, kl)
        return loss, ce_a, ce_b, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        grads = list(ctx.saved_tensors)
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # a scaled loss (e.g. fp16 GradScaler)
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return (*grads,) + (None,) * 11


def _stacked_halves(a, b):
    """(base, B) when a and b are the first and second half of one contiguous (2B, T, V) tensor, as
    logits.chunk(2) of a 2B-batch forward gives; else None. Feeding the base itself to the autograd function lets
    it return one gradient instead of two halves that autograd would then concatenate (2 more logits tensors)."""
    base = a._base
    if base is None or b._base is not base or not base.is_contiguous() or base.shape != (2 * a.shape[0], *a.shape[1:]):
        return None
    if not a.requires_grad == b.requires_grad == base.requires_grad:  # views made leaves: their grads are their own
        return None
    halves = base.chunk(2)
    for half, view in zip(halves, (a, b)):
        if view.stride() != half.stride() or view.storage_offset() != half.storage_offset():
            return None
    return base, a.shape[0]


def _check_logits(name, logits, like=None, like_name=None):
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() != 3:
        what = f"{logits.dtype} {tuple(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{name} must be a floating-point tensor [B, T, V], got {what}")
    if like is not None and (logits.shape != like.shape or logits.device != like.device):
        raise ValueError(f"{name} {tuple(logits.shape)} on {logits.device} does not match "
                         f"{like_name} {tuple(like.shape)} on {like.device}")


def _check_aligned(name, tensor, logits, logits_name):
    if not torch.is_tensor(tensor) or tensor.shape != logits.shape[:2] or tensor.device != logits.device:
        what = f"{tuple(tensor.shape)} on {tensor.device}" if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be [B, T] = {tuple(logits.shape[:2])} on {logits.device} "
                         f"like {logits_name}, got {what}")


def _count(name, value, measured, device, dtype):
    """A normaliser as a 0-dim tensor: the given count (an optimizer step's total) or the batch's own."""
    if value is None:
        value = measured
    elif not torch.is_tensor(value) and not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"{name} must be a count >= 0 (int, float or 0-dim tensor), got {value!r}")
    # a step without any labelled position has zero sums, so dividing them by 1 gives 0, never NaN
    return torch.as_tensor(value, dtype=dtype, device=device).clamp(min=1)


def _objective(logits_a, logits_b, labels, kl_mask, wa, wb, wk, num_tokens, num_kl_positions, chunk_tokens,
               names=("logits_masked", "logits_full")):
    """Validate, select the graded positions (after the shift) and run the chunked objective."""
    _check_logits(names[0], logits_a)
    if logits_b is not None:
        _check_logits(names[1], logits_b, logits_a, names[0])
    _check_aligned("labels", labels, logits_a, names[0])
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    vocab = logits_a.shape[-1]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"labels{where} = {labels[tuple(where)].item()} is outside 0..{vocab - 1} "
                         f"(the vocabulary of {names[0]}) and is not the ignore index {IGNORE_INDEX}")
    if kl_mask is not None:
        _check_aligned("kl_mask", kl_mask, logits_a, names[0])
        if kl_mask.dtype != torch.bool:
            raise ValueError(f"kl_mask must be a bool tensor, got {kl_mask.dtype}")
    if not (isinstance(chunk_tokens, int) and chunk_tokens > 0):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")

    targets = labels[:, 1:].long()  # (B, T-1): what logits[:, t] is graded on
    has_label = targets != IGNORE_INDEX
    if logits_b is None:
        on_kl = torch.zeros_like(has_label)
    else:
        on_kl = has_label if kl_mask is None else kl_mask[:, 1:]  # (B, T-1)
    if num_tokens is not None and num_kl_positions is None and logits_b is not None:
        if kl_mask is not None:
            raise ValueError("with a kl_mask the KL positions are not the label tokens: pass num_kl_positions "
                             "(the optimizer step's count of KL positions) along with num_tokens")
        num_kl_positions = num_tokens
    rows_b, rows_t = (has_label | on_kl).nonzero(as_tuple=True)  # (R,), (R,): the positions that matter
    compute = torch.promote_types(logits_a.dtype, torch.float32)
    n_lab = _count("num_tokens", num_tokens, has_label.sum(), logits_a.device, compute)
    n_kl = _count("num_kl_positions", num_kl_positions, on_kl.sum(), logits_a.device, compute)
    stacked = _stacked_halves(logits_a, logits_b) if logits_b is not None else None
    if stacked is not None:
        logits_a = logits_b = stacked[0]  # (2B, T, V): side a is rows [0, B), side b rows [B, 2B)
    if not torch.is_grad_enabled():  # evaluation under no_grad: no gradient buffers (they follow requires_grad)
        logits_a, logits_b = (None if x is None else x.detach() for x in (logits_a, logits_b))
    return LossParts(*_ChunkedObjective.apply(
        logits_a, logits_b, 0 if stacked is None else stacked[1], rows_b, rows_t, targets[rows_b, rows_t],
        on_kl[rows_b, rows_t], n_lab, n_kl, float(wa), float(wb), float(wk), chunk_tokens))


def remask_loss_parts(logits_masked: torch.Tensor, logits_full: torch.Tensor, labels: torch.Tensor,
                      kl_weight: float = 0.1, kl_mask: Optional[torch.Tensor] = None,
                      num_tokens: Optional[Count] = None, num_kl_positions: Optional[Count] = None,
                      chunk_tokens: int = CHUNK_TOKENS) -> LossParts:
    """The ReMask objective and its parts: 0.5 * (CE(masked) + CE(full)) + kl_weight * D(masked, full).

    logits_masked, logits_full: (B, T, V), any float dtype (bf16 stays bf16: fp32 math happens per chunk);
        they may be the two halves of one (2B, T, V) forward (logits.chunk(2) or [:B], [B:]): the function then
        works on the whole tensor and returns one gradient, so the 2B batch costs no extra memory.
    labels: (B, T) integer token ids aligned with input_ids, IGNORE_INDEX (-100) where nothing is graded.
    kl_mask: (B, T) bool, aligned like labels, positions whose prediction enters D; default: the labelled ones.
        ReMask-CoT drops some rationale labels but keeps D on all target positions: pass those as kl_mask.
    num_tokens: divide the CE token sums by this instead of the batch's label count; under gradient accumulation
        pass the label count of the whole optimizer step, so the micro-batch losses add up to the step's mean
        exactly (num_tokens=1 gives token sums).
    num_kl_positions: the same for D (the step's count of KL positions); it defaults to the batch's count, or to
        num_tokens when num_tokens is given and kl_mask is not (the KL positions are then the label tokens).
    chunk_tokens: positions per fp32 chunk (memory against speed).

    The loss is a float32 scalar (float64 for float64 logits). No labelled position gives 0 and zero gradients.

    Memory, measured on this 2-core CPU for bf16 logits [8, 256, 50304] (206 MB each), forward + backward into
    .grad, as the peak resident size (VmHWM, reset before the call) above the inputs, with glibc's mmap threshold
    at 64 KiB so that freed buffers leave at once: 2.77x one logits tensor with the default 128-token chunks
    (2.40x with 64, 3.52x with 256), of which 2.02x are the two bf16 gradients; 2.77x as well for the halves of
    one (2B, T, V) tensor; a direct fp32 version (F.cross_entropy, F.log_softmax, F.kl_div on .float() copies)
    needs 21.9x. tests/test_loss.py keeps a small version of this measurement.
    """
    return _objective(logits_masked, logits_full, labels, kl_mask, 0.5, 0.5, kl_weight,
                      num_tokens, num_kl_positions, chunk_tokens)


def remask_loss(logits_masked: torch.Tensor, logits_full: torch.Tensor, labels: torch.Tensor,
                kl_weight: float = 0.1, kl_mask: Optional[torch.Tensor] = None,
                num_tokens: Optional[Count] = None, **kwargs) -> torch.Tensor:
    """The ReMask objective as a scalar tensor; see remask_loss_parts for the arguments and its parts."""
    return remask_loss_parts(logits_masked, logits_full, labels, kl_weight, kl_mask, num_tokens, **kwargs).loss


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_tokens: Optional[Count] = None,
                  chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels aligned with input_ids, -100 ignored).

    The loss of the `sft` mode (full pass) and of `masked-thought` (masked pass); the same chunked function as
    remask_loss, so equally lean. num_tokens as in remask_loss_parts.
    """
    return _objective(logits, None, labels, None, 1.0, 0.0, 0.0, num_tokens, None, chunk_tokens,
                      names=("logits", None)).loss


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 num_positions: Optional[Count] = None, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """D = mean over positions of 0.5 * (KL(a||b) + KL(b||a)), each KL summed over the vocabulary.

    mask: (B, T) bool aligned with input_ids like labels (position t of the mask selects logits[:, t - 1]);
    default: every position that predicts a next token (all but the last). num_positions: the normaliser.
    """
    _check_logits("logits_a", logits_a)
    nothing_graded = torch.full(logits_a.shape[:2], IGNORE_INDEX, dtype=torch.long, device=logits_a.device)
    if mask is None:
        mask = torch.ones(logits_a.shape[:2], dtype=torch.bool, device=logits_a.device)
    return _objective(logits_a, logits_b, nothing_graded, mask, 0.0, 0.0, 1.0, None, num_positions,
                      chunk_tokens, names=("logits_a", "logits_b")).loss


# ----------------------------------------------------------------------------- Lilith optimizer


def _state_dtype(param):
    # measured (Lilith's docstring): bf16 state drifts (v_avg 15% off in 1000 steps), so fp32 for 16-bit parameters
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


class Lilith(torch.optim.Optimizer):
    """Lilith (euclaise, supertrainer2000), the optimizer of the ReMask recipe, reproduced step for step.

    Per tensor p with gradient g, step t counted from 1 per tensor, norms over the whole tensor:

        if sum(g.shape) > 1:  g *= max(||p|| / max(||g||, g_norm_min), ratio_min)    (rescales p.grad in place)
        m1_prev = m1
        m1 = beta1_m * (m1 + m2) + (1 - beta1_m) * g
        m2 = beta2_m * m2 + (1 - beta2_m) * (m1 - m1_prev)
        u  = m1 + acceleration * m2
        v  = beta_v * v + (1 - beta_v) * u^2
        u  = u / sqrt(v / (1 - beta_v^t) + eps)
        p  = p - lr * (u + weight_decay * p)
        if ema_k > 0:  ema = (1 - ema_beta) * ema + ema_beta * p;  every ema_k-th step p = ema   (ema starts as p)

    The EMA line is what the original code does (ema.lerp_(p, ema_beta)): the new parameters get weight
    ema_beta, so with the default 0.99 the "EMA" stays close to p. REFERENCE.md section 5 writes the weights the
    other way round; this class follows the code, which is what the recipe ran. Note the original's quirks,
    kept: the trust-ratio test is sum(shape) > 1, so shape (1,) and scalars skip it while (1, 1) does not; the
    rescaled gradient is left in p.grad.

    How it differs from AdamW: the gradient is first rescaled to the parameter's norm (a LARS/LAMB-like trust
    ratio, so every tensor moves by about the same relative amount); the first moment is a two-level momentum
    (m2 tracks the change of m1 and is fed back into it, an "acceleration" like Nesterov's); the second moment is
    taken of that momentum u rather than of the raw gradient, with bias correction on v only and eps inside the
    square root; weight decay is decoupled as in AdamW (lr * weight_decay * p).

    Memory: three state tensors per parameter (m1, m2, v; AdamW has two) plus a fourth (ema) when ema_k > 0:
    for StableLM-3B's 2.80e9 parameters that is 33.5 GB of fp32 state (AdamW: 22.4 GB).

    State precision: the original keeps state in the gradient's dtype. Here bf16/fp16 parameters get fp32 state
    (other parameters keep their own dtype, so fp32 parameters match the original bit for bit). Measured on this
    CPU: 4096 weights ~ N(0, 0.02^2), 1000 steps at lr 1e-5 with gradients 1e-3 * (0.3 * fixed + noise), error
    = ||p - p_ref|| / ||p_ref - p_0|| against the same rule in float64:
        fp32 parameters, fp32 state   2.4e-6
        fp32 parameters, bf16 state   2.0e-2   (v_avg off by 15%: a (1 - 0.999) lerp is below bf16's resolution)
        bf16 parameters, either state 0.87     (v_avg off by 4.9% with fp32 state, 18% with bf16 state)
    So fp32 state is needed, and bf16 parameters cannot take lr 1e-5 steps at all (a 1e-5 step is under half a
    bf16 ulp of a 0.02 weight and rounds away): train with fp32 master weights, as the recipe does.
    """

    def __init__(self, params, lr: float, eps: float = 1e-8, beta1_m: float = 0.9, beta2_m: float = 0.99,
                 beta_v: float = 0.999, weight_decay: float = 0.01, g_norm_min: float = 1e-4,
                 ratio_min: float = 1e-4, acceleration: float = 1, ema_k: int = 0, ema_beta: float = 0.99):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("g_norm_min", g_norm_min),
                            ("ratio_min", ratio_min)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"Lilith: {name} must be a number >= 0, got {value!r}")
        for name, value in (("beta1_m", beta1_m), ("beta2_m", beta2_m), ("beta_v", beta_v), ("ema_beta", ema_beta)):
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"Lilith: {name} must be in [0, 1), got {value!r}")
        if not (isinstance(ema_k, int) and ema_k >= 0):
            raise ValueError(f"Lilith: ema_k must be an int >= 0 (0: no EMA), got {ema_k!r}")
        defaults = dict(lr=lr, eps=eps, beta1_m=beta1_m, beta2_m=beta2_m, beta_v=beta_v, weight_decay=weight_decay,
                        g_norm_min=g_norm_min, ratio_min=ratio_min, acceleration=acceleration, ema_k=ema_k,
                        ema_beta=ema_beta)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():  # step runs under no_grad; the closure's backward needs a graph
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lilith does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p, group):
        state = self.state[p]
        dtype = _state_dtype(p)
        if not state:
            state["step"] = 0
            state["m_avg1"] = torch.zeros_like(p, dtype=dtype)
            state["m_avg2"] = torch.zeros_like(p, dtype=dtype)
            state["v_avg"] = torch.zeros_like(p, dtype=dtype)
            if group["ema_k"] > 0:
                state["ema"] = p.detach().to(dtype, copy=True)
        state["step"] += 1
        m1, m2, v = state["m_avg1"], state["m_avg2"], state["v_avg"]
        if sum(p.grad.shape) > 1:
            p_norm = torch.linalg.vector_norm(p, dtype=dtype)
            g_norm = torch.linalg.vector_norm(p.grad, dtype=dtype)
            p.grad.mul_((p_norm / g_norm.clamp(min=group["g_norm_min"])).clamp(min=group["ratio_min"]))
        g = p.grad.to(dtype)
        # the original's exact sequence of in-place lerps, so fp32 results agree bit for bit
        m1_prev = m1.clone()
        m1.add_(m2).lerp_(g, 1 - group["beta1_m"])
        m2.lerp_(m1 - m1_prev, 1 - group["beta2_m"])
        u = m1 + group["acceleration"] * m2
        v.lerp_(u.square(), 1 - group["beta_v"])
        v_hat = v / (1 - group["beta_v"] ** state["step"])
        u.div_((v_hat + group["eps"]).sqrt())
        u.add_(p, alpha=group["weight_decay"])
        p.add_(u, alpha=-group["lr"])
        if group["ema_k"] > 0:
            state["ema"].lerp_(p.to(dtype), group["ema_beta"])
            if state["step"] % group["ema_k"] == 0:
                p.copy_(state["ema"])

    def load_state_dict(self, state_dict):
        # torch casts floating state to each parameter's dtype; put fp32 state of bf16 parameters back from the dict
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for p, i in zip(params, saved_ids):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=_state_dtype(p), copy=True)


# ----------------------------------------------------------------------------- one-cycle schedule


def one_cycle_lr(step: int, total_steps: int, max_lr: float, pct_start: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4) -> float:
    """The learning rate of optimizer step `step` (from 0) under a one-cycle cosine schedule.

    Equals torch.optim.lr_scheduler.OneCycleLR(anneal_strategy="cos", cycle_momentum=False, three_phase=False)
    after `step` scheduler steps: a cosine rise from max_lr / div_factor to max_lr until step pct_start * N - 1,
    then a cosine fall to max_lr / div_factor / final_div_factor at step N - 1. A pure function, so a resumed run
    needs no scheduler state.
    """
    if not (isinstance(total_steps, int) and total_steps > 0):
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not (isinstance(step, int) and 0 <= step <= total_steps):  # torch allows one call past the end, too
        raise ValueError(f"step must be an int in 0..{total_steps} (total_steps), got {step!r}")
    if not 0 <= pct_start <= 1:
        raise ValueError(f"pct_start must be in [0, 1], got {pct_start!r}")
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    warmup_end = float(pct_start * total_steps) - 1  # the step at which max_lr is reached (may be fractional)
    if step <= warmup_end:
        start_lr, end_lr, start_step, end_step = initial_lr, max_lr, 0.0, warmup_end
    else:
        start_lr, end_lr, start_step, end_step = max_lr, min_lr, warmup_end, total_steps - 1
    if end_step == start_step:  # torch divides by zero here (ZeroDivisionError), at construction for step 0
        raise ValueError(f"pct_start * total_steps = {pct_start * total_steps:g} leaves a phase of zero steps "
                         f"at step {step}; choose another pct_start")
    pct = (step - start_step) / (end_step - start_step)
    return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1)  # cosine from start_lr to end_lr
