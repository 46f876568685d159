"""A helper program, not a test: how much resident memory remask_loss adds above its inputs at its peak, measured
in a process of its own by tests/test_loss.py's test_extra_peak_memory_is_a_few_logits_tensors.

    python tests/loss_peak_memory.py REPO_ROOT

prints three numbers, one a line, each the extra peak in (B, T, V) bf16 logits tensors: backward through both
passes, the loss alone under no_grad, and backward with a gradient for one pass only. Linux only: it reads the peak
(VmHWM) from /proc/self/status and resets it through /proc/self/clear_refs."""
import sys

import torch

sys.path.insert(0, sys.argv[1])
from remask import remask_loss  # noqa: E402 (from the repository root given on the command line)

torch.set_num_threads(1)  # a small job: threads would only wait on each other
B, T, V = 2, 128, 50304
lm, lf = (torch.empty(B, T, V, dtype=torch.bfloat16).normal_().requires_grad_() for _ in range(2))
labels = torch.randint(0, V, (B, T))
remask_loss(lm[:1, :4], lf[:1, :4], labels[:1, :4]).backward()  # warm-up: one-time allocations
status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024


def extra_peak(run):  # the peak resident size above the start, in logits tensors
    lm.grad = lf.grad = None
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
    base = status("VmRSS")
    run()
    print((status("VmHWM") - base) / (B * T * V * 2))


extra_peak(lambda: remask_loss(lm, lf, labels, chunk_tokens=8).backward())
with torch.no_grad():  # evaluation: inputs that require grad, but no graph to record
    extra_peak(lambda: remask_loss(lm, lf, labels, chunk_tokens=8))
extra_peak(lambda: remask_loss(lm, lf.detach(), labels, chunk_tokens=8).backward())  # one pass takes a gradient
