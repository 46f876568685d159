"""remask: fine-tune a causal language model with ReMask, from the loss to the command line.

ReMask (euclaise, the ReMask-3B model card) runs the model twice on each example, once with some target tokens
of the input replaced by a mask token and once on the full input, and minimises

    loss = 0.5 * (CE(masked) + CE(full)) + w * 0.5 * (KL(full || masked) + KL(masked || full))      (w = 0.1)

so that the model predicts the same thing whether or not its context was corrupted. The file is read top to
bottom, in three parts:

Part I, from the loss to the loop (what a reader comes for):
  1. the objective: remask_loss_reference, the loss by definition in a dozen lines of plain torch; then the public
     functions (remask_loss_parts, remask_loss, cross_entropy, symmetric_kl), which compute the same value and
     gradient chunk by chunk with an analytic gradient, so that no fp32 copy of the logits is ever held; then those
     chunked internals, the memory/transfer helpers and the input checks;
  2. Lilith, the optimizer of the ReMask recipe, as euclaise's original code computes it;
  3. the one-cycle cosine learning-rate schedule (torch's OneCycleLR without cycle_momentum) as a pure function;
  4. TrainConfig (one --flag per field, each checked where it is declared; defaults = the card's recipe, DEMO = the
     embedded CPU demo);
  5. one training step: both ReMask passes in one forward of a 2B batch, bf16 autocast over fp32 master weights on
     a GPU, gradients accumulated and normalised by the whole step's label tokens;
  6. train and its loop: set-up hands the loop one Run record; the loop reads nothing back from the GPU between log
     steps, writes a log line + metrics.jsonl per log step and a checkpoint where asked.
Part II, what the loop relies on: devices and accounting (MFU, memory), loading the model and the data,
  checkpoints (atomic, verified, exact --resume), sharded training (FSDP2: weights, gradients and Lilith's state in
  1/N slices per rank, sharded checkpoints with torch.distributed.checkpoint), signals, the run directory and the
  run log (train.log, metrics.jsonl, loss.svg).
Part III, beyond training: held-out evaluation (greedy exact match, teacher-forced loss); compare (every mode x
  several seeds on the same data and schedule, mean ± std, paired t intervals, sign tests and the smallest
  detectable difference, results.json with each run's machine and an SVG; compare-report pools parts); using a
  model (streamed generation, a terminal chat, GSM8K 5-shot strict match and ARC-Challenge 25-shot acc_norm as
  lm-evaluation-harness scores them; prompts and metrics live in data.py); the command line:
  `python remask.py train|compare|compare-report|generate|chat|eval --help`.
It brings model.py (StableLM), data.py (tokenizer, formats, masking) and quantize.py (LLM.int8) together.

Deliberately left out: temperature in the KL (the card uses 1), a fused matmul + loss kernel (the logits are
materialised once, in the model's dtype), foreach/fused optimizer kernels (one readable loop over tensors),
second derivatives of the loss, gradient clipping (the recipe has none; Lilith rescales each gradient to its
parameter's norm), tensor and pipeline parallelism (FSDP2 fits the family up to 3B on the cards people have)
and fp16 loss scaling (bf16 needs none).

References: the ReMask-3B model card (huggingface.co/euclaise/ReMask-3B); R-TeaFor (Lin & Cheng, EMNLP 2022,
aclanthology.org/2022.emnlp-main.423) for the two passes with forward + reverse KL; Masked Thought (Chen et al.,
arXiv 2403.02178); Lilith: euclaise/supertrainer2000, src/supertrainer2k/optim/lilith.py at commit 8da52ce;
the one-cycle policy (Smith & Topin, arXiv 1708.07120) and torch.optim.lr_scheduler.OneCycleLR (torch 2.13);
chunked losses with gradients computed in the forward pass as in Liger-Kernel (arXiv 2410.10989); GSM8K (Cobbe
et al., arXiv 2110.14168) and ARC (Clark et al., arXiv 1803.05457) as EleutherAI's lm-evaluation-harness runs them.
"""
import argparse
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import signal
import sys
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from html import escape
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (ARC_FEWSHOT, ARC_SEED, GSM8K_MAX_NEW_TOKENS, GSM8K_STOP, IGNORE_INDEX, MODES, PAD_ID, CoTRecord,
                  DataError, DownloadError, Loader, MaskConfig, Tokenizer, addition_cot, arc_contexts,
                  arc_continuations, atomic_write, chat_prompt, collate, cot_prompt, cut_at_stop, describe_fit,
                  embedded_dataset, embedded_tokenizer, encode_many, encode_pair, extract_answer, fit_length,
                  format_record, describe_overlap, gsm8k_prompts, load_tokenizer, mask_example, mixture_parts, overlap,
                  read_arc, read_eval_set, read_gsm8k, read_mixture, resolve_model, round_up, score_arc, score_gsm8k)
from model import (CONFIGS, OWNER, Config, StableLM, check_apart, check_replaceable, generate, make_owned, owner,
                   recover_directory, remove_directory, update_owner, write_directory)

# =============================================================================
# Part I. From the loss to the loop: what ReMask computes and how one run trains
# The objective, the optimizer and the schedule of the recipe, the run's configuration, one optimizer step and
# the loop. Everything the loop calls but does not define is in Part II.
# =============================================================================


# ----------------------------------------------------------------------------- objective: the definition
# Labels follow the Hugging Face convention: labels[:, t] is the token at position t, so logits[:, t] are graded
# on labels[:, t + 1] and the shift happens inside. A kl_mask is aligned the same way.


class LossParts(NamedTuple):
    loss: torch.Tensor  # the differentiable objective
    ce_masked: torch.Tensor  # cross-entropy of the masked pass (normalised like the loss)
    ce_full: torch.Tensor  # cross-entropy of the full pass
    kl: torch.Tensor  # D = mean of KL(full||masked) and KL(masked||full) over the KL positions


def remask_loss_reference(logits_masked: torch.Tensor, logits_full: torch.Tensor, labels: torch.Tensor,
                          kl_weight: float = 0.1, kl_mask: Optional[torch.Tensor] = None) -> LossParts:
    """The ReMask objective by definition, in plain torch: what remask_loss computes, and the tests' oracle.

    CE is the mean over labelled positions (labels != -100), D the mean over the KL positions (kl_mask, default:
    the labelled ones); an empty mean is 0. It computes in the logits' dtype (give it .float() or .double()
    copies) and holds several such copies of (B, T, V) at once, which is what remask_loss avoids.
    """
    vocab = logits_masked.shape[-1]
    targets = labels[:, 1:].reshape(-1)  # (N,), N = B * (T - 1): logits[:, t] predict labels[:, t + 1]
    masked = logits_masked[:, :-1].reshape(-1, vocab)  # (N, V)
    full = logits_full[:, :-1].reshape(-1, vocab)  # (N, V)
    n_labels = (targets != IGNORE_INDEX).sum().clamp(min=1)
    ce_masked = F.cross_entropy(masked, targets, ignore_index=IGNORE_INDEX, reduction="sum") / n_labels
    ce_full = F.cross_entropy(full, targets, ignore_index=IGNORE_INDEX, reduction="sum") / n_labels
    log_p, log_q = F.log_softmax(masked, dim=-1), F.log_softmax(full, dim=-1)  # (N, V) each
    kl_masked_full = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,) KL(masked || full)
    kl_full_masked = (log_q.exp() * (log_q - log_p)).sum(-1)  # (N,) KL(full || masked)
    on_kl = targets != IGNORE_INDEX if kl_mask is None else kl_mask[:, 1:].reshape(-1)  # (N,)
    kl = (0.5 * (kl_masked_full + kl_full_masked) * on_kl).sum() / on_kl.sum().clamp(min=1)
    return LossParts(0.5 * (ce_masked + ce_full) + kl_weight * kl, ce_masked, ce_full, kl)

# ----------------------------------------------------------------------------- objective: the public functions
# The same value and gradient as the definition, without an fp32 copy of the logits: the functions people call.


Count = Union[int, float, torch.Tensor]


def remask_loss_parts(logits_masked: torch.Tensor, logits_full: torch.Tensor, labels: torch.Tensor,
                      kl_weight: float = 0.1, kl_mask: Optional[torch.Tensor] = None,
                      num_tokens: Optional[Count] = None, num_kl_positions: Optional[Count] = None,
                      chunk_tokens: Optional[int] = None) -> LossParts:
    """remask_loss_reference's value and gradient, computed chunk by chunk: 0.5 * (CE(masked) + CE(full)) +
    kl_weight * D(masked, full), and its parts (detached).

    logits_masked, logits_full: (B, T, V), any float dtype (bf16 stays bf16: fp32 math happens per chunk);
        they may be the two halves of one (2B, T, V) forward (logits.chunk(2) or [:B], [B:]): the function then
        works on the whole tensor and returns one gradient, so the 2B batch costs no extra memory.
    labels: (B, T) integer token ids aligned with input_ids, IGNORE_INDEX (-100) where nothing is graded; on
        the logits' device or on the CPU, which spares a GPU the synchronisation that checking them would cost.
    kl_mask: (B, T) bool, aligned like labels (either device too), positions whose prediction enters D; default:
        the labelled ones. ReMask-CoT drops some rationale labels but keeps D on all target positions: pass
        those as kl_mask.
    num_tokens: divide the CE token sums by this instead of the batch's label count; under gradient accumulation
        pass the label count of the whole optimizer step, so the micro-batch losses add up to the step's mean
        (num_tokens=1 gives token sums).
    num_kl_positions: the same for D (the step's count of KL positions); it defaults to the batch's count, or to
        num_tokens when num_tokens is given and kl_mask is not (the KL positions are then the label tokens).
    chunk_tokens: positions per fp32 chunk (memory against speed); default CHUNK_ELEMENTS // V.

    The loss is a float32 scalar (float64 for float64 logits). No labelled position gives 0 and zero gradients.
    Extra peak memory for forward + backward: 2.75x one bf16 logits tensor, 2x of it the two gradients (README).
    """
    return _objective(logits_masked, logits_full, labels, kl_mask, 0.5, 0.5, kl_weight,
                      num_tokens, num_kl_positions, chunk_tokens)


def remask_loss(logits_masked: torch.Tensor, logits_full: torch.Tensor, labels: torch.Tensor,
                kl_weight: float = 0.1, kl_mask: Optional[torch.Tensor] = None,
                num_tokens: Optional[Count] = None, **kwargs) -> torch.Tensor:
    """The ReMask objective as a scalar tensor; see remask_loss_parts for the arguments and its parts."""
    return remask_loss_parts(logits_masked, logits_full, labels, kl_weight, kl_mask, num_tokens, **kwargs).loss


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_tokens: Optional[Count] = None,
                  chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels aligned with input_ids, -100 ignored).

    The loss of the `sft` mode (full pass) and of `masked-thought` (masked pass); the same chunked function as
    remask_loss, so equally lean. num_tokens as in remask_loss_parts.
    """
    return _objective(logits, None, labels, None, 1.0, 0.0, 0.0, num_tokens, None, chunk_tokens,
                      names=("logits", None)).loss


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 num_positions: Optional[Count] = None, chunk_tokens: Optional[int] = None) -> torch.Tensor:
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

# ----------------------------------------------------------------------------- objective: chunked
# The same value and gradient without an fp32 copy of the logits. The gradient of each position has a closed
# form (_ChunkedObjective's docstring), so forward computes value and gradient together, a chunk of positions
# at a time in fp32, and keeps only the gradient, in the logits' dtype; backward hands it over.

# Logits per fp32 chunk (positions x vocabulary): 128 positions at StableLM's V = 50304, ~6 fp32 (128, V)
# buffers live (154 MB); a small vocabulary takes more positions at once, since per-chunk overhead then costs
# more than memory (128-position chunks slowed a V = 128 CPU step by ~10%).
CHUNK_ELEMENTS = 128 * 50304


class Positions(NamedTuple):
    """The graded positions after the shift, (R,) each: where each one is (its row in the batch, its column), its
    target (IGNORE_INDEX: none) and whether D counts it."""
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    on_kl: torch.Tensor  # bool

    def chunk(self, start: int, size: int) -> "Positions":
        return Positions(*(t[start:start + size] for t in self))


class Weights(NamedTuple):
    """What multiplies CE(masked), CE(full) and D: in the loss, or per position once divided by their counts."""
    masked: float | torch.Tensor
    full: float | torch.Tensor
    kl: float | torch.Tensor


def _objective(logits_masked, logits_full, labels, kl_mask, w_masked, w_full, w_kl, num_tokens,
               num_kl_positions, chunk_tokens, names=("logits_masked", "logits_full")):
    """Check the inputs, select the graded positions (after the shift) and run the chunked objective."""
    chunk_tokens = _check_inputs(logits_masked, logits_full, labels, kl_mask, chunk_tokens, names)
    if num_tokens is not None and num_kl_positions is None and logits_full is not None:
        if kl_mask is not None:
            raise ValueError("with a kl_mask the KL positions are not the label tokens: pass num_kl_positions "
                             "(the optimizer step's count of KL positions) along with num_tokens")
        num_kl_positions = num_tokens
    batch_idx, pos_idx, targets, on_kl = _select_positions(labels, kl_mask, logits_full is not None,
                                                           logits_masked.device)  # (R,) each
    positions = Positions(batch_idx, pos_idx, targets, on_kl.bool())
    compute = torch.promote_types(logits_masked.dtype, torch.float32)
    # the batch's own counts, from the selection: it holds every labelled and every KL position
    n_labels = _count("num_tokens", num_tokens, (targets != IGNORE_INDEX).sum(), logits_masked.device, compute)
    n_kl = _count("num_kl_positions", num_kl_positions, on_kl.sum(), logits_masked.device, compute)
    full_offset = 0
    stacked = _stacked_halves(logits_masked, logits_full) if logits_full is not None else None
    if stacked is not None:
        logits_masked = logits_full = stacked  # (2B, T, V): the masked pass in rows [0, B), the full in [B, 2B)
        full_offset = len(stacked) // 2
    if not torch.is_grad_enabled():  # evaluation under no_grad: no gradient buffers (they follow requires_grad)
        logits_masked = logits_masked.detach()
        logits_full = None if logits_full is None else logits_full.detach()
    weights = Weights(float(w_masked), float(w_full), float(w_kl))
    return LossParts(*_ChunkedObjective.apply(logits_masked, logits_full, full_offset, positions, (n_labels, n_kl),
                                              weights, chunk_tokens))


class _ChunkedObjective(torch.autograd.Function):
    """loss = w_masked * sum CE(masked) / n_labels + w_full * sum CE(full) / n_labels + w_kl * sum D / n_kl.

    For one position (a row of V logits): p = softmax(masked logits), q = softmax(full logits), y = the label,
    d = log p - log q, KL(p||q) = sum_v p * d, KL(q||p) = -sum_v q * d, D = 0.5 * (KL(p||q) + KL(q||p)). Then

        cross-entropy part   dCE(masked)/d masked = p - onehot(y)        dCE(full)/d full = q - onehot(y)
        KL part              dD/d masked = 0.5 * (p * (1 + d - KL(p||q)) - q)
                             dD/d full   = 0.5 * (q * (1 - d - KL(q||p)) - p)

    (d/d masked of KL(p||q) = p * (d - KL(p||q)): a change of p weighs d, while sum_v p * dlog p = 0; and
    d/d masked of KL(q||p) = p - q, as for a cross-entropy against the soft label q.) A position's gradient is
    its CE weight times the cross-entropy part plus its KL weight times the KL part (_pass_grad).
    """

    @staticmethod
    def forward(ctx, logits_masked, logits_full, full_offset, positions: Positions, counts, weights: Weights,
                chunk_tokens):
        # logits_masked/full: (B, T, V), or one (2B, T, V) twice (full_offset = B: the full pass is rows B..2B);
        # logits_full is None for a cross-entropy alone. counts: (n_labels, n_kl), the sums' divisors.
        need = (ctx.needs_input_grad[0], logits_full is not None and ctx.needs_input_grad[1])  # masked, full
        ctx.stacked = full_offset > 0
        grad_masked, grad_full = _grad_buffers(logits_masked, logits_full, ctx.stacked, *need)
        n_labels, n_kl = counts
        # per-position weights; D's 0.5 is folded into the KL one
        per_position = Weights(weights.masked / n_labels, weights.full / n_labels, 0.5 * weights.kl / n_kl)
        sums = torch.zeros(3, dtype=n_labels.dtype, device=logits_masked.device)  # sum CE(masked), CE(full), D
        for start in range(0, positions.rows.numel(), chunk_tokens):
            at = positions.chunk(start, chunk_tokens)
            chunk_sums, g_masked, g_full = _chunk(logits_masked, logits_full, full_offset, at, per_position, need)
            sums[:len(chunk_sums)] += torch.stack(chunk_sums)
            if need[0]:
                grad_masked[at.rows, at.cols] = g_masked
            if need[1]:
                grad_full[at.rows + full_offset, at.cols] = g_full
        ctx.save_for_backward(grad_masked, None if ctx.stacked else grad_full)
        ctx.applied_scale = None  # the grad_loss that backward has scaled the saved gradients by
        ce_masked, ce_full, kl = sums[0] / n_labels, sums[1] / n_labels, sums[2] / n_kl
        loss = weights.masked * ce_masked + weights.full * ce_full + weights.kl * kl
        ctx.mark_non_differentiable(ce_masked, ce_full, kl)
        return loss, ce_masked, ce_full, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        return (*_scaled_saved_grads(ctx, grad_loss),) + (None,) * 5


def _chunk(logits_masked, logits_full, full_offset, at: Positions, weights: Weights, need):
    """One chunk of n positions `at`: the sums of CE(masked), CE(full) and D, and the gradients of the two passes'
    logits there, (n, V) in the logits' dtype (need: whether each pass needs its gradient). weights: per position.
    A function of its own so that the chunk's fp32 buffers die on return, before the next chunk allocates."""
    rows_masked, rows_full, cols, y, on_kl = at.rows, at.rows + full_offset, at.cols, at.targets, at.on_kl
    (w_ce_masked, w_ce_full, w_kl), (need_masked, need_full) = weights, need
    compute = torch.promote_types(logits_masked.dtype, torch.float32)
    has_y = y != IGNORE_INDEX  # (n,)
    y_col = y.clamp(min=0).unsqueeze(1)  # (n, 1) gather index; unlabelled rows are zeroed through has_y
    log_p = _log_softmax(logits_masked[rows_masked, cols], compute)  # (n, V)
    sums = [torch.where(has_y, -log_p.gather(1, y_col).squeeze(1), 0).sum()]
    p = log_p.exp()  # (n, V)
    ce_weight_masked = w_ce_masked * has_y  # (n,) CE weight of each row
    if logits_full is None:  # cross-entropy alone
        if not need_masked:
            return sums, None, None
        grad = p.mul_(ce_weight_masked[:, None]).scatter_add_(1, y_col, -ce_weight_masked[:, None])  # (n, V)
        return sums, grad.to(logits_masked.dtype), None  # the cross-entropy part, computed in p's buffer
    log_q = _log_softmax(logits_full[rows_full, cols], compute)  # (n, V)
    sums.append(torch.where(has_y, -log_q.gather(1, y_col).squeeze(1), 0).sum())
    q = log_q.exp()  # (n, V)
    d = log_p.sub_(log_q)  # (n, V) log p - log q, in log p's buffer
    del log_q
    kl_pq = torch.einsum("nv,nv->n", p, d)  # (n,) KL(p||q), a row dot product without an (n, V) temporary
    kl_qp = -torch.einsum("nv,nv->n", q, d)  # (n,) KL(q||p)
    sums.append((0.5 * (kl_pq + kl_qp) * on_kl).sum())
    kl_weight = w_kl * on_kl  # (n,) KL weight of each row
    grad_masked = grad_full = None
    if need_masked:
        kl_factor = (1 - kl_pq)[:, None] + d  # (n, V) 1 + d - KL(p||q)
        grad_masked = _pass_grad(p, q, kl_factor, ce_weight_masked, kl_weight, y_col).to(logits_masked.dtype)
        del kl_factor  # it holds the fp32 gradient: freed before the full pass allocates its own
    if need_full:
        kl_factor = (1 - kl_qp)[:, None] - d  # (n, V) 1 - d - KL(q||p)
        ce_weight_full = w_ce_full * has_y  # (n,)
        grad_full = _pass_grad(q, p, kl_factor, ce_weight_full, kl_weight, y_col).to(logits_masked.dtype)
    return sums, grad_masked, grad_full


def _log_softmax(logits_rows, compute):
    """log softmax of (n, V) gathered rows in fp32; the gather copied them, so the ops can be in place."""
    log_p = logits_rows.to(compute)  # (n, V)
    return log_p.sub_(torch.logsumexp(log_p, dim=1, keepdim=True))


def _pass_grad(own, other, kl_factor, ce_weight, kl_weight, y_col):
    """The gradient of one pass's logits, (n, V) fp32, for own = its softmax, other = the other pass's:

        ce_weight * (own - onehot(y))  +  kl_weight * (own * kl_factor - other)
        cross-entropy part                KL part (kl_factor = 1 +- d - KL, see _ChunkedObjective)

    summed in kl_factor's buffer: one (n, V) temporary, where writing the parts out would take three."""
    grad = kl_factor.mul_(kl_weight[:, None]).add_(ce_weight[:, None]).mul_(own)  # own * (ce_w + kl_w * factor)
    grad.addcmul_(other, kl_weight[:, None], value=-1)  # - kl_w * other
    return grad.scatter_add_(1, y_col, -ce_weight[:, None])  # - ce_w * onehot(y)

# ----------------------------------------------------------------------------- objective: memory and transfers
# What keeps the chunked objective at 2.75x one bf16 logits tensor of extra peak memory and the host ahead of
# the GPU; each piece says what it saves. The measurements are in the README (Public API) and `make bench`.


def _grad_buffers(logits_masked, logits_full, stacked, need_masked, need_full):
    """The (B, T, V) gradient buffers, in the logits' dtype: positions that are not graded keep exact zeros.
    Halves of one stacked tensor share one buffer: returning two halves would make autograd concatenate them
    (two more logits tensors at the step's peak)."""
    grad_masked = torch.zeros_like(logits_masked) if need_masked else None
    if stacked:
        return grad_masked, grad_masked
    return grad_masked, torch.zeros_like(logits_full) if need_full else None


def _scaled_saved_grads(ctx, grad_loss):
    """The saved gradients times grad_loss (1 unless the loss was scaled, e.g. by a GradScaler)."""
    grads = ctx.saved_tensors
    if ctx.applied_scale is None:
        # in place: a scaled copy is one more logits tensor at the peak, and testing grad_loss == 1 first would
        # make the host wait for the device. .data keeps autograd's saved-tensor version check quiet, so that a
        # retained graph can run backward again, rescaling from this scale.
        for g in grads:
            if g is not None:
                g.data.mul_(grad_loss)
        ctx.applied_scale = grad_loss
        return grads
    # a retained graph's next backward (gradcheck's): off the hot path, so a copy and a sync are fine
    if ctx.applied_scale.item() == 0:
        raise RuntimeError("backward again through a retained ReMask loss graph whose first backward had "
                           "grad_loss 0: that one scaled the saved logits gradients to zero in place")
    return [None if g is None else g * (grad_loss / ctx.applied_scale) for g in grads]


def _stacked_halves(a, b):
    """The (2B, T, V) tensor whose contiguous first and second halves a and b are, as logits.chunk(2) of a 2B
    forward gives; else None. One tensor in, one gradient out: no concatenation of two halves' gradients."""
    base = a._base
    if base is None or b._base is not base or not base.is_contiguous():
        return None
    if base.shape != (2 * a.shape[0], *a.shape[1:]):
        return None
    if not a.requires_grad == b.requires_grad == base.requires_grad:  # views made leaves: grads of their own
        return None
    for half, view in zip(base.chunk(2), (a, b)):
        if view.stride() != half.stride() or view.storage_offset() != half.storage_offset():
            return None
    return base


def _select_positions(labels, kl_mask, with_kl, device):
    """(batch_idx, pos_idx, targets, on_kl), each (R,) on device: the positions that are labelled or enter D,
    after the shift. Selected where the labels are and copied in one queued transfer: with the labels on the
    host (as the trainer passes them) nonzero and the checks cost the device no synchronisation."""
    targets = labels[:, 1:].long()  # (B, T-1): what logits[:, t] is graded on
    has_label = targets != IGNORE_INDEX
    if not with_kl:
        on_kl = torch.zeros_like(has_label)
    else:
        on_kl = has_label if kl_mask is None else kl_mask[:, 1:].to(labels.device)  # (B, T-1)
    batch_idx, pos_idx = (has_label | on_kl).nonzero(as_tuple=True)  # (R,), (R,)
    selected = torch.stack([batch_idx, pos_idx, targets[batch_idx, pos_idx], on_kl[batch_idx, pos_idx].long()])
    return to_device(selected, device)  # (4, R)


def to_device(tensor, device):
    """tensor on device; a host tensor goes through pinned memory, so the copy is queued and the host does not
    wait for the device (CUDA may synchronise a copy from pageable memory)."""
    if tensor.device == device or device.type != "cuda":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)

# ----------------------------------------------------------------------------- objective: input checks


def _check_inputs(logits_masked, logits_full, labels, kl_mask, chunk_tokens, names):
    """ValueError naming the argument for anything the objective cannot take; returns the chunk size."""
    _check_logits(names[0], logits_masked)
    if logits_full is not None:
        _check_logits(names[1], logits_full, logits_masked, names[0])
    _check_aligned("labels", labels, logits_masked, names[0])
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    vocab = logits_masked.shape[-1]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"labels{where} = {labels[tuple(where)].item()} is outside 0..{vocab - 1} "
                         f"(the vocabulary of {names[0]}) and is not the ignore index {IGNORE_INDEX}")
    if kl_mask is not None:
        _check_aligned("kl_mask", kl_mask, logits_masked, names[0])
        if kl_mask.dtype != torch.bool:
            raise ValueError(f"kl_mask must be a bool tensor, got {kl_mask.dtype}")
    if chunk_tokens is None:
        return max(1, CHUNK_ELEMENTS // vocab)
    if not (isinstance(chunk_tokens, int) and chunk_tokens > 0):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return chunk_tokens


def _check_logits(name, logits, like=None, like_name=None):
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() != 3:
        what = f"{logits.dtype} {tuple(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{name} must be a floating-point tensor [B, T, V], got {what}")
    if like is not None and (logits.shape != like.shape or logits.device != like.device):
        raise ValueError(f"{name} {tuple(logits.shape)} on {logits.device} does not match "
                         f"{like_name} {tuple(like.shape)} on {like.device}")


def _check_aligned(name, tensor, logits, logits_name):
    if (not torch.is_tensor(tensor) or tensor.shape != logits.shape[:2]
            or tensor.device not in (logits.device, torch.device("cpu"))):
        what = f"{tuple(tensor.shape)} on {tensor.device}" if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be [B, T] = {tuple(logits.shape[:2])} on {logits.device} (or the CPU) "
                         f"like {logits_name}, got {what}")


def _count(name, value, measured, device, dtype):
    """A normaliser as a 0-dim tensor: the given count (an optimizer step's total) or the batch's own."""
    if value is None:
        value = measured
    elif not torch.is_tensor(value) and not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f"{name} must be a count >= 0 (int, float or 0-dim tensor), got {value!r}")
    # a step without any labelled position has zero sums, so dividing them by 1 gives 0, never NaN
    return torch.as_tensor(value, dtype=dtype, device=device).clamp(min=1)

# ----------------------------------------------------------------------------- Lilith optimizer
# The optimizer of the ReMask recipe, as euclaise wrote it: supertrainer2000, src/supertrainer2k/optim/lilith.py
# at its final commit 8da52ce. tests/fixtures/lilith holds trajectories made by that code.


def _state_dtype(param):
    # bf16 state drifts (v_avg 15% off in 1000 steps: README, Public API), so fp32 state for 16-bit parameters
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


class Lilith(torch.optim.Optimizer):
    """Lilith (euclaise, supertrainer2000 lilith.py at commit 8da52ce), the optimizer of the ReMask recipe.

    Per tensor p with gradient g, step t counted from 1 per tensor, norms over the whole tensor:

        if sum(g.shape) > 1:  g *= max(||p|| / max(||g||, g_norm_min), ratio_min)    (rescales p.grad in place)
        m1_prev = m1
        m1 = beta1_m * (m1 + m2) + (1 - beta1_m) * g
        m2 = beta2_m * m2 + (1 - beta2_m) * (m1 - m1_prev)
        u  = m1 + acceleration * m2
        v  = beta_v * v + (1 - beta_v) * u^2
        u  = u / sqrt(v / (1 - beta_v^t) + eps)
        p  = p - lr * (u + weight_decay * p)
        if ema_k > 0:  ema = ema_beta * ema + (1 - ema_beta) * p;  every ema_k-th step p = ema   (ema starts as p)

    This is the final original code (commit 8da52ce, "EMA beta was inverted": ema.lerp_(p, 1 - ema_beta);
    earlier versions weighted p by ema_beta). The original's quirks are kept: the trust-ratio test is
    sum(shape) > 1, so shape (1,) and scalars skip it while (1, 1) does not; the rescaled gradient is left in
    p.grad.

    How it differs from AdamW: the gradient is first rescaled to the parameter's norm (a LARS/LAMB-like trust
    ratio, so every tensor moves by about the same relative amount); the first moment is a two-level momentum
    (m2 tracks the change of m1 and is fed back into it, an "acceleration" like Nesterov's); the second moment
    is taken of that momentum u rather than of the raw gradient, with bias correction on v only and eps inside
    the square root; weight decay is decoupled as in AdamW (lr * weight_decay * p).

    Memory: three state tensors per parameter (m1, m2, v; AdamW has two) plus a fourth (ema) when ema_k > 0:
    for StableLM-3B's 2.80e9 parameters that is 33.5 GB of fp32 state (AdamW: 22.4 GB).

    State precision: the original keeps state in the gradient's dtype; here bf16/fp16 parameters get fp32 state
    and other parameters keep their own dtype, so fp32 parameters run the original's arithmetic op for op. bf16
    state drifts, and bf16 parameters cannot take the recipe's lr-1e-5 steps at all (under half a bf16 ulp of a
    0.02 weight): train with fp32 master weights, as the recipe does (measured: README, Public API).
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
        if sum(p.grad.shape) > 1:  # a DTensor's shape is the whole tensor's
            p_norm, g_norm = whole_norm(p, dtype), whole_norm(p.grad, dtype)
            p.grad.mul_((p_norm / g_norm.clamp(min=group["g_norm_min"])).clamp(min=group["ratio_min"]))
        g = p.grad.to(dtype)
        # the original's sequence of in-place lerps, so that fp32 results round as the original's do
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
            state["ema"].lerp_(p.to(dtype), 1 - group["ema_beta"])
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
# The learning rate of the recipe: the one-cycle policy (Smith & Topin, arXiv 1708.07120) with cosine
# annealing, as torch.optim.lr_scheduler.OneCycleLR computes it (torch 2.13, torch/optim/lr_scheduler.py).


def one_cycle_lr(step: int, total_steps: int, max_lr: float, pct_start: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4) -> float:
    """The learning rate of optimizer step `step` (from 0) under a one-cycle cosine schedule.

    Equals torch.optim.lr_scheduler.OneCycleLR(anneal_strategy="cos", cycle_momentum=False, three_phase=False)
    after `step` scheduler steps: a cosine rise from max_lr / div_factor to max_lr until step pct_start * N - 1,
    then a cosine fall to max_lr / div_factor / final_div_factor at step N - 1. A pure function, so a resumed
    run needs no scheduler state. (Lilith has no momentum or betas for OneCycleLR's cycle_momentum to move.)
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

# ----------------------------------------------------------------------------- training configuration
PASSES = {"remask": 2, "masked-thought": 1, "sft": 1}  # forward passes per example (for the FLOP count)
PARTS = {"remask": ("ce_masked", "ce_full", "kl"), "masked-thought": ("ce_masked",), "sft": ("ce_full",)}
PRECISIONS = ("auto", "bf16", "fp32")  # --precision: auto is bf16 on CUDA, fp32 elsewhere


class Valid(NamedTuple):
    """The values a numeric flag accepts: holds(value) is true for them, `says` names them in the error."""
    holds: Callable
    says: str


def at_least(low) -> Valid:
    return Valid(lambda value: value >= low, f">= {low}")


PROBABILITY = Valid(lambda value: 0 <= value <= 1, "a probability in [0, 1]")


def _option(default, help, valid: Optional[Valid] = None, **argparse_extra):
    """A dataclass field whose help text becomes its --flag's help and whose `valid` its check: the dataclass is
    the one source of truth."""
    return field(default=default, metadata={"help": help, "valid": valid, **argparse_extra})


@dataclass
class TrainConfig:
    """One training run. Defaults are the ReMask-3B card's recipe; every field is a --flag of `remask.py train`."""
    model: str = _option("", "Hugging Face StableLM directory (with tokenizer.json) to fine-tune; empty: a fresh "
                             "--arch model with the embedded tokenizer")
    data: str = _option("", "training data, a mixture spec 'a.jsonl,b.jsonl:1000' (':N' samples N rows); empty: the "
                            "embedded addition task")
    eval_data: str = _option("", "held-out data of any schema (a mixture spec) for the held-out metrics, instead of "
                                 "--n-eval rows held out of --data")
    out: str = _option("runs/remask", "output directory: checkpoints/, model/ (final Hugging Face directory), "
                                      "train.log, metrics.jsonl, loss.svg")
    mode: str = _option("remask", "remask (masked + full pass, CE average + KL), masked-thought (masked pass only) "
                                  "or sft (full pass only)", choices=MODES)
    seq_len: int = _option(256, "examples longer than this many tokens are dropped (or cut, --truncate)",
                           at_least(1))
    micro_batch: int = _option(16, "sequences per forward pass (remask runs 2x as many rows: masked + full)",
                               at_least(1))
    global_batch: int = _option(256, "sequences per optimizer step over all ranks; gradient accumulation = "
                                     "global / (micro x ranks)", at_least(1))
    epochs: int = _option(6, "passes over the training data", at_least(1))
    max_steps: int = _option(0, "optimizer steps in all (the schedule spans them); 0: epochs x steps per epoch",
                             at_least(0))
    lr: float = _option(1e-5, "peak learning rate of Lilith's one-cycle cosine schedule",
                        Valid(lambda lr: lr > 0, "> 0"))  # 0 would train nothing
    pct_start: float = _option(0.3, "fraction of the steps spent rising to --lr", Valid(lambda pct: 0 <= pct < 1,
                                                                                          "in [0, 1)"))
    weight_decay: float = _option(0.01, "Lilith's decoupled weight decay", at_least(0))
    kl_weight: float = _option(0.1, "weight of the symmetric KL between the masked and the full pass (remask)",
                               at_least(0))
    input_mask: float = _option(MaskConfig.input_mask, "probability that a response/rationale input token is "
                                                       "masked", PROBABILITY)
    label_mask: float = _option(MaskConfig.label_mask, "probability that a rationale label is dropped (CoT "
                                                       "examples, not sft)", PROBABILITY)
    answer_only: float = _option(MaskConfig.answer_only, "probability that all rationale labels of a CoT example "
                                                         "are dropped (not sft)", PROBABILITY)
    mask_with: str = _option(MaskConfig.mask_with, "masked inputs become <|mask|> (mask) or a random token (random, "
                                                   "as Masked Thought)", choices=("mask", "random"))
    seed: int = _option(0, "seed of the data order, the masks, the embedded data and a fresh model's weights",
                        at_least(0))
    skip_bad: bool = _option(False, "skip (and count) data rows that fail to parse instead of stopping")
    truncate: bool = _option(False, "cut examples longer than --seq-len instead of dropping them")
    group_by_length: bool = _option(True, "sort each step's examples by length before cutting micro-batches: "
                                          "less padding, the same examples per step")
    arch: str = _option("debug", "model.py config of a fresh model (no --model); its vocabulary grows to the "
                                 "tokenizer's", choices=tuple(CONFIGS))
    digits: int = _option(3, "embedded task: digits of each operand of the additions", Valid(lambda d: 1 <= d <= 12,
                                                                                            "in [1, 12]"))
    n_train: int = _option(20000, "embedded task: training examples (generated in memory, so at most a million)",
                           Valid(lambda n: 1 <= n <= 10**6, "in [1, 1000000]"))
    n_eval: int = _option(0, "held-out problems for greedy exact match after training: the embedded task's own, "
                             "or CoT rows held out of --data (0: no evaluation)", at_least(0))
    device: str = _option("auto", "cpu, cuda, cuda:1 ...; auto: the GPU if there is one (under torchrun: the "
                                  "local rank's)")
    parallel: str = _option("ddp", "under torchrun: ddp (a full replica per rank) or fsdp (weights, gradients and "
                                   "Lilith's state sharded across ranks, FSDP2)", choices=("ddp", "fsdp"))
    offload: str = _option("none", "cpu: with --parallel fsdp on GPUs (one included), the fp32 weights and gradients "
                                   "live in pinned host memory, Lilith's state in host memory, and Lilith steps on "
                                   "the CPU; each block's weights visit the GPU only while it computes (FSDP2's "
                                   "CPUOffloadPolicy)", choices=("none", "cpu"))
    precision: str = _option("auto", "bf16: bf16 autocast over fp32 master weights (Lilith state fp32); fp32; "
                                     "auto: bf16 on CUDA, fp32 elsewhere (CPU bf16 is slow)",
                             choices=PRECISIONS)
    compile: bool = _option(False, "torch.compile the model (worth it on a GPU; the first steps compile)")
    grad_checkpointing: bool = _option(False, "recompute each block in backward: far less activation memory for "
                                              "~1/3 more compute")
    reduce_every_micro_batch: bool = _option(False, "under torchrun: reduce(-scatter) the gradients after every "
                                                    "micro-batch, not once a step: no whole fp32 gradient per rank "
                                                    "with --parallel fsdp (what fits the 12B), more communication")
    threads: int = _option(0, "CPU threads per process; 0: the cores shared among this machine's ranks",
                           at_least(0))
    log_every: int = _option(1, "optimizer steps per log line; the loop syncs with the device only there and at "
                                "checkpoints", at_least(1))
    save_every: int = _option(100, "optimizer steps between checkpoints (0: only at the end)", at_least(0))
    keep: int = _option(2, "checkpoints kept; older ones are deleted", at_least(1))
    stop_at: int = _option(0, "stop with a checkpoint after this optimizer step, the schedule still spanning "
                              "the whole run (0: run to the end)", at_least(0))
    resume: bool = _option(False, "continue exactly from the last checkpoint in --out")
    overwrite: bool = _option(False, "start over in an --out that holds checkpoints (they are deleted)")

    def __post_init__(self):
        for f in fields(self):  # every flag's own check, so that the error names it
            value, flag, valid = getattr(self, f.name), f"--{_flag(f.name)}", f.metadata["valid"]
            if f.type is float and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
            if valid is not None and not valid.holds(value):
                raise ValueError(f"{flag} must be {valid.says}, got {value}")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"{flag} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite starts it over: pass one of them")
        if self.eval_data and not self.data:
            raise ValueError("--eval-data needs --data (the embedded task holds out problems of its own)")
        if self.eval_data and self.n_eval:
            raise ValueError("--n-eval holds rows of --data out for evaluation, --eval-data evaluates on its own "
                             "file: pass one of them")

    def mask_config(self) -> MaskConfig:
        return MaskConfig(self.mode, self.input_mask, self.label_mask, self.answer_only, self.mask_with)


def _flag(name):
    return name.replace("_", "-")


# The embedded demo's preset, applied when neither --model nor --data is given (flags given explicitly win).
# Measured on a 2-core CPU (README): a 4-layer 128-wide StableLM (0.92M parameters) trained with ReMask on 2-digit
# additions whose rationales spell out every column and carry, 700 steps of 32 examples, reaches ~100% held-out
# exact match from 0% in 3 to 7 minutes. A fresh tiny model needs a far larger learning rate than the card's
# 1e-5 for a pretrained 3B one; with Lilith 1e-3 learned faster than 3e-3 (2 digits, 500 steps: 38% vs 2%).
DEMO = dict(out="runs/demo", seq_len=128, micro_batch=32, global_batch=32, epochs=1, n_train=22400, lr=1e-3,
            digits=2, n_eval=200, log_every=50, save_every=250)


# Fields that may differ on --resume: they change how the run executes, not what it computes (micro_batch
# changes the order of float sums only; offload where the same state lives and Lilith steps; n_eval and eval_data
# only the evaluation at the end; model and data are paths, spelt any way: the checkpoint holds the weights, and its
# data fingerprint the examples, token for token).
RUNTIME_FIELDS = {"out", "device", "compile", "grad_checkpointing", "reduce_every_micro_batch", "threads", "log_every",
                  "save_every", "keep", "stop_at", "resume", "overwrite", "micro_batch", "n_eval", "eval_data",
                  "model", "data", "offload"}


class TrainError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


def error_line(e: BaseException) -> str:
    """The one line a user sees for an expected failure; an OS error names its file and its cause."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"error: {e.filename}: {e.strerror}"
    return f"error: {e}"

# ----------------------------------------------------------------------------- one training step


def step_counts(batches, device) -> torch.Tensor:
    """(2,) float: the step's label tokens and KL positions (after the shift), counted on the host from the
    collated micro-batches, so that each micro-batch's loss is normalised by the whole step's count."""
    labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    kl = sum(int(b["kl_mask"][:, 1:].sum()) for b in batches)
    return to_device(torch.tensor([labels, kl], dtype=torch.float32), device)


def micro_step_loss(model, batch, mode, kl_weight, counts, device, autocast) -> tuple:
    """Forward one collated micro-batch: (loss to backpropagate, (3,) detached ce_masked, ce_full, kl), both
    normalised by the step's counts. Only the model runs under autocast: the loss does its own fp32 math."""
    labels = batch["labels"]  # (B, T) stays on the host: the loss selects its positions there, without a sync
    if mode == "remask":
        ids = torch.cat([to_device(batch[k], device) for k in ("masked_ids", "input_ids")])  # (2B, T)
        with autocast:
            logits = model(ids)  # (2B, T, V): both passes in one forward (StableLM has no dropout: same math)
        parts = remask_loss_parts(*logits.chunk(2), labels, kl_weight, kl_mask=batch["kl_mask"], num_tokens=counts[0],
                                  num_kl_positions=counts[1])
        return parts.loss, torch.stack([parts.ce_masked, parts.ce_full, parts.kl])
    ids = to_device(batch["input_ids" if mode == "sft" else "masked_ids"], device)  # (B, T)
    with autocast:
        logits = model(ids)  # (B, T, V)
    loss = cross_entropy(logits, labels, num_tokens=counts[0])
    zero = torch.zeros((), device=device)
    ce = loss.detach()
    return loss, torch.stack([ce, zero, zero] if mode == "masked-thought" else [zero, ce, zero])


def accumulate_gradients(runner, batches, mode, kl_weight, device, autocast, wrapper=None, world=1,
                         reduce_every_micro_batch=False) -> tuple:
    """Forward and backward every micro-batch of one optimizer step into .grad: (the step's loss, (3,) its parts),
    on the device; wrapper: the DDP or FSDP2 module whose gradient sync waits for the last micro-batch (unless
    reduce_every_micro_batch). Nothing is read back from the device (tests/test_train.py runs this on the meta
    device, where any read fails): the host runs ahead and the GPU never waits for it."""
    counts = step_counts(batches, device)
    if world > 1:
        dist.all_reduce(counts)  # the global step's counts: every rank normalises alike
    loss_sum, part_sums = torch.zeros((), device=device), torch.zeros(3, device=device)
    for i, batch in enumerate(batches):
        # all-reduce (reduce-scatter) gradients once, after the last; until then each rank accumulates them whole
        sync = wrapper is None or reduce_every_micro_batch or i == len(batches) - 1
        if is_sharded(wrapper):
            wrapper.set_requires_gradient_sync(sync)
        with nullcontext() if sync or is_sharded(wrapper) else wrapper.no_sync():
            loss, parts = micro_step_loss(runner, batch, mode, kl_weight, counts, device, autocast)
            (loss * world if world > 1 else loss).backward()  # DDP/FSDP average over ranks; losses are global already
        loss_sum += loss.detach()
        part_sums += parts
    return loss_sum, part_sums

# ----------------------------------------------------------------------------- the training loop


def train(cfg: TrainConfig, log=print, evaluate_untrained=True) -> dict:
    """Run (or resume) one training run; returns its summary (also printed). Under torchrun every rank calls it."""
    owns_group = not dist.is_initialized()  # a process group the caller started is the caller's to end
    ranks, device = init_distributed(cfg.device)
    run_log = RunLog(log, ranks.rank == 0)
    try:
        with _StopOnSignal(run_log) as stopper, ExitStack() as held:
            run = start_run(cfg, ranks, device, run_log, evaluate_untrained, held)
            step, interrupted = training_loop(run, stopper, run_log)
            return end_run(run, step, interrupted, stopper, run_log)
    except (TrainError, DataError, ValueError, OSError) as e:
        run_log.error(e)
        raise
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def training_loop(run, stopper, log) -> tuple:
    """Draw micro-batches -> accumulate gradients -> set lr -> optimizer step -> account, with a log line and a
    checkpoint where asked, until the run's stop step or a signal; returns (the last step, whether interrupted)."""
    cfg, model, optimizer, span = run.cfg, run.model, run.optimizer, run.span
    totals, step, interrupted = Totals.zeros(run.device), span.start_step, False
    stopper.in_loop = True
    try:
        while step < span.stop and not interrupted:
            epoch, in_epoch = divmod(step, len(run.loader))
            batches = run.loader.micro_batches(epoch, in_epoch)
            loss, parts = accumulate_gradients(run.runner, batches, cfg.mode, cfg.kl_weight, run.device, run.autocast,
                                               run.wrapper, run.ranks.world, cfg.reduce_every_micro_batch)
            lr = one_cycle_lr(step, span.total, cfg.lr, cfg.pct_start)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = gradient_norm(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            totals.add(loss, parts, grad_norm, batches, cfg.mode, model.flops_per_token)

            log_step, save_step, sync = sync_now(step, span.stop, cfg, stopper, run.ranks.world)
            if not sync:
                continue  # the host runs ahead: nothing is read back from the device between sync steps
            seen = read_back(totals, model, stopper.requested, run.ranks.world)
            check_finite(seen, totals.steps, step, run.last_saved)
            interrupted = seen["interrupted"]
            if log_step or interrupted:
                log_metrics(run, run_metrics(seen, totals, step, epoch, lr, span, run.peak_flops, run.device,
                                             cfg.mode), log)
                totals = Totals.zeros(run.device)
            if save_step or interrupted or step == span.stop:
                run.last_saved = save(run, step)
                log(f"saved {run.last_saved}")
    except torch.OutOfMemoryError:
        raise TrainError(out_of_memory(run, step)) from None
    finally:
        stopper.in_loop = False
    return step, interrupted


@dataclass
class Run:
    """One run as set-up hands it to the loop: what it trains, with what, on which data, and where it starts."""
    cfg: TrainConfig
    ranks: "Ranks"
    device: torch.device
    precision: str  # bf16 or fp32
    autocast: object  # the context the model's forward runs in (bf16 autocast, or nothing)
    tok: Tokenizer
    held_out: list  # CoTRecords evaluated after the run
    fingerprint: dict  # data_fingerprint of the training examples: every checkpoint holds it
    model: StableLM  # fp32 master weights, whole or sharded (FSDP2)
    optimizer: Lilith
    runner: torch.nn.Module  # what the step calls: the model, or DDP of it, maybe compiled
    wrapper: Optional[torch.nn.Module]  # the DDP or FSDP2 module whose gradient sync waits for the last micro-batch
    loader: Loader
    span: "Span"  # the schedule's steps, the step the run stops after, where it starts, and when
    peak_flops: Optional[float]  # of all ranks, for MFU; None on an unknown device
    last_saved: Optional[Path]  # the checkpoint resumed from, then the newest one saved
    history: list  # the metrics of every log line (a resumed run: the checkpoint's run's, up to its step)
    summary: dict  # what train() returns

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes whole files."""
        return self.ranks.rank == 0

    @property
    def sharded(self) -> bool:
        return is_sharded(self.model)

    @property
    def evaluates(self) -> bool:
        """Who evaluates and writes the final model: rank 0, or every rank of a sharded model, in step (its weights
        are gathered from all of them)."""
        return self.main or self.sharded


def start_run(cfg, ranks, device, log, evaluate_untrained, held) -> Run:
    """Set-up: the run directory, the data, the model and optimizer, the position to start from. held: what the run
    holds until it ends (the run directory's lock)."""
    if cfg.model:  # a Hub id becomes its snapshot directory in the Hugging Face cache (downloaded where missing)
        try:
            cfg = replace(cfg, model=str(resolve_model(cfg.model, log)))
        except DataError as e:
            raise TrainError(f"--model {e}") from None
    out, main = Path(cfg.out).expanduser(), ranks.rank == 0
    sharded = sharding(cfg, ranks, device)  # an --offload that cannot run is refused here, before any work
    previous = check_run_directory(cfg)
    if main and out.is_dir():  # one writer at a time, from the first write on (a missing --out: made by the claim)
        held.callback(os.close, lock_run_directory(out))
    if main and previous:
        log.start_file(out / "train.log")  # a resumed run's own log: its errors belong there too
    log(f"remask train {' '.join(f'--{_flag(k)} {v}' for k, v in asdict(cfg).items() if v != '')}")
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // ranks.local_world))
    precision = resolve_precision(cfg.precision, device)
    tok = load_tokenizer_for(cfg, log)
    examples, held_out = load_examples(cfg, tok, log)
    fingerprint = data_fingerprint(examples)  # the data is part of the recipe: a resume must train on the same
    resume_from = find_resume_checkpoint(out, log) if previous else None  # the newest intact checkpoint
    model, optimizer, start_step = model_and_optimizer(cfg, tok, resume_from, fingerprint, device, log, sharded)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise TrainError(f"--seq-len {cfg.seq_len} is longer than the model's context of "
                         f"{model.config.max_position_embeddings} tokens (max_position_embeddings): positions it never "
                         f"learnt; use --seq-len {model.config.max_position_embeddings} or less")
    runner, wrapper = wrap_for_training(model, cfg, ranks, device)
    loader = training_loader(examples, tok, cfg, ranks)
    if main:
        claim_run_directory(cfg, previous, log, held)
    if ranks.world > 1:
        dist.barrier()  # the other ranks write nothing; rank 0 has made --out the run's
    total = cfg.max_steps or len(loader) * cfg.epochs
    log(f"StableLM {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device} "
        f"({precision}), {ranks.world} rank(s), {state_placement(model)}; {len(loader)} steps per epoch, "
        f"{total} steps of {min(cfg.global_batch, len(examples))} sequences, micro-batch {cfg.micro_batch}, mode "
        f"{cfg.mode}; each log line: means over its steps")
    summary = {"out": str(out), "total_steps": total}
    if answerable(held_out) and evaluate_untrained and not previous and (main or sharded):
        summary["accuracy_untrained"] = untrained_accuracy(model, tok, held_out, device, precision, log)
    history = history_until(out / "metrics.jsonl", start_step) if main and previous else []
    peak = peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    span = Span(total, min(cfg.stop_at or total, total), start_step, time.perf_counter())
    return Run(cfg, ranks, device, precision, _autocast(device, precision), tok, held_out, fingerprint, model,
               optimizer, runner, wrapper, loader, span, peak * ranks.world if peak else None, resume_from, history,
               summary)


def end_run(run, step, interrupted, stopper, log) -> dict:
    """The end: stopped early (a signal, --stop-at), or the final model and its evaluation. Returns the summary."""
    summary = run.summary
    summary.update(step=step, checkpoint=str(run.last_saved), seconds=time.perf_counter() - run.span.started,
                   final_loss=run.history[-1]["loss"] if run.history else None)
    if interrupted:
        signum = stopper.signum or signal.SIGINT  # another rank's signal: this one saw none itself
        summary.update(interrupted=True, exit_code=128 + signum)
        log(f"interrupted at step {step}: --resume continues from {run.last_saved}")
    elif step < run.span.total:
        log(f"stopped at step {step} of {run.span.total} (--stop-at): --resume continues")
    elif run.evaluates:
        finish(run, log)
    return summary



# =============================================================================
# Part II. What the loop relies on
# Devices and accounting, loading the model and the data, checkpoints, sharded training, signals and the run log.
# =============================================================================


# ----------------------------------------------------------------------------- devices and accounting

# dense bf16, NVIDIA's data sheets (not the sparse figures)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device, dtype):
    """Dense peak FLOP/s of a known GPU for bf16 work, else None: MFU then prints n/a, never a wrong figure."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gb(device) -> float:
    """Peak allocated GPU memory, or the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a --device flag names (auto: this rank's GPU if there is one, else the CPU), checked to exist."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {name}: not a device remask runs on (cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and device.index is None:  # plain "cuda": this rank's GPU (set_device needs an index)
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available in this torch build or machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TrainError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_precision(name: str, device) -> str:
    """bf16 or fp32 for a --precision flag; auto: bf16 on CUDA, fp32 elsewhere (CPU bf16 is slow)."""
    if name not in PRECISIONS:
        raise TrainError(f"--precision {name}: expected one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def _autocast(device, precision):
    # CPUs take bf16 autocast too: the GPU path (bf16 matmuls, fp32 master weights, bf16 logits) runs in tests
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


@dataclass
class Ranks:
    rank: int = 0  # this process's index among all processes
    world: int = 1  # processes in all (torchrun --nproc_per_node x nodes)
    local_rank: int = 0  # index on this machine: its GPU
    local_world: int = 1  # processes on this machine: they share its CPU cores


def init_distributed(device_name: str) -> tuple:
    """(Ranks, device): torchrun's environment starts torch.distributed (NCCL on GPUs, gloo on CPUs)."""
    env = os.environ
    ranks = Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                  int(env.get("LOCAL_WORLD_SIZE", 1)))
    device = resolve_device(device_name, ranks.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if
                                device.type == "cuda" else None)
    return ranks, device


@dataclass
class Totals:
    """Sums over the steps since the last log line. The device tensors grow without a read-back; a log line shows
    their means over those steps (the grad norm too: the mean of the steps' norms, not the last one)."""
    loss: torch.Tensor
    ce_masked: torch.Tensor
    ce_full: torch.Tensor
    kl: torch.Tensor
    grad_norm: torch.Tensor
    steps: int = 0
    tokens: int = 0  # host counts: the batches' shapes are known without the device
    flops: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, device):
        return cls(*torch.zeros(5, device=device).unbind())

    def add(self, loss, parts, grad_norm, batches, mode, flops_per_token):
        self.loss += loss
        for total, part in zip((self.ce_masked, self.ce_full, self.kl), parts):
            total += part
        self.grad_norm += grad_norm
        self.steps += 1
        for batch in batches:
            B, T = batch["input_ids"].shape
            self.tokens += B * T
            self.flops += PASSES[mode] * B * T * flops_per_token(T)


class Span(NamedTuple):
    """Where a run goes: the schedule's steps, the step it stops after, where it started and when."""
    total: int
    stop: int
    start_step: int
    started: float


def sync_now(step, stop, cfg, stopper, world) -> tuple:
    """Does this step read back from the device? (log, save): a log step (--log-every, the last step), a checkpoint
    step (--save-every), and a stop signal: one process honours it at once, several agree at such a step."""
    log_step = step % cfg.log_every == 0 or step == stop
    save_step = bool(cfg.save_every) and step % cfg.save_every == 0
    return log_step, save_step, log_step or save_step or (stopper.requested and world == 1)


def read_back(totals, model, stop_requested, world) -> dict:
    """The loop's one read-back: the sums since the last log line over all ranks, whether any rank was signalled,
    and whether every weight is finite (non-finite weights must never become "the last good checkpoint")."""
    finite = torch.stack([local(p).isfinite().all() for p in model.parameters()]).all()  # all-reduced below
    device_sums = torch.stack([totals.loss, totals.ce_masked, totals.ce_full, totals.kl, totals.grad_norm])
    host_sums = torch.tensor([totals.tokens, totals.flops, stop_requested], dtype=torch.float32,
                             device=device_sums.device)
    values = torch.cat([device_sums, host_sums, (~finite).float()[None].to(device_sums.device)])  # offload: host
    if world > 1:
        dist.all_reduce(values)
    loss, ce_masked, ce_full, kl, grad_norm, tokens, flops, signalled, not_finite = values.tolist()
    # the losses are global already (normalised by the whole step's counts); the grad norm is every rank's
    return dict(loss=loss, ce_masked=ce_masked, ce_full=ce_full, kl=kl, grad_norm=grad_norm / world, tokens=tokens,
                flops=flops, interrupted=signalled > 0, finite=not_finite == 0)


def gradient_norm(model) -> torch.Tensor:
    """The 2-norm of the whole gradient (sharded: over every rank's slices, the same on every rank)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if is_dtensor(norm) else norm


def check_finite(seen, steps, step, last_saved):
    if math.isfinite(seen["loss"]) and seen["finite"]:
        return
    where = f"last good checkpoint: {last_saved}" if last_saved else "no checkpoint was saved yet"
    what = f"loss is {seen['loss'] / steps}" if not math.isfinite(seen["loss"]) else "the weights are not finite"
    raise TrainError(f"{what} at step {step} (or in the {steps} steps before it); stopping. {where}. A lower --lr "
                     f"needs a fresh start (--overwrite, or another --out): --resume keeps the recipe, --lr included")


def out_of_memory(run, step) -> str:
    """What to change when the GPU runs out of memory during the loop; --offload cpu where the plan says it fits."""
    cfg = run.cfg
    return (f"out of GPU memory at step {step} with --micro-batch {cfg.micro_batch} (peak "
            f"{peak_memory_gb(run.device):.1f} GB): use --micro-batch {max(cfg.micro_batch // 2, 1)} (gradient "
            f"accumulation grows, the step stays the same) and/or --grad-checkpointing"
            + offload_advice(cfg, run.model.config, run.device, run.ranks, run.precision))


def run_metrics(seen, totals, step, epoch, lr, span, peak_flops_all, device, mode) -> dict:
    """A log line's metrics: the means over the steps since the last line, speed, memory and time left."""
    now = time.perf_counter()
    per_step = {name: seen[name] / totals.steps for name in ("loss", *PARTS[mode], "grad_norm")}
    seconds = now - totals.started
    return {"step": step, "total_steps": span.total, "epoch": epoch, "loss": per_step["loss"],
            **{name: per_step[name] for name in PARTS[mode]}, "lr": lr, "grad_norm": per_step["grad_norm"],
            "tokens_per_s": seen["tokens"] / seconds,
            "mfu": seen["flops"] / seconds / peak_flops_all if peak_flops_all else None,
            "peak_mem_gb": peak_memory_gb(device), "elapsed_s": now - span.started,
            "eta_s": (now - span.started) / (step - span.start_step) * (span.stop - step)}

# ----------------------------------------------------------------------------- loading the model and the data


def load_model(cfg: TrainConfig, tok, log) -> StableLM:
    """A --model checkpoint as fp32 master weights (vocabulary grown if the tokenizer needs more rows), or a
    fresh --arch model seeded by --seed. Lilith cannot move bf16 weights by lr 1e-5 steps (see Lilith)."""
    if not cfg.model:
        config = replace(Config.named(cfg.arch), vocab_size=round_up(len(tok), 64), eos_token_id=tok.eos_id,
                         bos_token_id=tok.eos_id)
        torch.manual_seed(cfg.seed)
        return StableLM(config)
    path = Path(cfg.model).expanduser()
    try:
        if Config.from_json(path / "config.json").quantization_config is not None:
            raise TrainError(f"--model {path} is an 8-bit (LLM.int8) checkpoint: its int8 weights cannot be "
                             f"trained; write a float copy with `python quantize.py --dequantize IN OUT` and train "
                             f"that")
        model = StableLM.from_pretrained(path, dtype=torch.float32)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(f"--model {path}: {e}") from None
    eos = model.config.eos_token_id
    if eos is not None and tok.eos_id not in (eos if isinstance(eos, list) else [eos]):
        raise TrainError(f"--model {path}: tokenizer.json's <|endoftext|> is id {tok.eos_id} but config.json's "
                         f"eos_token_id is {eos}: the tokenizer does not belong to this model")
    if len(tok) > model.config.vocab_size:
        rows = round_up(len(tok), 64)
        log(f"growing the vocabulary from {model.config.vocab_size} to {rows} rows: the tokenizer needs {len(tok)} "
            f"(new rows start as the mean of the old ones)")
        model.resize_vocab(rows)
    return model


def load_tokenizer_for(cfg: TrainConfig, log) -> Tokenizer:
    if not cfg.model:
        return embedded_tokenizer()
    path = Path(cfg.model).expanduser()
    if not path.is_dir():
        raise TrainError(f"--model {path}: not a directory (expected a Hugging Face model directory with "
                         f"config.json, model.safetensors and tokenizer.json)")
    tok = load_tokenizer(path)
    if tok.added_tags:
        log(f"added to the tokenizer: {' '.join(tok.added_tags)} ({len(tok)} embedding rows needed)")
    return tok


def load_examples(cfg: TrainConfig, tok, log) -> tuple:
    """(training examples, held-out records). Embedded: generated from --seed with their own held-out set;
    --data: --n-eval CoT rows drawn with the seed are held out of training, or --eval-data is read."""
    if cfg.data:
        records = read_mixture(cfg.data, cfg.seed, cfg.skip_bad, log)
        if cfg.eval_data:
            held_out = read_eval_set(cfg.eval_data, tok, cfg.seq_len, cfg.seed, cfg.skip_bad, log)
            log(describe_overlap(overlap(records, held_out), len(held_out)))
        else:
            cot = [i for i, r in enumerate(records) if isinstance(r, CoTRecord)]
            if cfg.n_eval > len(cot):
                raise TrainError(f"--n-eval {cfg.n_eval}: --data holds only {len(cot)} chain-of-thought rows to hold "
                                 f"out")
            held = set(random.Random(f"held-out:{cfg.seed}").sample(cot, cfg.n_eval))
            held_out = [records[i] for i in sorted(held)]
            records = [r for i, r in enumerate(records) if i not in held]
    else:
        records, held_out, _ = embedded_dataset(cfg.seed, cfg.n_train, cfg.n_eval, cfg.digits)
    examples, dropped = fit_length(encode_many(records, tok), cfg.seq_len, cfg.truncate)
    log(f"training {describe_fit(len(examples), dropped, cfg.seq_len, cfg.truncate)}; held out: "
        f"{held_out_name(cfg, held_out)}")
    if not examples:
        raise TrainError(f"no training examples left (--seq-len {cfg.seq_len})")
    if cfg.global_batch > len(examples):  # clamped, not refused: a small data set is legitimate, a false log not
        log(f"warning: --global-batch {cfg.global_batch} is larger than the {len(examples)} training examples: "
            f"each step takes all {len(examples)} (one step per epoch)")
    return examples, held_out


def held_out_name(cfg, held_out) -> str:
    """Which held-out set a run evaluates on, as the log and metrics.jsonl name it."""
    if cfg.eval_data:
        return f"--eval-data {cfg.eval_data} ({len(held_out)} records)"
    if cfg.data:
        return f"{len(held_out)} chain-of-thought rows of --data (drawn with --seed {cfg.seed})"
    return f"the embedded task's {len(held_out)} problems"


def model_and_optimizer(cfg, tok, resume_from, fingerprint, device, log, sharded=False) -> tuple:
    """(model, Lilith, first step): from a verified checkpoint (with its RNG states), or fresh; sharded: the model
    is sharded over all ranks (--parallel fsdp), else whole."""
    precision = resolve_precision(cfg.precision, device)
    if resume_from is None:
        model = load_model(cfg, tok, log)
        model = (shard_model(model, device, precision, cfg.offload == "cpu") if sharded else model).to(device).train()
        return model, Lilith(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay), 0
    model, state = load_checkpoint(resume_from, cfg, device, fingerprint, sharded)
    if len(tok) > model.config.vocab_size:
        raise TrainError(f"--resume: {resume_from} has {model.config.vocab_size} vocabulary rows, the tokenizer "
                         f"needs {len(tok)}")
    model.to(device).train()
    optimizer = Lilith(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if sharded:
        load_sharded(resume_from, model, optimizer)
    else:
        optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"])
    log(f"resumed from {resume_from} at step {state['step']}")
    return model, optimizer, state["step"]


def wrap_for_training(model, cfg, ranks, device) -> tuple:
    """(runner, wrapper): what the step calls (DDP over ranks, then torch.compile) and the DDP or FSDP2 module
    whose gradient sync accumulate_gradients defers, or None."""
    model.gradient_checkpointing = cfg.grad_checkpointing
    if is_sharded(model):
        wrapper = runner = model  # sharded by model_and_optimizer: an FSDP2 model is its own wrapper
    elif ranks.world == 1:
        wrapper, runner = None, model
    else:
        wrapper = runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return (torch.compile(runner) if cfg.compile else runner), wrapper


def training_loader(examples, tok, cfg, ranks) -> Loader:
    """This rank's share of every global batch. Several ranks drop the last partial batch so that all of them run
    the same number of micro-batches (each one's backward joins the gradient all-reduce)."""
    loader = Loader(examples, tok, cfg.mask_config(), cfg.global_batch, cfg.micro_batch, cfg.seed,
                    cfg.group_by_length, ranks.rank, ranks.world, drop_last=ranks.world > 1)
    if len(loader) == 0:
        raise TrainError(f"{len(examples)} examples make no full --global-batch {cfg.global_batch} on "
                         f"{ranks.world} ranks")
    return loader

# ----------------------------------------------------------------------------- checkpoints
# out/checkpoints/step-000120/{model/ (Hugging Face directory, fp32, tokenizer.json), trainer.pt, checksums.json}.
# A checkpoint is filled in a hidden temporary directory and swapped into place when complete (model.write_directory);
# what a kill leaves behind is repaired or removed by the next save or --resume. checksums.json, written last,
# holds the size and CRC-32 of every other file: --resume verifies the newest checkpoint and falls back to the
# newest intact one, so a checkpoint truncated or overwritten since it was written is never trained on. CRC-32
# because it guards against accidents (torn writes, bit rot, stray bytes), not forgery, and costs little next to
# writing the 3B's ~56 GB of state (the README has the cost measured against SHA-256, SHA-1, MD5 and BLAKE2b).

CHECKPOINT = re.compile(r"step-(\d{6,})")
CHECKSUMS = "checksums.json"
SHARDS_METADATA = "shards/.metadata"  # a sharded checkpoint's (torch.distributed.checkpoint) index of the slices
READ_CHUNK = 1 << 24  # bytes per read while checksumming: 16 MiB


def checkpoints(out) -> list:
    """The checkpoints remask wrote in out/checkpoints (their owner records say so), oldest first, intact or not
    (verify_checkpoint tells). Anything else there is not remask's, and left alone."""
    root = Path(out) / "checkpoints"
    found = [p for p in root.iterdir() if CHECKPOINT.fullmatch(p.name) and is_owned(p, "checkpoint")
             ] if root.is_dir() else []
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path) -> int:
    return int(CHECKPOINT.fullmatch(Path(path).name)[1])


def data_fingerprint(examples) -> dict:
    """What the run trains on: the number of encoded examples and a SHA-256 of their ids, roles, targets and kind,
    in order. Kept in every checkpoint: the same --data path may hold other rows by the time of a --resume."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(np.array([len(ex.ids), ex.cot], dtype=np.int64).tobytes())  # where one example ends
        for t in (ex.ids, ex.roles, ex.targets):
            digest.update(t.numpy().tobytes())
    return {"examples": len(examples), "sha256": digest.hexdigest()}


def file_checksum(path) -> dict:
    crc = size = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def write_checksums(directory):
    """Record every file of a filled checkpoint in checksums.json: the last file written, the mark of a whole one."""
    directory = Path(directory)
    files = sorted(f.relative_to(directory).as_posix() for f in directory.rglob("*") if f.is_file())
    record = {"files": {name: file_checksum(directory / name) for name in files if name != CHECKSUMS}}
    (directory / CHECKSUMS).write_text(json.dumps(record, indent=1) + "\n")


def verify_checkpoint(path) -> list:
    """What is wrong with a checkpoint, 'file: what' per damaged file; empty if every file is as it was written."""
    path = Path(path)
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())["files"]
        sizes = {name: int(entry["size"]) for name, entry in recorded.items()}
    except FileNotFoundError:
        return [f"{CHECKSUMS}: missing"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{CHECKSUMS}: unreadable ({type(e).__name__}: {e})"]
    weights = SHARDS_METADATA if SHARDS_METADATA in sizes else "model/config.json"  # sharded or whole
    problems = [f"{name}: not recorded in {CHECKSUMS}" for name in ("trainer.pt", weights) if name not in sizes]
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != size:  # truncation shows without reading the file
            problems.append(f"{name}: {file.stat().st_size} bytes, {size} were written")
        elif file_checksum(file) != recorded[name]:
            problems.append(f"{name}: not the bytes that were written (CRC-32)")
    return problems


def find_resume_checkpoint(out, log) -> Path:
    """The newest intact checkpoint in out. Each newer damaged one is named in one line with what is wrong; if
    none is intact, the refusal lists them all."""
    recover_checkpoints(out)
    damaged = []
    for path in reversed(checkpoints(out)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        damaged.append(f"{path.name}: {'; '.join(problems)}")
        log(f"--resume: skipping the damaged checkpoint {path} ({'; '.join(problems)})")
    if not damaged:
        raise TrainError(f"--resume: no checkpoint in {Path(out) / 'checkpoints'}")
    raise TrainError(f"--resume: no intact checkpoint in {Path(out) / 'checkpoints'}: {' | '.join(damaged)}")


def write_checkpoint(directory, step, model, tok, optimizer, cfg, data):
    """Fill an empty directory with checkpoint `step`: model/, trainer.pt, then checksums.json."""
    directory = Path(directory)
    model.save_pretrained(directory / "model", extra=tok.save)
    write_trainer_state(directory, step, cfg, data, optimizer=optimizer.state_dict())
    write_checksums(directory)


def write_trainer_state(directory, step, cfg, data, **extra):
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
           else [], "numpy": np.random.get_state(), "python": random.getstate()}
    try:
        torch.save({"step": step, "config": asdict(cfg), "data": data, "rng": rng, **extra}, directory / "trainer.pt")
    except RuntimeError as e:  # torch's writer reports a full disk or a file-size limit as a RuntimeError
        raise OSError(f"{directory / 'trainer.pt'}: cannot be written ({str(e).strip().splitlines()[0]})") from None


def is_owned(path, kind) -> bool:
    """Whether `path` is a `kind` directory remask made (model.owner)."""
    return (owner(path) or {}).get("remask") == kind


def recover_checkpoints(out):
    """Put right what killed saves and deletions left in out/checkpoints, where they carry remask's proof
    (model.recover_directory): a whole checkpoint whose swap a kill interrupted goes back in place, half-deleted
    ones go. Before every save, and before a --resume reads."""
    root = Path(out) / "checkpoints"
    for step in sorted({m[1] for p in root.iterdir() if (m := re.match(r"\.(step-\d{6,})\.", p.name))}
                       if root.is_dir() else []):
        recover_directory(root / step)


def save_checkpoint(out, step, model, tok, optimizer, cfg, keep, data) -> Path:
    """Write checkpoint `step` (data: data_fingerprint of the training examples), then keep the newest `keep`.
    Through model.write_directory: at every instant step-N is absent, the old or the new checkpoint, whole."""
    recover_checkpoints(out)
    final = write_directory(Path(out) / "checkpoints" / f"step-{step:06d}",
                            lambda tmp: write_checkpoint(tmp, step, model, tok, optimizer, cfg, data),
                            kind="checkpoint")  # may replace a damaged checkpoint of this step that --resume skipped
    rotate_checkpoints(out, keep, final)
    return final


def save(run, step) -> Path:
    """Checkpoint `step` of a run, whatever its parallelism: a sharded one by every rank together, a whole one by
    rank 0 while the others wait. Returns the checkpoint (the others: the one before)."""
    saved = run.last_saved
    if run.sharded:
        saved = save_sharded_checkpoint(run.out, step, run.model, run.optimizer, run.cfg, run.cfg.keep,
                                        run.fingerprint)
    elif run.main:
        saved = save_checkpoint(run.out, step, run.model, run.tok, run.optimizer, run.cfg, run.cfg.keep,
                                run.fingerprint)
    if run.ranks.world > 1:
        dist.barrier()
    return saved


def rotate_checkpoints(out, keep, newest):
    """Delete all but the keep - 1 checkpoints just before `newest`, the one just written (intact, and never
    deleted). Later steps are damaged leftovers --resume skipped: they are replaced when the run reaches them."""
    older = [p for p in checkpoints(out) if checkpoint_step(p) < checkpoint_step(newest)]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        remove_directory(old, "checkpoint")


def load_checkpoint(path, cfg: TrainConfig, device, data, sharded=False) -> tuple:
    """(model, trainer state) of a verified checkpoint, refusing one whose recipe (naming the field), training
    data (data_fingerprint of this run's examples) or sharding (sharded over all ranks, or whole) differ from this
    run's. A sharded checkpoint's model is a sharded skeleton that load_sharded fills once Lilith is built."""
    path = Path(path)
    shards = dist.get_world_size() if sharded else 0  # what trainer.pt records: the ranks, 0 for a whole model
    try:
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        if state.get("world", 0) == shards:  # otherwise refused below, before any weights load
            model = (sharded_skeleton(Config.from_dict(state["model_config"]), device,
                                      resolve_precision(cfg.precision, device), cfg.offload == "cpu") if shards
                     else StableLM.from_pretrained(path / "model", dtype=torch.float32))
    except Exception as e:  # its files are as written, yet do not load: not a checkpoint this code wrote
        raise TrainError(f"--resume: {path} does not load: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
                         ) from None
    if state.get("world", 0) != shards:  # DCP could reshard, but each rank's share of the data would change
        saved = f"sharded over {state['world']} ranks" if "world" in state else "whole (not sharded)"
        raise TrainError(f"--resume: {path} was saved {saved}; this run has {shards or 'no'} shards: resume with "
                         f"the number of ranks and the --parallel it was saved with")
    saved = state["config"]
    for name, value in asdict(cfg).items():
        if name not in RUNTIME_FIELDS and saved.get(name) != value:
            raise TrainError(f"--resume: {path} was trained with --{_flag(name)} {saved.get(name)!r}, this run asks "
                             f"for {value!r}; a resumed run must keep the recipe (or start a new --out)")
    if state["data"] != data:
        was, now = state["data"]["examples"], data["examples"]
        change = f"{was} examples -> {now}" if was != now else f"same count ({now} examples), different content"
        raise TrainError(f"--resume: the training data changed since {path}: {change}; a resumed run must train on "
                         f"the same data (or start a new --out)")
    return model, state


def restore_rng(rng):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])

# ----------------------------------------------------------------------------- sharded training (FSDP2)
# --parallel fsdp (torch.distributed.fsdp.fully_shard) on several ranks: each block is one unit, the root
# (embeddings, final norm, head) another; every parameter becomes a DTensor of which each rank holds a 1/N slice
# along dim 0. A unit's whole weights are all-gathered just before its forward (and again before its backward) and
# freed after; its gradients are reduce-scattered back into slices. Lilith, built on the sharded parameters, keeps
# its state as slices of the same shape (whole_norm gives it the norms of whole tensors), so weights, gradients and
# state take 1/N of the memory per rank. A sharded checkpoint: step-000120/{shards/ (torch.distributed.checkpoint:
# a .distcp file per rank + .metadata), trainer.pt, checksums.json}, placed as a whole one is (write_directory).
# --offload cpu (FSDP2's CPUOffloadPolicy) moves the slices to pinned host memory: before each all-gather a unit's
# fp32 slice is copied to the GPU and cast to bf16 there, each reduce-scattered fp32 gradient slice is copied back,
# and Lilith, built on host parameters, keeps its state and steps on the CPU. The GPU holds the units in flight,
# the activations and the logits; a single process shards over a group of one rank for it.
# FSDP2 and torch.distributed.checkpoint are imported where a sharded run first needs them: their import takes about
# a second, which every other command would pay at start-up.


def is_dtensor(tensor) -> bool:
    """Whether tensor is a DTensor, a parameter sharded by FSDP2. Only a sharded run imports
    torch.distributed.tensor (about a second of start-up that no other command should pay): before, there is none."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def whole_norm(tensor, dtype):
    """The 2-norm of the whole tensor: of a DTensor over all its shards, not this rank's (a DTensor's norm is a
    partial result; full_tensor() all-reduces it)."""
    norm = torch.linalg.vector_norm(tensor, dtype=dtype)
    return norm.full_tensor() if is_dtensor(norm) else norm


def local(tensor):
    """This rank's slice of a sharded (DTensor) parameter, or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def is_sharded(module) -> bool:
    """Whether fully_shard has made module an FSDP2 module (never before a sharded run imported FSDP2)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def sharding(cfg, ranks, device) -> bool:
    """Whether this run shards its model: --parallel fsdp on several ranks, or in one process with --offload cpu.
    Checked before any work: --offload cpu needs --parallel fsdp and a GPU (FSDP2 pins the host memory it copies
    from, which takes an accelerator: without one fully_shard fails with "Cannot access accelerator device when
    none is available"). A single offloading process starts a process group of one rank, which train() ends."""
    if cfg.offload == "cpu" and cfg.parallel != "fsdp":
        raise TrainError("--offload cpu needs --parallel fsdp: FSDP2 is what keeps the state in host memory (one "
                         "process or several, under torchrun)")
    if cfg.offload == "cpu" and device.type != "cuda":
        why = "--device cpu" if cfg.device != "auto" else "torch.cuda.is_available() is False here"
        raise TrainError(f"--offload cpu needs a GPU: FSDP2's CPU offload copies each block's weights from pinned "
                         f"host memory to an accelerator, and this run is on the CPU ({why}); drop --offload cpu")
    if cfg.parallel != "fsdp" or (ranks.world == 1 and cfg.offload == "none"):
        return False  # one process without offload: nothing to shard
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    return True


def shard_model(model, device, precision, offload=False):
    """Shard model in place over all ranks. bf16: weights all-gathered and used in bf16, gradients reduced in fp32
    into fp32 slices (FSDP2's mixed precision, the same recipe as autocast over fp32 master weights). offload: the
    slices in pinned host memory; Lilith's norms of whole tensors are then all-reduced on the host, so the mesh's
    process group pairs gloo for host tensors with NCCL for GPU ones (a NCCL group has no CPU backend)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    if offload:
        mesh = DeviceMesh.from_group(dist.new_group(backend=f"cpu:gloo,{device.type}:nccl"), device.type)
    else:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    placement = CPUOffloadPolicy(pin_memory=True) if offload else OffloadPolicy()
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=placement)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=placement)  # the root: embeddings, final norm, head
    return model


def sharded_skeleton(config, device, precision, offload=False):
    """A sharded model whose slices are allocated, not filled (load_sharded fills them): no whole copy anywhere."""
    with torch.device("meta"):
        model = StableLM(config)
    return shard_model(model, device, precision, offload).to_empty(device="cpu" if offload else device)


def state_placement(model) -> str:
    """Where this rank's training state lives, for the run's first log line: each fp32 weight with its gradient and
    Lilith's three moments (20 bytes; the moments exist from the first step on)."""
    where = {}
    for p in model.parameters():
        where[local(p).device.type] = where.get(local(p).device.type, 0) + 5 * local(p).numel() * p.element_size()
    return (f"training state (weights, gradients, Lilith's moments) {where.get('cuda', 0) / 1e9:.2f} GB on the GPU "
            f"and {where.get('cpu', 0) / 1e9:.2f} GB in host memory per rank")


def save_sharded_checkpoint(out, step, model, optimizer, cfg, keep, data) -> Path:
    """Checkpoint `step` of a sharded run; a collective. Rank 0 places it through write_directory, as a whole one;
    inside its fill every rank writes its slices into rank 0's temporary directory (several nodes: a shared file
    system), then rank 0 adds trainer.pt and checksums.json (dcp.save returns once every rank's file is written)."""
    import torch.distributed.checkpoint as dcp
    final = Path(out) / "checkpoints" / f"step-{step:06d}"
    state = sharded_state(model, optimizer)
    if dist.get_rank() != 0:
        where = [None]
        dist.broadcast_object_list(where)
        if where[0] is None:
            raise TrainError(f"rank 0 could not start writing {final}")
        dcp.save(state, checkpoint_id=Path(where[0]) / "shards")
        return final
    told = False

    def fill(tmp):
        nonlocal told
        dist.broadcast_object_list([str(tmp)])
        told = True
        dcp.save(state, checkpoint_id=tmp / "shards")
        write_trainer_state(tmp, step, cfg, data, world=dist.get_world_size(), model_config=model.config.to_dict())
        write_checksums(tmp)

    recover_checkpoints(out)
    try:
        write_directory(final, fill, kind="checkpoint")
    except BaseException:
        if not told:  # the other ranks wait for the directory: tell them there is none
            dist.broadcast_object_list([None])
        raise
    rotate_checkpoints(out, keep, final)
    return final


def sharded_state(model, optimizer) -> dict:
    """What a sharded checkpoint holds: this rank's slices of the weights and of Lilith's state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_sharded(path, model, optimizer):
    """Fill the sharded model and Lilith from a verified sharded checkpoint; a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=Path(path) / "shards")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_full_model(model, tok, path):
    """Gather the sharded weights (a collective) and write them once, from rank 0, as a Hugging Face directory in
    the source's dtype. Rank 0 holds the whole model in host memory for it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return
    with torch.device("meta"):
        plain = StableLM(model.config)
    plain.load_state_dict(whole, assign=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.to(getattr(torch, model.config.torch_dtype)).save_pretrained(path, extra=tok.save)


@contextmanager
def gathered_root(model):
    """generate() calls the embeddings and the head directly, not through the model's forward, whose hook would
    all-gather them: gather them here (blocks gather themselves). Every rank must run the same calls in step."""
    if not is_sharded(model):
        yield
        return
    with torch.no_grad():  # FSDP2 sets itself up in the root's first forward: one token, before any block's
        model(torch.zeros(1, 1, dtype=torch.long, device=model.model.norm.weight.device))
    model.unshard()
    try:
        yield
    finally:
        model.reshard()

# ----------------------------------------------------------------------------- sharded training: the memory plan
# What a sharded step needs per rank, on the GPU and (--offload cpu) in host memory, and what offload copies over
# PCIe: tests/bench.py --bench memory prints it for the family, out_of_memory consults it. What autograd saves for
# backward per token, measured by tests/bench.py under bf16 autocast: 44 bytes per unit of width in each block (43.7,
# 44.1 and 44.7 for StableLM-3B, 2-1.6B and 2-12B; 111.8 KB at the 3B's 2560), 6 outside them (the embeddings'
# output, the final norm's and the head's inputs).
SAVED_PER_TOKEN_PER_WIDTH = (44, 6)
USABLE_GPU_MEMORY = 0.95  # of a card's memory: the rest is CUDA's context and the allocator's fragmentation


class ShardedPlan(NamedTuple):
    """Bytes per rank of one optimizer step under --parallel fsdp."""
    gpu: float  # at the step's peak
    host: float  # the state and Lilith's temporaries, with --offload cpu (else 0)
    pinned: float  # of host: the weights and gradients FSDP2 copies from and into (power-of-two blocks)
    to_gpu: float  # host -> GPU per micro-batch: a unit's fp32 slice before each of its all-gathers
    to_host: float  # GPU -> host per reduce-scatter (one a step; every micro-batch with --reduce-every-micro-batch)


def sharded_plan(config, ranks, tokens, offload=False, grad_checkpointing=False, accumulating=True,
                 reduce_every_micro_batch=False, compute_bytes=2, saved=None) -> ShardedPlan:
    """The plan of one micro-batch of `tokens` (rows x sequence length; ReMask runs 2 rows a sequence) on each of
    `ranks` ranks; accumulating: micro-batches before the step's last one (--global-batch > ranks x --micro-batch);
    compute_bytes: 2 under bf16, 4 under fp32; saved: bytes autograd keeps per token in each block and outside the
    blocks (default: SAVED_PER_TOKEN_PER_WIDTH x the width).

    GPU, at the end of a micro-batch's forward: the fp32 state / N (20 bytes a parameter: weights, gradients,
    Lilith's 3 moments; none with offload); the whole fp32 gradient, which FSDP2 accumulates unsharded until the
    step's last micro-batch (with --reduce-every-micro-batch only the root's, held through the backward, and the
    buffer its reduce-scatter copies it into); the gathered root (embeddings, final norm, head: gathered once per
    micro-batch), the running block and the next one FSDP2 prefetches, and the running block's gradient; with
    offload also the prefetched block's fp32 slice copied over and its cast; the activations of one micro-batch
    (--grad-checkpointing: each block's fp32 input, one block's saved tensors); the logits, the loss's gradient
    buffer and its fp32 chunk. Or, if more, at the start of the step's last micro-batch: the gradient so far and the
    root being gathered (with offload, from its fp32 slice copied over and cast). Host, with offload: each weight's
    and each gradient's fp32 slice pinned, in a block rounded up to a power of two (torch's pinned-memory allocator,
    CachingHostAllocator, rounds every block so), Lilith's 3 moments / N, and its temporaries while it steps (5 fp32
    copies of the largest tensor's slice)."""
    with torch.device("meta"):  # the counts of one block and of the root: a one-block model has them all
        model = StableLM(replace(config, num_hidden_layers=1))
    L, C, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - block
    params = root + L * block
    per_layer, rest = saved or [bytes_per_width * C for bytes_per_width in SAVED_PER_TOKEN_PER_WIDTH]
    state = 0 if offload else 20 * params / ranks
    whole_gradient = accumulating and not reduce_every_micro_batch
    gradient = 4 * params if whole_gradient else 2 * 4 * root
    staging = (4 + (compute_bytes if compute_bytes != 4 else 0)) / ranks if offload else 0  # bytes a parameter
    gathered = (root + 2 * block) * compute_bytes + 4 * block + staging * block
    saved_per_token = L * 4 * C + per_layer + rest if grad_checkpointing else L * per_layer + rest
    loss = 2 * tokens * V * compute_bytes + 6 * 4 * CHUNK_ELEMENTS  # ~6 fp32 (chunk, V) buffers live per chunk
    at_forward_end = state + gradient + gathered + tokens * saved_per_token + loss
    at_start = state + (4 * params if whole_gradient else 0) + (compute_bytes + staging) * root
    gpu = max(at_forward_end, at_start)
    if not offload:
        return ShardedPlan(gpu, 0, 0, 0, 0)
    def pinned(p):  # bytes of the pinned block of this rank's fp32 slice (dim 0 split, padded to N rows a rank)
        return 1 << (4 * -(-len(p) // ranks) * (p.numel() // len(p)) - 1).bit_length()

    pinned_per_copy = (sum(pinned(p) for p in model.parameters())
                       + (L - 1) * sum(pinned(p) for p in model.model.layers[0].parameters()))
    largest = max(p.numel() for p in model.parameters())
    host = 2 * pinned_per_copy + 12 * params / ranks + 5 * 4 * largest / ranks  # weights, gradients; Lilith's
    to_gpu = 4 * (root + 2 * L * block) / ranks  # each block for its forward and again for its backward
    return ShardedPlan(gpu, host, 2 * pinned_per_copy, to_gpu, 4 * params / ranks)


def offload_advice(cfg, config, device, ranks, precision) -> str:
    """The flags with --offload cpu under which the plan fits this GPU, as a sentence for out_of_memory ('' if none
    does, or the run offloads already)."""
    if cfg.offload == "cpu" or device.type != "cuda":
        return ""
    card = torch.cuda.get_device_properties(device).total_memory
    tokens = PASSES[cfg.mode] * cfg.micro_batch * cfg.seq_len
    tried = [(cfg.grad_checkpointing, cfg.reduce_every_micro_batch), (True, cfg.reduce_every_micro_batch),
             (True, True)]
    for checkpointing, every_micro_batch in dict.fromkeys(tried):
        plan = sharded_plan(config, ranks.world, tokens, offload=True, grad_checkpointing=checkpointing,
                            accumulating=cfg.global_batch > cfg.micro_batch * ranks.world,
                            reduce_every_micro_batch=every_micro_batch, compute_bytes=2 if precision == "bf16" else 4)
        if plan.gpu < USABLE_GPU_MEMORY * card:
            flags = ["--parallel fsdp --offload cpu"] + [flag for flag, on, was in (
                ("--grad-checkpointing", checkpointing, cfg.grad_checkpointing),
                ("--reduce-every-micro-batch", every_micro_batch, cfg.reduce_every_micro_batch)) if on and not was]
            return (f"; or keep the state in host memory: {' '.join(flags)} (plan per rank: {plan.gpu / 1e9:.1f} GB "
                    f"of this GPU's {card / 1e9:.1f} GB, {plan.host / 1e9:.1f} GB of host memory)")
    return ""


# ----------------------------------------------------------------------------- signals, run directory and run log


class Interrupted(KeyboardInterrupt):
    """A stop signal that quits at once (a second one, or one outside the loop); its exit code is 128 + the
    signal's number, as a shell reports a process that a signal ended."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum

    def __reduce__(self):  # as it was made (a compare worker's interruption reaches the parent pickled)
        return Interrupted, (self.exit_code - 128,)


class _StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and `timeout` send) during the loop: finish the step, save,
    stop. A second signal, or one during set-up or the final save, quits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log):
        self.log, self.signum, self.in_loop, self.previous = log, None, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None or not self.in_loop:
            raise Interrupted(signum)
        self.signum = signum
        self.log(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (a second signal quits "
                 f"without saving)")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# A run directory: what a run writes there, each checked to be absent or the run's own before any work. The run's
# owner record (model.OWNER, kind "run") lists the names it wrote: --overwrite replaces those, never anything else.
RUN_FILES = ("train.log", "metrics.jsonl", "loss.svg")
RUN_DIRECTORIES = {"checkpoints": "checkpoints", "model": "model"}  # name: the kind of its owner record


def run_inputs(cfg) -> dict:
    """What a run reads, by the flag that names it: inputs are never outputs (model.check_apart). Only what exists:
    a missing file, or a directory given as a data file, is refused by its reader, in its own words."""
    reads = {"--model": cfg.model} if cfg.model and Path(cfg.model).expanduser().is_dir() else {}
    for spec_flag, spec in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        reads.update({f"{spec_flag} file {path}": path for path, _ in (mixture_parts(spec) if spec else [])
                      if Path(path).expanduser().is_file()})
    return reads


def lock_run_directory(out) -> int:
    """One writer at a time: an flock on --out, held for the whole run (the kernel releases it if the process dies),
    so a second process on the same --out is refused before it changes anything, and never disturbs the first."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TrainError(f"--out {out}: another remask process is writing this run right now; wait for it to end, "
                         f"or choose another --out") from None
    return fd


def check_run_directory(cfg) -> list:
    """The run directory policy, checked before anything is read or written: every output is absent or this run
    directory's own, none is an input, and an --out holding checkpoints is continued (--resume) or started over
    (--overwrite, replacing only the run's own outputs once it has loaded everything). Returns the checkpoints to
    resume from ([] for a fresh run)."""
    if not cfg.out.strip():
        raise TrainError("--out is empty: give the run's directory (it is never taken to mean the current one)")
    out = Path(cfg.out).expanduser()
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TrainError(f"--out {out}: {blocking} is a file, not a directory")
    existing = next(p for p in (out, *out.parents, Path(".")) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: {existing} is not writable")
    check_apart({f"--out's {name}": out / name for name in (OWNER, *RUN_FILES, *RUN_DIRECTORIES)}, run_inputs(cfg))
    record = owner(out)
    if record is not None and record["remask"] != "run":
        raise TrainError(f"--out {out}: remask's {record['remask']} directory, not a training run's; choose another "
                         f"--out")
    for name in RUN_FILES:
        if ((out / name).exists() or (out / name).is_symlink()) and name not in (record or {}).get("wrote", []):
            raise TrainError(f"--out {out}: {out / name} is not remask's (the run's record {OWNER} does not list it): "
                             f"it is left alone; choose another --out, or move it away")
    for name, kind in RUN_DIRECTORIES.items():
        try:
            check_replaceable(out / name, kind)
        except FileExistsError as e:
            raise TrainError(f"--out {out}: {e}") from None
    previous = checkpoints(out)
    if cfg.resume and not previous:
        raise TrainError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if previous and not cfg.resume and not cfg.overwrite:
        raise TrainError(f"{out / 'checkpoints'} holds checkpoints (latest {previous[-1].name}): pass --resume to "
                         f"continue that run, --overwrite to start over (replacing its outputs), or another --out")
    return previous if cfg.resume else []


def claim_run_directory(cfg, previous, log, held):
    """Rank 0 makes --out this run's (a missing one is made and locked here, held until the run ends): a fresh run
    deletes what the directory's record says an earlier run wrote (an overwritten run's checkpoints among them) and
    records what it writes; train.log starts with the lines logged so far, or a resumed run appends to its own."""
    out = Path(cfg.out).expanduser()
    try:
        if not out.exists():
            make_owned(out, "run", wrote=[])
            held.callback(os.close, lock_run_directory(out))
        record = owner(out) or make_owned(out, "run", wrote=[])
    except OSError as e:
        raise TrainError(f"--out {out}: {e.strerror}") from None
    if not previous:
        for checkpoint in checkpoints(out):  # --overwrite, checked by check_run_directory
            remove_directory(checkpoint, "checkpoint")
        for name in set(RUN_FILES) & set(record["wrote"]):
            (out / name).unlink(missing_ok=True)
    if not (out / "checkpoints").exists():
        make_owned(out / "checkpoints", "checkpoints")
    record["wrote"] = sorted({*record["wrote"], *RUN_FILES, *RUN_DIRECTORIES})
    update_owner(out, record)
    log.start_file(out / "train.log")


class RunLog:
    """Messages on rank 0: printed, and appended to out/train.log once the run owns its directory (the lines
    before that are kept and written first)."""

    def __init__(self, print_fn, main):
        self.print_fn, self.main, self.file, self.pending = print_fn, main, None, []

    def __call__(self, message):
        if self.main:
            self.print_fn(message)
            self._write(message)

    def _write(self, line):
        if self.file is None:
            self.pending.append(line)
        else:
            with open(self.file, "a") as f:
                f.write(line + "\n")

    def start_file(self, path):
        self.file = path
        for line in self.pending:
            self._write(line)
        self.pending = []

    def error(self, e):
        """A failed run's error line, in train.log too once the run owns its directory (main prints it)."""
        if self.main and self.file is not None:
            self._write(error_line(e))


def log_metrics(run, metrics, log):
    """A log line's metrics: kept for the loss curve, and on rank 0 printed and appended to metrics.jsonl."""
    run.history.append(metrics)
    if run.main:
        log(format_metrics(metrics, run.cfg.mode))
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")


def history_until(metrics_file, step) -> list:
    """The metrics a resumed run keeps: the checkpoint's run's log lines up to its step, metrics_file rewritten with
    them. The checkpoints are the truth: a torn or blank line (a kill mid-write) is dropped, never an error."""
    history = []
    for line in metrics_file.read_text(errors="replace").splitlines() if metrics_file.exists() else []:
        try:
            metrics = json.loads(line)
        except ValueError:
            continue
        if isinstance(metrics, dict) and "loss" in metrics and isinstance(metrics.get("step"), int) and \
                metrics["step"] <= step:
            history.append(metrics)
    atomic_write(metrics_file, "".join(json.dumps(m) + "\n" for m in history))
    return history


def _duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def format_metrics(m: dict, mode: str) -> str:
    """A log line: loss, its parts and the grad norm are means over the steps since the previous line."""
    parts = ", ".join(f"{name} {m[name]:.4f}" for name in PARTS[mode])
    mfu = "n/a" if m["mfu"] is None else f"{m['mfu']:.1%}"
    return (f"step {m['step']}/{m['total_steps']} | loss {m['loss']:.4f} ({parts}) | lr {m['lr']:.3e} | "
            f"grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"peak mem {m['peak_mem_gb']:.2f} GB | ETA {_duration(m['eta_s'])}")


PALETTE = ("#c0392b", "#2471a3", "#229954", "#7d3c98", "#b9770e")


class Series(NamedTuple):
    """One line of a chart; low/high (optional) bound a shaded band around it."""
    name: str
    x: list
    y: list
    low: Optional[list] = None
    high: Optional[list] = None


def svg_chart(series, title, x_label, y_label="", y_range=None, width=640, height=360, pad=56) -> str:
    """Lines (with optional bands) against a shared x axis, with labelled axes and a legend, in plain SVG."""
    xs = [x for s in series for x in s.x]
    ys = [y for s in series for part in (s.y, s.low or [], s.high or []) for y in part]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range or (min(ys), max(ys))
    span_x, span_y = max(x1 - x0, 1e-12), max(y1 - y0, 1e-12)

    def position(x, y) -> tuple:  # data coordinates -> SVG pixels (y grows downwards)
        return (pad + (x - x0) / span_x * (width - 2 * pad), height - pad - (y - y0) / span_y * (height - 2 * pad))

    def point(x, y) -> str:
        return "{:.1f},{:.1f}".format(*position(x, y))

    shapes = []
    for k, s in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        if s.low is not None:
            outline = list(zip(s.x, s.high)) + list(zip(s.x, s.low))[::-1]
            band = [point(x, v) for x, v in outline]
            shapes.append(f'<polygon points="{" ".join(band)}" fill="{color}" fill-opacity="0.15" stroke="none"/>')
        shapes.append(f'<polyline points="{" ".join(point(x, v) for x, v in zip(s.x, s.y))}" stroke="{color}" '
                      f'stroke-width="1.5" fill="none"><title>{escape(s.name)}</title></polyline>')
        if len(s.x) <= 20:  # a few measured points (evaluations): mark them, the lines between are not data
            shapes += [f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{color}"/>'
                       for cx, cy in (position(x, v) for x, v in zip(s.x, s.y))]
        if len(series) > 1:
            y = pad + 16 * k
            shapes.append(f'<line x1="{width - pad - 130}" y1="{y - 4}" x2="{width - pad - 110}" y2="{y - 4}" '
                          f'stroke="{color}" stroke-width="2"/>')
            shapes.append(f'<text x="{width - pad - 104}" y="{y}">{escape(s.name)}</text>')
    bottom = height - pad + 16
    x_ticks = sorted(set(xs)) if len(set(xs)) <= 10 else [x0, x1]  # every x of a few evaluations, else the ends
    text = [(pad - 4, pad + 4, "end", f"{y1:.4g}"), (pad - 4, height - pad + 4, "end", f"{y0:.4g}"),
            *[(round(position(x, y0)[0], 1), bottom, "middle", f"{x:.4g}") for x in x_ticks],
            (width / 2, height - 12, "middle", x_label), (width / 2, 20, "middle", title)]
    y_title = (f'<text x="14" y="{height / 2}" text-anchor="middle" transform="rotate(-90 14 {height / 2})">'
               f'{escape(y_label)}</text>\n' if y_label else "")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
            f'<path d="M{pad},{pad} V{height - pad} H{width - pad}" stroke="black" fill="none"/>\n'
            + "".join(line + "\n" for line in shapes)
            + "".join(f'<text x="{x}" y="{y}" text-anchor="{a}">{escape(t)}</text>\n' for x, y, a, t in text)
            + y_title + "</svg>\n")

# =============================================================================
# Part III. Beyond training
# Held-out evaluation, compare (the card's table at small scale), using a model (generation, chat, GSM8K, ARC)
# and the command line.
# =============================================================================


# ----------------------------------------------------------------------------- held-out evaluation


class TextStream:
    """The text of each row as tokens arrive, for streaming and for stop strings. Rows are decoded whole: a
    byte-level BPE token can be part of a character, which decodes to U+FFFD until the rest arrives."""

    def __init__(self, tok, rows, stop_strings=(), on_text=None):
        self.tok, self.ids, self.text = tok, [[] for _ in range(rows)], [""] * rows
        self.stop_strings, self.on_text = stop_strings, on_text

    def __call__(self, tokens):  # (B,) new tokens -> (B,) bool: the row's text holds a stop string
        for row, token in enumerate(tokens.tolist()):
            self.ids[row].append(token)
            text = self.tok.decode(self.ids[row])
            if not text.endswith("\ufffd"):
                if self.on_text is not None:
                    self.on_text(text[len(self.text[row]):])
                self.text[row] = text
        return torch.tensor([any(s in t for s in self.stop_strings) for t in self.text], device=tokens.device)


def completion_text(tok, ids, stop_ids, stop_strings=(), skip_special_tokens=False) -> str:
    """The text of generated ids: cut after the first stop id, decoded (tags dropped with skip_special_tokens, as
    lm-evaluation-harness's Hugging Face model decodes), then cut before the first stop string."""
    cut = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return cut_at_stop(tok.decode(ids[:cut], skip_special_tokens), stop_strings)


@torch.no_grad()
def greedy_completions(model, tok, prompts, max_new_tokens, device, precision="fp32", batch_size=64,
                       stop_ids=None, stop_strings=(), log=None, compile=False, skip_special_tokens=False,
                       max_prompt_tokens=None) -> list:
    """Greedy continuations of prompts (left-padded batches) as completion_text gives them; stop ids default to
    <|user|>, <|endoftext|>; stop strings cost a decode per token, so only when asked (generation stops when the
    text with its tags holds one, as the harness's stopping criterion). compile: the compiled decode step.
    max_prompt_tokens: longer prompts keep only their last tokens (the harness's left truncation)."""
    stop_ids = (tok.user_id, tok.eos_id) if stop_ids is None else stop_ids
    out = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tok.encode(p) for p in prompts[start:start + batch_size]]
        if max_prompt_tokens is not None:
            encoded = [ids[-max_prompt_tokens:] for ids in encoded]
        T = max(map(len, encoded))
        ids = torch.full((len(encoded), T), tok.pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, T - len(e):], mask[row, T - len(e):] = torch.tensor(e), 1
        with _autocast(device, precision):
            rows = generate(model, ids.to(device), max_new_tokens, stop_ids=stop_ids, attention_mask=mask.to(device),
                            pad_id=tok.pad_id, on_token=TextStream(tok, len(encoded), stop_strings)
                            if stop_strings else None, compile=compile)[:, T:].tolist()
        out += [completion_text(tok, row, stop_ids, stop_strings, skip_special_tokens) for row in rows]
        if log is not None:
            log(f"{len(out)}/{len(prompts)} prompts done")
    return out


def exact_match(model, tok, records, device, precision="fp32") -> tuple:
    """(accuracy, completions): greedy answers of held-out CoT problems, the text after <|answer|> against the
    reference answer."""
    budget = max(len(tok.encode(format_record(r))) - len(tok.encode(cot_prompt(r.prompt))) for r in records) + 8
    completions = greedy_completions(model, tok, [cot_prompt(r.prompt) for r in records], budget, device, precision)
    correct = [extract_answer(c) == r.answer for c, r in zip(completions, records)]
    return sum(correct) / len(correct), completions


@torch.no_grad()
def teacher_forced_loss(model, tok, records, device, precision="fp32", batch_size=32) -> float:
    """Mean cross-entropy per label token of the held-out examples, full input, no label dropping."""
    examples = encode_many(records, tok)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        items = [mask_example(e, tok, MaskConfig("sft"), 0, 0, 0) for e in examples[start:start + batch_size]]
        batch = collate(items, pin_memory=False)
        labels = batch["labels"].to(device)
        with _autocast(device, precision):
            logits = model(batch["input_ids"].to(device))  # (B, T, V)
        total += cross_entropy(logits, labels, num_tokens=1).item()  # a token sum
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)


def answerable(held_out) -> list:
    """The held-out records greedy exact match grades: those with an answer (CoT); the loss takes them all."""
    return [r for r in held_out if isinstance(r, CoTRecord)]


def untrained_accuracy(model, tok, held_out, device, precision, log) -> float:
    """Rank 0's, or (sharded) every rank's in step."""
    model.eval()
    with gathered_root(model):
        accuracy = exact_match(model, tok, answerable(held_out), device, precision)[0]
    model.train()
    log(f"untrained exact match on {len(answerable(held_out))} held-out problems: {accuracy:.1%}")
    return accuracy


def finish(run, log):
    """The end of a whole run (run.evaluates): the loss curve, the final model as a Hugging Face directory, and the
    held-out evaluation (into run.summary)."""
    model, tok, held_out, summary, final = run.model, run.tok, run.held_out, run.summary, run.out / "model"
    if run.main and run.history:
        loss_curve = Series("loss", [m["step"] for m in run.history], [m["loss"] for m in run.history])
        atomic_write(run.out / "loss.svg", svg_chart([loss_curve], "training loss", "optimizer step"))
    if run.sharded:
        save_full_model(model, tok, final)  # gathered, written once by rank 0
    else:
        model.to(getattr(torch, model.config.torch_dtype))  # the source's dtype (bf16 for StableLM-3B)
        model.save_pretrained(final, extra=tok.save)  # the tokenizer joins the directory before it appears
    summary["model"] = str(final)
    log(f"saved the trained model as a Hugging Face directory: {final}")
    if not held_out:
        return
    graded, summary["eval_set"] = answerable(held_out), held_out_name(run.cfg, held_out)
    model.eval()
    with gathered_root(model):
        if graded:
            summary["accuracy"], completions = exact_match(model, tok, graded, run.device, run.precision)
        summary["eval_loss"] = teacher_forced_loss(model, tok, held_out, run.device, run.precision)
    if graded:
        before = f" (untrained: {summary['accuracy_untrained']:.1%})" if "accuracy_untrained" in summary else ""
        log(f"held-out exact match: {summary['accuracy']:.1%} of {len(graded)}{before}. Example: "
            f"{cot_prompt(graded[0].prompt)!r} -> {completions[0]!r}")
    log(f"held-out teacher-forced loss: {summary['eval_loss']:.4f} on {summary['eval_set']}")
    if run.main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": summary["step"], **{k: summary[k] for k in ("eval_set", "accuracy", "eval_loss")
                                                            if k in summary}}) + "\n")


# ----------------------------------------------------------------------------- compare: the card's table at small scale
MODE_NAMES = {"sft": "SFT", "masked-thought": "Masked Thought", "remask": "ReMask"}
# The embedded comparison's preset: the card's regime at small scale, a fixed training set of 2048 examples seen for
# the card's 6 epochs (384 steps of 32), the same data order, masks, weights and schedule for every mode of a seed;
# 500 held-out problems, so an accuracy's binomial standard error stays <= 2.2 points. The size was fixed before any
# result, and the models learn there (13-51% exact match; 1408 examples, 264 steps, left every run <= 7%). The
# one-epoch contrast sees as many examples, all fresh: --epochs 1 --n-train 12288 (the same 384 steps).
# One thread: a 0.9M model gains little from two, and a run then sums its floats in one order, so the table is the
# same for any --jobs on one machine (the same CPU kind and torch build: float kernels differ across CPUs).
COMPARE = dict(DEMO, out="runs/compare", n_train=2048, epochs=6, n_eval=500, log_every=64, save_every=0, threads=1)
# What a run of COMPARE costs, measured on a 2-core AMD EPYC, two runs at a time on one thread each, evaluations
# included (minutes; measured ReMask 6.1-6.8, SFT and Masked Thought 3.5-4.1): 10.3 core-minutes per seed for SFT +
# ReMask, 14.1 with Masked Thought. Runs are independent, so --jobs divides the total; other protocols scale by steps.
RUN_MINUTES = {"remask": 6.5, "masked-thought": 3.8, "sft": 3.8}
RUN_MINUTES_STEPS = 384
# `make compare`'s seeds: what fits about an hour on 2 cores, 8 seeds x 14.1 core-minutes / 2 jobs = 56 minutes
# (9 would be 63).
COMPARE_SEEDS = 8
CHOICES = 4  # multiple choice as ARC: the right worked solution and 3 distractors
POWER = 0.8  # the power at which the smallest detectable difference is quoted


def parse_seeds(text: str) -> list:
    """--seeds: a count N (seeds 0..N-1), or seeds and inclusive ranges A-B separated by commas ("20-39",
    "0-4,10"; one seed alone: "7-7", since "7" is a count)."""
    if text.strip().isdigit():
        if int(text) < 1:
            raise ValueError(f"--seeds {text}: a count of seeds must be at least 1")
        return list(range(int(text)))
    seeds = []
    for item in text.split(","):
        bounds = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not bounds:
            raise ValueError(f"--seeds {text!r}: {item!r} is not a seed or a range A-B (expected a count N, a range "
                             f"A-B or a comma list such as 0-4,10)")
        low, high = int(bounds[1]), int(bounds[2] or bounds[1])
        if high < low:
            raise ValueError(f"--seeds {text!r}: the range {item.strip()} runs backwards")
        seeds += range(low, high + 1)
    return seeds


def seed_ranges(seeds) -> str:
    """Sorted seeds as --seeds reads them back: [0, 1, 2, 3, 4, 10] -> "0-4,10", [7] -> "7-7"."""
    runs = []  # [first, last] of each run of consecutive seeds
    for seed in sorted(seeds):
        if runs and seed == runs[-1][1] + 1:
            runs[-1][1] = seed
        else:
            runs.append([seed, seed])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"{text}-{text}" if text.isdigit() else text  # "7" alone would be a count


def estimate_minutes(cfg: TrainConfig, runs: int, modes, jobs: int) -> float:
    """Wall minutes that `runs` runs (the modes in equal shares) of the embedded task should take, `jobs` at a
    time (at most one per core): RUN_MINUTES scaled by the optimizer steps, never less than one run."""
    steps = cfg.max_steps or math.ceil(cfg.n_train / cfg.global_batch) * cfg.epochs
    per_run = [RUN_MINUTES[mode] * steps / RUN_MINUTES_STEPS for mode in modes]
    return max(sum(per_run) * runs / len(modes) / min(jobs, os.cpu_count() or 1), max(per_run))


def machine(device: torch.device) -> dict:
    """What a run's floats depend on besides its seed: the CPU model (or the GPU), torch's version, the float
    backends torch reports (MKL, oneDNN alias MKL-DNN, the vector instructions its kernels use) and its threads."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        cpuinfo = ""
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    build = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", build)
    mkldnn = re.search(r"(?:MKL-DNN|oneDNN) (v[\d.]+)", build)
    return {"cpu": names[0].strip() if names else platform.processor() or "not reported",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__,
            "mkl_available": torch.backends.mkl.is_available(), "mkl_version": mkl[1] if mkl else None,
            "mkldnn_available": torch.backends.mkldnn.is_available(), "mkldnn_version": mkldnn[1] if mkldnn else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def describe_machine(m: dict) -> str:
    """A machine record in the words of the report."""
    if m["cpu"] == "unknown":  # read_results' record of a run that has none
        return f"a machine not recorded (its results.json predates machine records; torch {m['torch']})"
    mkl = m["mkl_version"] if m["mkl_available"] else "none"
    mkldnn = m["mkldnn_version"] if m["mkldnn_available"] else "none"
    device = "" if m["device"] == "CPU" else f"{m['device']} on "
    return (f"{device}{m['cpu']} ({m['cpu_capability']}), torch {m['torch']}, MKL {mkl}, oneDNN {mkldnn}, "
            f"{m['threads']} thread{'s' * (m['threads'] != 1)}")


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (n - 1; None for fewer than two values)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def t_cdf(t: float, df: int, intervals: int = 1000) -> float:
    """Student's t distribution function: 1/2 + the integral of its density from 0 to t (Simpson's rule; the
    density is smooth and at most 0.4, so 1000 intervals are exact to ~1e-9 for |t| < 50)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x):
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    h = abs(t) / intervals
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    area = h / 3 * (density(0.0) + inner + density(abs(t)))
    return 0.5 + math.copysign(area, t)


def t_quantile(p: float, df: int) -> float:
    """The t with t_cdf(t, df) = p, 0.5 <= p < 1, by bisection (t_cdf is increasing)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p {p}, df {df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(40):  # the bracket shrinks 2^40-fold
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def paired_interval(differences, confidence=0.95) -> dict:
    """Mean of per-seed paired differences with its t confidence interval (df = n - 1), and the smallest true
    difference (mde) that a paired t test of this n and this std of differences detects with probability POWER
    at the same level, two-sided: (t(1 - alpha/2, n-1) + t(POWER, n-1)) x std / sqrt(n), the usual approximation."""
    mean, std = mean_std(differences)
    n = len(differences)
    out = {"differences": list(differences), "mean": mean, "std": std, "n": n, "df": n - 1, "t": None,
           "low": None, "high": None, "excludes_zero": None, "mde": None}
    if std is not None:
        t = t_quantile(0.5 + confidence / 2, n - 1)
        half = t * std / math.sqrt(n)
        out.update(t=t, low=mean - half, high=mean + half, excludes_zero=mean - half > 0 or mean + half < 0,
                   mde=(t + t_quantile(POWER, n - 1)) * std / math.sqrt(n))
    return out


def sign_test(leads: int, trails: int) -> float:
    """Two-sided exact sign test (ties dropped before): the chance that a fair coin per seed splits the seeds at
    least as unevenly as leads : trails."""
    n, fewer = leads + trails, min(leads, trails)
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(fewer + 1)) / 2 ** n)


def binomial_se(accuracy: float, n: int) -> float:
    """The standard error of an accuracy measured on n problems: the evaluation set's own sampling error."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


def addition_choices(record: CoTRecord, rng: random.Random) -> Optional[list]:
    """CHOICES records for an embedded addition: its own worked solution first, then the worked solutions of
    a+b' for b' = b +- 1 or +- 10 (a wrong answer reached by a plausible slip), under the same question; None
    for a problem that is not an addition of two numbers."""
    numbers = re.findall(r"\d+", record.prompt)
    if len(numbers) != 2:
        return None
    a, b = map(int, numbers)
    slips = [b + d for d in rng.sample((1, -1, 10, -10), 4) if b + d >= 0][:CHOICES - 1]
    return [record] + [CoTRecord(record.prompt, *addition_cot(a, other)) for other in slips]


@torch.no_grad()
def continuation_logprobs(model, tok, records, device, precision="fp32", batch_size=64) -> tuple:
    """(summed log-probability of each record's label tokens given what precedes them, their counts), full
    input: for a CoT record, log p(rationale, answer | question) as a harness scores a choice."""
    sums, counts = [], []
    examples = encode_many(records, tok)
    for start in range(0, len(examples), batch_size):
        items = [mask_example(e, tok, MaskConfig("sft"), 0, 0, 0) for e in examples[start:start + batch_size]]
        batch = collate(items, pin_memory=False)
        labels = batch["labels"][:, 1:].to(device)  # (B, T-1) the token each position predicts
        with _autocast(device, precision):
            logits = model(batch["input_ids"].to(device))[:, :-1]  # (B, T-1, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
        graded = labels != IGNORE_INDEX  # (B, T-1)
        picked = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
        sums += (picked * graded).sum(1).tolist()
        counts += graded.sum(1).tolist()
    return sums, counts


def evaluate_point(model_dir, tok, held_out, choices, device, precision, accuracy=None) -> dict:
    """Held-out metrics of a saved model: greedy exact match (generative; measured unless given), and the
    log-likelihood side: multiple-choice accuracy (summed log-likelihood, first choice right; None without
    choices) and the teacher-forced loss per label token of the right solutions."""
    model = StableLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    if accuracy is None:
        accuracy = exact_match(model, tok, held_out, device, precision)[0]
    records = held_out if choices is None else [r for options in choices for r in options]
    sums, counts = continuation_logprobs(model, tok, records, device, precision)
    step = 1 if choices is None else CHOICES
    eval_loss = -sum(sums[::step]) / sum(counts[::step])
    mc = None
    if choices is not None:
        scores = [sums[i:i + CHOICES] for i in range(0, len(sums), CHOICES)]
        mc = sum(max(range(CHOICES), key=s.__getitem__) == 0 for s in scores) / len(scores)
    return {"accuracy": accuracy, "mc_accuracy": mc, "eval_loss": eval_loss}


# per metric: its name in the tables, the scale and format of its numbers there, and +1 if higher is better
METRICS = {"accuracy": ("exact match, greedy (%)", 100, "{:.2f}", 1),
           "mc_accuracy": (f"multiple choice, {CHOICES} options (%)", 100, "{:.2f}", 1),
           "eval_loss": ("teacher-forced loss (nats/token)", 1, "{:.4f}", -1)}


def _values(runs, mode, key) -> list:
    return [r[key] for r in sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["seed"])]


def _metric_keys(runs) -> list:
    return [k for k in METRICS if all(r.get(k) is not None for r in runs)]


def markdown_table(runs, modes) -> str:
    """Per mode: mean ± sample std over seeds; beside each accuracy the evaluation set's own standard error
    (binomial, mean over the runs)."""
    keys = _metric_keys(runs)
    header = "Mode | " + " | ".join(METRICS[k][0] + (" | its eval SE" if k != "eval_loss" else "") for k in keys)
    lines = [header + " | runs |", "---|" * (header.count("|") + 2)]
    for mode in modes:
        cells = []
        for key in keys:
            _, scale, fmt, _ = METRICS[key]
            mean, std = mean_std([v * scale for v in _values(runs, mode, key)])
            cells.append(fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std)))
            if key != "eval_loss":
                mine = [r for r in runs if r["mode"] == mode]
                cells.append(f"{100 * sum(binomial_se(r[key], r['n_eval']) for r in mine) / len(mine):.2f}")
        lines.append(f"{MODE_NAMES[mode]} | " + " | ".join(cells) + f" | {len(_values(runs, mode, 'seed'))} |")
    return "\n".join(lines)


def paired_differences(runs, modes) -> dict:
    """For each mode against SFT and each metric, over the seeds both ran (same seed = same data, order, masks,
    initial weights and evaluation set): the per-seed differences, their 95% t interval and smallest detectable
    difference, and the seeds where the mode leads SFT, ties or trails (for the loss, leading is lower) with the
    sign test's p-value."""
    if "sft" not in modes:
        return {}
    by_run = {(r["mode"], r["seed"]): r for r in runs}
    out = {}
    for mode in modes:
        seeds = sorted(s for m, s in by_run if m == mode and ("sft", s) in by_run)
        if mode == "sft" or not seeds:
            continue
        out[f"{mode} - sft"] = {}
        for key in _metric_keys(runs):
            differences = [by_run[mode, s][key] - by_run["sft", s][key] for s in seeds]
            better = METRICS[key][3]
            leads, trails = sum(better * d > 0 for d in differences), sum(better * d < 0 for d in differences)
            out[f"{mode} - sft"][key] = {**paired_interval(differences), "seeds": seeds, "leads": leads,
                                         "ties": len(seeds) - leads - trails, "trails": trails,
                                         "sign_p": sign_test(leads, trails)}
    return out


def _differences_rows(differences, columns, cells) -> str:
    """A table with one row per paired difference: its name, `columns` per metric filled by cells(d, scale,
    digits), and the seeds paired."""
    keys = list(next(iter(differences.values())))
    lines = ["Paired difference (per seed) | " + " | ".join(
        f"{METRICS[k][0].split(' (')[0]}: {columns[0]}" + "".join(f" | {c}" for c in columns[1:]) for k in keys)
        + " | seeds |", "---|" * (2 + len(columns) * len(keys))]
    for name, by_key in differences.items():
        row = []
        for key in keys:
            scale = METRICS[key][1]
            row += cells(by_key[key], scale, 2 if scale == 100 else 4)
        n = next(iter(by_key.values()))["n"]
        lines.append(f"{MODE_NAMES[name.split(' - ')[0]]} - SFT | " + " | ".join(row) + f" | {n} |")
    return "\n".join(lines)


def differences_table(differences) -> str:
    """Per paired difference and metric: the mean, its 95% t interval and whether that excludes zero."""
    def cells(d, scale, digits):
        interval = "n/a (1 seed)" if d["low"] is None else f"[{d['low'] * scale:+.{digits}f}, " \
                                                           f"{d['high'] * scale:+.{digits}f}]"
        verdict = "n/a" if d["excludes_zero"] is None else "yes" if d["excludes_zero"] else "no"
        return [f"{d['mean'] * scale:+.{digits}f}", interval, verdict]
    return _differences_rows(differences, ["mean", "95% CI", "excludes 0?"], cells) if differences else ""


def sign_table(differences) -> str:
    """Per paired difference and metric: the seeds where the mode leads, ties and trails, the sign test's
    p-value, and the minimum detectable effect (MDE): the smallest difference the run detects at POWER."""
    def cells(d, scale, digits):
        mde = "n/a" if d["mde"] is None else f"{d['mde'] * scale:.{digits}f}"
        return [f"{d['leads']} / {d['ties']} / {d['trails']}", f"{d['sign_p']:.3g}", mde]
    columns = ["leads / ties / trails", "sign test p", f"MDE ({POWER:.0%} power)"]
    return _differences_rows(differences, columns, cells) if differences else ""


def curves_svg(runs, modes) -> str:
    """Held-out exact match against optimizer step: per mode the mean over its seeds and a min-max band."""
    series = []
    for mode in modes:
        curves = [r["curve"] for r in runs if r["mode"] == mode]
        points = list(zip(*curves))  # per evaluation point, one entry per seed
        values = [[100 * p["accuracy"] for p in at] for at in points]
        series.append(Series(f"{MODE_NAMES[mode]} (n={len(curves)})", [mean_std([p["step"] for p in at])[0]
                                                                          for at in points],
                             [mean_std(v)[0] for v in values], [min(v) for v in values], [max(v) for v in values]))
    top = 10 * math.ceil(max(max(s.high) for s in series) / 10 + 1e-9)  # the next multiple of 10 above the band
    return svg_chart(series, "held-out exact match (mean over n seeds, band: min to max)",
                     "optimizer step", "exact match (%)", y_range=(0, min(100, top)))


def compare(base: TrainConfig, seeds, modes=MODES[::-1], eval_points=3, jobs=1, log=print) -> dict:
    """Train every mode with every seed on the same data and schedule, evaluating the held-out problems at
    eval_points evenly spaced steps (the last one the end); print the tables, write results.json and
    curves.svg into base.out. jobs > 1: that many runs at once, each in its own process."""
    if base.n_eval < 1:
        raise TrainError("compare needs held-out problems: --n-eval >= 1")
    if not seeds or eval_points < 1 or jobs < 1:
        raise ValueError(f"compare needs at least one seed, --eval-points >= 1 and --jobs >= 1 (got {len(seeds)} "
                         f"seeds, --eval-points {eval_points}, --jobs {jobs})")
    for flag, values in (("--seeds", seeds), ("--modes", modes)):  # one run counted twice would fake a seed
        twice = next((v for k, v in enumerate(values) if v in values[:k]), None)
        if twice is not None:
            raise ValueError(f"{flag} names {twice} twice")
    claim_comparison(base.out, run_inputs(base))
    device = init_distributed(base.device)[1]
    started = time.perf_counter()
    tasks = [(seed, mode) for seed in sorted(seeds) for mode in modes]  # seed-major, as the tables list the runs
    jobs = min(jobs, len(tasks))
    if not base.model and not base.data and device.type == "cpu":
        log(f"estimate: about {_duration(60 * estimate_minutes(base, len(tasks), modes, jobs))} for {len(tasks)} "
            f"runs, {jobs} at a time (per-run times measured on a 2-core AMD EPYC, one thread each, scaled by "
            f"optimizer steps)")
    if jobs == 1:
        runs = [compare_run(base, seed, mode, eval_points, log) for seed, mode in tasks]
    else:
        runs = compare_in_processes(base, tasks, eval_points, jobs)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return report(asdict(base), runs, modes, eval_points, time.perf_counter() - started, device_name, log)


def claim_comparison(out: str, reads: dict):
    """Before any work: --out is a comparison directory remask made (its runs are its own, started over), or is
    made one; a directory of anything else, a training run's included, is refused, as is one holding an input."""
    if not str(out).strip():
        raise TrainError("--out is empty: give the comparison's directory (it is never taken to mean the current one)")
    out = Path(out).expanduser()
    check_apart({"--out": out}, reads)
    try:
        check_replaceable(out, "compare")  # absent, empty, or remask's comparison directory
    except FileExistsError as e:
        raise TrainError(f"--out: {e} (choose another --out)") from None
    if owner(out) is None:
        make_owned(out, "compare")


def compare_run(base: TrainConfig, seed, mode, eval_points, log=print) -> dict:
    """One mode's run of one seed (it depends on nothing else) with its evaluation curve: exact match and the
    teacher-forced loss at every point, the multiple choice (2,000 scored solutions) at the end; and the machine
    that computed it."""
    cfg = replace(base, seed=seed, mode=mode, out=str(Path(base.out) / f"{mode}-seed{seed}"), resume=False,
                  overwrite=True)  # the comparison's own run directory (claim_comparison): started over
    device = resolve_device(base.device)
    precision = resolve_precision(base.precision, device)
    tok = load_tokenizer_for(cfg, log=lambda message: None)
    examples, held_out = load_examples(cfg, tok, log=lambda message: None)
    steps_per_epoch = len(Loader(examples, tok, cfg.mask_config(), base.global_batch, base.micro_batch))
    total = base.max_steps or steps_per_epoch * base.epochs
    stops = sorted({max(1, round(total * k / eval_points)) for k in range(1, eval_points + 1)})
    rng = random.Random(f"choices:{seed}")  # the same distractors for every mode of a seed
    choices = [addition_choices(r, rng) for r in held_out]
    choices = choices if all(c is not None and len(c) == CHOICES for c in choices) else None
    tag = f"[{mode} seed {seed}] "
    started, curve = time.perf_counter(), []
    for k, stop in enumerate(stops):  # chunks of one run: resume is bit-exact
        summary = train(replace(cfg, stop_at=stop, resume=k > 0, overwrite=k == 0), log=lambda m: log(tag + m),
                        evaluate_untrained=False)
        if summary.get("interrupted"):  # the run saved its checkpoint; the comparison stops with it
            raise Interrupted(summary["exit_code"] - 128)
        # at the end train() has saved the final model and measured its exact match itself
        model_dir = summary.get("model") or Path(summary["checkpoint"]) / "model"
        point = evaluate_point(model_dir, tok, held_out, choices if stop == total else None, device, precision,
                               summary.get("accuracy"))
        curve.append({"step": summary["step"], **point})
        log(tag + f"step {summary['step']}/{total}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in point.items() if v is not None))
    return {"mode": mode, "seed": seed, **curve[-1], "n_eval": len(held_out), "final_loss": summary["final_loss"],
            "seconds": time.perf_counter() - started, "machine": machine(device), "curve": curve}


def default_jobs(cfg: TrainConfig) -> int:
    """Runs at once: on a CPU as many as its cores hold at --threads each; on a GPU one (they would share it)."""
    if cfg.threads == 0 or resolve_device(cfg.device).type == "cuda":
        return 1
    return max(1, (os.cpu_count() or 1) // cfg.threads)


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker left idle by Ctrl-C: the parent ends it


def compare_in_processes(base: TrainConfig, tasks, eval_points, jobs) -> list:
    """compare_run for every (seed, mode), `jobs` processes at a time (spawned: a forked torch can deadlock),
    the costliest first (ReMask's two passes) so that the processes finish together; the runs come back in the
    order of tasks. They are those of one process: a run depends on its seed alone, and with --threads 1 (the
    preset) sums its floats in the same order. Ctrl-C or SIGTERM ends every worker at once."""
    log_line = partial(print, flush=True)  # lines, not buffers, interleave
    order = sorted(range(len(tasks)), key=lambda i: tasks[i][1] != "remask")  # stable: seed-major otherwise
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)
    try:
        with _StopOnSignal(log_line):  # outside a training loop: a signal raises Interrupted at once
            futures = {i: pool.submit(compare_run, base, *tasks[i], eval_points, log_line) for i in order}
            return [futures[i].result() for i in range(len(tasks))]
    except BaseException:  # a signal or a failed run: the others' work would be thrown away anyway
        for worker in multiprocessing.active_children():
            worker.kill()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


# The TrainConfig fields that say where and how a comparison ran, not what it computed (those --resume lets differ,
# but n_eval, the held-out set), and those compare sets per run: parts that differ only in these may be pooled.
POOL_FREE_FIELDS = (RUNTIME_FIELDS - {"n_eval"}) | {"seed", "mode"}


def _protocol(results: dict) -> dict:
    """What a results.json computed: its configuration less POOL_FREE_FIELDS (a field it lacks, from an older
    remask.py, at today's default) and its evaluation points."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    config = {**defaults, **results["config"]}
    return {**{k: v for k, v in config.items() if k not in POOL_FREE_FIELDS}, "eval_points": results["eval_points"]}


def read_results(path) -> dict:
    """A results.json of `remask.py compare`; a run without a machine (written before runs recorded theirs) gets
    one of "unknown" fields but the file's torch version."""
    try:
        results = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not (isinstance(results, dict) and {"config", "runs", "eval_points"} <= results.keys()
            and all(isinstance(r, dict) and r.get("mode") in MODES and isinstance(r.get("seed"), int)
                    for r in results["runs"])):
        raise ValueError(f"{path}: not a results.json of remask.py compare (config, eval_points, runs of a mode "
                         f"and a seed)")
    # a machine record's fields, all unknown
    unknown = {**dict.fromkeys(machine(torch.device("cpu")), "unknown"), "torch": results.get("torch", "unknown")}
    results["runs"] = [{**run, "machine": run.get("machine") or unknown} for run in results["runs"]]
    return results


def pool(paths, out, log=print) -> dict:
    """One report over the runs of several results.json: parts run on other machines or at other times (a run
    depends on its seed alone). Refused: parts of different protocols, and a (seed, mode) run in two parts (or
    twice in one)."""
    parts = [(path, read_results(path)) for path in paths]
    (first_path, first), seen, runs = parts[0], {}, []
    expected = _protocol(first)
    for path, part in parts:
        protocol = _protocol(part)
        differ = [f"{k} {expected.get(k)!r} vs {protocol.get(k)!r}" for k in sorted(expected.keys() | protocol.keys())
                  if expected.get(k) != protocol.get(k)]
        if differ:
            raise ValueError(f"{first_path} and {path} ran different protocols ({', '.join(differ)}): their runs "
                             f"do not pool")
        for run in part["runs"]:
            if (run["seed"], run["mode"]) in seen:
                raise ValueError(f"the {run['mode']} run of seed {run['seed']} is in {seen[run['seed'], run['mode']]} "
                                 f"and in {path}: a run counted twice would fake a seed")
            seen[run["seed"], run["mode"]] = path
            runs.append(run)
    modes = [mode for mode in MODES[::-1] if any(r["mode"] == mode for r in runs)]
    runs.sort(key=lambda r: (r["seed"], modes.index(r["mode"])))
    sources = [{"file": str(path), "date": part.get("date"), "seconds": part.get("seconds"),
                "device": part.get("device"), "seeds": seed_ranges({r["seed"] for r in part["runs"]}),
                "modes": sorted({r["mode"] for r in part["runs"]}, key=modes.index)} for path, part in parts]
    devices = ", ".join(dict.fromkeys(str(part.get("device")) for _, part in parts))
    claim_comparison(out, {f"results file {path}": path for path in paths})
    return report({**first["config"], "out": str(out)}, runs, modes, first["eval_points"],
                  sum(part.get("seconds") or 0 for _, part in parts), devices, log, sources)


def report(config: dict, runs, modes, eval_points, seconds, device_name, log=print, parts=None) -> dict:
    """The tables, results.json and curves.svg of finished runs: those of one comparison (gathered from several
    processes, one per run) or those pooled from several `parts` (seconds: theirs added)."""
    seeds = sorted({r["seed"] for r in runs})
    differences = paired_differences(runs, modes)
    table = "\n\n".join([markdown_table(runs, modes)] + ([differences_table(differences), sign_table(differences)]
                                                         if differences else []))
    counts = {}  # runs per distinct machine
    for run in runs:
        key = json.dumps(run["machine"], sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    machines = [{**json.loads(key), "runs": n} for key, n in counts.items()]
    multiple_choice = all(r["mc_accuracy"] is not None for r in runs)
    results = {"table": table, "seconds": seconds, "device": device_name, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "seeds": seeds, "modes": list(modes),
               "eval_points": eval_points, "choices": CHOICES if multiple_choice else None, "config": config,
               "machines": machines, **({"parts": parts} if parts else {}), "runs": runs,
               "differences": differences,
               "summary": {mode: {key: dict(zip(("mean", "std", "n"), (*mean_std(_values(runs, mode, key)),
                                                                        len(_values(runs, mode, key)))))
                                  for key in _metric_keys(runs)} for mode in modes}}
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "curves.svg", curves_svg(runs, modes))
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    per_mode = ", ".join(f"{MODE_NAMES[m]} seeds {seed_ranges(_values(runs, m, 'seed'))}" for m in modes)
    source = (f"pooled from {len(parts)} results.json" if parts else f"in {_duration(seconds)} on {device_name}")
    log(f"\n{table}\n\n{len(runs)} runs ({per_mode}) {source}; results in {out / 'results.json'}, curves in "
        f"{out / 'curves.svg'}\n" + "\n".join(f"{m['runs']} runs on {describe_machine(m)}" for m in machines))
    return results

# ----------------------------------------------------------------------------- using a model: chat, GSM8K and ARC
# Log-likelihoods as lm-evaluation-harness's Hugging Face model computes them (models/huggingface.py,
# HFLM._loglikelihood_tokens of lm-eval 0.4.13, checked against it; early-2024 0.4 sources read the same): the input is
# (context + continuation)[-(max_length + 1):][:-1], so a context too long for the model loses tokens on its left;
# max_length is config.json's max_position_embeddings (the first of n_positions, max_position_embeddings, n_ctx that
# the config has); a request's score is the sum of its continuation tokens' log-softmax values, and `greedy` says
# whether every one of them is the argmax. Batches are right-padded without an attention mask, as there: causal
# attention never looks right, so a row's values do not depend on its batch. Deliberate differences: log-softmax
# in float32 (the harness takes it in the dtype of the model's logits), and only the continuation's positions go
# through lm_head. Long generation prompts (GSM8K) are cut on the left to max_length - max_new_tokens tokens, as
# HFLM.generate_until does.


def load_for_inference(path, device_name="auto") -> tuple:
    """(tokenizer, model, device) of a Hugging Face directory, float or 8-bit, ready for generation."""
    device = resolve_device(device_name)
    path = resolve_model(str(path))
    try:
        tok = load_tokenizer(path)
        model = StableLM.from_pretrained(path, device=device).eval()
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(f"--model {path}: {e}") from None
    if len(tok) > model.config.vocab_size:
        raise TrainError(f"--model {path}: the tokenizer needs {len(tok)} embedding rows but the model has only "
                         f"{model.config.vocab_size}; fine-tune it with remask.py train first (which grows them)")
    return tok, model, device


def context_length(model) -> int:
    """The longest input the model was trained on: config.json's max_position_embeddings."""
    return model.config.max_position_embeddings


def check_fits(model, prompt_tokens: int, max_new_tokens: int):
    """Refuse a generation that would run past the model's context (positions it never saw give garbage)."""
    limit = context_length(model)
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"the prompt is {prompt_tokens} tokens and --max-new-tokens {max_new_tokens}: "
                         f"{prompt_tokens + max_new_tokens} tokens do not fit the model's context of {limit} "
                         f"(max_position_embeddings)")


def stream_reply(model, tok, prompt, device, max_new_tokens, temperature=0.0, top_k=None, seed=0, write=print,
                 compile=False) -> str:
    """Write the continuation of prompt piece by piece as it is generated, up to <|user|> or the end of text.
    A prompt that leaves no room for max_new_tokens in the model's context raises ValueError."""
    ids = tok.encode(prompt)
    check_fits(model, len(ids), max_new_tokens)
    stops = torch.tensor([tok.user_id, tok.eos_id], device=device)
    text = TextStream(tok, 1, on_text=lambda piece: write(piece, end="", flush=True))
    shown = lambda token: None if torch.isin(token, stops).any() else text(token)  # noqa: E731 (tags unprinted)
    generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k,
             stop_ids=tuple(stops.tolist()), on_token=shown, generator=torch.Generator(device).manual_seed(seed),
             compile=compile)
    write()
    return text.text[0].strip()


def chat_loop(respond, read_line=input, write=print, system="") -> list:
    """A terminal conversation: each user line goes to respond(prompt) -> reply, the prompt holding the whole
    history in the chat format; /reset forgets the history, /exit (or end of input) leaves. A line that is not
    UTF-8 text, or a conversation that outgrew the model's context (respond raises ValueError), is answered with
    a note and the conversation goes on. Returns the history."""
    history = []
    write("chat: /reset forgets the conversation, /exit leaves")
    while True:
        try:
            line = read_line("you> ").strip()
            line.encode("utf-8")  # a strict terminal fails to decode; others pass bad bytes on as surrogates
        except EOFError:
            return history
        except UnicodeError:
            write("(that line is not valid UTF-8 text; type it again)")
            continue
        if line == "/exit":
            return history
        if line == "/reset":
            history = []
            write("(history cleared)")
        elif line:
            try:
                history.append((line, respond(chat_prompt(history, line, system))))
            except ValueError as e:
                write(f"(not answered: {e}; /reset starts a new conversation)")


def first(items: list, limit) -> list:
    """items[:limit], all of them for None. A limit below 1 is an error, never 'all' (0) or 'all but 3' (-3)."""
    if limit is None:
        return items
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    return items[:limit]


def evaluate_gsm8k(complete, problems, train=None, format="harness", limit=None) -> tuple:
    """(scores, rows) of the lm-evaluation-harness GSM8K task. complete(prompts, stop_strings) -> completions cut
    at those strings (the model in `eval`, a script in the tests); scores as data.score_gsm8k; one row per problem
    with its prompt, completion and extracted answers."""
    problems = first(problems, limit)
    prompts = gsm8k_prompts(problems, train, format)
    completions = complete(prompts, GSM8K_STOP[format])
    scores = score_gsm8k(completions, [p.answer for p in problems], format)
    rows = [{"index": i, "prompt": prompt, "completion": completion, "reference": problem.answer,
             **{name: score.extracted[i] for name, score in scores.items()},
             **{f"{name}_correct": score.correct[i] for name, score in scores.items()}}
            for i, (prompt, completion, problem) in enumerate(zip(prompts, completions, problems))]
    return scores, rows


@torch.no_grad()
def loglikelihood_tokens(model, pairs, device, precision="fp32", batch_size=32, max_length=None, log=None) -> list:
    """[(log-likelihood, greedy)] of (context ids, continuation ids) pairs, computed as the harness does (see the
    section's comment); max_length defaults to the model's context. Longest inputs first, as the harness batches
    them; the results come back in the order of pairs."""
    max_length = max_length or context_length(model)
    for context, continuation in pairs:
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(f"a request needs a context and 1 to {max_length} continuation tokens, got "
                             f"{len(context)} and {len(continuation)}")
    inputs = [(context + continuation)[-(max_length + 1):][:-1] for context, continuation in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    results = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = max(len(inputs[i]) for i in rows)
        ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)  # (B, T) right-padded
        rows_at, positions, targets = [], [], []
        for r, i in enumerate(rows):
            n, continuation = len(inputs[i]), pairs[i][1]
            ids[r, :n] = torch.tensor(inputs[i])
            rows_at += [r] * len(continuation)
            positions += range(n - len(continuation), n)  # the positions that predict the continuation
            targets += continuation
        with _autocast(device, precision):
            h = model.hidden_states(ids.to(device))  # (B, T, C)
            logits = model.lm_head(h[torch.tensor(rows_at), torch.tensor(positions)])  # (N, V) continuation only
        logprobs = logits.float().log_softmax(-1)  # (N, V)
        target = torch.tensor(targets, device=device)  # (N,)
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1)  # (N,)
        hit = logprobs.argmax(-1) == target  # (N,)
        lengths = [len(pairs[i][1]) for i in rows]
        for i, lls, hits in zip(rows, picked.split(lengths), hit.split(lengths)):
            results[i] = (float(lls.sum()), bool(hits.all()))
        if log is not None and (start // batch_size % 10 == 9 or start + batch_size >= len(order)):
            log(f"{min(start + batch_size, len(order))}/{len(order)} log-likelihood requests done")
    return results


def loglikelihoods(model, tok, requests, device, precision="fp32", batch_size=32, log=None) -> list:
    """[(log-likelihood, greedy)] of (context, continuation) strings, split into tokens as the harness splits them
    (data.encode_pair); says how many contexts are cut to fit the model."""
    pairs = [encode_pair(tok, context, continuation) for context, continuation in requests]
    max_length = context_length(model)
    cut = sum(len(context) + len(continuation) > max_length + 1 for context, continuation in pairs)
    if cut and log is not None:
        log(f"{cut} of {len(pairs)} requests exceed the model's context of {max_length} tokens: their contexts "
            "are cut on the left, as lm-evaluation-harness cuts them")
    return loglikelihood_tokens(model, pairs, device, precision, batch_size, max_length, log)


def evaluate_arc(loglikelihood, questions, train, limit=None, k=ARC_FEWSHOT, seed=ARC_SEED) -> tuple:
    """(scores, rows) of the lm-evaluation-harness ARC task (arc_challenge or arc_easy: the same code on other
    data). loglikelihood(requests) -> [(log-likelihood, greedy)] for (context, continuation) strings (the model
    in `eval`, a script in the tests); scores as data.score_arc; one row per question with its context, the
    log-likelihood of each choice and both predictions."""
    questions = first(questions, limit)
    contexts = arc_contexts(questions, train, k, seed)
    requests = [(context, continuation) for context, question in zip(contexts, questions)
                for continuation in arc_continuations(question)]
    answers = iter(loglikelihood(requests))
    per_question = [[next(answers) for _ in question.choices] for question in questions]
    scores = score_arc([[ll for ll, _ in answer] for answer in per_question], questions)
    rows = [{"index": i, "id": question.id, "prompt": context, "choices": question.choices,
             "loglikelihoods": [ll for ll, _ in answer], "greedy": [greedy for _, greedy in answer],
             "prediction": scores["acc"].predictions[i], "prediction_norm": scores["acc_norm"].predictions[i],
             "gold": question.gold, "acc": scores["acc"].correct[i], "acc_norm": scores["acc_norm"].correct[i]}
            for i, (context, question, answer) in enumerate(zip(contexts, questions, per_question))]
    return scores, rows

# ----------------------------------------------------------------------------- command line


def add_config_flags(parser, preset: dict, leave_out=()):
    """One --flag per TrainConfig field (but those in leave_out), its help from the field; the help shows the
    recipe's default and, where the preset changes it, the preset's value: "(default 1e-05; demo: 0.001)"."""
    for f in (f for f in fields(TrainConfig) if f.name not in leave_out):
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", "valid")}
        default = f"default {f.default!r}" + (f"; {preset['name']}: {preset[f.name]!r}" if f.name in preset else "")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument(f"--{_flag(f.name)}", default=argparse.SUPPRESS, help=f"{f.metadata['help']} ({default})",
                            **kind, **extra)


def given_flags(args) -> dict:
    """The TrainConfig fields whose flags were typed (argparse leaves the others unset)."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}


def config_from_args(args, preset: dict) -> TrainConfig:
    """The recipe's defaults, then the preset when neither --model nor --data is given, then the flags given."""
    given = given_flags(args)
    uses_preset = not given.get("model") and not given.get("data")
    ignored = [name for name in IGNORED_WITHOUT if given.get(IGNORED_WITHOUT[name]) and name in given]
    if ignored:
        raise ValueError(f"--{_flag(ignored[0])} does nothing with --{_flag(IGNORED_WITHOUT[ignored[0]])} "
                         f"({TrainConfig.__dataclass_fields__[ignored[0]].metadata['help']}): leave it out")
    preset_values = {k: v for k, v in preset.items() if k != "name"} if uses_preset else {}
    return TrainConfig(**{**preset_values, **given})


# Flags that one source makes meaningless: given with it, they are errors, not silence.
IGNORED_WITHOUT = {"digits": "data", "n_train": "data", "arch": "model"}
# Flags that a --mode makes meaningless (remask.py train; compare trains every mode)
IGNORED_BY_MODE = {"sft": ("kl_weight", "input_mask", "label_mask", "answer_only", "mask_with"),
                   "masked-thought": ("kl_weight",)}


def cmd_train(args):
    cfg = config_from_args(args, DEMO)
    ignored = [name for name in IGNORED_BY_MODE.get(cfg.mode, ()) if name in given_flags(args)]
    if ignored:
        raise ValueError(f"--{_flag(ignored[0])} does nothing under --mode {cfg.mode}: leave it out")
    if not cfg.model and not cfg.data:
        print(f"embedded demo (preset: {', '.join(f'--{_flag(k)} {v}' for k, v in DEMO.items())}; flags given "
              f"override it)")
        if "out" not in given_flags(args) and not cfg.resume and "overwrite" not in given_flags(args):
            cfg = replace(cfg, overwrite=True)  # `make train` again starts the demo over in its own directory
    summary = train(cfg)
    return summary.get("exit_code", 0)


def cmd_compare(args):
    preset = {"name": "compare", **COMPARE}
    cfg = config_from_args(args, preset)
    if (cfg.model or cfg.data) and not hasattr(args, "n_eval"):
        cfg = replace(cfg, n_eval=500)  # real data: 500 CoT rows held out unless told otherwise
    if args.eval_points < 1 or args.jobs < 0:
        raise ValueError(f"--eval-points must be >= 1 and --jobs >= 0, got --eval-points {args.eval_points}, "
                         f"--jobs {args.jobs}")
    jobs = args.jobs or default_jobs(cfg)
    compare(cfg, parse_seeds(args.seeds), args.modes, args.eval_points, jobs)
    return 0


def cmd_compare_report(args):
    pool(args.results, args.out)
    return 0


def _check_use_flags(args):
    """generate/chat/eval flags whose type alone admits nonsense: one error naming the flag, before a model loads."""
    for name in ("max_new_tokens", "top_k", "limit", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{_flag(name)} must be at least 1, got {value}")
    temperature = getattr(args, "temperature", 0.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")


def _check_output_file(path: Path):
    """Refuse an --output that cannot become a file before any work is done (an evaluation takes hours)."""
    if path.is_dir():
        raise ValueError(f"--output {path}: is a directory; give a file name")
    parent = next(p for p in path.parents if p.exists())  # the nearest existing ancestor
    if not parent.is_dir():
        raise ValueError(f"--output {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path}: cannot write in {parent}")


def cmd_generate(args):
    _check_use_flags(args)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv arrive as surrogates
        raise ValueError("--prompt is not valid UTF-8 text") from None
    tok, model, device = load_for_inference(args.model, args.device)
    prompt = cot_prompt(args.prompt) if args.cot else chat_prompt([], args.prompt, args.system)
    check_fits(model, len(tok.encode(prompt)), args.max_new_tokens)  # before the prompt is echoed
    print(prompt, end="", flush=True)
    stream_reply(model, tok, prompt, device, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                 compile=args.compile)
    return 0


def cmd_chat(args):
    _check_use_flags(args)
    tok, model, device = load_for_inference(args.model, args.device)
    if args.max_new_tokens >= context_length(model):
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the model's "
                         f"context of {context_length(model)} tokens")
    chat_loop(lambda prompt: stream_reply(model, tok, prompt, device, args.max_new_tokens, args.temperature,
                                          args.top_k, args.seed, compile=args.compile), system=args.system)
    return 0


EVAL_NAMES = {"gsm8k": "GSM8K", "arc": "ARC-Challenge", "arc-challenge": "ARC-Challenge", "arc-easy": "ARC-Easy"}


def _gsm8k_completer(args, tok, model, device, precision, log):
    """complete(prompts, stop_strings) for evaluate_gsm8k: greedy, batched, prompts cut on the left to leave room
    for --max-new-tokens in the model's context (HFLM.generate_until's max_length - max_gen_toks)."""
    keep = context_length(model) - args.max_new_tokens
    if keep < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context "
                         f"of {context_length(model)} tokens")
    # harness: only <|endoftext|> is a stop id and tags are dropped from the text (the harness decodes with
    # skip_special_tokens=True), so "Question:" etc. end the answer; cot: the tags delimit the answer, so they stay
    harness = args.format == "harness"
    stop_ids = (tok.eos_id,) if harness else (tok.user_id, tok.eos_id)

    def complete(prompts, stop_strings):
        cut = sum(len(tok.encode(p)) > keep for p in prompts)
        if cut:
            log(f"{cut} of {len(prompts)} prompts exceed {keep} tokens (the model's context less --max-new-tokens): "
                "cut on the left, as lm-evaluation-harness cuts them")
        return greedy_completions(model, tok, prompts, args.max_new_tokens, device, precision, args.batch_size,
                                  stop_ids, stop_strings, log=log, compile=args.compile,
                                  skip_special_tokens=harness, max_prompt_tokens=keep)
    return complete


def cmd_eval(args):
    _check_use_flags(args)
    gsm8k = args.task == "gsm8k"
    if not gsm8k and args.format != "harness":
        raise ValueError(f"--format {args.format} is for gsm8k only; {args.task} has the harness's prompt only")
    if args.format == "harness" and not args.fewshot_data:
        raise ValueError(f"eval {args.task} needs --fewshot-data (the train split, for the few-shot examples)")
    output = Path(args.output or (f"gsm8k-{args.format}.jsonl" if gsm8k else f"{EVAL_NAMES[args.task].lower()}.jsonl"))
    _check_output_file(output)
    reads = {"--data": args.data, **({"--fewshot-data": args.fewshot_data} if args.fewshot_data else {})}
    check_apart({"--output": output}, reads)
    if args.fewshot_data and os.path.realpath(args.fewshot_data) == os.path.realpath(args.data):
        raise ValueError(f"--fewshot-data {args.fewshot_data} is the --data file: the few-shot examples would be drawn "
                         f"from the test questions themselves; give the train split")
    args.model = str(resolve_model(args.model))
    check_apart({"--output": output}, {"--model": args.model})
    read = read_gsm8k if gsm8k else read_arc
    test = read(args.data)
    train = read(args.fewshot_data) if args.format == "harness" else None
    tok, model, device = load_for_inference(args.model, args.device)
    precision = resolve_precision("auto", device)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    if gsm8k:
        scores, rows = evaluate_gsm8k(_gsm8k_completer(args, tok, model, device, precision, log), test, train,
                                      args.format, args.limit)
        title = f"GSM8K ({args.format} format, {len(rows)} problems"
    else:
        score = lambda requests: loglikelihoods(model, tok, requests, device, precision, args.batch_size,  # noqa: E731
                                                log)
        scores, rows = evaluate_arc(score, test, train, args.limit)
        title = f"{EVAL_NAMES[args.task]} ({ARC_FEWSHOT}-shot, {len(rows)} questions"
    atomic_write(output, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"{title}, {time.time() - t0:.0f}s on {device}; {output}):")
    for name, score in scores.items():
        stderr = "n/a" if score.stderr is None else f"{score.stderr:.4f}"
        print(f"  {name}: {score.accuracy:.4f} ± {stderr}")
    return 0


def _add_generation_flags(parser, max_new_tokens):
    parser.add_argument("--model", required=True, help="Hugging Face model directory, float or 8-bit")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="tokens to generate at most (the prompt and these must fit the model's context)")
    parser.add_argument("--device", default="auto", help="cuda, cpu, ...; auto: the GPU if there is one")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on a GPU: "
                        "several times faster once compiled; the first call takes a minute or so)")


def _add_sampling_flags(parser):
    parser.add_argument("--system", default="", help="a system message; the chat format has no system tag, so it "
                        "leads the first user turn, followed by a blank line (as training reads a system turn)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k (>= 1) most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def build_parser():
    parser = argparse.ArgumentParser(prog="remask.py", description="ReMask fine-tuning of StableLM models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_p = sub.add_parser("train", help="fine-tune (no --model/--data: the embedded CPU demo)",
                             description="Fine-tune with ReMask, Masked Thought or SFT. Without --model and --data: "
                                         "the embedded demo (a fresh small model on chain-of-thought additions). "
                                         "Several GPUs: torchrun --nproc_per_node N remask.py train ...")
    add_config_flags(train_p, {"name": "demo", **DEMO})
    train_p.set_defaults(run=cmd_train)
    compare_p = sub.add_parser("compare", help="SFT vs Masked Thought vs ReMask: same data, schedule and seeds",
                               description="Train every mode with every seed (the embedded default: a fixed set of "
                                           "2048 examples for 6 epochs, 384 steps; --epochs 1 --n-train 12288 for "
                                           "the one-epoch contrast), evaluate held-out greedy exact match, multiple "
                                           "choice by log-likelihood and teacher-forced loss during training, print "
                                           "mean ± std per mode and paired differences against SFT (95%% t "
                                           "intervals, seeds ahead with a sign test, the smallest detectable "
                                           "difference), write results.json (with each run's machine) and "
                                           "curves.svg. Parts run elsewhere pool with compare-report.")
    compare_p.add_argument("--seeds", default=str(COMPARE_SEEDS),
                           help=f"a count N (seeds 0..N-1), a range A-B or a comma list such as 0-4,10 (default "
                                f"{COMPARE_SEEDS}: about an hour on 2 cores)")
    compare_p.add_argument("--eval-points", type=int, default=3, help="evaluations per run, evenly spaced, the last "
                                                                      "at the end (default 3)")
    compare_p.add_argument("--jobs", type=int, default=0,
                           help="runs trained at once, each in its own process (default 0: the CPU's cores / "
                                "--threads on a CPU, 1 on a GPU); the table does not depend on it")
    compare_p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[::-1]),
                           help="modes to compare (default: all three)")
    # compare sets these itself for every run (its modes: --modes, its seeds: --seeds)
    add_config_flags(compare_p, {"name": "compare", **COMPARE},
                     leave_out=("mode", "seed", "stop_at", "resume", "overwrite"))
    compare_p.set_defaults(run=cmd_compare)
    report_p = sub.add_parser("compare-report", help="pool several compare results.json into one report",
                              description="Pool the runs of several results.json of `compare` (parts run on other "
                                          "machines or at other times, e.g. --seeds 0-19 and --seeds 20-39) into "
                                          "one report: the tables, results.json and curves.svg. Refused: parts of "
                                          "different protocols, a run (seed and mode) in two parts.")
    report_p.add_argument("results", nargs="+", help="results.json files of remask.py compare")
    report_p.add_argument("--out", required=True, help="directory for the pooled results.json and curves.svg")
    report_p.set_defaults(run=cmd_compare_report)
    gen = sub.add_parser("generate", help="answer one prompt with a trained model (streamed)",
                         description="Wrap --prompt in the chat template (or --cot: the CoT template) and stream the "
                                     "reply until <|user|> or the end of text.")
    gen.add_argument("--prompt", required=True, help="the user's message (with --cot: a question)")
    gen.add_argument("--cot", action="store_true", help="ask in the CoT format: <|user|> ... <|rationale|>")
    _add_generation_flags(gen, 256)
    _add_sampling_flags(gen)
    gen.set_defaults(run=cmd_generate)
    chat = sub.add_parser("chat", help="a multi-turn conversation in the terminal",
                          description="Talk to a model in the chat format; /reset forgets the history, /exit leaves.")
    _add_generation_flags(chat, 256)
    _add_sampling_flags(chat)
    chat.set_defaults(run=cmd_chat)
    evaluate = sub.add_parser("eval", help="GSM8K or ARC as lm-evaluation-harness measures them",
                              description="lm-evaluation-harness's tasks on a model directory. gsm8k: 5-shot "
                                          "'Question: ...\\nAnswer:' prompts drawn with seed 1234, greedy decoding "
                                          "with its stop strings, strict-match and flexible-extract accuracy with "
                                          "standard errors (--format cot asks in the ReMask CoT template and reads "
                                          "the answer after <|answer|>); prompts longer than the model's context "
                                          "less --max-new-tokens lose tokens on the left, as in the harness. "
                                          "arc (= arc-challenge), arc-easy: 25-shot contexts drawn with seed 1234, "
                                          "the log-likelihood of each choice, acc and acc_norm with standard "
                                          "errors; contexts longer than the model's context lose tokens on the "
                                          "left, as in the harness.")
    evaluate.add_argument("task", choices=list(EVAL_NAMES), help="the benchmark")
    evaluate.add_argument("--data", required=True, help="the test split as JSON Lines (make data: "
                                                        "data/gsm8k-test.jsonl, data/ARC-Challenge-test.jsonl)")
    evaluate.add_argument("--fewshot-data", help="the train split, for the few-shot examples "
                                                 "(data/gsm8k-train.jsonl, data/ARC-Challenge-train.jsonl)")
    evaluate.add_argument("--format", choices=sorted(GSM8K_STOP), default="harness", help="gsm8k prompt format")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N problems (N >= 1)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    evaluate.add_argument("--output", help="JSON Lines, one row per problem: prompt, completion and extracted "
                                           "answers (gsm8k), log-likelihood of each choice and predictions (arc); "
                                           "default gsm8k-FORMAT.jsonl, arc-challenge.jsonl, arc-easy.jsonl")
    _add_generation_flags(evaluate, GSM8K_MAX_NEW_TOKENS)
    evaluate.set_defaults(run=cmd_eval)
    return parser


def main(argv=None):
    """Every command behind one error boundary: an expected failure is one `error:` line on stderr and exit code 1
    (argparse's usage errors: 2), an interruption one line and 130 (143 for SIGTERM), never a traceback; a failure
    nobody anticipated is one `error: internal error` line and 1 (REMASK_TRACEBACK=1 shows its traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TrainError, DataError, DownloadError, ValueError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'})", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:  # the last boundary: what nobody anticipated is one line too, the traceback on request
        if os.environ.get("REMASK_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (set REMASK_TRACEBACK=1 to see the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
