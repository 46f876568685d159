"""quantize.py: LLM.int8 8-bit quantization (Dettmers et al. 2022) in a few readable lines.

LLM.int8 stores every linear weight as int8 with one float32 scale per output row and computes
    y = x @ W^T  ~=  int32(CA @ CB^T) * (SCA outer SCB) / 127^2  +  x[:, O] @ W[:, O]^T
where
  - CB = round(W16 * 127 / SCB), SCB = per-row absmax of the fp16 weight (quantized once, at load time);
  - CA = round(x16 * 127 / SCA), SCA = per-row absmax of the fp16 activations (quantized every call);
  - O are the "outlier" input features: columns where any |x| >= threshold (6.0). A few such features
    carry most of a large model's signal, and vector-wise int8 would crush everything else in their
    rows, so they are multiplied in the input's own precision against the dequantized weight columns.
The integer product is exact (int32 accumulation): torch._int_mm on CUDA and CPU, float64 where
_int_mm's shape rules do not hold. The bytes of CB and SCB are identical to what bitsandbytes stores,
and a model quantized here saves to (and loads from) the bitsandbytes 8-bit checkpoint layout (model.py).

What it costs: LLM.int8 is a memory technique, not a speed one. Linear weights take 1 byte instead of 2
(StableLM-3B: 5.6 GB of bf16 -> 3.1 GB; embeddings and lm_head stay bf16), but every call quantizes the
activations, finds the outlier columns (a host sync) and runs an extra small matmul. On an H100 bitsandbytes'
LLM.int8 decodes ~3.3x slower than bf16 (bitsandbytes v0.45 benchmark, Llama-3.1-8B), whereas weight-only int8 with
the dequantization fused into the matmul (gpt-fast, torch.compile) decodes ~1.5x faster than bf16
at batch 1, because batch-1 decoding is bound by reading the weights. tests/bench_quantize.py
measures our version against bf16 on the machine at hand.

Deliberately left out: 4-bit formats, the old tiled ("col32"/"col_turing") weight layouts, training
through int8 weights (dequantize_model gives float linears to fine-tune), fused kernels.

References: arXiv 2208.07339 (LLM.int8); bitsandbytes 0.45+ int8_vectorwise_quant and
int8_mixed_scaled_mm (default backend); transformers' bitsandbytes integration (checkpoint layout).
"""
import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

# One 127 from each side's scale. bitsandbytes' CPU backend multiplies by 6.200124e-05 instead, a typo of
# 6.2000124e-05; with that value swapped in, this file reproduces its CPU logits bit for bit (tests/test_quantize.py).
DEQUANT_SCALE = 1 / 127**2

# ----------------------------------------------------------------------------- vector-wise quantization


def _quantize_rows(a16, absmax):
    """int8 of an fp16 matrix given each row's absmax; all-zero rows give zeros, not 0 * inf = NaN."""
    # fp32 reciprocal, then fp32 product, rounded half to even: bitsandbytes' exact arithmetic, so bytes match
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))  # (R,)
    return torch.round(a16.float() * scale.unsqueeze(-1)).to(torch.int8)  # (R, C)


def quantize_rowwise(weight):
    """(int8 CB (out, in), float32 SCB (out,)) of a float weight: per output row absmax of its fp16 cast.

    Per element |CB * SCB / 127 - W16| <= SCB / 254 (half a step) up to fp32 rounding of the scale.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_rowwise: expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    w16 = weight.detach().to(torch.float16)  # (N, K) bitsandbytes quantizes the fp16 copy of the weight
    if not torch.isfinite(w16).all():
        raise ValueError("quantize_rowwise: weight has values that are not finite in float16 (|w| > 65504?)")
    SCB = w16.abs().amax(dim=1).float()  # (N,)
    return _quantize_rows(w16, SCB), SCB


def dequantize_rowwise(CB, SCB, dtype=torch.float32):
    """The float weight CB * SCB / 127 that an int8 weight stands for."""
    return (CB.float() * SCB.unsqueeze(1) / 127).to(dtype)  # (N, K)


# ----------------------------------------------------------------------------- int8 matmul with outlier decomposition


def _int8_matmul(a, b):
    """Exact int32 a @ b^T of int8 (M, K) and (N, K)."""
    M, K = a.shape
    N = b.shape[0]
    if a.device.type == "cpu" or (a.is_cuda and K % 8 == 0 and N % 8 == 0):
        if a.is_cuda and M <= 16:  # cuBLASLt's int8 GEMM needs M > 16; zero rows are free next to the weight read
            a = torch.cat([a, a.new_zeros(17 - M, K)])  # (17, K)
        return torch._int_mm(a, b.t())[:M]  # (M, N) b.t() is a column-major view, the layout _int_mm wants
    # elsewhere float64: every partial sum is an integer below K * 127^2 < 2^53, so it is exact
    return (a.double() @ b.double().t()).to(torch.int32)  # (M, N)


def int8_linear(x, weight_int8, SCB, bias=None, threshold=6.0):
    """LLM.int8 y = x @ W^T + bias for x (..., in), int8 weight (out, in), SCB (out,); output in x's dtype.

    threshold > 0: input features with any |x16| >= threshold are multiplied in x's precision instead.
    threshold 0: no decomposition, everything goes through int8.
    """
    K = x.shape[-1]
    N = weight_int8.shape[0]
    if weight_int8.dtype != torch.int8 or weight_int8.shape != (N, K) or SCB.shape != (N,):
        raise ValueError(f"int8_linear: input (..., {K}) needs an int8 weight ({N}, {K}) and SCB ({N},); "
                         f"got {weight_int8.dtype} {tuple(weight_int8.shape)} and {tuple(SCB.shape)}")
    x2 = x.reshape(-1, K)  # (M, K)
    x16 = x2.to(torch.float16)  # (M, K) activations are quantized from their fp16 cast, as in bitsandbytes
    outlier_cols = None
    if threshold > 0:
        is_outlier = x16.abs() >= threshold  # (M, K)
        outlier_cols = is_outlier.any(dim=0).nonzero().squeeze(1)  # (O,) a host sync, as in bitsandbytes
        # outliers must not set their row's scale (the rest of their column still does, as in bitsandbytes)
        x16 = x16.masked_fill(is_outlier, 0)  # (M, K)
    SCA = x16.abs().amax(dim=1).float()  # (M,)
    CA = _quantize_rows(x16, SCA)  # (M, K)
    if outlier_cols is not None:
        CA[:, outlier_cols] = 0  # the whole outlier column goes through the float path below
    acc = _int8_matmul(CA, weight_int8)  # (M, N) int32, exact
    out = acc.float() * (SCA.unsqueeze(1) * SCB.unsqueeze(0)) * DEQUANT_SCALE  # (M, N)
    if bias is not None:
        out = out + bias.float()
    out = out.to(x.dtype)
    if outlier_cols is not None and outlier_cols.numel() > 0:
        w_out = dequantize_rowwise(weight_int8[:, outlier_cols], SCB, x.dtype)  # (N, O)
        out = torch.addmm(out, x2[:, outlier_cols], w_out.t())  # (M, N) in x's precision
    return out.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------- module and model surgery


class Int8Linear(nn.Module):
    """nn.Linear's drop-in for inference with an int8 weight; state dict keys: weight, SCB, (bias)."""

    def __init__(self, in_features, out_features, bias=True, threshold=6.0, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear, threshold=6.0):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight, layer.SCB = quantize_rowwise(linear.weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x):
        return int8_linear(x, self.weight, self.SCB, self.bias, self.threshold)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16), .half() and the like cast every float buffer, but the scales must stay float32
        # (as bitsandbytes stores them), so SCB takes only the device of such a cast
        SCB = self.SCB
        super()._apply(fn, recurse)
        if self.SCB.dtype != torch.float32:
            self.SCB = SCB.to(self.SCB.device)
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


def _replace_modules(model, kind, make):
    """Replace, in place, each submodule of type `kind` for which make(name, module) returns a module."""
    if type(model) is kind:
        raise TypeError(f"expected a model that contains {kind.__name__} layers, got one {kind.__name__} itself")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is kind]
    for name, module in targets:
        new = make(name, module)
        if new is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
    return model


def quantize_model(model, threshold=6.0, skip=("lm_head",)):
    """Every nn.Linear -> Int8Linear, in place, except those whose full or last name is in skip."""
    def make(name, linear):
        if name in skip or name.rpartition(".")[2] in skip:
            return None
        return Int8Linear.from_linear(linear, threshold)
    return _replace_modules(model, nn.Linear, make)


def dequantize_model(model, dtype=torch.float32):
    """Every Int8Linear -> nn.Linear with weight CB * SCB / 127 in dtype, in place (e.g. to fine-tune)."""
    def make(name, q):
        linear = nn.Linear(q.in_features, q.out_features, q.bias is not None, device=q.weight.device, dtype=dtype)
        linear.weight.data.copy_(dequantize_rowwise(q.weight, q.SCB, dtype))
        if q.bias is not None:
            linear.bias.data.copy_(q.bias.detach())
        return linear
    return _replace_modules(model, Int8Linear, make)


# ----------------------------------------------------------------------------- command line


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tensor_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _dir_bytes(directory):
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def _copy_tokenizer(src):
    """save_pretrained's extra: IN's tokenizer files, copied into the new directory before it takes OUT's place (the
    copy is a whole model: generate and eval need its tokenizer, and OUT is never without it), with the chat template
    and stop ids every model directory remask writes carries (data.save_chat_config). IN's tokenizer is read here,
    before any weight, so a broken one fails first."""
    from data import load_tokenizer, save_chat_config
    tok = load_tokenizer(src) if (Path(src) / "tokenizer.json").is_file() else None

    def copy(directory):
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copy2(Path(src) / name, directory / name)
        if tok is not None:
            save_chat_config(directory, tok)
    return copy


def _check_args(args):
    """Every flag and both paths, before any weight is read. Once the flags pass, an IN that names a Hub model
    becomes its directory in the Hugging Face cache (downloaded if missing: data.resolve_model)."""
    from data import resolve_model
    from model import Config, StableLM, check_apart, check_replaceable
    if args.prompts < 1:
        raise ValueError(f"--prompts {args.prompts}: need at least 1 prompt for the logit comparison")
    if args.prompt_len < 1:
        raise ValueError(f"--prompt-len {args.prompt_len}: need at least 1 token per prompt")
    if not math.isfinite(args.threshold) or args.threshold < 0:
        raise ValueError(f"--threshold {args.threshold}: need a finite number >= 0 (0 = no decomposition)")
    args.in_dir = str(resolve_model(args.in_dir))
    src, out = Path(args.in_dir), Path(args.out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory (IN is a Hugging Face model directory)")
    check_apart({"OUT": out}, {"IN": src})
    check_replaceable(out)
    config = Config.from_json(src / "config.json")
    is_8bit = config.quantization_config is not None
    if is_8bit and not args.dequantize:
        raise ValueError(f"{src}: already an 8-bit checkpoint (`python quantize.py --dequantize IN OUT` writes a "
                         f"float copy)")
    if args.dequantize and not is_8bit:
        raise ValueError(f"{src}: --dequantize needs an 8-bit checkpoint; config.json has no quantization_config")
    with torch.device("meta"):
        linears = [name for name, m in StableLM(config).named_modules() if isinstance(m, nn.Linear)]
    kinds = sorted({name.rpartition(".")[2] for name in linears})
    unknown = [s for s in args.skip if s not in linears and s not in kinds]
    if unknown:
        raise ValueError(f"--skip {' '.join(unknown)}: no such linear layer in {src}; layers are named by kind "
                         f"({', '.join(kinds)}) or in full ({linears[0]} ... {linears[-1]})")
    if config.tie_word_embeddings and not args.dequantize and "lm_head" not in args.skip:
        raise ValueError(f"{src}: lm_head shares the embedding matrix (tie_word_embeddings); keep it in float "
                         f"(--skip lm_head)")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write an LLM.int8 (bitsandbytes 8-bit layout) copy of a checkpoint, or with --dequantize a "
                    "float copy of an 8-bit one, and compare the two models' logits on random prompts.",
        epilog="An existing OUT is replaced (whole, never half-written) only when it is empty or a model directory "
               "remask wrote (its .remask-owner.json says so); anything else, and an OUT that is, holds or lies "
               "inside IN (links and spellings resolved), is refused before any work.")
    parser.add_argument("in_dir", metavar="IN", help="Hugging Face style StableLM checkpoint directory, or a model on "
                        "the Hub as ORG/NAME[@REVISION] (downloaded into the Hugging Face cache if missing)")
    parser.add_argument("out_dir", metavar="OUT", help="where to write the copy (see below for an existing OUT)")
    parser.add_argument("--dequantize", action="store_true",
                        help="IN is 8-bit: write a float copy (in the dtype of its other float tensors), e.g. to "
                             "fine-tune it")
    parser.add_argument("--threshold", type=float, default=6.0, help="outlier threshold (0 = no decomposition)")
    parser.add_argument("--skip", nargs="*", default=["lm_head"],
                        help="linear layers to keep in float, by kind (lm_head, up_proj, ...) or full name")
    parser.add_argument("--prompts", type=int, default=4, help="random prompts for the logit comparison")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    args = parser.parse_args(argv)
    from data import DownloadError
    try:
        convert(args)
    except (ValueError, OSError, DownloadError) as e:  # OSError includes FileNotFoundError and FileExistsError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted: {args.out_dir} holds what it held before, or the whole new copy", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the last boundary: an exception no check anticipated (a bug), its traceback on request
        if os.environ.get("REMASK_TRACEBACK", "") not in ("", "0"):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        print(f"error: internal error: {type(e).__name__}: {first_line} (set REMASK_TRACEBACK=1 to see the "
              f"traceback)", file=sys.stderr)
        sys.exit(1)


def convert(args):
    # The command line is the one part that runs a model; importing model.py here keeps the library above
    # free of it (model.py itself imports this file for Int8Linear).
    from model import StableLM

    _check_args(args)
    t0 = time.time()
    extra = _copy_tokenizer(args.in_dir)
    model = StableLM.from_pretrained(args.in_dir).eval()
    before = _tensor_bytes(model)
    vocab = model.config.vocab_size
    # seeded random token ids: a tokenizer-free probe of the whole network
    ids = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).float()  # (P, T, V)
        if args.dequantize:
            dequantize_model(model, model.model.embed_tokens.weight.dtype)
        else:
            quantize_model(model, args.threshold, tuple(args.skip))
        got = model(ids).float()  # (P, T, V)
    after = _tensor_bytes(model)
    model.save_pretrained(args.out_dir, extra=extra)
    with torch.no_grad():
        reloaded = StableLM.from_pretrained(args.out_dir).eval()(ids).float()
    if not torch.equal(reloaded, got):
        raise RuntimeError(f"{args.out_dir}: reloading the saved model does not reproduce its logits")
    rel = ((got - ref).abs().amax(dim=(1, 2)) / ref.abs().amax(dim=(1, 2))).max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"weights in memory: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({after / before:.2f}x)")
    print(f"safetensors on disk: {_dir_bytes(args.in_dir) / 1e6:.2f} MB -> {_dir_bytes(args.out_dir) / 1e6:.2f} MB")
    print(f"worst relative logit change over {args.prompts} random prompts of {args.prompt_len} tokens: {rel:.2e} "
          f"(max |dlogit| / max |logit| per prompt); top-1 agreement {agree:.1%}")
    what = "a float copy" if args.dequantize else f"an 8-bit copy (threshold {args.threshold}, skip {args.skip})"
    print(f"wrote {args.out_dir} in {time.time() - t0:.1f}s: {what}")


if __name__ == "__main__":
    import quantize  # run as the importable module, so its layers are the quantize.Int8Linear that model.py knows
    quantize.main()
