"""model.py: the StableLM transformer family from scratch, Hugging Face checkpoint I/O and KV-cache generation.

StableLM-3B-4E1T is a LLaMA-like decoder with LayerNorm (with bias) instead of RMSNorm, rotary position
embeddings on only the first 25% of each head's dims (GPT-NeoX "rotate_half" layout) and a SwiGLU MLP. Family
members switch on q/k/v biases (stablelm-2-1_6b), per-head q/k LayerNorm, parallel attention + MLP residuals and
grouped-query attention (stablelm-2-12b). Every switch is a field of Config, named as in config.json, and every
parameter is named as in the Hugging Face checkpoint, so state dicts map 1:1.

Sections: config (the fields, as named in config.json, and the known configs) / the model / generation
(batched, left or right padded, preallocated KV cache, streaming) / Hugging Face I/O (config.json in any of the three
spellings met in the wild; safetensors, sharded or not, fp32/fp16/bf16 and bitsandbytes LLM.int8, in the layout
transformers, vLLM and lm-evaluation-harness load; loaded only when every float is finite) / directory writing (a
model directory written whole or not at all, over nothing but a model directory: write_directory, and
recover_directory for what a killed write left).

Deliberately left out: dropout (StableLM trains without it), rope scaling variants, pytorch_model.bin files,
4-bit formats, beam search and top-p.

References: transformers/models/stablelm/modeling_stablelm.py (the math, the names), nanoGPT (the structure),
gpt-fast (a static KV cache for compiled decoding), the safetensors format, PaLM appendix B (FLOP accounting).
"""
import ctypes
import errno
import fcntl
import functools
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

import quantize

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    vocab_size: int = 50304                 # embedding rows (may exceed the tokenizer's size)
    hidden_size: int = 2560                 # residual stream width C
    intermediate_size: int = 6912           # SwiGLU inner width
    num_hidden_layers: int = 32             # transformer blocks L
    num_attention_heads: int = 32           # query heads H; head_dim = C / H
    num_key_value_heads: int = 32           # key/value heads; fewer than H = grouped-query attention
    max_position_embeddings: int = 4096     # context length trained on (informational: nothing is sized by it)
    rope_theta: float = 10000.0             # rotary base
    partial_rotary_factor: float = 0.25     # fraction of each head's dims that rotate
    layer_norm_eps: float = 1e-5            # epsilon of every LayerNorm
    use_qkv_bias: bool = False              # biases on the q, k, v projections (StableLM 2)
    qk_layernorm: bool = False              # per-head LayerNorm without bias on q and k (StableLM 2 12B)
    use_parallel_residual: bool = False     # x + attn(ln(x)) + mlp(ln(x)) instead of two sequential residuals
    tie_word_embeddings: bool = False       # lm_head shares the embedding matrix
    bos_token_id: int | None = 0            # begin-of-text id (StableLM never prepends it)
    eos_token_id: int | list | None = 0     # end-of-text id(s)
    torch_dtype: str = "float32"            # dtype of the stored weights
    quantization_config: dict | None = None  # bitsandbytes LLM.int8 settings of an 8-bit checkpoint

    def __post_init__(self):
        C, H, KV = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if C % H or H % KV:
            raise ValueError(f"hidden_size {C} must divide by num_attention_heads {H}, "
                             f"and num_attention_heads by num_key_value_heads {KV}")
        if not 0 <= self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives {self.rotary_dim} rotary dims "
                             f"of head_dim {self.head_dim}: need an even number between 0 and head_dim")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)  # int() truncates, as transformers does

    @classmethod
    def from_dict(cls, d, source="config"):
        """A Config from a parsed config.json: config_from_dict (Hugging Face I/O, below)."""
        return config_from_dict(d, source)

    @classmethod
    def from_json(cls, path):
        """A Config from a config.json file: config_from_json (Hugging Face I/O, below)."""
        return config_from_json(path)

    def to_dict(self):
        """The config.json contents: config_to_dict (Hugging Face I/O, below)."""
        return config_to_dict(self)

    @classmethod
    def named(cls, name):
        if name not in CONFIGS:
            raise KeyError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
        return replace(CONFIGS[name])  # a copy: callers may change it (resize_vocab does)


CONFIGS = {
    "stablelm-3b-4e1t": Config(torch_dtype="bfloat16"),
    "stablelm-2-1_6b": Config(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=32, num_key_value_heads=32, use_qkv_bias=True,
                              bos_token_id=100257, eos_token_id=100257, torch_dtype="float16"),
    "debug": Config(vocab_size=128, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
}

# ----------------------------------------------------------------------------- the model


def rotary_cos_sin(position_ids, dim, theta, dtype):
    """cos, sin (B, 1, T, dim) for positions (B, T); fp32 math as in transformers, then cast like it."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim)  # (dim/2,)
    freqs = position_ids[..., None].float() * inv_freq                                              # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]                                                # (B, 1, T, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of x (B, h, T, D), GPT-NeoX layout: dim i pairs with i + dim/2."""
    r = cos.shape[-1]
    if r == 0:
        return x
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def causal_padding_mask(key_valid, query_slots):
    """(B, 1, T, S) bool: a query sees the valid keys at slots up to its own, and always itself, so padding
    queries stay finite (an all-masked row would be NaN, and NaN values poison the cache for real queries)."""
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)  # (S,)
    causal = keys <= query_slots[:, None]                             # (T, S)
    return ((key_valid[:, None, :] & causal) | (keys == query_slots[:, None]))[:, None]


class HeadLayerNorm(nn.Module):
    """One bias-free LayerNorm per head (named norms.{h}.weight, as in transformers), applied in one batched op."""

    def __init__(self, n_heads, head_dim, eps):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(head_dim, eps=eps, bias=False) for _ in range(n_heads))

    def forward(self, x):  # (B, h, T, D)
        # at least fp32 inside and rounded once, as each nn.LayerNorm does: bit-identical to transformers in bf16
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = torch.stack([norm.weight for norm in self.norms])[:, None, :].to(dtype)  # (h, 1, D)
        return (F.layer_norm(x.to(dtype), x.shape[-1:], eps=self.norms[0].eps) * weight).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        C, H, KV, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.index, self.n_head, self.n_kv_head, self.head_dim = index, H, KV, D
        self.q_proj = nn.Linear(C, H * D, bias=config.use_qkv_bias)
        self.k_proj = nn.Linear(C, KV * D, bias=config.use_qkv_bias)
        self.v_proj = nn.Linear(C, KV * D, bias=config.use_qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        self.qk_layernorm = config.qk_layernorm
        if config.qk_layernorm:
            self.q_layernorm = HeadLayerNorm(H, D, config.layer_norm_eps)
            self.k_layernorm = HeadLayerNorm(KV, D, config.layer_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.index, k, v)  # (B, KV, S, D): all slots; the mask hides unused ones
        # no mask: is_causal lets SDPA pick flash attention (and reproduces transformers' sdpa path bit for bit)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=self.head_dim ** -0.5, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                        # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


def matmul_input(h):
    """h as the matmuls that read it take it. Under autocast each nn.Linear would cast the fp32 LayerNorm output to
    bf16 itself and keep its own copy for backward; casting once here keeps one copy for q, k and v (one for gate
    and up): 15 KB less saved per token per layer of StableLM-3B (of 127), with the same values."""
    device = h.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return h.to(torch.get_autocast_dtype(device))
    return h


class Block(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config, index)
        self.mlp = MLP(config)
        self.parallel = config.use_parallel_residual
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        h = matmul_input(self.input_layernorm(x))
        a = self.self_attn(h, cos, sin, mask, cache)
        if self.parallel:
            return x + a + self.mlp(h)
        x = x + a
        return x + self.mlp(matmul_input(self.post_attention_layernorm(x)))


class StableLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute blocks in backward: keeps ~1/L of activations, +1/3 compute
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module):  # transformers' init: N(0, 0.02) matrices, zero biases, LayerNorm (1, 0)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, cache=None):
        """input_ids (B, T) -> logits (B, T, vocab) in the model's dtype. See hidden_states for the arguments."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache))

    def hidden_states(self, input_ids, attention_mask=None, cache=None):
        """Final-norm hidden states (B, T, C). attention_mask (B, T): 1 = token, 0 = padding (left, right or both);
        rotary positions count real tokens only, so a padded row computes what it would alone. cache: a KVCache
        that this call appends to (prefill or decode)."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        valid = None if attention_mask is None else attention_mask.bool()
        if cache is not None:
            mask, pos = cache.append(valid if valid is not None else torch.ones_like(input_ids, dtype=torch.bool))
        elif valid is not None:
            mask = causal_padding_mask(valid, torch.arange(T, device=x.device))
            pos = (valid.cumsum(-1) - 1).clamp(min=0)
        else:
            mask, pos = None, torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rotary_cos_sin(pos, self.config.rotary_dim, self.config.rope_theta, x.dtype)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        return self.model.norm(x)

    @torch.no_grad()
    def resize_vocab(self, n):
        """Grow the vocabulary to n rows; new embedding and lm_head rows = mean of the existing rows (a common choice
        for new tokens).
        Call before building an optimizer: the two matrices become new Parameters."""
        old = self.config.vocab_size
        if n < old:
            raise ValueError(f"resize_vocab({n}): the model already has {old} rows; shrinking would drop tokens")
        if isinstance(self.lm_head, quantize.Int8Linear):
            raise ValueError("resize_vocab: lm_head is 8-bit; resize before quantizing")

        def grow(p):
            mean = p.float().mean(0, keepdim=True).to(p.dtype)  # (1, C), averaged in fp32
            return nn.Parameter(torch.cat([p, mean.expand(n - old, -1)]), requires_grad=p.requires_grad)

        self.model.embed_tokens.weight = grow(self.model.embed_tokens.weight)
        tied = self.config.tie_word_embeddings
        self.lm_head.weight = self.model.embed_tokens.weight if tied else grow(self.lm_head.weight)
        self.model.embed_tokens.num_embeddings = self.lm_head.out_features = self.config.vocab_size = n
        return self

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, forward + backward: 6N + 12·L·H·Q·T (PaLM appendix B), N = the
        matmul weights including lm_head, excluding the input embedding (a lookup, not a matmul)."""
        c = self.config
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        per_layer = c.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * c.hidden_size * c.intermediate_size
        n = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
        return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len

    # ------------------------------------------------------------------------- checkpoint I/O

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a Hugging Face StableLM directory: load_pretrained (Hugging Face I/O, below)."""
        return load_pretrained(path, dtype, device)

    def save_pretrained(self, path, max_shard_size=5 * 10**9, extra=None):
        """Write a Hugging Face model directory: the module's save_pretrained (Hugging Face I/O, below)."""
        return save_pretrained(self, path, max_shard_size, extra)

# ----------------------------------------------------------------------------- generation


class KVCache:
    """Preallocated keys and values of every layer, plus which slots hold real tokens.

    Slots fill left to right; a padded prompt occupies all its slots but its pad slots stay invalid, so left and
    right padding both work. All state that changes per step is a tensor updated in place: no host syncs, fixed
    addresses and shapes, so a decode step can be captured by torch.compile / CUDA graphs (as in gpt-fast)."""

    def __init__(self, model, batch_size, max_len):
        c, weight = model.config, model.model.embed_tokens.weight
        shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)  # (L, B, KV, S, D)
        self.v = torch.zeros(shape, dtype=weight.dtype, device=weight.device)  # (L, B, KV, S, D)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=weight.device)  # slot has a token
        self.next_slot = torch.zeros((), dtype=torch.long, device=weight.device)  # first free slot
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=weight.device)  # each row's next position
        self.slots = None  # (T,) slots of the tokens being appended
        for t in (self.k, self.v, self.valid, self.next_slot, self.next_pos):
            torch._dynamo.mark_static_address(t)  # in-place updates at fixed addresses: no recompiles under compile

    def append(self, valid):
        """Claim slots for T new tokens per row (valid (B, T) bool); returns the attention mask and positions."""
        T = valid.shape[1]
        self.slots = self.next_slot + torch.arange(T, device=valid.device)  # (T,)
        self.valid.index_copy_(1, self.slots, valid)
        pos = self.next_pos[:, None] + (valid.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        self.next_pos += valid.sum(-1)
        self.next_slot += T
        return causal_padding_mask(self.valid, self.slots), pos

    def update(self, layer, k, v):  # k, v (B, KV, T, D) -> the layer's whole cache (B, KV, S, D)
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer], self.v[layer]


def sample(logits, temperature=0.0, top_k=None, generator=None):
    """(B, V) logits -> (B,) ids: argmax at temperature 0, else a draw from softmax(logits / temperature)
    restricted to the top_k most likely tokens."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def decode_step(model, tokens, cache):
    """One new token per row, (B, 1) ids -> (B, V) next-token logits. Fixed shapes and no host syncs."""
    return model(tokens, cache=cache)[:, -1]


def _static_cache(model, batch_size, max_len):
    """One cache kept on the model and reused: a CUDA graph records fixed addresses, so a fresh cache per call
    would re-record it. Lengths round up to 256 so that calls with different lengths share it."""
    max_len = -(-max_len // 256) * 256
    cache = getattr(model, "_static_kv_cache", None)
    weight = model.model.embed_tokens.weight
    if cache is None or (cache.k.shape[1], cache.k.shape[3]) != (batch_size, max_len) or cache.k.dtype != weight.dtype \
            or cache.k.device != weight.device:
        cache = model._static_kv_cache = KVCache(model, batch_size, max_len)
    for t in (cache.valid, cache.next_slot, cache.next_pos):
        t.zero_()  # stale keys and values may stay: invalid slots are masked
    return cache


@functools.cache
def _compiled_decode_step():
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)  # CUDA graphs: no launch overhead


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, stop_ids=(), attention_mask=None,
             pad_id=0, on_token=None, generator=None, compile=False):
    """Continue each row of input_ids (B, T); returns (B, T + n), n <= max_new_tokens new tokens per row.

    attention_mask (B, T) marks real tokens (1) and padding (0), on either side. A row that emits one of
    stop_ids keeps that token and gets pad_id after it; generation ends early once every row has stopped.
    on_token(tokens) sees each step's (B,) new tokens as they come (streaming); if it returns a (B,) bool tensor,
    rows marked True stop as if they had emitted a stop id (stop strings, say). compile=True runs the decode
    step through torch.compile with CUDA graphs (worth it on a GPU; the first call compiles)."""
    B, T = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    cache = _static_cache(model, B, T + max_new_tokens) if compile else KVCache(model, B, T + max_new_tokens)
    h = model.hidden_states(input_ids, valid, cache)                     # (B, T, C)
    last = (valid * torch.arange(T, device=device)).argmax(-1)            # each row's last real token
    logits = model.lm_head(h[torch.arange(B, device=device), last])      # (B, V): lm_head on B rows, not B*T
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = _compiled_decode_step() if compile else decode_step
    new = []
    for i in range(max_new_tokens):
        drawn = sample(logits, temperature, top_k, generator)  # (B,)
        token = torch.where(done, pad_id, drawn)  # (B,) finished rows get pad_id
        new.append(token)
        finished = on_token(token) if on_token is not None else None
        if finished is not None:  # the callback's own stop rule, e.g. stop strings in the decoded text
            done |= finished
        if len(stop):
            done |= torch.isin(token, stop)
        if finished is not None or len(stop):
            if done.all():  # the loop's only host sync, and only when there is something to stop on
                break
        if i + 1 < max_new_tokens:
            # finished rows are fed their (ignored) draw, which is always a valid id, unlike pad_id may be
            logits = step(model, drawn[:, None], cache).clone()  # clone: a CUDA graph reuses its output buffer
    return torch.cat([input_ids, torch.stack(new, 1) if new else input_ids[:, :0]], dim=1)

# ----------------------------------------------------------------------------- Hugging Face I/O


# safetensors' names of the float dtypes a checkpoint may store, and torch's (what config.json's torch_dtype says)
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# the largest value of each size: more layers or heads than any published model (Llama 3.1 405B has 126 and 128)
# would build millions of modules before the checkpoint could refuse them; widths up to 2**24 keep every tensor's
# byte count within int64
SIZE_LIMITS = {**dict.fromkeys(("num_hidden_layers", "num_attention_heads", "num_key_value_heads"), 1024),
               **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings"), 2**24)}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)  # JSON's true is a Python int too


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_token_id(v):
    return _is_int(v) and v >= 0


FIELD_CHECKS = {  # (what it must be, test) of every Config field but torch_dtype (_dtype_name), as config.json has it
    **{name: ("a positive int", lambda v: _is_int(v) and v > 0) for name in SIZE_LIMITS},
    "rope_theta": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
    "partial_rotary_factor": ("a number from 0 to 1", lambda v: _is_number(v) and 0 <= v <= 1),
    "layer_norm_eps": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    **{name: ("true or false", lambda v: isinstance(v, bool))
       for name in ("use_qkv_bias", "qk_layernorm", "use_parallel_residual", "tie_word_embeddings")},
    "bos_token_id": ("a token id (an int >= 0) or null", lambda v: v is None or _is_token_id(v)),
    "eos_token_id": ("a token id (an int >= 0), a non-empty list of them, or null",
                     lambda v: v is None or _is_token_id(v) or isinstance(v, list) and v and all(map(_is_token_id, v))),
    "quantization_config": ("an object or null", lambda v: v is None or isinstance(v, dict)),
}


def _shown(value, limit=120):
    """repr(value), cut to `limit` characters: a config.json may hold a megabyte where a number belongs."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _dtype_name(d, source):
    """config.json's dtype as a torch dtype name, or "auto": the stored weights' dtype, which load_pretrained fills in
    (also when the config names none). transformers 4 writes it as torch_dtype, 5 as dtype, both as "bfloat16", and
    a string it was given ("auto", "torch.bfloat16") as it was given."""
    key = next((k for k in ("torch_dtype", "dtype") if d.get(k) is not None), None)
    value = "auto" if key is None else d[key]
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name != "auto" and name not in FLOAT_DTYPES.values():
        raise ValueError(f"{source}: {key} must be one of {', '.join(map(repr, FLOAT_DTYPES.values()))} or 'auto', "
                         f"got {value!r}")
    return name


def config_from_dict(d, source="config"):
    """A Config from the contents of a config.json, in any of its spellings: hub files (top-level rope keys),
    transformers 5 (nested rope_parameters), stablelm_epoch. Every field's type and range is checked here, by name:
    JSON holds any type, and a string where a size belongs must fail before anything is built from it."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: a config must be a JSON object, got {type(d).__name__}")
    d = dict(d)
    model_type = d.get("model_type")
    if model_type not in ("stablelm", "stablelm_epoch"):
        raise ValueError(f"{source}: model_type {model_type!r} is not StableLM ('stablelm' or 'stablelm_epoch')")
    for old, new in (("norm_eps", "layer_norm_eps"), ("rope_pct", "partial_rotary_factor")):
        if old in d:
            d[new] = d.pop(old)
    rope = d.pop("rope_parameters", None) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{source}: rope_parameters must be an object, got {_shown(rope)}")
    if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
        raise ValueError(f"{source}: rope scaling ({rope or d.get('rope_scaling')}) is not supported")
    d.update({k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope})
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (StableLM uses 'silu')")
    d.setdefault("num_key_value_heads", d.get("num_attention_heads", Config.num_attention_heads))
    d["torch_dtype"] = _dtype_name(d, source)
    given = {f.name: d[f.name] for f in fields(Config) if f.name in d}
    for name, (what, ok) in FIELD_CHECKS.items():
        if name in given and not ok(given[name]):
            raise ValueError(f"{source}: {name} must be {what}, got {_shown(given[name])}")
        if name in given and name in SIZE_LIMITS and given[name] > SIZE_LIMITS[name]:
            raise ValueError(f"{source}: {name} {_shown(given[name])} is more than {SIZE_LIMITS[name]}, the most this "
                             f"code builds (far beyond any published model)")
    try:
        return Config(**given)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_from_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file (a Hugging Face model directory has config.json)")
    return config_from_dict(_read_json(path), source=str(path))


def _read_json(path):
    """A JSON file's contents; ValueError naming the file when it is not UTF-8 JSON that Python can hold (nested
    beyond the recursion limit, or an int of more than 4300 digits)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_to_dict(config):
    """Hub-style config.json (transformers 4.x spelling, which 5.x, vLLM and lm-eval also read)."""
    d = {"architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "hidden_act": "silu", **asdict(config),
         "attention_dropout": 0.0, "hidden_dropout": 0.0, "initializer_range": 0.02, "use_cache": True}
    if d["quantization_config"] is None:
        del d["quantization_config"]
    return d


def load_pretrained(path, dtype=None, device=None):
    """Load a Hugging Face StableLM directory. dtype casts floating weights (None keeps the stored dtype); int8
    weights and their fp32 scales stay as stored. Built on the meta device and filled file by file, so the
    weights are in memory once. Every floating tensor must be finite (checked as it is read). A config.json whose
    dtype is "auto" (or missing) gets the stored embedding's dtype, so getattr(torch, config.torch_dtype) is always a
    dtype. Reading changes nothing: what a killed save_pretrained left beside `path` is put right by the next write
    there."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory{killed_write_note(path)}")
    config = Config.from_json(path / "config.json")
    files, index = _weight_files(path)
    with torch.device("meta"):
        model = StableLM(config)
    int8 = set()
    if config.quantization_config is not None:
        int8 = _swap_in_int8(model, config.quantization_config, path / "config.json")
    expected = model.state_dict()
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]  # tied files carry only the embedding (a stray copy is ignored below)
    stored = _check_checkpoint(path, files, index, expected, int8)
    if config.torch_dtype == "auto":  # as transformers' "auto": what the weights are stored in
        config.torch_dtype = FLOAT_DTYPES[stored["model.embed_tokens.weight"]]
    for file in files:
        with _open(file, device) as st:
            shard = {}
            for name in st.keys():
                if name not in expected:
                    continue  # weight_format or a tied lm_head.weight, both checked already
                t = st.get_tensor(name)
                cast = dtype is not None and t.is_floating_point() and not name.endswith(".SCB")
                shard[name] = _check_finite(t.to(dtype) if cast else t, name, file)
            model.load_state_dict(shard, strict=False, assign=True)  # the loaded tensors become the parameters
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _weight_files(path):
    """The safetensors files of a checkpoint directory and its index's weight map (None when unsharded)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = _read_index(index_file)
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {index_file} but missing")
        return files, weight_map
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], None
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            f"(only safetensors checkpoints are supported)")


def _read_index(index_file):
    """The weight map {tensor name: file name} of a model.safetensors.index.json, checked: file names are plain
    names of files beside the index (nothing outside the directory is read), metadata.total_size is an int."""
    index = _read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file}: not a safetensors index (expected an object whose weight_map is an object "
                         f"of tensor name -> file name)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or file in ("", ".", "..") or any(c in file for c in "/\\\0"):
            raise ValueError(f"{index_file}: weight_map gives {_shown(name)} the file {_shown(file)}: expected the "
                             f"name of a file in the same directory")
    metadata = index.get("metadata", {})
    if not isinstance(metadata, dict) or not _is_int(metadata.get("total_size", 0)) \
            or metadata.get("total_size", 0) < 0:
        raise ValueError(f"{index_file}: metadata must be an object whose total_size (if any) is an int >= 0, got "
                         f"{_shown(metadata)}")
    return weight_map


def _open(file, device=None):
    try:
        return safe_open(str(file), framework="pt", device=str(device or "cpu"))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: broken safetensors file ({e})") from None


def _swap_in_int8(model, qconfig, source):
    """Replace the linears an LLM.int8 checkpoint quantized by (meta) Int8Linear layers; returns their names."""
    if qconfig.get("quant_method") != "bitsandbytes" or not qconfig.get("load_in_8bit") \
            or qconfig.get("llm_int8_has_fp16_weight"):
        raise ValueError(f"{source}: quantization_config is not bitsandbytes LLM.int8 with int8 weights "
                         f"(load_in_8bit true, llm_int8_has_fp16_weight false): {qconfig}")
    skip, threshold = qconfig.get("llm_int8_skip_modules"), qconfig.get("llm_int8_threshold", 6.0)
    if skip is None:
        skip = ["lm_head"]  # transformers' default keeps the output layer float; [] quantizes every linear
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"{source}: quantization_config.llm_int8_skip_modules must be a list of module names or "
                         f"null, got {_shown(skip)}")
    if not (_is_number(threshold) and threshold >= 0):
        raise ValueError(f"{source}: quantization_config.llm_int8_threshold must be a finite number >= 0, got "
                         f"{_shown(threshold)}")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(name == s or f"{s}." in f"{name}." for s in skip)]  # transformers' name matching
    for name in names:
        linear = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantize.Int8Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            threshold=float(threshold), device="meta", dtype=linear.weight.dtype))
    return set(names)


def _check_checkpoint(path, files, index, expected, int8):
    """Compare every name, shape and dtype in the files' headers with the model before any data is read; returns
    {tensor name: safetensors dtype} of what the files hold."""
    found, stored, problems = {}, {}, []
    for file in files:
        with _open(file) as st:
            for name in st.keys():
                sl = st.get_slice(name)
                shape, dtype = list(sl.get_shape()), sl.get_dtype()
                if name in found:
                    problems.append(f"{name} is in both {found[name]} and {file}")
                found[name], stored[name] = file, dtype
                module = name.rsplit(".", 1)[0]
                if name.endswith(".weight_format") and module in int8:
                    if math.prod(shape) != 1:
                        problems.append(f"{name} in {file} has shape {shape}: a layout is one number (0: row-major)")
                    elif (layout := st.get_tensor(name).item()) != 0:
                        problems.append(f"{name} in {file} is {layout}: an old tiled int8 layout (col32/turing/"
                                        f"ampere), not row-major (0); re-save it with bitsandbytes >= 0.44")
                elif name in expected:
                    want = expected[name]
                    if shape != list(want.shape):
                        problems.append(f"{name} in {file} has shape {shape}, the model expects {list(want.shape)}")
                    is_int8 = name.endswith(".weight") and module in int8
                    if (dtype == "I8") != is_int8 or not (is_int8 or dtype in FLOAT_DTYPES):
                        problems.append(f"{name} in {file} has dtype {dtype}, the model expects "
                                        f"{'I8' if is_int8 else 'a float'}")
                elif name != "lm_head.weight":  # (a tied checkpoint's stray lm_head copy is ignored)
                    hint = name.endswith(".SCB") and not int8
                    problems.append(f"unexpected tensor {name} in {file}"
                                    + (" (an 8-bit checkpoint, but config.json has no quantization_config)" * hint))
    missing = [name for name in expected if name not in found]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
                        f"({len(missing)} in all)")
    if index is not None:
        problems += [f"{name} listed in the index is in none of the files" for name in index if name not in found]
    if problems:
        raise ValueError(f"{path}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems))
    return stored


def _check_finite(t, name, file):
    """t, unless it is floating with a NaN or an infinity. Through min and max, which propagate NaN and are infinite
    when any value is: one reduction, far cheaper on the CPU than isfinite(t).all() (a bool per element)."""
    if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{file}: tensor {name} ({t.dtype}) has {bad} of {t.numel()} values that are NaN or "
                         f"infinite: corrupt, or overflowed (in training, or in a cast to a narrower dtype)")
    return t


def save_pretrained(model, path, max_shard_size=5 * 10**9, extra=None):
    """Write a directory transformers/vLLM/lm-eval load as is; shards above max_shard_size (bytes or '5GB').
    extra(directory), if given, adds files (a tokenizer) before the directory appears. Through write_directory:
    `path` is never half-written, and only a model directory remask wrote is replaced (check_replaceable)."""
    limit = _parse_size(max_shard_size)

    def fill(directory):
        _write_files(model, directory, limit)
        if extra is not None:
            extra(directory)

    return write_directory(path, fill)


def _parse_size(size):
    """Bytes from an int or a string like '5GB' or '500MB' (decimal units, as transformers counts them)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?B)", str(size).strip().upper())
    if not isinstance(size, int) and not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB'")
    return size if isinstance(size, int) else int(float(m[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m[2]])


def _write_files(model, directory, limit):
    """The safetensors shards (with their index when sharded), config.json and generation_config.json."""
    tensors = model.state_dict()
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]  # what transformers writes for tied embeddings
    int8 = [name for name, m in model.named_modules() if isinstance(m, quantize.Int8Linear)]
    for name in int8:  # bitsandbytes' marker for the row-major int8 layout
        tensors[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    config = replace(model.config, torch_dtype=dtype, quantization_config=_int8_config(model) if int8 else None)
    shards = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, shard in zip(names, shards):  # one shard at a time on the CPU
        part = {k: tensors[k].detach().cpu().contiguous() for k in shard}
        try:
            save_file(part, directory / file, metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors (a full disk, a file-size limit) are the OS's
            raise OSError(f"{directory / file}: cannot be written ({e})") from None
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: file for file, shard in zip(names, shards) for k in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                  "eos_token_id": config.eos_token_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _int8_config(model):
    """quantization_config as transformers' BitsAndBytesConfig(load_in_8bit=True) writes it."""
    thresholds = {m.threshold for m in model.modules() if isinstance(m, quantize.Int8Linear)}
    if len(thresholds) != 1:
        raise ValueError(f"save_pretrained: Int8Linear layers disagree on threshold ({sorted(thresholds)})")
    skip = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]  # linears left in float
    return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
            "_load_in_8bit": True, "_load_in_4bit": False, "llm_int8_threshold": thresholds.pop(),
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip,
            "llm_int8_enable_fp32_cpu_offload": False, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}

# ----------------------------------------------------------------------------- directory writing
# Ownership: remask deletes, replaces or repairs only what it provably wrote. Every directory it creates holds an
# owner record, OWNER (kind and a random token); a write's temporaries carry the same token in their names. What
# lacks that proof is never touched: a writer in its way refuses before any work, naming the path. Reading (loading a
# model) changes nothing; what a killed write left is put right by the next write to the same place.

OWNER = ".remask-owner.json"  # {"remask": kind, "token": hex}: the proof that remask made this directory
KINDS = ("model", "checkpoint", "checkpoints", "run", "compare")
LEFTOVER = r"\.{name}\.(tmp|new|old|deleting)-([0-9a-f]{{16}})"  # beside NAME: a write's or deletion's temporaries


class DirectoryNotReplaceable(FileExistsError):
    """A destination holds something its writer did not write (a FileExistsError: command lines report it)."""


def owner(path) -> Optional[dict]:
    """The owner record of a directory remask made ({"remask": kind, "token": hex}), else None."""
    try:
        record = json.loads((Path(path) / OWNER).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("remask") in KINDS and isinstance(record.get("token"), str)):
        return None
    return record


def make_owned(path, kind, **extra) -> dict:
    """Create directory `path` (parents too) as remask's `kind`, or mark an existing one: its owner record."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    record = {"remask": kind, "token": secrets.token_hex(8), **extra}
    update_owner(path, record)
    return record


def update_owner(path, record):
    """Rewrite a directory's owner record (a run adds the names of what it writes), whole or not at all."""
    tmp = Path(path) / f"{OWNER}.{record['token']}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, Path(path) / OWNER)


def check_replaceable(path, kind="model"):
    """Raise unless writing `path` would replace nothing but a `kind` directory remask made: `path` absent, an
    empty directory, or one holding remask's owner record of that kind (a link is followed: its target must be so)."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise DirectoryNotReplaceable(f"{path}: a link to nothing; remove it or choose another path")
        return
    if not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")
    if not any(path.iterdir()):
        return  # an empty directory: replacing it loses nothing
    record = owner(path)
    if record is None or record["remask"] != kind:
        entries = sorted(p.name + "/" * p.is_dir() for p in path.iterdir())
        listing = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
        made = "was not made by remask" if record is None else f"is remask's {record['remask']} directory"
        raise DirectoryNotReplaceable(f"{path}: exists, holds {listing} and {made} (no {kind} owner record "
                                      f"{OWNER}), so it is left alone: choose another path, or remove it yourself")


def write_directory(path, fill, kind="model") -> Path:
    """Write a whole directory at `path` so that at every instant `path` holds the old or the new one, whole.

    fill(tmp) writes the contents into a hidden sibling `.NAME.tmp-TOKEN` that already holds its owner record with
    TOKEN (modes then follow the umask, everything is fsynced). Renamed to `.NAME.new-TOKEN` it is marked complete,
    then it takes path's place: in one atomic exchange on Linux (renameat2 RENAME_EXCHANGE), elsewhere by two renames,
    between which a kill leaves no `path` but a complete `.NAME.new-TOKEN` that the next write puts back. An existing
    `path` must be remask's `kind` directory (check_replaceable), before fill runs and again before the swap. The
    writer holds an flock on its temporary directory, so recovery leaves a live write alone.
    """
    path = Path(path)
    if path.is_symlink():  # replace the directory the link points at, keep the link
        path = path.resolve()
    recover_directory(path)
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    tmp, new = (path.parent / f".{path.name}.{stage}-{token}" for stage in ("tmp", "new"))
    tmp.mkdir(mode=0o700)
    update_owner(tmp, {"remask": kind, "token": token})  # first: from now on the temporary carries its proof
    lock = _lock(tmp, blocking=True)
    try:
        fill(tmp)
        _settle(tmp)
        _rename(tmp, new)
        _fsync(path.parent)
        check_replaceable(path, kind)  # again: fill may have taken hours
        if not path.exists():
            _rename(new, path)
        elif _exchange(new, path):
            _fsync(path.parent)
            _delete(new)  # the old directory now; a kill leaves it to recovery
        else:
            old = path.parent / f".{path.name}.old-{token}"
            _rename(path, old)
            _rename(new, path)
            _fsync(path.parent)
            _delete(old)
        _fsync(path.parent)
    except BaseException:
        if tmp.exists():
            _delete(tmp)  # incomplete; whatever else is left, the next write sorts out
        os.close(lock)
        lock = None
        recover_directory(path)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    return path


def remove_directory(path, kind):
    """Delete a `kind` directory remask made (refused, naming it, if it is not one). Renamed to a hidden
    `.NAME.deleting-TOKEN` first: a kill during the deletion leaves nothing half-deleted under the old name."""
    path = Path(path)
    check_replaceable(path, kind)
    if not path.exists():
        return
    hidden = path.parent / f".{path.name}.deleting-{owner(path)['token']}"
    _rename(path, hidden)
    _delete(hidden)


def leftovers(path) -> dict:
    """{leftover: stage} beside `path` that a write or deletion of `path` provably left: a `.NAME.STAGE-TOKEN`
    holding remask's owner record whose token is TOKEN (the write's own temporary, or a deletion's), or, for what a
    write displaced, whose TOKEN is the token of the directory now at `path`."""
    path = Path(os.path.realpath(path))  # beside the directory a link points at, where write_directory writes
    if not path.name or not path.parent.is_dir():
        return {}
    pattern = re.compile(LEFTOVER.format(name=re.escape(path.name)))
    current = (owner(path) or {}).get("token")
    found = {}
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        record = owner(p) if m and p.is_dir() and not p.is_symlink() else None
        if record is not None and m[2] in (record["token"], current):
            found[p] = m[1]
    return found


def recover_directory(path):
    """Put right what a killed write or deletion of `path` left beside it (only what leftovers() proves to be
    remask's): if `path` is missing, put back the newest complete `.NAME.new-*` (else an `.NAME.old-*`); then
    delete the others. Does nothing while a writer is alive. Called by writers only: reading changes nothing."""
    path = Path(os.path.realpath(path))
    found = leftovers(path)
    if not found:
        return
    locks = [_lock(p, blocking=False) for p in found]
    try:
        if None in locks:
            return  # a live writer holds one of them: its own cleanup follows
        if not path.exists():
            complete = [p for p in found if found[p] in ("new", "old")]
            if complete:  # a new one beats an old one, then the newest
                survivor = max(complete, key=lambda p: (found[p] == "new", p.stat().st_mtime))
                _rename(survivor, path)
                _fsync(path.parent)
                found = leftovers(path)  # the directory it displaced is proven by the token now at `path`
        for p in found:
            _delete(p)
    finally:
        for fd in locks:
            if fd is not None:
                os.close(fd)


def killed_write_note(path) -> str:
    """For an error about a missing `path`: what a killed write left beside it, if anything."""
    found = leftovers(path)
    if not found:
        return ""
    return (f" (a killed write left {', '.join(sorted(p.name for p in found))} beside it: the next write to "
            f"{Path(path).name} puts it right)")


def check_apart(writes: dict, reads: dict):
    """Inputs are never outputs: refuse (ValueError, one line) a path to be written that is, contains or lies inside
    a path to be read. writes, reads: {what the user called it: path}; every spelling (links, '..', relative or
    absolute, '' or '.') is resolved first."""
    for w_name, w in writes.items():
        target = Path(os.path.realpath(os.path.expanduser(str(w)) or "."))
        for r_name, r in reads.items():
            source = Path(os.path.realpath(os.path.expanduser(str(r)) or "."))
            if target == source:
                relation = "is"
            elif source.is_relative_to(target):
                relation = "contains"
            elif target.is_relative_to(source):
                relation = "lies inside"
            else:
                continue
            raise ValueError(f"{w_name} ({target}) {relation} {r_name} ({source}): writing it would change an input; "
                             f"choose another output path")


def _rename(src, dst):
    """Every rename of a write or deletion (a named seam: the fault tests kill the process here)."""
    os.rename(src, dst)


def _delete(path):
    """Delete a directory remask made, its owner record last: a kill midway leaves the rest still provably ours, for
    the next write to finish (a named seam: the fault tests kill the process here)."""
    path = Path(path)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.name != OWNER:
            entry.unlink()
    (path / OWNER).unlink(missing_ok=True)
    path.rmdir()


def _lock(path, blocking):
    """An open descriptor of `path` holding an exclusive flock (released when closed or the process dies);
    None when another process holds it and blocking is False."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass  # a filesystem without locks (some NFS setups): recovery cannot see a live writer there
    return fd


def _settle(directory):
    """Give everything in directory the umask's modes (mkdtemp and mkstemp make them private) and fsync it all."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
            _fsync(os.path.join(root, name))
        os.chmod(root, 0o777 & ~umask)
        _fsync(root)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _renameat2():
    """glibc's renameat2 (2.28+), or None where the C library has none (macOS, musl, old glibc)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


AT_FDCWD, RENAME_EXCHANGE = -100, 2  # from linux/fcntl.h and linux/fs.h


def _exchange(a, b) -> bool:
    """Swap two paths in one atomic step; False where the system or the filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no such call, or a filesystem without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))
