"""tests/bench.py: throughput of model.py on the current device (`make bench`, `python tests/bench.py --help`).

Each benchmark is a function (model, args) -> dict of measurements, registered in BENCHMARKS; the command line
runs the chosen benchmarks on the chosen named configs and prints one line each. Weights are random: speed does
not depend on their values. Defaults: the debug config in fp32 on a CPU; on a GPU also stablelm-3b-4e1t, in bf16.

  forward  inference forward passes of a (batch, seq) block: tokens/s and achieved TFLOP/s (MFU on known GPUs)
  decode   batch-1 greedy generation with the KV cache: tokens/s, and the weight bytes read per second

Peak numbers are dense bf16 (REFERENCE.md section 9); an unknown device prints "n/a", never a guessed MFU.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import CONFIGS, Config, StableLM, generate  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device, dtype):
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


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


def bench_decode(model, args):
    device = model.lm_head.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    sec = seconds_per_call(lambda: generate(model, prompt, args.new_tokens, compile=args.compile), device, 2, 3)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens_per_s = args.new_tokens / sec  # includes the 16-token prefill: a slight underestimate
    return {"new_tokens": args.new_tokens, "compile": args.compile, "tokens/s": f"{tokens_per_s:,.1f}",
            "weights GB/s": f"{weight_bytes * tokens_per_s / 1e9:,.1f}"}


BENCHMARKS = {"forward": bench_forward, "decode": bench_decode}

# ----------------------------------------------------------------------------- command line


def build(config, device, dtype):
    with torch.device(device):  # initialised in place on the device: no host copy of a 3B model
        return StableLM(config).to(dtype).eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", nargs="+", choices=list(BENCHMARKS), default=["forward"], help="benchmarks to run")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                   help="named configs (default: debug; on CUDA also stablelm-3b-4e1t)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch", type=int, default=8, help="forward: sequences per call")
    p.add_argument("--seq", type=int, default=256, help="forward: tokens per sequence")
    p.add_argument("--warmup", type=int, default=2, help="forward: untimed calls first")
    p.add_argument("--iters", type=int, default=5, help="forward: timed calls")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated per call")
    p.add_argument("--compile", action="store_true", help="decode: torch.compile + CUDA graphs for the decode step")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = args.configs or (["debug", "stablelm-3b-4e1t"] if device.type == "cuda" else ["debug"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {where}  dtype {str(dtype)[6:]}  torch {torch.__version__}")
    for name in names:
        model = build(Config.named(name), device, dtype)
        for bench in args.bench:
            result = BENCHMARKS[bench](model, args)
            print(f"{bench:8s} {name:18s} " + "  ".join(f"{k} {v}" for k, v in result.items()), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
