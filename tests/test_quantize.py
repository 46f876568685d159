"""Tests of quantize.py: LLM.int8 arithmetic as property tests, byte equality with bitsandbytes, and (last
section) the bitsandbytes 8-bit checkpoint round trip through model.py and the command line.

The error bound of int8_linear (checked over many seeds by test_int8_linear_within_quantization_bound):
write x = xq + ea and W = Wq + ew, with xq = CA * SCA / 127 and Wq = CB * SCB / 127 the dequantized
values. Rounding to the nearest step gives |ea_ik| <= SCA_i / 254 and |ew_jk| <= SCB_j / 254 (each up
to a factor 1 + 3e-5 from the fp32 scale). Over the regular (int8) columns R,
    x W - xq Wq = ea W + x ew - ea ew,
and over the outlier columns O only the weight is quantized (x W - x Wq = x ew), so
    |y_ij - (x W^T)_ij| <= (SCA_i sum_R |W_jk| + SCB_j sum_all |x_ik|) / 254 + |R| SCA_i SCB_j / 254^2,
plus floating-point rounding of the dequantization and of the outlier matmul in x's dtype.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import NEOX_DIR, ROOT, STABLELM_TINY, STABLELM_TINY_INT8
from quantize import (Int8Linear, _int8_matmul, dequantize_model, dequantize_rowwise, int8_linear,
                      quantize_model, quantize_rowwise)

SCALE_SLACK = 1 + 1e-4  # the fp32 scale 127 / absmax is off by a few ulps: 3e-5 at most, rounded up


def fp16_exact(t):
    """t rounded to float16 values, so that the fp16 cast inside LLM.int8 is exact."""
    return t.half().float()


def random_case(seed, outliers=True, bias=True):
    """A random (x, W, bias) with rows of varied scale, zero rows and, optionally, outlier feature columns."""
    g = torch.Generator().manual_seed(seed)
    M, K, N = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in ((1, 9), (8, 96), (1, 40)))
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 3
    if outliers and M > 0:
        cols = torch.randperm(K, generator=g)[: max(1, K // 16)]
        x[torch.randint(0, M, (cols.numel(),), generator=g), cols] = (torch.rand(cols.numel(), generator=g) * 40 + 6)
    W = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 0.2
    if N > 2:
        W[1] = 0  # an all-zero weight row
    b = torch.randn(N, generator=g) if bias else None
    return fp16_exact(x), fp16_exact(W), (fp16_exact(b) if bias else None)


def error_bound(x, W, bias, threshold):
    """The bound of the module docstring, in float64, for fp16-exact x and W."""
    x, W = x.double(), W.double()
    SCB = W.abs().amax(dim=1)  # (N,)
    is_outlier = x.abs() >= threshold if threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
    regular = ~is_outlier.any(dim=0)  # (K,)
    SCA = x.masked_fill(is_outlier, 0).abs().amax(dim=1)  # (M,)
    bound = SCALE_SLACK / 254 * (SCA[:, None] * (W.abs() * regular).sum(1)[None, :]
                                 + SCB[None, :] * x.abs().sum(1)[:, None])
    bound += int(regular.sum()) * SCA[:, None] * SCB[None, :] * SCALE_SLACK ** 2 / 254 ** 2
    magnitude = x.abs() @ W.abs().t() + (bias.double().abs() if bias is not None else 0)  # (M, N)
    return bound, magnitude


# ----------------------------------------------------------------------------- quantize_rowwise


@pytest.mark.parametrize("seed", range(20))
def test_quantize_rowwise_error_at_most_half_a_step(seed):
    g = torch.Generator().manual_seed(seed)
    N, K = int(torch.randint(1, 50, (), generator=g)), int(torch.randint(1, 200, (), generator=g))
    W = torch.randn(N, K, generator=g) * torch.exp(torch.randn(N, 1, generator=g) * 3)  # scales over decades
    W[torch.rand(N, generator=g) < 0.2] = 0  # all-zero rows
    CB, SCB = quantize_rowwise(W)
    assert CB.dtype == torch.int8 and CB.shape == (N, K) and SCB.dtype == torch.float32 and SCB.shape == (N,)
    W16 = W.half().double()
    assert torch.equal(SCB.double(), W16.abs().amax(dim=1))
    assert CB.abs().max() <= 127
    err = (CB.double() * SCB.double()[:, None] / 127 - W16).abs()
    assert (err <= SCB.double()[:, None] / 254 * SCALE_SLACK).all()
    zero_rows = SCB == 0
    assert (CB[zero_rows] == 0).all() and torch.equal(zero_rows, (W == 0).all(dim=1))
    nonzero = ~zero_rows
    assert (CB[nonzero].abs().amax(dim=1) == 127).all()  # each row's absmax lands on the last step


def test_quantize_rowwise_hand_worked_rounds_half_to_even():
    W = torch.tensor([[127.0, 62.5, -0.5, 1.5, -63.5], [1.0, -0.5, 0.25, 0.0, 0.0], [0.0] * 5])
    CB, SCB = quantize_rowwise(W)
    assert SCB.tolist() == [127.0, 1.0, 0.0]
    # row 0: scale exactly 1, ties go to even; row 1: 127 * [1, -0.5, 0.25] = [127, -63.5, 31.75]
    assert CB.tolist() == [[127, 62, 0, 2, -64], [127, -64, 32, 0, 0], [0, 0, 0, 0, 0]]


def test_quantize_rowwise_matches_bitsandbytes_bytes():
    """Quantizing the float fixture reproduces the int8 weights and SCB that bitsandbytes saved, byte for byte."""
    floats, saved = load_file(STABLELM_TINY / "model.safetensors"), load_file(STABLELM_TINY_INT8 / "model.safetensors")
    names = [k[: -len(".SCB")] for k in saved if k.endswith(".SCB")]
    assert len(names) == 14
    for name in names:
        CB, SCB = quantize_rowwise(floats[name + ".weight"])
        assert torch.equal(CB, saved[name + ".weight"]), name
        assert torch.equal(SCB, saved[name + ".SCB"]), name


def test_quantize_rowwise_rejects_bad_weights():
    with pytest.raises(ValueError, match="2-D float weight"):
        quantize_rowwise(torch.ones(4))
    with pytest.raises(ValueError, match="not finite in float16"):
        quantize_rowwise(torch.tensor([[1e5, 1.0]]))


# ----------------------------------------------------------------------------- int8_linear


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_within_quantization_bound(seed, threshold):
    x, W, b = random_case(seed, bias=seed % 2 == 0)
    CB, SCB = quantize_rowwise(W)
    y = int8_linear(x, CB, SCB, b, threshold)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], W.shape[0])
    ref = x.double() @ W.double().t() + (b.double() if b is not None else 0)
    bound, magnitude = error_bound(x, W, b, threshold)
    fp_rounding = (x.shape[1] + 8) * 2.0 ** -24 * magnitude
    assert ((y.double() - ref).abs() <= bound + fp_rounding).all()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_half_precision_inputs(seed, dtype):
    x, W, b = random_case(100 + seed)
    CB, SCB = quantize_rowwise(W)
    y = int8_linear(x.to(dtype), CB, SCB, b.to(dtype), 6.0)
    assert y.dtype == dtype
    xd = x.to(dtype).float()  # what the function actually received
    ref = xd.double() @ W.double().t() + b.to(dtype).double()
    bound, magnitude = error_bound(xd, W, b.to(dtype).float(), 6.0)
    assert ((y.double() - ref).abs() <= bound + 2 * torch.finfo(dtype).eps * magnitude).all()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_outlier_columns_are_exact_in_input_precision(seed, dtype):
    """Only outlier features nonzero: the int8 part is 0 and the result is the exact float product.

    Weights are integers with each row's absmax 127 (in a feature x never uses), so CB * SCB / 127 is the
    weight itself; all products and sums are small integers, exact in every dtype. Quantizing the outliers
    instead would be visibly wrong (6 * 127 / 8 = 95.25 is not an integer).
    """
    g = torch.Generator().manual_seed(seed)
    M, K, N = int(torch.randint(1, 7, (), generator=g)), 16, 8
    cols = torch.randperm(K - 1, generator=g)[:2] + 1  # feature 0 holds the weights' 127s
    x = torch.zeros(M, K)
    x[:, cols] = (torch.randint(6, 9, (M, 2), generator=g) * (torch.randint(0, 2, (M, 2), generator=g) * 2 - 1)).float()
    W = torch.randint(-8, 9, (N, K), generator=g).float()
    W[:, 0] = 127 * (torch.randint(0, 2, (N,), generator=g) * 2 - 1)
    b = torch.randint(-4, 5, (N,), generator=g).float()
    CB, SCB = quantize_rowwise(W)
    assert torch.equal(dequantize_rowwise(CB, SCB), W)
    y = int8_linear(x.to(dtype), CB, SCB, b.to(dtype), 6.0)
    assert y.dtype == dtype
    assert torch.equal(y.float(), x[:, cols] @ W[:, cols].t() + b)


def test_int8_linear_hand_worked():
    x, W = torch.tensor([[1.0, 2.0]]), torch.tensor([[127.0, -127.0]])  # exact product: 127 - 254 = -127
    CB, SCB = quantize_rowwise(W)
    # no decomposition: SCA = 2, CA = round([63.5, 127]) = [64, 127], acc = 127 * (64 - 127) = -8001,
    # y = -8001 * 2 * 127 / 127^2 = -126 (1 was stored as 64 * 2 / 127)
    assert int8_linear(x, CB, SCB, threshold=0.0).item() == -126.0
    # feature 1 (2 >= 1.5) is an outlier: SCA = 1, CA = [127, 0], int8 part 127, float part 2 * -127
    assert int8_linear(x, CB, SCB, threshold=1.5).item() == -127.0
    # bitsandbytes' rule: an outlier column leaves int8 for every row, but only the outlier element itself is
    # kept out of its row's scale. Row 1: SCA = max(3, 2) = 3, CA = [0, round(84.67)] = [0, 85], so
    # y = 85 * 127 * 3 * 127 / 127^2 = 255 (zeroing the whole column first would give SCA 2 and exactly 254)
    x, W = torch.tensor([[10.0, 1.0], [3.0, 2.0]]), torch.tensor([[0.0, 127.0]])
    CB, SCB = quantize_rowwise(W)
    assert int8_linear(x, CB, SCB, threshold=6.0).flatten().tolist() == pytest.approx([127.0, 255.0], abs=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_threshold_matters_only_with_outliers(seed):
    x, W, b = random_case(200 + seed, outliers=False)
    x = x.clamp(-5.9, 5.9)
    CB, SCB = quantize_rowwise(W)
    assert torch.equal(int8_linear(x, CB, SCB, b, 6.0), int8_linear(x, CB, SCB, b, 0.0))
    # one large feature ruins its rows' activation scale unless it is decomposed; measured against the
    # dequantized weights, so that only the activations' quantization error is left
    x[:, 0] = 60.0
    ref = x.double() @ dequantize_rowwise(CB, SCB).double().t() + b.double()
    err6 = (int8_linear(x, CB, SCB, b, 6.0).double() - ref).abs().mean()
    err0 = (int8_linear(x, CB, SCB, b, 0.0).double() - ref).abs().mean()
    assert err6 < err0 / 5


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_zero_rows_and_columns_give_the_bias(threshold):
    g = torch.Generator().manual_seed(300)
    x = fp16_exact(torch.randn(5, 32, generator=g) * 4)
    W, b = torch.randn(7, 32, generator=g), torch.randn(7, generator=g)
    x[0] = 0  # an all-zero input row
    x[:, 1] = 0  # an all-zero feature
    W[2] = 0  # an all-zero weight row
    CB, SCB = quantize_rowwise(W)
    y = int8_linear(x, CB, SCB, b, threshold)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], b) and torch.equal(y[:, 2], b[2].expand(x.shape[0]))
    assert torch.equal(int8_linear(torch.zeros(3, x.shape[1]), CB, SCB, None, threshold), torch.zeros(3, W.shape[0]))


@pytest.mark.parametrize("seed", range(6))
def test_rows_are_independent_without_outliers(seed):
    """Vector-wise quantization: each row alone (one-row inputs) gives the same bits as in a batch."""
    x, W, b = random_case(400 + seed, outliers=False)
    x = x.clamp(-5.9, 5.9)
    CB, SCB = quantize_rowwise(W)
    y = int8_linear(x, CB, SCB, b)
    for i in range(x.shape[0]):
        assert torch.equal(int8_linear(x[i:i + 1], CB, SCB, b), y[i:i + 1])
        assert torch.equal(int8_linear(x[i], CB, SCB, b), y[i])  # a 1-D input


@pytest.mark.parametrize("seed", range(6))
def test_leading_dims_are_flattened_tokens(seed):
    x, W, b = random_case(500 + seed)
    CB, SCB = quantize_rowwise(W)
    x3 = torch.cat([x, x.flip(0)]).reshape(2, x.shape[0], -1)  # (B, T, K)
    y3 = int8_linear(x3, CB, SCB, b)
    assert y3.shape == (2, x.shape[0], W.shape[0])
    assert torch.equal(y3, int8_linear(x3.reshape(-1, x.shape[1]), CB, SCB, b).reshape(y3.shape))


def test_int8_matmul_is_exact_at_the_extremes():
    """K = 6912 (the 3B MLP) of 127 * 127 is 1.1e8, beyond float32's exact integers (2^24)."""
    a = torch.full((3, 6912), 127, dtype=torch.int8)
    a[1] = -127
    a[2, ::2] = -127
    b = torch.full((8, 6912), 127, dtype=torch.int8)
    b[3] = torch.randint(-127, 128, (6912,), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    want = a.long() @ b.long().t()
    got = _int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    assert want[0, 0] == 6912 * 127 * 127


def test_int8_linear_rejects_mismatched_weights():
    CB, SCB = quantize_rowwise(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"int8 weight \(4, 6\)"):
        int8_linear(torch.randn(2, 6), CB, SCB)
    with pytest.raises(ValueError, match="int8 weight"):
        int8_linear(torch.randn(2, 8), CB.float(), SCB)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 17, 40])
@pytest.mark.parametrize("K,N", [(64, 48), (60, 44)])  # _int_mm's shapes, and the float64 fallback
def test_cuda_matches_cpu(M, K, N):
    g = torch.Generator().manual_seed(M * K)
    x, W = fp16_exact(torch.randn(M, K, generator=g) * 3), fp16_exact(torch.randn(N, K, generator=g))
    CB, SCB = quantize_rowwise(W)
    assert torch.equal(_int8_matmul(*(t.cuda() for t in (quantize_rowwise(x)[0], CB))).cpu(),
                       _int8_matmul(quantize_rowwise(x)[0], CB))
    # without outliers every step is elementwise IEEE arithmetic or an exact integer product: same bits
    y = int8_linear(x.cuda(), CB.cuda(), SCB.cuda(), threshold=0.0).cpu()
    assert torch.equal(y, int8_linear(x, CB, SCB, threshold=0.0))
    y6 = int8_linear(x.cuda(), CB.cuda(), SCB.cuda(), threshold=6.0).cpu()
    torch.testing.assert_close(y6, int8_linear(x, CB, SCB, threshold=6.0), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- Int8Linear and model surgery


def test_int8_linear_module_from_linear_and_state_dict():
    linear = nn.Linear(24, 10)
    q = Int8Linear.from_linear(linear, threshold=5.0)
    CB, SCB = quantize_rowwise(linear.weight)
    assert torch.equal(q.weight, CB) and torch.equal(q.SCB, SCB) and torch.equal(q.bias, linear.bias)
    assert set(q.state_dict()) == {"weight", "SCB", "bias"}
    assert set(Int8Linear(24, 10, bias=False).state_dict()) == {"weight", "SCB"}
    x = torch.randn(2, 3, 24) * 4
    assert torch.equal(q(x), int8_linear(x, CB, SCB, linear.bias, 5.0))
    # built on meta then given real tensors, the way model.py loads checkpoints
    m = Int8Linear(24, 10, threshold=5.0, device="meta", dtype=torch.bfloat16)
    assert m.weight.is_meta and m.weight.dtype == torch.int8 and m.SCB.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16
    m.load_state_dict(q.state_dict(), assign=True)
    assert torch.equal(m(x), q(x))
    # a dtype cast of the model leaves int8 weights and float32 scales alone
    h = Int8Linear.from_linear(linear).to(torch.bfloat16)
    assert h.bias.dtype == torch.bfloat16 and torch.equal(h.weight, CB) and torch.equal(h.SCB, SCB)
    assert h.half().SCB.dtype == torch.float32
    with pytest.raises(TypeError, match="contains Linear layers"):
        quantize_model(linear)


def test_quantize_and_dequantize_model():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "layers": nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(16, 16), "up": nn.Linear(16, 32, bias=False)})
                                 for _ in range(2)]),
        "norm": nn.LayerNorm(16),
        "lm_head": nn.Linear(16, 40),
    })
    floats = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_model(model, threshold=4.0, skip=("lm_head", "layers.1.up")) is model
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    assert kinds == {"layers.0.q_proj": "Int8Linear", "layers.0.up": "Int8Linear", "layers.1.q_proj": "Int8Linear",
                     "layers.1.up": "Linear", "lm_head": "Linear"}
    assert model["layers"][0]["q_proj"].threshold == 4.0
    assert torch.equal(model["layers"][0]["up"].weight, quantize_rowwise(floats["layers.0.up.weight"])[0])
    assert dequantize_model(model, dtype=torch.bfloat16) is model
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    for name in ("layers.0.q_proj", "layers.0.up", "layers.1.q_proj"):
        w = model.get_submodule(name).weight
        CB, SCB = quantize_rowwise(floats[name + ".weight"])
        assert w.dtype == torch.bfloat16 and torch.equal(w, dequantize_rowwise(CB, SCB, torch.bfloat16))
        err = (dequantize_rowwise(CB, SCB).double() - floats[name + ".weight"].half().double()).abs()
        assert (err <= SCB.double()[:, None] / 254 * SCALE_SLACK).all()
    assert torch.equal(model["lm_head"].weight, floats["lm_head.weight"])  # skipped layers are untouched
    assert torch.equal(model["layers"][0]["q_proj"].bias.float(), floats["layers.0.q_proj.bias"].bfloat16().float())


# ----------------------------------------------------------------------------- with model.py: checkpoints, CLI


def fixture_logits_error():
    """max |our logits - bitsandbytes' logits| / max |theirs| on the 8-bit fixture."""
    from model import StableLM
    model = StableLM.from_pretrained(STABLELM_TINY_INT8).eval()
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 14
    expected = load_file(STABLELM_TINY_INT8 / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).float()
    assert (logits.argmax(-1) == expected["logits"].argmax(-1)).all()
    return ((logits - expected["logits"]).abs().max() / expected["logits"].abs().max()).item()


def test_model_fixture_logits_are_bitsandbytes_with_its_constant(monkeypatch):
    """With bitsandbytes' CPU dequantization constant, our arithmetic is theirs: the logits are identical."""
    import quantize
    monkeypatch.setattr(quantize, "DEQUANT_SCALE", 6.200124e-05)
    assert fixture_logits_error() == 0.0


def test_model_fixture_logits_with_exact_constant():
    """With 1/127^2 (this project's choice) the logits move by 4.5e-3 relative, not the ~1e-4 one might expect.

    LLM.int8 is discontinuous: every layer re-rounds its activations, so a scale change of 1.8e-5 flips a few
    roundings, each worth a whole quantization step, and the flips compound through the layers (changing
    bitsandbytes' constant by 1e-6 alone moves these logits by 5.4e-3). The bound below is still well under
    the quantization effect itself: the float model is 9.9e-3 away from these logits.
    """
    assert fixture_logits_error() < 6e-3


def test_model_fp16_upload_runs_in_fp16(tmp_path):
    """8-bit uploads made with transformers 4.x keep their float tensors in fp16; the int8 layers then see fp16."""
    from model import StableLM
    shutil.copytree(STABLELM_TINY_INT8, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors = {k: v.half() if v.dtype == torch.float32 and not k.endswith(".SCB") else v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    model = StableLM.from_pretrained(tmp_path / "ckpt").eval()
    expected = load_file(STABLELM_TINY_INT8 / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"])
    assert logits.dtype == torch.float16 and model.model.layers[0].mlp.up_proj.SCB.dtype == torch.float32
    assert (logits.argmax(-1) == expected["logits"].argmax(-1)).all()
    assert ((logits.float() - expected["logits"]).abs().max() / expected["logits"].abs().max()) < 1.5e-2  # 6.7e-3


def test_model_quantized_equals_loaded_8bit_checkpoint():
    from model import StableLM
    mine = quantize_model(StableLM.from_pretrained(STABLELM_TINY), 6.0).state_dict()
    theirs = StableLM.from_pretrained(STABLELM_TINY_INT8).state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        if k.endswith(".SCB") or mine[k].dtype == torch.int8:
            assert torch.equal(mine[k], theirs[k]), k


def test_model_save_load_is_bit_exact(tmp_path):
    from model import StableLM
    model = StableLM.from_pretrained(STABLELM_TINY_INT8).eval()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    fmt = saved["model.layers.0.mlp.down_proj.weight_format"]
    assert fmt.dtype == torch.uint8 and fmt.dim() == 0 and fmt.item() == 0
    assert saved["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] and qc["llm_int8_threshold"] == 6.0
    again = StableLM.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = load_file(STABLELM_TINY_INT8 / "expected.safetensors")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_model_refuses_tiled_weight_format(tmp_path):
    from model import StableLM
    shutil.copytree(STABLELM_TINY_INT8, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight_format"] = torch.tensor(1, dtype=torch.uint8)
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weight_format"):
        StableLM.from_pretrained(tmp_path / "ckpt")


def test_model_command_line_end_to_end(tmp_path):
    src, out = tmp_path / "src", tmp_path / "int8"
    shutil.copytree(STABLELM_TINY, src)
    shutil.copy(NEOX_DIR / "tokenizer.json", src)  # a whole model directory
    command = [sys.executable, str(ROOT / "quantize.py"), str(src), str(out), "--prompts", "2", "--prompt-len", "16"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "worst relative logit change" in run.stdout and "MB ->" in run.stdout
    rel = float(run.stdout.split("worst relative logit change")[1].split(": ")[1].split()[0])
    assert 0 < rel < 2e-2
    mine, theirs = load_file(out / "model.safetensors"), load_file(STABLELM_TINY_INT8 / "model.safetensors")
    for k in theirs:
        if k.endswith((".SCB", ".weight_format")) or theirs[k].dtype == torch.int8:
            assert torch.equal(mine[k], theirs[k]), k
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_dequantize_command_round_trip(tmp_path):
    """quantize.py IN Q, then quantize.py --dequantize Q F: F is the float model Q stands for (each weight CB * SCB /
    127 in Q's float dtype, tokenizer kept), and its logits are close to the 8-bit model's."""
    import quantize
    from model import StableLM
    src = tmp_path / "src"
    shutil.copytree(STABLELM_TINY, src)
    shutil.copy(NEOX_DIR / "tokenizer.json", src)
    quantize.main([str(src), str(tmp_path / "q"), "--prompts", "1", "--prompt-len", "8"])
    quantize.main(["--dequantize", str(tmp_path / "q"), str(tmp_path / "f"), "--prompts", "1", "--prompt-len", "8"])
    q, f = StableLM.from_pretrained(tmp_path / "q").eval(), StableLM.from_pretrained(tmp_path / "f").eval()
    assert f.config.quantization_config is None and not any(isinstance(m, Int8Linear) for m in f.modules())
    for name, m in q.named_modules():
        if isinstance(m, Int8Linear):
            w = f.get_submodule(name).weight
            assert w.dtype == torch.float32 and torch.equal(w, dequantize_rowwise(m.weight, m.SCB))
    assert (tmp_path / "f" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    ids = load_file(STABLELM_TINY_INT8 / "expected.safetensors")["input_ids"]
    with torch.no_grad():
        lq, lf = q(ids), f(ids)
    assert (lq.argmax(-1) == lf.argmax(-1)).float().mean() > 0.9
    assert ((lq - lf).abs().max() / lq.abs().max()) < 2e-2


def test_every_linear_quantized_saves_a_loadable_checkpoint(tmp_path):
    """--skip with no names quantizes lm_head too: the config's skip list is [] (not null, which means lm_head)."""
    import quantize
    from model import StableLM
    quantize.main([str(STABLELM_TINY), str(tmp_path / "q"), "--skip", "--prompts", "1", "--prompt-len", "8"])
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qconfig["llm_int8_skip_modules"] == []
    assert isinstance(StableLM.from_pretrained(tmp_path / "q").lm_head, Int8Linear)


def run_quantize(argv, capsys):
    """(exit code, stderr) of `quantize.py ARGV` run in this process."""
    import quantize
    with pytest.raises(SystemExit) as exit_info:
        quantize.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_a_bad_config_field_is_one_line_naming_config_json(tmp_path, capsys):
    shutil.copytree(STABLELM_TINY, tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "2"}))
    code, err = run_quantize([str(tmp_path / "src"), str(tmp_path / "out")], capsys)
    assert code == 1 and err == f"error: {tmp_path / 'src' / 'config.json'}: num_hidden_layers must be a positive " \
                                f"int, got '2'\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_unanticipated_exception_is_one_internal_error_line(tmp_path, capsys, monkeypatch):
    """The last boundary: a bug (here a ZeroDivisionError inside the checks) is one line and exit code 1;
    REMASK_TRACEBACK=1 lets the traceback through."""
    import quantize

    def bug(args):
        raise ZeroDivisionError("division by zero\nsecond line")
    monkeypatch.setattr(quantize, "_check_args", bug)
    argv = [str(STABLELM_TINY), str(tmp_path / "out")]
    monkeypatch.delenv("REMASK_TRACEBACK", raising=False)
    assert run_quantize(argv, capsys) == (1, "error: internal error: ZeroDivisionError: division by zero (set "
                                             "REMASK_TRACEBACK=1 to see the traceback)\n")
    monkeypatch.setenv("REMASK_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        quantize.main(argv)
    assert not (tmp_path / "out").exists()
