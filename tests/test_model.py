"""Tests of model.py: the fixture made by transformers, an independent re-derivation of the math, and property
tests (causality, batch and padding invariance, KV cache == full forward, batched == per-row generation,
bit-exact save/load, sharding, config spellings) over random configs that cover every variant of the family; named
configs and FLOP counts, clear errors for broken configs and model directories, and LLM.int8 checkpoints."""
import json
import math
import random
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import quantize
from bench import saved_for_backward
from conftest import STABLELM_TINY, STABLELM_TINY_INT8, assert_same_weights
from model import CONFIGS, Config, KVCache, StableLM, generate, sample

N_SEEDS = 16  # seed bits 0..3 switch qkv bias, qk layernorm, parallel residual, tied embeddings: all 16 layouts

# ----------------------------------------------------------------------------- helpers


def random_config(seed):
    rng = random.Random(seed)
    H = rng.choice([2, 4])
    D = rng.choice([8, 12, 16])
    # even rotary dims only; 0.375 * 12 = 4.5 checks that rotary_dim truncates like transformers
    factor = rng.choice([f for f in (0.25, 0.375, 0.5, 0.75, 1.0) if int(D * f) % 2 == 0])
    return Config(vocab_size=rng.randint(40, 97), hidden_size=H * D, intermediate_size=rng.randint(16, 80),
                  num_hidden_layers=rng.randint(1, 3), num_attention_heads=H,
                  num_key_value_heads=H // 2 if seed % 3 == 0 else H,  # every third: grouped-query
                  rope_theta=rng.choice([10000.0, 500.0]), partial_rotary_factor=factor,
                  layer_norm_eps=rng.choice([1e-5, 1e-6]), use_qkv_bias=bool(seed & 1), qk_layernorm=bool(seed & 2),
                  use_parallel_residual=bool(seed & 4), tie_word_embeddings=bool(seed & 8), max_position_embeddings=64)


def random_model(seed, dtype=torch.float64):
    """A model whose every parameter is random (default init would hide bias and norm bugs: ones and zeros)."""
    torch.manual_seed(seed)
    model = StableLM(random_config(seed)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * (1.0 if "embed" in name else 1.5 / math.sqrt(p.shape[1])))
            else:  # LayerNorm weights around 1, biases around 0
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def random_ids(model, B, T, seed):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_logits(sd, c, ids):
    """transformers' StableLM forward re-derived on the raw state dict: explicit LayerNorm, rotary as complex
    multiplication, matmul-softmax attention with kv heads repeated, SiLU as z * sigmoid(z)."""
    B, T = ids.shape
    H, KV, D, r = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.rotary_dim

    def ln(x, w, b=0.0):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + c.layer_norm_eps) * w + b

    def lin(x, name):
        return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if name + ".bias" in sd else 0.0)

    def rope(x):  # (B, h, T, D): dims (i, i + r/2) are the real and imaginary parts of a rotating number
        if r == 0:
            return x
        # angles and their cos/sin in float32, as transformers computes them for every model dtype
        angle = torch.arange(T).float()[:, None] * (1.0 / c.rope_theta ** (torch.arange(0, r, 2).float() / r))
        z = torch.complex(x[..., :r // 2], x[..., r // 2:r]) * torch.complex(angle.cos(), angle.sin()).cdouble()
        return torch.cat([z.real, z.imag, x[..., r:]], dim=-1)

    def heads(x, n):
        return x.view(B, T, n, D).transpose(1, 2)

    def mlp(x, p):
        g = lin(x, p + "mlp.gate_proj")
        return lin(g * torch.sigmoid(g) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = ln(x, sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"])
        q, k, v = (heads(lin(h, p + f"self_attn.{n}_proj"), m) for n, m in (("q", H), ("k", KV), ("v", KV)))
        if c.qk_layernorm:
            q = torch.stack([ln(q[:, j], sd[p + f"self_attn.q_layernorm.norms.{j}.weight"]) for j in range(H)], 1)
            k = torch.stack([ln(k[:, j], sd[p + f"self_attn.k_layernorm.norms.{j}.weight"]) for j in range(KV)], 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
        a = lin((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1), p + "self_attn.o_proj")
        if c.use_parallel_residual:
            x = x + a + mlp(h, p)
        else:
            x = x + a
            x = x + mlp(ln(x, sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"]), p)
    x = ln(x, sd["model.norm.weight"], sd["model.norm.bias"])
    return x @ sd["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"].T

# ----------------------------------------------------------------------------- the fixture (made by transformers)


def test_fixture_logits_match_transformers():
    expected = load_file(STABLELM_TINY / "expected.safetensors")
    model = StableLM.from_pretrained(STABLELM_TINY)
    with torch.no_grad():
        logits = model(expected["input_ids"])
    assert logits.shape == expected["logits"].shape and logits.dtype == torch.float32
    assert (logits - expected["logits"]).abs().max() <= 1e-5


def test_fixture_greedy_ids():
    expected = load_file(STABLELM_TINY / "expected.safetensors")
    model = StableLM.from_pretrained(STABLELM_TINY)
    out = generate(model, expected["greedy_prompt"], max_new_tokens=8)
    assert torch.equal(out, expected["greedy_ids"])


def test_fixture_config():
    c = Config.from_json(STABLELM_TINY / "config.json")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (320, 64, 176, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.rope_theta, c.layer_norm_eps) == (4, 4, 10000, 1e-5)
    assert (c.head_dim, c.rotary_dim, c.torch_dtype, c.tie_word_embeddings) == (16, 4, "float32", False)

# ----------------------------------------------------------------------------- the math, property by property


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_matches_independent_reference(seed):
    model = random_model(seed)
    ids = random_ids(model, 2, 11, seed)
    with torch.no_grad():
        ours = model(ids)
    ref = reference_logits({k: v for k, v in model.state_dict().items()}, model.config, ids)
    assert ours.abs().max() > 1  # random weights give logits far from zero: the comparison is not vacuous
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_causality(seed):
    """Changing token t leaves the logits before t unchanged (and changes those at t)."""
    model = random_model(seed)
    ids = random_ids(model, 1, 12, seed)
    t = random.Random(seed).randint(1, 11)
    changed = ids.clone()
    changed[0, t:] = (changed[0, t:] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_batch_invariance(seed):
    """A row's logits do not depend on its batch mates, and neither on padding with a mask, left or right."""
    model = random_model(seed)
    ids = random_ids(model, 4, 9, seed)
    with torch.no_grad():
        batch = model(ids)
        alone = model(ids[2:3])
        torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-10)
        pad = 3
        for left in (True, False):
            padded = torch.zeros(1, 9 + pad, dtype=torch.long)
            mask = torch.zeros(1, 9 + pad, dtype=torch.long)
            real = slice(pad, None) if left else slice(0, 9)
            padded[:, real], mask[:, real] = ids[2:3], 1
            torch.testing.assert_close(model(padded, attention_mask=mask)[:, real], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_kv_cache_decoding_equals_full_forward(seed):
    """Prefill a prompt, then feed the rest one token at a time: each step's logits equal the full forward's."""
    model = random_model(seed, torch.float32)
    B, T, prompt = 2, 10, random.Random(seed).randint(1, 6)
    ids = random_ids(model, B, T, seed)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model, B, T + 2)  # spare slots stay masked
        steps = [model(ids[:, :prompt], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(prompt, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=2e-5)


def pad_rows(rows, left, pad_id=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, where], mask[i, where] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("seed", range(0, N_SEEDS, 2))
def test_batched_generation_equals_per_row(seed, left):
    model = random_model(seed)
    rng = random.Random(seed)
    rows = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 7))] for _ in range(3)]
    ids, mask = pad_rows(rows, left)
    batched = generate(model, ids, 6, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = generate(model, torch.tensor([r]), 6)
        assert batched[i, ids.shape[1]:].tolist() == alone[0, len(r):].tolist()
    assert torch.equal(batched[:, :ids.shape[1]], ids)


@pytest.mark.parametrize("seed", range(4))
def test_stop_ids_stop_rows_and_pad(seed):
    model = random_model(seed)
    ids = random_ids(model, 3, 5, seed)
    free = generate(model, ids, 8)[:, 5:]
    stop = int(free[0, 2])  # row 0 meets it at step 2 at the latest; others may or may not
    out = generate(model, ids, 8, stop_ids=(stop,), pad_id=-1)[:, 5:]
    for row, got in zip(free.tolist(), out.tolist()):
        n = row.index(stop) + 1 if stop in row else len(row)
        assert got[:n] == row[:n] and all(t == -1 for t in got[n:])
    assert out.shape[1] == max(r.index(stop) + 1 if stop in r else 8 for r in free.tolist())  # ends when all stop


def test_streaming_sees_every_token():
    model = random_model(3)
    ids = random_ids(model, 2, 4, 3)
    seen = []
    out = generate(model, ids, 5, on_token=lambda t: seen.append(t.tolist()))
    assert torch.tensor(seen).T.tolist() == out[:, 4:].tolist()


@pytest.mark.parametrize("seed", range(3))
def test_on_token_can_stop_rows(seed):
    """A callback that returns a (B,) bool stops those rows like a stop id: the row keeps the token it saw, pads
    after it, and generation ends once every row has stopped."""
    model = random_model(seed)
    ids = random_ids(model, 3, 4, seed)
    free = generate(model, ids, 8)[:, 4:]
    stop_after = torch.tensor([2, 5, 3])  # row r stops once it has r's count of new tokens
    count = torch.zeros(3, dtype=torch.long)

    def on_token(token):
        count.add_(1)
        return count >= stop_after

    out = generate(model, ids, 8, on_token=on_token, pad_id=-1)[:, 4:]
    assert out.shape[1] == 5
    for row, n in enumerate(stop_after.tolist()):
        assert out[row, :n].tolist() == free[row, :n].tolist() and (out[row, n:] == -1).all()


def test_decode_step_compiles_to_one_graph_and_is_reused(monkeypatch):
    """compile=True: the decode step traces without graph breaks (fullgraph), every later step and call reuses
    that graph (a recompile raises), and the tokens equal eager decoding. The eager backend keeps this fast on a
    CPU; test_compiled_decoding_equals_eager_on_cuda runs inductor with CUDA graphs."""
    torch._dynamo.reset()
    step = torch.compile(M.decode_step, backend="eager", fullgraph=True)
    monkeypatch.setattr(M, "_compiled_decode_step", lambda: step)
    model = random_model(3)
    ids, mask = pad_rows([[1, 2, 3, 4, 5], [6, 7]], left=True)
    eager = generate(model, ids, 10, attention_mask=mask)
    with torch._dynamo.config.patch(error_on_recompile=True):  # (monkeypatch's undo would delete the setting)
        assert torch.equal(generate(model, ids, 10, attention_mask=mask, compile=True), eager)
        assert torch.equal(generate(model, ids, 10, attention_mask=mask, compile=True), eager)
    torch._dynamo.reset()


def test_sampling():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits.expand(500, -1), 0.8, top_k=3, generator=g) for _ in range(8)]).flatten()
    assert set(draws.tolist()) <= {0, 1, 5}  # only the top 3
    p = (logits[0, [0, 1, 5]] / 0.8).softmax(-1)
    freq = torch.stack([(draws == i).float().mean() for i in (0, 1, 5)])
    assert (freq - p).abs().max() < 0.03  # 4000 draws: 3 sigma is ~0.025
    model = random_model(5)
    ids = random_ids(model, 2, 4, 5)
    greedy = generate(model, ids, 5)
    assert torch.equal(generate(model, ids, 5, temperature=1.0, top_k=1), greedy)
    a, b = (generate(model, ids, 5, temperature=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model(6).train()
    ids = random_ids(model, 2, 8, 6)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(0, N_SEEDS, 5))
def test_one_bf16_copy_of_each_norm_output_under_autocast(seed, monkeypatch):
    """Under autocast the blocks hand the matmuls one bf16 copy of each LayerNorm output instead of letting every
    nn.Linear cast (and save) its own: the same values, fewer bytes kept for backward."""
    model = random_model(seed, torch.float32).train()
    ids = random_ids(model, 2, 16, seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, once = saved_for_backward(lambda: model(ids))
        monkeypatch.setattr(M, "matmul_input", lambda h: h)
        logits_per_linear, per_linear = saved_for_backward(lambda: model(ids))
    assert torch.equal(logits, logits_per_linear)
    assert once < per_linear


def test_resize_vocab_adds_mean_rows():
    for seed in (0, 8):  # untied, tied
        model = random_model(seed)
        V = model.config.vocab_size
        ids = random_ids(model, 1, 6, seed)
        with torch.no_grad():
            before = model(ids)
            emb, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
            model.resize_vocab(V + 5)
            after = model(ids)
        assert model.config.vocab_size == V + 5 and after.shape[-1] == V + 5
        assert torch.equal(model.model.embed_tokens.weight[:V], emb)
        torch.testing.assert_close(model.model.embed_tokens.weight[V:], emb.mean(0).expand(5, -1))
        torch.testing.assert_close(model.lm_head.weight[V:], head.mean(0).expand(5, -1))
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == model.config.tie_word_embeddings
        torch.testing.assert_close(after[..., :V], before, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shrinking"):
        model.resize_vocab(3)

# ----------------------------------------------------------------------------- named configs and FLOP accounting


def test_named_configs():
    with torch.device("meta"):
        m3b = StableLM(Config.named("stablelm-3b-4e1t"))
        m16 = StableLM(Config.named("stablelm-2-1_6b"))
    assert sum(p.numel() for p in m3b.parameters()) == 2_795_443_200
    assert len(m3b.state_dict()) == 356
    assert m3b.flops_per_token(256) == 6 * 2_666_332_160 + 12 * 32 * 32 * 80 * 256  # N_matmul = 2.666e9
    assert sum(p.numel() for p in m16.parameters()) == 1_644_515_328  # the card's 1,644,417,024 plus LN biases
    assert m16.model.layers[0].self_attn.q_proj.bias is not None
    assert Config.named("debug").num_hidden_layers == 4
    Config.named("debug").vocab_size = 7
    assert CONFIGS["debug"].vocab_size == 128  # named() hands out copies
    with pytest.raises(KeyError, match="stablelm-3b-4e1t"):
        Config.named("stablelm-7b")


def test_flops_per_token_by_hand():
    c = Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True)
    # per layer: q 32x32, k 32x16, v 32x16, o 32x32, gate/up/down 3 x 32x48; plus lm_head 100x32
    n = 2 * (1024 + 512 + 512 + 1024 + 3 * 1536) + 3200
    assert StableLM(c).flops_per_token(10) == 6 * n + 12 * 2 * 4 * 8 * 10

# ----------------------------------------------------------------------------- config.json spellings


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_config_round_trips_in_every_spelling(seed, tmp_path):
    c = random_config(seed)
    hub = c.to_dict()
    assert hub["model_type"] == "stablelm" and hub["architectures"] == ["StableLmForCausalLM"]
    assert Config.from_dict(hub) == c
    nested = {k: v for k, v in hub.items() if k not in ("rope_theta", "partial_rotary_factor", "torch_dtype")}
    nested["rope_parameters"] = {"rope_theta": c.rope_theta, "partial_rotary_factor": c.partial_rotary_factor,
                                 "rope_type": "default"}
    nested["dtype"] = c.torch_dtype
    assert Config.from_dict(nested) == c  # transformers 5.x
    epoch = {k: v for k, v in hub.items() if k not in ("layer_norm_eps", "partial_rotary_factor")}
    epoch.update(model_type="stablelm_epoch", norm_eps=c.layer_norm_eps, rope_pct=c.partial_rotary_factor)
    assert Config.from_dict(epoch) == c  # pre-integration stablelm_epoch
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert Config.from_json(tmp_path / "config.json") == c

def test_config_errors_name_the_problem(tmp_path):
    hub = Config().to_dict()
    for change, message in [({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                            ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
                            ({"partial_rotary_factor": 0.0125}, "gives 1 rotary dims"),  # int(80 * 0.0125) = 1 is odd
                            ({"model_type": None}, "model_type None"),
                            ({"hidden_size": "2560"}, "hidden_size must be a positive int, got '2560'"),
                            ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int"),
                            ({"rope_theta": float("nan")}, "rope_theta must be a finite number"),
                            ({"use_qkv_bias": 1}, "use_qkv_bias must be true or false")]:
        with pytest.raises(ValueError, match=message):
            Config.from_dict({**hub, **change})
    with pytest.raises(ValueError, match="a config must be a JSON object, got list"):
        Config.from_dict([hub])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path}.*not valid JSON"):
        Config.from_json(tmp_path / "config.json")

# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(0, N_SEEDS, 2))
def test_save_load_is_bit_exact(seed, dtype, tmp_path):
    model = random_model(seed, dtype)
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == [".remask-owner.json", "config.json", "generation_config.json", "model.safetensors"]
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert ("lm_head.weight" in stored) != model.config.tie_word_embeddings  # what transformers writes
    loaded = StableLM.from_pretrained(tmp_path / "m")
    assert_same_weights(model.state_dict(), loaded.state_dict())
    assert loaded.config == replace(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == model.config.tie_word_embeddings
    ids = random_ids(model, 2, 5, seed)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    as_fp32 = StableLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_fp32.parameters())


@pytest.mark.parametrize("seed", range(0, N_SEEDS, 3))
def test_sharded_equals_unsharded(seed, tmp_path):
    model = random_model(seed, torch.float32)
    model.save_pretrained(tmp_path / "one")
    total = sum(t.numel() * t.element_size() for t in load_file(tmp_path / "one" / "model.safetensors").values())
    model.save_pretrained(tmp_path / "many", max_shard_size=total // 3)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "many").glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == total and set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # every shard respects the limit unless it holds a single larger tensor
        sizes = [t.numel() * t.element_size() for t in load_file(tmp_path / "many" / shard).values()]
        assert sum(sizes) <= total // 3 or len(sizes) == 1
    assert_same_weights(StableLM.from_pretrained(tmp_path / "one").state_dict(),
                        StableLM.from_pretrained(tmp_path / "many").state_dict())
    model.save_pretrained(tmp_path / "units", max_shard_size="1KB")
    assert len(list((tmp_path / "units").glob("model-*.safetensors"))) > n


def test_save_replaces_a_directory_and_an_interrupted_save_leaves_the_old_one(tmp_path, monkeypatch):
    first, second = random_model(1, torch.float32), random_model(2, torch.float32)
    first.save_pretrained(tmp_path / "m")
    second.save_pretrained(tmp_path / "m")
    assert_same_weights(second.state_dict(), StableLM.from_pretrained(tmp_path / "m").state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary or old directories left behind
    calls = []

    def save_then_die(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) % 2 == 0:
            raise KeyboardInterrupt  # interrupted after the first shard of each save
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(M, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        first.save_pretrained(tmp_path / "m", max_shard_size=1000)
    with pytest.raises(KeyboardInterrupt):
        first.save_pretrained(tmp_path / "new", max_shard_size=1000)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # nothing half-written, not even a temp dir
    assert_same_weights(second.state_dict(), StableLM.from_pretrained(tmp_path / "m").state_dict())

# ----------------------------------------------------------------------------- bad input: clear errors


@pytest.fixture
def tiny_copy(tmp_path):
    shutil.copytree(STABLELM_TINY, tmp_path / "tiny")
    return tmp_path / "tiny"


def edit_weights(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_error_no_config_json(tiny_copy):
    (tiny_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{tiny_copy}.*config.json"):
        StableLM.from_pretrained(tiny_copy)


def test_error_unknown_model_type(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match=f"{tiny_copy}.*'llama'"):
        StableLM.from_pretrained(tiny_copy)


def test_error_inconsistent_config(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))
    with pytest.raises(ValueError, match=f"{tiny_copy}.*num_attention_heads 5"):
        StableLM.from_pretrained(tiny_copy)


def test_error_missing_tensor(tiny_copy):
    edit_weights(tiny_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        StableLM.from_pretrained(tiny_copy)


def test_error_unexpected_tensor(tiny_copy):
    edit_weights(tiny_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        StableLM.from_pretrained(tiny_copy)


def test_error_wrong_shape(tiny_copy):
    edit_weights(tiny_copy, lambda t: t.update({"model.norm.bias": torch.zeros(63)}))
    with pytest.raises(ValueError, match=r"model.norm.bias .* has shape \[63\], the model expects \[64\]"):
        StableLM.from_pretrained(tiny_copy)


@pytest.mark.parametrize("keep", [6, 1000, -100])
def test_error_truncated_safetensors(tiny_copy, keep):
    file = tiny_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep])  # cut inside the header, or the data cut short
    with pytest.raises(ValueError, match=f"{file}: broken safetensors file"):
        StableLM.from_pretrained(tiny_copy)


def test_error_no_weights(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{tiny_copy}: no model.safetensors"):
        StableLM.from_pretrained(tiny_copy)


def test_error_shard_missing(tmp_path):
    random_model(0, torch.float32).save_pretrained(tmp_path / "m", max_shard_size=2000)
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim}: listed in"):
        StableLM.from_pretrained(tmp_path / "m")

# ----------------------------------------------------------------------------- LLM.int8 checkpoints


def test_int8_fixture_loads_as_int8_layers(monkeypatch):
    model = StableLM.from_pretrained(STABLELM_TINY_INT8)
    fp32 = load_file(STABLELM_TINY / "model.safetensors")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, quantize.Int8Linear) and attn.q_proj.weight.dtype == torch.int8
    assert type(model.lm_head) is torch.nn.Linear  # llm_int8_skip_modules null: lm_head stays float
    for name, m in model.named_modules():
        if isinstance(m, quantize.Int8Linear):  # each layer got the bytes bitsandbytes made from its fp32 weight
            CB, SCB = quantize.quantize_rowwise(fp32[name + ".weight"])
            assert torch.equal(m.weight, CB) and torch.equal(m.SCB, SCB), name
    expected = load_file(STABLELM_TINY_INT8 / "expected.safetensors")
    with torch.no_grad():
        ours = model(expected["input_ids"])
        # bitsandbytes' CPU backend (0.45+) dequantizes with 6.200124e-05; with that constant the whole
        # 8-bit model reproduces its logits exactly, so every layer got the right int8 bytes, scales and settings
        monkeypatch.setattr(quantize, "DEQUANT_SCALE", 6.200124e-05)
        assert torch.equal(model(expected["input_ids"]), expected["logits"])
    # with exactly 1/127^2 each int8 matmul moves ~2e-5 relative; this tiny model's residual stream (std ~0.02)
    # meets LayerNorms that scale that up ~50x
    assert (ours - expected["logits"]).abs().max() < 5e-3


def test_int8_save_load_round_trip(tmp_path):
    model = quantize.quantize_model(random_model(1, torch.float16))
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_8bit"] and q["llm_int8_threshold"] == 6.0
    assert q["llm_int8_skip_modules"] == ["lm_head"] and config["torch_dtype"] == "float16"
    stored = load_file(tmp_path / "q" / "model.safetensors")
    fmt = stored["model.layers.0.mlp.down_proj.weight_format"]
    assert fmt.dtype == torch.uint8 and fmt.shape == () and fmt.item() == 0
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert stored["model.layers.0.mlp.down_proj.SCB"].dtype == torch.float32
    loaded = StableLM.from_pretrained(tmp_path / "q")
    assert_same_weights(model.state_dict(), loaded.state_dict())


def test_int8_refuses_tiled_layout(tmp_path):
    shutil.copytree(STABLELM_TINY_INT8, tmp_path / "q")
    edit_weights(tmp_path / "q", lambda t: t.update({"model.layers.1.self_attn.k_proj.weight_format":
                                                        torch.tensor(2, dtype=torch.uint8)}))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight_format .* tiled"):
        StableLM.from_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no quantization_config"):
        StableLM.from_pretrained(tmp_path / "q")

# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_fixture_on_cuda():
    expected = load_file(STABLELM_TINY / "expected.safetensors")
    model = StableLM.from_pretrained(STABLELM_TINY, device="cuda")
    with torch.no_grad():
        logits = model(expected["input_ids"].cuda()).cpu()
    assert (logits - expected["logits"]).abs().max() <= 1e-4
    assert torch.equal(generate(model, expected["greedy_prompt"].cuda(), 8).cpu(), expected["greedy_ids"])


@pytest.mark.gpu
def test_compiled_decoding_equals_eager_on_cuda():
    model = random_model(3, torch.float32).cuda()
    ids, mask = pad_rows([[1, 2, 3, 4, 5], [6, 7]], left=True)
    eager = generate(model, ids.cuda(), 12, attention_mask=mask.cuda())
    compiled = generate(model, ids.cuda(), 12, attention_mask=mask.cuda(), compile=True)
    assert torch.equal(eager, compiled)
