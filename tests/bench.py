"""tests/bench.py: throughput of remask on the current device (`make bench`, `python tests/bench.py --help`).

Each benchmark is a function (model, args) -> dict of measurements ((config, args) for the memory plan, which
builds its own small models), registered in BENCHMARKS; the command line runs the chosen benchmarks on the chosen
named configs and prints one line each. Weights are random: speed does not depend on their values. With no
arguments everything runs: the debug config on a CPU; on a GPU also stablelm-3b-4e1t (inference in bf16, training
in bf16 autocast over fp32 master weights, as remask.py trains).

  forward    inference forward passes of a (batch, seq) block: tokens/s and achieved TFLOP/s (MFU on known GPUs)
  step       the ReMask micro-step with gradients: both passes in one forward of a 2B batch + the chunked loss
             (remask.py's), against two separate forwards of the same model + the chunked loss, and against two
             forwards + the loss by its definition on fp32 copies (remask_loss_reference, the naive way), and
             against transformers' StableLmForCausalLM doing that naive step;
             with --compile (the default on CUDA) also the first one through torch.compile, as `train --compile`;
             sequence tokens/s, MFU, peak memory and the ratios, in the same run
  optimizer  the recipe's whole optimizer step: 256 sequences in micro-batches of 8 + Lilith with fp32 state over
             fp32 master weights: seconds and peak memory (does it fit an 80 GB card?)
  memory     the plan of that optimizer step's peak memory for micro-batches 16, 8, 4, with and without
             --grad-checkpointing: the static state plus what autograd saves for backward, measured by counting the
             saved tensors of short forwards of one- and two-layer versions of the model (runs on a CPU for the 3B);
             --ranks N...: also the per-rank plan of `train --parallel fsdp` (under torchrun the optimizer
             benchmark itself runs sharded, for a measured per-rank peak); on 1 and N ranks the plan of
             `--offload cpu` (remask.sharded_plan): the GPU side, the host side and the PCIe bytes, as a table
             at the end (configs: model.py's and stablelm-2-12b's, from its config.json)
  lilith     Lilith's step on this CPU (what an offloaded run's step costs on the host): seconds per parameter
  decode     batch-1 greedy generation with the KV cache, eager and (with --compile) with the compiled CUDA-graph
             decode step: tokens/s, the weight bytes read per second, and the speed-up over transformers' generate
  int8       tests/bench_quantize.py: LLM.int8 against bf16 for batch-1 decode matmuls

Peak numbers are dense bf16 from NVIDIA's data sheets; an unknown device prints "n/a", never a guessed MFU.
Peak memory: torch.cuda.max_memory_allocated on a GPU; on a CPU the process's peak resident size (VmHWM),
reset before each measurement.
The transformers baselines run only where transformers is installed (it is not a dependency of remask); they use
the very same parameter tensors as our model, so they cost no extra weight memory and compute the same function.
"""
import argparse
import functools
import gc
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

from contextlib import nullcontext

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quantize  # noqa: E402
from model import CONFIGS, Config, StableLM, generate  # noqa: E402
from remask import (IGNORE_INDEX, USABLE_GPU_MEMORY, Lilith, init_distributed, is_sharded, peak_flops,  # noqa: E402
                    remask_loss_parts, remask_loss_reference, sharded_plan, sharded_skeleton)


def reset_peak_memory(device):
    """Start a peak-memory measurement: the CUDA allocator's counter, or the kernel's VmHWM on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def peak_memory(device):
    """GB at the peak since reset_peak_memory, as a string ("n/a" where it cannot be read)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"
    try:
        status = Path("/proc/self/status").read_text()
        return f"{int(status.split('VmHWM:')[1].split()[0]) * 1024 / 1e9:.2f} GB RSS"
    except (OSError, IndexError, ValueError):
        return "n/a"


def seconds_per_call(fn, device, warmup, iters):
    """Mean wall time of fn() after warm-up calls, with the device drained before and after."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


@functools.cache
def import_transformers():
    """The transformers module, or None (said once) where it is not installed."""
    try:
        import transformers
        return transformers
    except ImportError as e:
        print(f"transformers baselines skipped: {e}")
        return None


def transformers_twin(model):
    """transformers' StableLmForCausalLM (SDPA attention) over model's own Parameter objects, or None: the same
    weights in the same memory, and model.zero_grad clears the gradients of both."""
    transformers = import_transformers()
    if transformers is None:
        return None
    config = transformers.StableLmConfig(**model.config.to_dict(), attn_implementation="sdpa")
    with torch.device(model.lm_head.weight.device):  # its own random weights are dropped at once by assign=True
        twin = transformers.StableLmForCausalLM(config)
    twin.load_state_dict(dict(model.named_parameters()), strict=True, assign=True)
    return twin.train(model.training)

# ----------------------------------------------------------------------------- benchmarks


@torch.no_grad()
def bench_forward(model, args):
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    sec = seconds_per_call(lambda: model(ids), device, args.warmup, args.iters)
    tokens = args.batch * args.seq
    flops = model.flops_per_token(args.seq) / 3 * tokens / sec  # forward = 1/3 of forward + backward
    peak = peak_flops(device, model.lm_head.weight.dtype)
    return {"batch": args.batch, "seq": args.seq, "tokens/s": f"{tokens / sec:,.0f}", "TFLOP/s": f"{flops / 1e12:.2f}",
            "MFU": f"{flops / peak:.1%}" if peak else "n/a"}


def compiles(name, fn):
    """Run fn once (it compiles); False, said in one line, where torch.compile cannot work here."""
    try:
        fn()
        return True
    except Exception as e:  # no compiler, no Triton, an unsupported op: the eager numbers still stand
        print(f"{name} skipped: torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return False


def bench_decode(model, args):
    """Batch-1 greedy decoding: ours eager, ours with the compiled (CUDA-graph) decode step, transformers."""
    device = model.lm_head.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    variants = {"eager": lambda: generate(model, prompt, args.new_tokens)}
    compiled = lambda: generate(model, prompt, args.new_tokens, compile=True)  # noqa: E731
    if args.compile and compiles("compiled decode", compiled):
        variants["compiled"] = compiled
    twin = transformers_twin(model)
    if twin is not None:  # min_new_tokens: no early stop on an end-of-text id, the same work as ours
        variants["transformers generate"] = lambda: twin.generate(
            prompt, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens, use_cache=True,
            pad_token_id=0)
    result = {"new_tokens": args.new_tokens}
    seconds = {name: seconds_per_call(fn, device, 2, 3) for name, fn in variants.items()}
    for name, sec in seconds.items():
        tokens_per_s = args.new_tokens / sec  # includes the 16-token prefill: a slight underestimate
        result[name] = f"{tokens_per_s:,.1f} tok/s, weights {weight_bytes * tokens_per_s / 1e9:,.1f} GB/s"
    for name in ("eager", "compiled"):
        if name in seconds and "transformers generate" in seconds:
            speed_up = seconds["transformers generate"] / seconds[name]
            result[f"{name} speed-up vs transformers generate"] = f"{speed_up:.2f}x"
    return result


def remask_batch(config, batch, seq, device, generator=None):
    """Random token ids (B, T), a masked copy, labels on the last 3/4 of each row (a prompt of 1/4 is not
    graded) and the KL positions: the shapes of a ReMask micro-batch."""
    ids = torch.randint(0, config.vocab_size - 1, (batch, seq), generator=generator).to(device)  # (B, T)
    target = torch.arange(seq, device=device) >= seq // 4  # (T,)
    labels = torch.where(target, ids, IGNORE_INDEX)  # (B, T)
    masked = torch.where(target & (torch.rand(batch, seq, generator=generator).to(device) < 0.4),
                         config.vocab_size - 1, ids)  # (B, T): 40% of the targets -> a "mask" id
    return masked, ids, labels, target.expand(batch, seq)


def training_autocast(device, args):
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.train_precision == "bf16" else nullcontext()


def bench_step(model, args):
    """One ReMask micro-step with gradients, three ways (four with transformers), in the same run on the same
    model and batch."""
    device = model.lm_head.weight.device
    model.train()
    masked, ids, labels, kl_mask = remask_batch(model.config, args.micro_batch, args.seq, device)
    autocast = training_autocast(device, args)

    def one_forward(runner=model):  # remask.py: both passes as one (2B, T) batch, the chunked loss
        with autocast:
            logits = runner(torch.cat([masked, ids]))  # (2B, T, V)
        remask_loss_parts(*logits.chunk(2), labels, 0.1, kl_mask=kl_mask).loss.backward()

    def two_forwards():  # the same loss, the passes as two forwards
        with autocast:
            logits_masked, logits_full = model(masked), model(ids)  # (B, T, V) each
        remask_loss_parts(logits_masked, logits_full, labels, 0.1, kl_mask=kl_mask).loss.backward()

    def naive():  # two forwards and the loss by its definition on fp32 copies
        with autocast:
            logits_masked, logits_full = model(masked), model(ids)  # (B, T, V) each
        remask_loss_reference(logits_masked.float(), logits_full.float(), labels, 0.1, kl_mask).loss.backward()

    def hf_naive():  # the naive step in transformers
        with autocast:
            masked_out, full_out = twin(masked), twin(ids)
        remask_loss_reference(masked_out.logits.float(), full_out.logits.float(), labels, 0.1,
                              kl_mask).loss.backward()

    twin = transformers_twin(model)
    model.gradient_checkpointing = args.grad_checkpointing  # recomputed blocks: the same work for both models
    if twin is not None and args.grad_checkpointing:
        twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flops = 2 * args.micro_batch * args.seq * model.flops_per_token(args.seq)  # two passes with gradients
    peak = peak_flops(device, torch.bfloat16 if isinstance(autocast, torch.autocast) else model.lm_head.weight.dtype)
    variants = {"one 2B forward": one_forward}
    compiled = functools.partial(one_forward, torch.compile(model))  # what remask.py train --compile runs
    if args.compile and compiles("compiled step", compiled):
        variants["one 2B forward, compiled"] = compiled
    variants.update({"two forwards": two_forwards, "naive": naive})
    if twin is not None:
        variants["transformers"] = hf_naive
    times, memory, failed = {}, {}, {}
    for round_ in range(3):  # interleaved rounds, best of each: drift in machine speed hits every variant alike
        for name, fn in variants.items():
            if name in failed:
                continue
            model.zero_grad(set_to_none=True)
            reset_peak_memory(device)
            try:
                sec = seconds_per_call(fn, device, args.warmup if round_ == 0 else 0, args.iters)
            except torch.OutOfMemoryError:  # say so and go on: the other variants' numbers still stand
                failed[name] = f"out of memory (peak {peak_memory(device)})"
                continue
            times[name] = min(times.get(name, sec), sec)
            memory.setdefault(name, peak_memory(device))
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = False
    result = {"micro_batch": args.micro_batch, "seq": args.seq, "grad_checkpointing": args.grad_checkpointing,
              **failed}
    for name, sec in times.items():
        mfu = f"{flops / sec / peak:.1%}" if peak else "n/a"
        tokens_per_s = args.micro_batch * args.seq / sec
        result[name] = f"{sec * 1e3:.1f} ms, {tokens_per_s:,.0f} tok/s, MFU {mfu}, peak {memory[name]}"
    for ours in ("one 2B forward", "one 2B forward, compiled"):
        for baseline in ("two forwards", "naive", "transformers"):
            if ours in times and baseline in times:
                result[f"{ours}: speed-up vs {baseline}"] = f"{times[baseline] / times[ours]:.2f}x"
    return result


def bench_optimizer(model, args):
    """The recipe's optimizer step: --global-batch sequences in micro-steps of --optimizer-micro-batch, then Lilith
    (fp32 state over fp32 weights): its time and its peak memory, the figure that must fit the card."""
    device = torch.device(args.device)  # where it computes (an offloaded model's parameters are on the host)
    sharded = is_sharded(model)  # built by build_sharded: under torchrun, or offloaded
    ranks = dist.get_world_size() if sharded else 1
    model.train()
    model.gradient_checkpointing = args.grad_checkpointing
    optimizer = Lilith(model.parameters(), lr=1e-5)
    autocast = training_autocast(device, args)
    micro_batch = args.optimizer_micro_batch
    accum = max(1, args.global_batch // (micro_batch * ranks))
    batches = [remask_batch(model.config, micro_batch, args.seq, device) for _ in range(min(accum, 2))]

    def step():
        for i in range(accum):
            if sharded:  # reduce-scatter after the last micro-batch only, as remask.accumulate_gradients
                model.set_requires_gradient_sync(args.reduce_every_micro_batch or i == accum - 1)
            masked, ids, labels, kl_mask = batches[i % len(batches)]
            with autocast:
                logits = model(torch.cat([masked, ids]))  # (2B, T, V)
            n = accum * int(kl_mask[:, 1:].sum())  # the step's label tokens = its KL positions here
            remask_loss_parts(*logits.chunk(2), labels, 0.1, kl_mask=kl_mask, num_tokens=n,
                              num_kl_positions=n).loss.backward()
            del logits
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {"ranks": ranks, "micro_batch": micro_batch, "accum": accum, "grad_checkpointing": args.grad_checkpointing,
              "reduce_every_micro_batch": args.reduce_every_micro_batch}
    reset_peak_memory(device)
    try:
        sec = seconds_per_call(step, device, 1, 1)
    except torch.OutOfMemoryError:
        return {**result, "step": f"out of memory (peak {peak_memory(device)}): see the memory plan (--bench memory)"}
    finally:
        model.gradient_checkpointing = False
    sequences = accum * micro_batch
    return {**result, "step": f"{sec:.2f} s ({sequences} sequences, {sequences * args.seq / sec:,.0f} tok/s)",
            "peak": peak_memory(device)}


def saved_for_backward(fn, exclude=()):
    """(fn(), bytes of the distinct tensors autograd saved for backward while it ran, not counting the storage of
    the tensors in exclude)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}  # storage address -> bytes: a tensor saved by several ops, or views of one, count once

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, sum(saved.values())


def saved_bytes(config, layers, tokens, device, autocast):
    """Bytes autograd keeps for backward after the training forward of `tokens` tokens through a `layers`-layer
    version of config, the parameters themselves not counted."""
    with torch.device(device):
        model = StableLM(replace(config, num_hidden_layers=layers)).train()
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    with autocast:
        return saved_for_backward(lambda: model(ids), exclude=model.parameters())[1]


def measure_saved(config, device, autocast) -> dict:
    """What autograd saves for backward, from short forwards of one- and two-layer versions of config: bytes per
    token in each block and outside them, and the fixed bytes (weight copies autocast makes) of each. The
    vocabulary adds only the head's weight copy outside the blocks: measured with VOCAB_MEASURED rows (a 12B-wide
    model then fits a 24 GB host) and scaled to the config's."""
    small = replace(config, vocab_size=min(config.vocab_size, VOCAB_MEASURED))
    n1, n2 = 64, 128  # tokens: two sizes separate what grows with tokens from what does not (weight copies)
    s = {(L, n): saved_bytes(small, L, n, device, autocast) for L in (1, 2) for n in (n1, n2)}
    per_layer_token = (s[2, n2] - s[1, n2] - s[2, n1] + s[1, n1]) / (n2 - n1)
    per_layer_fixed = s[2, n1] - s[1, n1] - per_layer_token * n1  # a layer's weights cast to bf16
    rest_token = (s[1, n2] - s[1, n1]) / (n2 - n1) - per_layer_token
    rest_fixed = s[1, n1] - per_layer_fixed - per_layer_token * n1 - rest_token * n1  # the head's weight copy
    return dict(per_layer_token=per_layer_token, per_layer_fixed=per_layer_fixed, rest_token=rest_token,
                rest_fixed=rest_fixed * config.vocab_size / small.vocab_size)


def bench_memory(config, args):
    """The memory plan of the recipe's optimizer step, from what autograd saves in short forwards of one- and
    two-layer versions of the model (on this device, under the training precision), scaled to the whole model:
    the peak is the static state plus the saved activations and the loss's logits buffers of one micro-step.
    --ranks: the per-rank plans of --parallel fsdp (remask.sharded_plan); on 1 and each of those ranks also
    --offload cpu's GPU and host sides and PCIe bytes, whose --optimizer-micro-batch rows also go to
    args.offload_rows, the table main prints at the end."""
    device = torch.device(args.device)
    autocast = training_autocast(device, args)
    m = measure_saved(config, device, autocast)
    logits_bytes = 2 if args.train_precision == "bf16" else 4
    saved = (m["per_layer_token"], m["rest_token"])
    result = {"static (fp32 weights, grads, 3 Lilith states)": f"{20 * parameters(config) / 1e9:.1f} GB",
              "weight copies": f"{(config.num_hidden_layers * m['per_layer_fixed'] + m['rest_fixed']) / 1e9:.1f} GB",
              "saved per token per layer": f"{m['per_layer_token'] / 1e3:.1f} KB",
              "saved per token outside the layers": f"{m['rest_token'] / 1e3:.1f} KB"}
    for micro_batch in sorted({args.micro_batch, args.optimizer_micro_batch, 16, 8, 4}, reverse=True):
        tokens = 2 * micro_batch * args.seq  # both passes
        plain, ckpt = (single_plan(config, m, tokens, c, logits_bytes) for c in (False, True))
        result[f"micro-batch {micro_batch}"] = f"{plain / 1e9:.1f} GB, with --grad-checkpointing {ckpt / 1e9:.1f} GB"
        for ranks in dict.fromkeys([1, *args.ranks]):
            accumulating = args.global_batch > micro_batch * ranks
            plan = functools.partial(sharded_plan, config, ranks, tokens, accumulating=accumulating,
                                     compute_bytes=logits_bytes, saved=saved)
            for offload in (False, True) if ranks > 1 else (True,):
                for every in (False, True):
                    flags = (", --offload cpu" if offload else "") + (", --reduce-every-micro-batch" if every else "")
                    gpu = [plan(offload=offload, grad_checkpointing=c, reduce_every_micro_batch=every).gpu
                           for c in (False, True)]
                    row = f"{gpu[0] / 1e9:.1f} GB, with --grad-checkpointing {gpu[1] / 1e9:.1f} GB"
                    if offload:
                        host = plan(offload=True)
                        row += f"; host {host.host / 1e9:.1f} GB ({host.pinned / 1e9:.1f} pinned)"
                    result[f"micro-batch {micro_batch}, fsdp {ranks} rank(s){flags}"] = row
            if micro_batch == args.optimizer_micro_batch:
                args.offload_rows.append(offload_row(args.name, config, ranks, micro_batch, plan, args))
    return result


def parameters(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in StableLM(config).parameters())


def single_plan(config, m, tokens, grad_checkpointing, logits_bytes) -> float:
    """Bytes at the peak of the recipe's optimizer step in one process, micro-batches of `tokens` (rows x sequence
    length), from measure_saved's m: the fp32 state (weights, gradients, Lilith's m1, m2, v: 20 bytes a parameter),
    the weight copies autocast makes, the saved activations, the logits and the loss's gradient buffer (alive
    together). Checkpointed: each block keeps its fp32 input; one block at a time is recomputed with its copies."""
    L, C = config.num_hidden_layers, config.hidden_size
    logits = 2 * tokens * config.vocab_size * logits_bytes
    if grad_checkpointing:
        return (20 * parameters(config) + m["rest_fixed"] + m["per_layer_fixed"]
                + tokens * (L * 4 * C + m["per_layer_token"] + m["rest_token"]) + logits)
    return (20 * parameters(config) + L * m["per_layer_fixed"] + m["rest_fixed"]
            + tokens * (L * m["per_layer_token"] + m["rest_token"]) + logits)


def offload_row(name, config, ranks, micro_batch, plan, args) -> dict:
    """One row of the offload table: the GPU side per rank (plain, --grad-checkpointing, and with
    --reduce-every-micro-batch too), the host side, and what crosses PCIe per micro-batch and per optimizer step."""
    accumulation = max(1, args.global_batch // (micro_batch * ranks))
    gpu = [plan(offload=True, grad_checkpointing=c, reduce_every_micro_batch=e).gpu
           for c, e in ((False, False), (True, False), (True, True))]
    p = plan(offload=True)
    return dict(name=name, params=parameters(config), ranks=ranks, gpu=gpu, host=p.host, pinned=p.pinned,
                to_gpu=p.to_gpu, to_gpu_step=accumulation * p.to_gpu, to_host=p.to_host, accumulation=accumulation)


def smallest_card(plan_bytes) -> str:
    """The smallest of the usual cards (GB, 1 GB = 2^30 bytes as the cards are sold) the plan fits, or 'no'."""
    fits = [card for card in CARDS_GB if plan_bytes < USABLE_GPU_MEMORY * card * 2 ** 30]
    return str(fits[0]) if fits else "no"


def offload_table(rows, seconds_per_param) -> str:
    """The offload rows of every config as one markdown table: GB per rank (and the smallest card each fits),
    host memory, PCIe bytes, and the CPU's Lilith step (measured here: seconds_per_param x parameters / N)."""
    lines = ["| model (parameters) | cards | GPU GB: card | `--grad-checkpointing` | and `--reduce-every-micro-batch` "
             "| host GB (pinned) | to GPU a micro-batch | to GPU a step | to host a step | Lilith step here |",
             "|---" * 10 + "|"]
    for r in rows:
        gpu = " | ".join(f"{g / 1e9:.1f}: {smallest_card(g)}" for g in r["gpu"])
        lilith = f"{seconds_per_param * r['params'] / r['ranks']:.0f} s" if seconds_per_param else "n/a"
        lines.append(f"| {r['name']} ({r['params'] / 1e9:.2f}B) | {r['ranks']} | {gpu} | {r['host'] / 1e9:.1f} "
                     f"({r['pinned'] / 1e9:.1f}) | {r['to_gpu'] / 1e9:.1f} GB | {r['to_gpu_step'] / 1e9:.0f} GB "
                     f"(x{r['accumulation']}) | {r['to_host'] / 1e9:.1f} GB (x{r['accumulation']} with "
                     f"`--reduce-every-micro-batch`) | {lilith} |")
    return "\n".join(lines)


def bench_lilith(args) -> dict:
    """Lilith's step on this CPU, the step an offloaded run takes on the host between two micro-batch rounds: over
    about --lilith-params fp32 parameters shaped as the 3B's MLP matrices, seconds per parameter."""
    shape = (2560, 6912)
    count = max(1, round(args.lilith_params / (shape[0] * shape[1])))
    params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(shape) * 1e-3
    optimizer = Lilith(params, lr=1e-5)
    optimizer.step()  # the first step makes the state
    times = []
    for _ in range(args.iters):  # the fastest: the step itself, not the other processes of a shared machine
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    n, sec = count * shape[0] * shape[1], min(times)
    return {"cpu": f"{cpu_name()}, {torch.get_num_threads()} threads", "parameters": f"{n / 1e6:.1f}M",
            "step": f"{sec:.3f} s (mean {sum(times) / len(times):.3f} s)", "per parameter": f"{sec / n * 1e9:.2f} ns",
            "seconds_per_param": sec / n}


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


BENCHMARKS = {"forward": bench_forward, "step": bench_step, "optimizer": bench_optimizer, "decode": bench_decode,
              "memory": bench_memory}
TRAINING = {"step", "optimizer"}  # benchmarks that train: fp32 master weights (+ bf16 autocast on a GPU)
PLANS = {"memory"}  # benchmarks that take the config, not a built model: they build their own small ones
# model.py's named configs and stabilityai/stablelm-2-12b's config.json (model.py names no 12B config)
NAMED = {**CONFIGS, "stablelm-2-12b": Config(vocab_size=100352, hidden_size=5120, intermediate_size=13824,
                                         num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                                         qk_layernorm=True, use_parallel_residual=True, bos_token_id=100257,
                                         eos_token_id=100257, torch_dtype="bfloat16")}
CARDS_GB = (16, 24, 40, 48, 80)  # the usual cards' memory, GiB as sold
VOCAB_MEASURED = 4096  # embedding rows of the models measure_saved builds

# ----------------------------------------------------------------------------- command line


def scaled(config, layers=None, hidden=None):
    """config with `layers` blocks and width `hidden`: the MLP and the heads' count scale with the width."""
    changes = {"num_hidden_layers": layers} if layers else {}
    if hidden:
        ratio = hidden / config.hidden_size
        changes.update(hidden_size=hidden, intermediate_size=round(config.intermediate_size * ratio / 64) * 64,
                       num_attention_heads=round(config.num_attention_heads * ratio),
                       num_key_value_heads=round(config.num_key_value_heads * ratio))
    return replace(config, **changes)


def build(config, device, dtype):
    with torch.device(device):  # initialised in place on the device: no host copy of a 3B model
        return StableLM(config).to(dtype).eval()


@torch.no_grad()
def build_sharded(config, device, precision, offload=False):
    """Under torchrun: the model as `train --parallel fsdp` shards it, each rank allocating only its slices (as a
    resumed sharded run does), filled with small random values (the timing and memory do not depend on them).
    offload: the slices in pinned host memory (--offload cpu; one rank is enough)."""
    model = sharded_skeleton(config, device, precision, offload)
    for p in model.parameters():
        p.to_local().normal_(0, 0.02)
    return model


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the defaults that depend on the device filled in (tests/gpu_check.py starts here)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", nargs="+", choices=[*BENCHMARKS, "lilith", "int8"],
                   default=[*BENCHMARKS, "lilith", "int8"], help="benchmarks to run (default: all)")
    p.add_argument("--configs", nargs="+", choices=list(NAMED),
                   help="named configs (default: debug; on CUDA also stablelm-3b-4e1t)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="inference weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--train-precision", choices=["bf16", "fp32"],
                   help="step/optimizer: bf16 autocast over fp32 weights (default on CUDA) or fp32 (default on CPU)")
    p.add_argument("--batch", type=int, default=8, help="forward: sequences per call")
    p.add_argument("--seq", type=int, default=256, help="forward, step, optimizer: tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=16, help="step: sequences per micro-step (the recipe's 16)")
    p.add_argument("--optimizer-micro-batch", type=int, default=8,
                   help="optimizer: sequences per micro-step (8: what fits an 80 GB card, see the memory plan)")
    p.add_argument("--global-batch", type=int, default=256, help="optimizer: sequences per optimizer step")
    p.add_argument("--grad-checkpointing", action="store_true", help="step, optimizer: recompute blocks in backward")
    p.add_argument("--reduce-every-micro-batch", action="store_true",
                   help="optimizer under torchrun: reduce-scatter after every micro-batch, as train's flag")
    p.add_argument("--ranks", type=int, nargs="*", default=[],
                   help="memory: also the per-rank plan of `train --parallel fsdp` on each of these numbers of ranks "
                        "(the optimizer step itself runs sharded when launched by torchrun)")
    p.add_argument("--layers", type=int, help="a version of the configs with this many blocks (to measure on a CPU)")
    p.add_argument("--hidden", type=int, help="... and this width (the MLP scaled alike; heads of the same size)")
    p.add_argument("--warmup", type=int, default=2, help="forward, step: untimed calls first")
    p.add_argument("--iters", type=int, default=5, help="forward, step: timed calls")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated per call")
    p.add_argument("--lilith-params", type=int, default=50_000_000, help="lilith: parameters Lilith steps over")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="step and decode: also time the torch.compile'd variants (default: on CUDA only)")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.train_precision = args.train_precision or ("bf16" if cuda else "fp32")
    args.compile = cuda if args.compile is None else args.compile
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: each rank on its own GPU (a CPU process group on CPUs)
        device = init_distributed("auto" if device.type == "cuda" else "cpu")[1]
    names = args.configs or (["debug", "stablelm-3b-4e1t"] if device.type == "cuda" else ["debug"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {where}  inference dtype {str(dtype)[6:]}  training {args.train_precision} over fp32 weights  "
          f"torch {torch.__version__}")
    seconds_per_param, args.offload_rows = None, []
    if "lilith" in args.bench:  # first: the memory plan's offload table prices the host's step with it
        result = bench_lilith(args)
        seconds_per_param = result.pop("seconds_per_param")
        print(f"{'lilith':9s} {'':18s} " + "  ".join(f"{k}: {v}" for k, v in result.items()), flush=True)
    for name in names:
        for bench in [b for b in args.bench if b in BENCHMARKS]:
            config, args.name = scaled(NAMED[name], args.layers, args.hidden), name
            if bench in PLANS:
                result = BENCHMARKS[bench](config, args)
            else:
                if bench == "optimizer" and dist.is_initialized():
                    model = build_sharded(config, device, args.train_precision)
                else:
                    model = build(config, device, torch.float32 if bench in TRAINING else dtype)
                result = BENCHMARKS[bench](model, args)
                del model
            print(f"{bench:9s} {name:18s} " + "  ".join(f"{k}: {v}" for k, v in result.items()), flush=True)
            gc.collect()  # a transformers model sits in reference cycles: free the weights it shares now
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.offload_rows:
        print(f"\n--offload cpu, per rank: micro-batch {args.optimizer_micro_batch} x {args.seq} tokens, "
              f"{args.global_batch} sequences a step, {args.train_precision}; a card fits below "
              f"{USABLE_GPU_MEMORY:.0%} of its bytes; PCIe bytes are fp32 (FSDP2 copies the fp32 slices, then casts)")
        print(offload_table(args.offload_rows, seconds_per_param))
    if "int8" in args.bench:
        bench_quantize.run(device)


if __name__ == "__main__":
    main()
