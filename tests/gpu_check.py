"""tests/gpu_check.py: everything that waits for a GPU, in one command (`make gpu-check`), written to one markdown
report. Sized to finish within 10 minutes on one H100 (--budget, 540 s by default: a section that would not fit what
is left is skipped and the report says so):

  1. every GPU-marked test (pytest -m gpu);
  2. the StableLM-3B ReMask micro-step on random weights (tests/bench.py's step: bf16 autocast over fp32 weights,
     eager) at micro-batch 4 and 8, with and without --grad-checkpointing: tokens/s, MFU and peak memory, beside
     transformers' naive step on the very same weights where transformers is installed;
  3. the 3B optimizer step (2 micro-batches, then Lilith) at the same settings: its peak against the single-process
     plan (tests/bench.py's, from what autograd saves on this GPU), then with --offload cpu (FSDP2 in one process,
     --grad-checkpointing): its GPU peak against remask.sharded_plan's GPU side, its host peak against the host side;
  4. batch-1 decoding (eager, compiled, and transformers' generate).

Without CUDA it says so in one line and exits 1. Usage: python tests/gpu_check.py [--report gpu-check.md]"""
import argparse
import datetime
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import bench  # noqa: E402
import remask  # noqa: E402

CONFIG = "stablelm-3b-4e1t"
SETTINGS = [(micro_batch, checkpointing) for micro_batch in (4, 8) for checkpointing in (False, True)]
# seconds on one H100 (estimates: model builds included): a measurement starts only if its need is left
NEEDS = {"step": 30, "optimizer": 15, "offload": 150, "decode": 40, "compiled decode": 120}  # step, optimizer: each
RESERVE = 240  # seconds of the budget kept from the GPU tests for the measurements


class Report:
    """The markdown report, and the clock of the budget."""

    def __init__(self, budget):
        self.lines, self.deadline, self.failed = [], time.perf_counter() + budget, False

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, section) -> bool:
        if self.left() >= NEEDS[section]:
            return True
        self.add(f"*{section}: skipped, {self.left():.0f} s of the budget left (it needs about {NEEDS[section]} s)*\n")
        return False

    def add(self, *lines):
        self.lines += lines
        print(*lines, sep="\n", flush=True)

    def table(self, header, rows):
        self.add("| " + " | ".join(header) + " |", "|---" * len(header) + "|",
                 *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), "")


def gpu_tests(report):
    """pytest -m gpu in its own process, within what is left of the budget less RESERVE."""
    report.add("## GPU tests (`pytest -m gpu`)", "")
    limit = max(120, report.left() - RESERVE)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
    # a session of its own: at the limit the tests' own subprocesses are stopped with pytest, not left on the GPU
    tests = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output = tests.communicate(timeout=limit)[0]
        verdict = "passed" if tests.returncode == 0 else f"exit code {tests.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(tests.pid, signal.SIGKILL)
        output, verdict = tests.communicate()[0], f"stopped after {limit:.0f} s"
    report.failed |= verdict != "passed"
    report.add(f"Result: **{verdict}**", "", "```", *output.strip().splitlines()[-25:], "```", "")


def step_rows(report, model, args):
    """The micro-step at each setting: ours and transformers' naive step, as tests/bench.py's step reports them."""
    report.add("## StableLM-3B ReMask micro-step, random weights (bf16 autocast over fp32 weights, eager)", "",
               "One micro-step: both passes as one forward of a 2B batch + the chunked loss + backward; transformers: "
               "two forwards + the loss by its definition on fp32 copies, on the same weights.", "")
    rows = []
    for micro_batch, checkpointing in SETTINGS:
        if not report.fits("step"):
            break
        args.micro_batch, args.grad_checkpointing = micro_batch, checkpointing
        result = bench.bench_step(model, args)
        rows.append((micro_batch, "yes" if checkpointing else "no", result.get("one 2B forward", "n/a"),
                     result.get("transformers", "n/a (not installed)"),
                     result.get("one 2B forward: speed-up vs transformers", "n/a")))
        gc.collect()
        torch.cuda.empty_cache()
    report.table(["micro-batch", "--grad-checkpointing", "remask: time, tokens/s, MFU, peak",
                  "transformers (naive): time, tokens/s, MFU, peak", "speed-up"], rows)


def optimizer_rows(report, model, args, saved):
    """The whole optimizer step (2 micro-batches + Lilith on the GPU): its peak against the single-process plan."""
    report.add("## StableLM-3B optimizer step: peak memory against the plan", "",
               "2 micro-batches of 256 tokens a sequence, then Lilith (fp32 state on the GPU). Plan: tests/bench.py's "
               "single-process plan with what autograd saves measured on this GPU. transformers has no Lilith step: "
               "its figure is the micro-step's above.", "")
    rows = []
    for micro_batch, checkpointing in SETTINGS:
        if not report.fits("optimizer"):
            break
        args.optimizer_micro_batch, args.global_batch, args.grad_checkpointing = micro_batch, 2 * micro_batch, \
            checkpointing
        result = bench.bench_optimizer(model, args)
        plan = bench.single_plan(model.config, saved, 2 * micro_batch * args.seq, checkpointing, 2)
        rows.append((micro_batch, "yes" if checkpointing else "no", result["step"], result.get("peak", "n/a"),
                     f"{plan / 1e9:.2f} GB"))
        gc.collect()
        torch.cuda.empty_cache()
    report.table(["micro-batch", "--grad-checkpointing", "step", "peak", "plan"], rows)


def offload_rows(report, config, args, saved):
    """--offload cpu in one process: the 3B sharded over a group of one rank with its slices in pinned host memory."""
    report.add("## StableLM-3B optimizer step with `--offload cpu` (FSDP2, one process)", "",
               "2 micro-batches of 8 x 256 tokens, --grad-checkpointing, Lilith on the CPU. Plan: remask.sharded_plan "
               "with what autograd saves measured on this GPU; the host peak also holds the process itself (CUDA, "
               "torch: a few GB). transformers: n/a (no offload of its own).", "")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = bench.build_sharded(config, torch.device("cuda"), "bf16", offload=True)
        args.optimizer_micro_batch, args.global_batch, args.grad_checkpointing = 8, 16, True
        cpu = torch.device("cpu")
        bench.reset_peak_memory(cpu)
        result = bench.bench_optimizer(model, args)
        host = bench.peak_memory(cpu)
        plan = remask.sharded_plan(config, 1, 2 * 8 * args.seq, offload=True, grad_checkpointing=True,
                                   accumulating=True, compute_bytes=2, saved=saved)
        report.table(["step", "GPU peak", "GPU plan", "host peak", "host plan (pinned)", "PCIe plan"],
                     [(result["step"], result.get("peak", "n/a"), f"{plan.gpu / 1e9:.2f} GB", host,
                       f"{plan.host / 1e9:.1f} GB ({plan.pinned / 1e9:.1f})",
                       f"{plan.to_gpu / 1e9:.1f} GB to the GPU a micro-batch, {plan.to_host / 1e9:.1f} GB back a "
                       f"step")])
        del model
    finally:
        dist.destroy_process_group()
        gc.collect()
        torch.cuda.empty_cache()


def decode_rows(report, config, args):
    report.add("## StableLM-3B batch-1 decoding (bf16, 16-token prompt, 64 new tokens)", "")
    args.compile = report.left() >= NEEDS["compiled decode"]
    model = bench.build(config, torch.device("cuda"), torch.bfloat16)
    result = bench.bench_decode(model, args)
    report.table(["variant", "figure"], [(name, value) for name, value in result.items()])
    if not args.compile:
        report.add("*compiled decode: skipped for the budget*", "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", default="gpu-check.md", help="the markdown report to write")
    p.add_argument("--budget", type=float, default=540, help="seconds for everything (10 minutes less a margin)")
    options = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check",
              file=sys.stderr)
        return 1
    report = Report(options.budget)
    transformers = bench.import_transformers()
    report.add(f"# gpu-check: {torch.cuda.get_device_name()}", "",
               f"{datetime.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, transformers "
               f"{transformers.__version__ if transformers else 'not installed'}; budget {options.budget:.0f} s", "")
    args = bench.parse_args(["--device", "cuda", "--train-precision", "bf16", "--no-compile", "--warmup", "1",
                             "--iters", "1"])
    config = bench.scaled(bench.NAMED[CONFIG])  # a copy of the named config
    sections = [("GPU tests", lambda: gpu_tests(report))]
    saved = {}

    def measured():  # what autograd saves per token on this GPU, for the plans
        m = bench.measure_saved(config, torch.device("cuda"), bench.training_autocast(torch.device("cuda"), args))
        saved.update(m, pair=(m["per_layer_token"], m["rest_token"]))

    def whole_model():
        measured()
        model = bench.build(config, torch.device("cuda"), torch.float32)
        step_rows(report, model, args)
        optimizer_rows(report, model, args, saved)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    sections += [("3B step and optimizer step", whole_model),
                 ("--offload cpu", lambda: report.fits("offload") and offload_rows(report, config, args,
                                                                                   saved.get("pair"))),
                 ("decode", lambda: report.fits("decode") and decode_rows(report, config, args))]
    for name, section in sections:
        try:
            section()
        except Exception as e:  # a section's failure is a finding: the report goes on
            report.failed = True
            report.add(f"**{name} failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}**", "")
    Path(options.report).write_text("\n".join(report.lines) + "\n")
    print(f"gpu-check: {'FAILED' if report.failed else 'passed'}; report: {options.report}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
