"""bench_quantize.py: what LLM.int8 saves in memory and costs in speed, for StableLM-3B-4e1t's linear layers.

Memory is computed from the 3B config's shapes (nothing is allocated). Speed is batch-1 decoding, the case
that matters for generation: one token's activations (1, in) times each linear's weight, F.linear in bf16
against quantize.int8_linear, timed in the same run on the same device. A decode step is weight-read
bound, so achieved GB/s (weight bytes / time) says how close each path gets to the memory bandwidth.
On a CPU the layer shapes are scaled down 10x (hidden 256, intermediate 688) and it runs on one thread; it
says so.

Usage: python tests/bench_quantize.py [--device cuda|cpu] [--iters N]
"""
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quantize import int8_linear, quantize_rowwise  # noqa: E402


@dataclass
class Config3B:
    hidden: int = 2560  # hidden_size
    intermediate: int = 6912  # intermediate_size (SwiGLU)
    layers: int = 32  # num_hidden_layers
    vocab: int = 50304  # vocab_size (embed_tokens and lm_head, kept in bf16 by LLM.int8)


def layer_linears(c):
    """(name, out, in, count per layer) of one decoder layer's linears."""
    return [("q/k/v/o_proj", c.hidden, c.hidden, 4), ("gate/up_proj", c.intermediate, c.hidden, 2),
            ("down_proj", c.hidden, c.intermediate, 1)]


# ----------------------------------------------------------------------------- memory


def weight_memory(c=Config3B()):
    """Bytes of the model's weights in bf16, and with LLM.int8 linears (int8 + one float32 SCB per row)."""
    linear = sum(n * k * count for _, n, k, count in layer_linears(c)) * c.layers
    scb_rows = sum(n * count for _, n, _, count in layer_linears(c)) * c.layers
    other = 2 * c.vocab * c.hidden + (4 * c.layers + 2) * c.hidden  # embed + lm_head, LayerNorm weights and biases
    return 2 * (linear + other), linear + 4 * scb_rows + 2 * other


# ----------------------------------------------------------------------------- speed


def _seconds_per_call(fn, device, iters, rounds=5):
    """Best of `rounds` averages: a busy machine only ever makes a round slower."""
    for _ in range(3):
        fn()  # warm-up: kernel selection, allocator
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def decode_speed(device, c, iters):
    """Per layer shape: (name, shape, count, bf16 s, int8 s, bf16 bytes, int8 bytes) for one token."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, n, k, count in layer_linears(c):
        w = (torch.randn(n, k, generator=g) * 0.02).to(device, torch.bfloat16)
        CB, SCB = quantize_rowwise(w)
        x = torch.randn(1, k, generator=g).to(device, torch.bfloat16)  # (1, K) one token
        x[0, :2] = 8.0  # two outlier features, the regime LLM.int8 is built for
        t16 = _seconds_per_call(lambda: F.linear(x, w), device, iters)
        t8 = _seconds_per_call(lambda: int8_linear(x, CB, SCB, threshold=6.0), device, iters)
        rows.append((name, f"{n}x{k}", count, t16, t8, 2 * n * k, n * k + 4 * n))
    return rows


def run(device=None, iters=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = Config3B()
    bf16, int8 = weight_memory(full)
    print(f"StableLM-3B-4e1t weights: bf16 {bf16 / 1e9:.2f} GB, LLM.int8 {int8 / 1e9:.2f} GB "
          f"({int8 / bf16:.2f}x; embeddings, lm_head and norms stay bf16)")
    if device.type == "cuda":
        c, what = full, f"{torch.cuda.get_device_name(device)}, 3B layer shapes"
    else:
        c = Config3B(hidden=256, intermediate=688)
        what = f"CPU (1 thread), shapes scaled down 10x (hidden {c.hidden}, intermediate {c.intermediate})"
    iters = iters or (100 if device.type == "cuda" else 20)
    print(f"batch-1 decode matmuls on {what}, best of 5 rounds of {iters} calls")
    print(f"{'layer':>14} {'out x in':>12} {'bf16 us':>9} {'int8 us':>9} {'bf16 GB/s':>10} {'int8 GB/s':>10} "
          f"{'int8/bf16':>10}")
    threads = torch.get_num_threads()
    if device.type == "cpu":  # one thread: on a shared 2-core box, OpenMP barriers stall for whole scheduler ticks
        torch.set_num_threads(1)
    try:
        rows = decode_speed(device, c, iters)
    finally:
        torch.set_num_threads(threads)
    for name, shape, _, t16, t8, b16, b8 in rows:
        print(f"{name:>14} {shape:>12} {t16 * 1e6:9.1f} {t8 * 1e6:9.1f} {b16 / t16 / 1e9:10.2f} {b8 / t8 / 1e9:10.2f} "
              f"{t8 / t16:9.2f}x")
    token16 = c.layers * sum(count * t16 for _, _, count, t16, _, _, _ in rows)
    token8 = c.layers * sum(count * t8 for _, _, count, _, t8, _, _ in rows)
    print(f"per token, {c.layers} layers of linears (lm_head, bf16 in both, left out): bf16 {token16 * 1e3:.2f} ms "
          f"({1 / token16:.1f} tok/s), LLM.int8 {token8 * 1e3:.2f} ms ({1 / token8:.1f} tok/s): "
          f"int8 takes {token8 / token16:.2f}x the bf16 time")
    return {"device": str(device), "bf16_bytes": bf16, "int8_bytes": int8, "bf16_s_per_token": token16,
            "int8_s_per_token": token8}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per shape")
    args = parser.parse_args(argv)
    run(args.device, args.iters)


if __name__ == "__main__":
    main()
