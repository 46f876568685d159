"""data.py: which tokens ReMask shows the model and which it grades, made exact, inspectable and reproducible.

The file follows one example through the pipeline, top to bottom:
  conventions  the five tags, the token roles, label -100 where nothing is graded, right padding with id 0.
  formats      chat  <|user|>\\n{user}\\n<|assistant|>\\n{assistant}\\n<|user|>\\n ... ending with <|user|>
               CoT   <|user|>\\n{prompt}\\n<|rationale|>\\n{rationale}\\n<|answer|>\\n{answer}\\n<|user|>
               A system message has no tag: its text leads the first user turn, '{system}\\n\\n{user}'.
               `encode(record, tok)` tokenizes the whole string once and gives every token a role (tag, prompt,
               response, rationale, answer) and a target flag from the character offsets of that one encoding;
               `fit_length` drops (or cuts) examples longer than the sequence length.
  masking      `mask_example(ex, tok, MaskConfig, seed, epoch, index)`: masked inputs, labels and KL mask of one
               example, a pure function of (seed, epoch, index).
  batching     `collate` right-pads to a multiple of 8; `Loader` yields each optimizer step's micro-batches for
               one data-parallel rank, in a seeded order per epoch, from any (epoch, step) on.
  tokenizer    `load_tokenizer(dir)` loads a Hugging Face `tokenizer.json` with `tokenizers` and adds the five
               tags as special tokens when missing; `len(tok)` is the number of embedding rows it needs.
  readers      TinyCoT (prompt, rationale, target) and CoT (prompt, rationale, answer), reddit-instruct-curated
               (post_title, post_text, comment_text), messages of {role, content} (oasst2, TRL, axolotl),
               ShareGPT (conversations of {from, value}), alpaca (instruction, input, output) and
               prompt/completion, as JSON Lines or a JSON array; the schema is recognised from a row's keys.
               `load_dataset("a.jsonl,b.jsonl:1000", tok, seq_len)` reads a mixture, samples ":N" rows with the
               seed, encodes and fits it to seq_len; `read_eval_set` reads a held-out one, `overlap` finds its
               records that training holds too.
  embedded     `embedded_dataset(seed, n_train, n_eval, digits)`: synthetic chain-of-thought addition plus short
               chat pairs, held-out problems, and a small BPE tokenizer trained here and cached on disk.
  show         `render(ex, tok, item)` and `python data.py show SPEC`: the text with labels and masks marked;
               `python data.py check SPEC`: per file, the schemas, bad rows, lengths, duplicates, what would train.
  files        what reading and writing share: `atomic_write` (a file appears whole or not at all, with the
               umask's mode), `read_text`, `json_lines` and `read_json_objects` (errors name the file and line).
  download     `python data.py download NAME|all --out DIR` through the dataset viewer's /rows API (stdlib only).
  models       `resolve_model("org/name[@revision]")`: a model on the Hugging Face Hub as its directory in the cache
               transformers shares (downloaded where missing, resumable, hash-checked); a local directory as is.
               `python data.py download ORG/NAME[@REVISION]` downloads one.
  chat         `save_chat_config(dir, tok)`: the chat template, eos and stop ids other tools read, in every model
               directory remask writes.
  gsm8k        the lm-evaluation-harness GSM8K task without the model: `read_gsm8k(path)`, `gsm8k_prompts`
               (5-shot 'Question: ...\\nAnswer:' drawn with seed 1234, or the CoT template), `cut_at_stop`,
               `strict_match`, `flexible_extract`, `normalize_gsm8k`, and `score_gsm8k` (accuracy and stderr).
  arc          the lm-evaluation-harness ARC task (25-shot log-likelihoods) without the model: `read_arc(path)`,
               `arc_contexts`, `arc_continuations`, `encode_pair` and `score_arc` (acc, acc_norm and stderr).
  command line `python data.py show ...`, `python data.py check ...` and `python data.py download ...`
               (datasets or a model).

Conventions other modules rely on: labels are aligned with input_ids (Hugging Face convention; the loss shifts
them), -100 where there is no label; kl_mask is aligned the same way and marks the target positions before any
label dropping; padding id 0 on the right; no BOS is prepended (GPT-NeoX has none).

Deliberately left out: streaming datasets larger than memory, worker processes (masking and padding 16
examples takes ~2 ms of CPU, far below a training step), the harness's chat-template and multi-process variants.

Sources: the ReMask-3B model card (huggingface.co/euclaise/ReMask-3B: the two prompt formats, the mask rates 0.4,
0.1 and 0.1, sequence length 256, the three datasets); Masked Thought (Chen et al. 2024, arXiv 2403.02178) for
random-token masking; the GPT-NeoX-20B tokenizer.json that stabilityai/stablelm-3b-4e1t ships (<|endoftext|> is
id 0, no BOS); the dataset cards of euclaise/TinyCoT, euclaise/reddit-instruct-curated, sablo/oasst2_curated and
openai/gsm8k; the dataset formats of TRL (huggingface.co/docs/trl/dataset_formats), axolotl (docs/dataset-formats),
FastChat's ShareGPT files and tatsu-lab/stanford_alpaca's alpaca_data.json; the Hugging Face dataset viewer API
(huggingface.co/docs/dataset-viewer, the /rows endpoint);
EleutherAI lm-evaluation-harness 0.4.13 (lm_eval/tasks/gsm8k/gsm8k.yaml version 3.0, api/samplers.py,
api/task.py, filters/extraction.py, api/metrics.py, models/huggingface.py generate_until); huggingface_hub 2.4
(constants.py, file_download.py, hf_api.py, utils/_http.py, _snapshot_download.py: the Hub's HTTP interface and
cache layout); transformers (tokenization_utils_base.py: chat_template.jinja, how a chat template is rendered).
"""
from __future__ import annotations  # the pipeline reads in order: encode names Tokenizer before it is defined

import argparse
import fcntl
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

# ----------------------------------------------------------------------------- conventions
# What every part below, and remask.py, relies on.

TAGS = ("<|user|>", "<|assistant|>", "<|rationale|>", "<|answer|>", "<|mask|>")  # the card's tags, plus the mask
EOS = "<|endoftext|>"
PAD_ID = 0  # right padding follows every real token, so causal attention never mixes it in; never a label either
IGNORE_INDEX = -100  # label of a position without a target (torch's cross_entropy ignore_index)
MODES = ("remask", "masked-thought", "sft")  # the three rows of the card's table (see MaskConfig)

# Token roles. Content roles are numerically above TAG: a token's role is the largest role among its characters,
# so a token that merges a framing newline with content counts as content.
TAG, PROMPT, RESPONSE, RATIONALE, ANSWER = range(5)
ROLE_NAMES = ("tag", "prompt", "response", "rationale", "answer")


class DataError(ValueError):
    """Bad input data or tokenizer; the message names the file, line and field."""


# ----------------------------------------------------------------------------- formats and encoding
# A record becomes one string in the card's format, tokenized once; every token gets a role and a target flag.

@dataclass
class ChatRecord:
    turns: list  # [(user, assistant), ...] stripped, non-empty strings; the conversation starts with the user
    system: str = ""  # a system message, stripped; the format has no tag for it, see with_system


@dataclass
class CoTRecord:
    prompt: str  # the question
    rationale: str  # the reasoning, graded but partly label-droppable
    answer: str  # the direct answer, never masked or dropped


@dataclass
class Encoded:
    ids: torch.Tensor  # (T,) int64 token ids, equal to the tokenizer's encoding of format_record(record)
    roles: torch.Tensor  # (T,) int8, one of TAG PROMPT RESPONSE RATIONALE ANSWER
    targets: torch.Tensor  # (T,) bool, the token is a label (predicted from the positions before it)
    cot: bool  # a chain-of-thought example (rationale label dropping applies)


def _segments(record) -> list:
    """(text, role, target) pieces whose concatenation is the formatted example."""
    u, a, r, ans = TAGS[:4]
    if isinstance(record, CoTRecord):  # ends with '\n<|user|>' like a chat turn: the end of a reply is learned

        return [(u, TAG, False), ("\n", TAG, False), (record.prompt, PROMPT, False), ("\n", TAG, False),
                (r, TAG, False), ("\n", TAG, False), (record.rationale, RATIONALE, True), ("\n", TAG, True),
                (ans, TAG, True), ("\n", TAG, True), (record.answer, ANSWER, True), ("\n", TAG, True),
                (u, TAG, True)]
    segs = [(u, TAG, False)]
    for i, (user, assistant) in enumerate(record.turns):
        user = with_system(record.system, user) if i == 0 else user
        segs += [("\n", TAG, False), (user, PROMPT, False), ("\n", TAG, False), (a, TAG, False),
                 ("\n", TAG, False), (assistant, RESPONSE, True), ("\n", TAG, True), (u, TAG, True)]
    return segs


def format_record(record) -> str:
    return "".join(text for text, _, _ in _segments(record))


def with_system(system: str, user: str) -> str:
    """The first user turn's text with a system message before it. The card's chat format has no system tag,
    so the system text leads the first user turn, a blank line between them: prompt, never graded. Training
    (_segments), chat_prompt and the chat template a trained model ships all write it this way."""
    return f"{system}\n\n{user}" if system else user


def chat_prompt(history: list, user: str, system: str = "") -> str:
    """The prompt side of a chat turn: earlier (user, assistant) turns, then `user`, ending '<|assistant|>\\n';
    a system message leads the first user turn as in training."""
    system = system.strip()
    if history:
        return f"{format_record(ChatRecord(history, system))}\n{user.strip()}\n{TAGS[1]}\n"
    return f"{TAGS[0]}\n{with_system(system, user.strip())}\n{TAGS[1]}\n"


def cot_prompt(prompt: str) -> str:
    """The prompt side of a CoT example, ending '<|rationale|>\\n'; the model writes the rest."""
    return f"{TAGS[0]}\n{prompt.strip()}\n{TAGS[2]}\n"


def extract_answer(completion: str):
    """The answer a CoT completion gives: the text after <|answer|> up to <|user|> or the end, or None."""
    if TAGS[3] not in completion:
        return None
    return completion.split(TAGS[3], 1)[1].split(TAGS[0], 1)[0].replace(EOS, "").strip()


def encode_many(records: list, tok: Tokenizer) -> list:
    """Encode each record with one whole-string tokenization; roles and targets come from the token offsets.

    A token's role is the largest role among the characters it covers, and it is a target if any of them is.
    In plain Python, with `enc.offsets` the [start, end) character span of each token:

        role = [max(char_role[start:end]) for start, end in enc.offsets]
        target = [any(char_target[start:end]) for start, end in enc.offsets]

    `np.maximum.reduceat(a, [s0, e0, s1, e1, ...])` computes the same in one call: it reduces a[s0:e0],
    a[e0:s1], a[s1:e1], ..., so its even entries are the tokens' spans. The odd entries are dropped: the byte
    pieces of one character share its span, so there e0 > s1 and reduceat returns a single element instead."""
    segments = [_segments(r) for r in records]
    texts = ["".join(t for t, _, _ in segs) for segs in segments]
    out = []
    for record, segs, enc in zip(records, segments, tok._spans.encode_batch(texts, add_special_tokens=False)):
        lengths = [len(t) for t, _, _ in segs]
        # per character, plus a sentinel: reduceat's indices must be positions, and an end may equal the length
        char_role = np.append(np.repeat([r for _, r, _ in segs], lengths), TAG).astype(np.int8)
        char_target = np.append(np.repeat([g for _, _, g in segs], lengths), False)
        bounds = np.asarray(enc.offsets, dtype=np.int64).reshape(-1)  # (2T,) start0, end0, start1, end1, ...
        role = np.maximum.reduceat(char_role, bounds)[::2]
        target = np.logical_or.reduceat(char_target, bounds)[::2]
        out.append(Encoded(torch.tensor(enc.ids, dtype=torch.int64), torch.from_numpy(role.copy()),
                           torch.from_numpy(target.copy()), isinstance(record, CoTRecord)))
    return out


def encode(record, tok: Tokenizer) -> Encoded:
    return encode_many([record], tok)[0]


def fit_length(examples: list, seq_len: int, truncate: bool = False):
    """Drop examples longer than seq_len (or cut them to it); returns (kept, number dropped).
    A cut example that keeps no label is dropped too: it would teach nothing."""
    kept, dropped = [], 0
    for ex in examples:
        if len(ex.ids) > seq_len:
            if not truncate:
                dropped += 1
                continue
            ex = Encoded(ex.ids[:seq_len], ex.roles[:seq_len], ex.targets[:seq_len], ex.cot)
            if not ex.targets.any():
                dropped += 1
                continue
        kept.append(ex)
    return kept, dropped


def describe_fit(kept: int, dropped: int, seq_len: int, truncate: bool) -> str:
    """The log line for fit_length's result."""
    if truncate:
        return f"{kept} examples (longer ones cut to {seq_len} tokens); {dropped} dropped as left without labels"
    return f"{kept} examples; {dropped} dropped as longer than {seq_len} tokens"


# ----------------------------------------------------------------------------- masking
# What ReMask is about: which inputs the masked pass sees replaced, and which labels are dropped.

@dataclass
class MaskConfig:
    """How one example is masked. The defaults are the model card's rates and the single source of every
    default elsewhere (`data.py show`, remask.py's TrainConfig)."""
    mode: str = "remask"  # sft: full input only; masked-thought: masked input only; remask: both (+ KL)
    input_mask: float = 0.4  # probability that each response/rationale input token is replaced
    label_mask: float = 0.1  # probability that each rationale label is dropped (CoT; not in sft)
    answer_only: float = 0.1  # probability that all rationale labels of a CoT example are dropped (not in sft)
    mask_with: str = "mask"  # "mask": <|mask|>; "random": a uniformly random ordinary token (Masked Thought)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mask_with not in ("mask", "random"):
            raise ValueError(f"mask_with must be 'mask' or 'random', got {self.mask_with!r}")
        for field in ("input_mask", "label_mask", "answer_only"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"{field} must be a probability in [0, 1], got {getattr(self, field)}")


def mask_example(ex: Encoded, tok: Tokenizer, cfg: MaskConfig, seed: int, epoch: int, index: int) -> dict:
    """input_ids, masked_ids (None in sft), labels and kl_mask of one example; a pure function of
    (seed, epoch, index), so any batch order and any resume draw the same masks, and masked-thought and
    remask runs with the same seed see the same masks."""
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")  # one word each keeps the seed streams apart
    # numpy on these short vectors costs a fraction of torch's per-op overhead; the tensors share the memory
    ids, roles = ex.ids.numpy(), ex.roles.numpy()
    labels = np.where(ex.targets.numpy(), ids, IGNORE_INDEX)  # (T,)
    item = dict(input_ids=ex.ids, masked_ids=None, labels=torch.from_numpy(labels), kl_mask=ex.targets)
    if cfg.mode == "sft":
        return item
    rng = np.random.default_rng((seed, epoch, index, 1))  # the trailing 1 separates it from Loader.order's stream
    T = len(ids)
    u_input, u_label, u_answer = rng.random(T), rng.random(T), rng.random()
    maskable = (roles == RESPONSE) | (roles == RATIONALE)  # content only: never prompt, tags or answer
    if cfg.mask_with == "mask":
        fill = tok.mask_id
    else:  # drawn last, so the two choices share every other draw
        fill = tok.ordinary_ids[rng.integers(0, len(tok.ordinary_ids), T)]  # (T,)
    item["masked_ids"] = torch.from_numpy(np.where(maskable & (u_input < cfg.input_mask), fill, ids))
    if ex.cot:
        labels[(roles == RATIONALE) & ((u_label < cfg.label_mask) | (u_answer < cfg.answer_only))] = IGNORE_INDEX
    return item


# ----------------------------------------------------------------------------- batching
# Masked examples padded into micro-batches, in a seeded order that a resume re-enters at any step.

def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def collate(items: list, pad_multiple: int = 8, pin_memory=None) -> dict:
    """Right-pad a list of mask_example dicts to the longest, rounded up to pad_multiple (tensor-core
    friendly shapes, fewer distinct shapes for torch.compile); pinned memory when CUDA is there."""
    T = max(len(it["input_ids"]) for it in items)
    T = round_up(T, pad_multiple)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory

    def pad(key, value, dtype):
        out = torch.full((len(items), T), value, dtype=dtype)  # (B, T)
        for row, it in zip(out, items):
            row[:len(it[key])] = it[key]
        return out.pin_memory() if pin else out

    batch = dict(input_ids=pad("input_ids", PAD_ID, torch.int64), labels=pad("labels", IGNORE_INDEX, torch.int64),
                 kl_mask=pad("kl_mask", False, torch.bool), masked_ids=None)
    if items[0]["masked_ids"] is not None:
        batch["masked_ids"] = pad("masked_ids", PAD_ID, torch.int64)
    return batch


class Loader:
    """Optimizer steps of `global_batch` examples in a seeded order per epoch. For each step, one rank gets
    its share (every world_size-th example of the step's batch) cut into micro-batches of `micro_batch`.

    group_by_length sorts each global batch by length before sharding and cutting, so a micro-batch holds
    similar lengths (less padding, the longest first so memory trouble shows at once) while every step still
    sees exactly the same examples: the optimizer trajectory does not change, only the padding. The last
    partial batch is kept unless drop_last; a rank may then get fewer (or no) micro-batches than the others."""

    def __init__(self, examples: list, tok: Tokenizer, mask: MaskConfig, global_batch: int, micro_batch: int,
                 seed: int = 0, group_by_length: bool = False, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, pin_memory=None):
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size or micro_batch < 1:
            raise ValueError(f"need 0 <= rank < world_size and micro_batch >= 1 (rank {rank}, "
                             f"world_size {world_size}, micro_batch {micro_batch})")
        if not examples:
            raise ValueError("no examples to load")
        self.examples, self.tok, self.mask, self.seed = examples, tok, mask, seed
        self.global_batch, self.micro_batch, self.group_by_length = global_batch, micro_batch, group_by_length
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        n = len(examples)
        self.steps_per_epoch = n // global_batch if drop_last else round_up(n, global_batch) // global_batch
        self.lengths = np.array([len(ex.ids) for ex in examples])

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch, 0, 2)).permutation(len(self.examples))

    def step_indices(self, epoch: int, step: int) -> list:
        """This rank's micro-batches of example indices for one optimizer step."""
        batch = self.order(epoch)[step * self.global_batch:(step + 1) * self.global_batch]
        if self.group_by_length:
            batch = batch[np.argsort(-self.lengths[batch], kind="stable")]
        share = batch[self.rank::self.world_size].tolist()
        return [share[i:i + self.micro_batch] for i in range(0, len(share), self.micro_batch)]

    def micro_batches(self, epoch: int, step: int) -> list:
        """Collated micro-batches of one step, each with an `index` tensor of its example indices."""
        out = []
        for idx in self.step_indices(epoch, step):
            items = [mask_example(self.examples[i], self.tok, self.mask, self.seed, epoch, i) for i in idx]
            batch = collate(items, pin_memory=self.pin_memory)
            batch["index"] = torch.tensor(idx)
            out.append(batch)
        return out

    def iterate(self, epoch: int, start_step: int = 0):
        """Yield (step, micro_batches) from start_step to the end of the epoch (a resume passes its position)."""
        for step in range(start_step, self.steps_per_epoch):
            yield step, self.micro_batches(epoch, step)


# ----------------------------------------------------------------------------- tokenizer
# A Hugging Face tokenizer.json with the five tags added as special tokens.

class Tokenizer:
    """A `tokenizers.Tokenizer` with the five tags as special tokens and the ids the pipeline needs."""

    def __init__(self, tk: tokenizers.Tokenizer, name: str = "tokenizer"):
        tk.no_truncation()  # some hub files enable truncation/padding, which would silently cut examples
        tk.no_padding()
        added = tk.get_added_tokens_decoder()
        special = {t.content for t in added.values() if t.special}
        self.added_tags = [t for t in TAGS if t not in special]  # tags this tokenizer lacked (reported by callers)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.added_tags])
        self.tk = tk
        self.user_id, self.assistant_id, self.rationale_id, self.answer_id, self.mask_id = (
            tk.token_to_id(t) for t in TAGS)
        self.eos_id = tk.token_to_id(EOS)
        if self.eos_id is None:
            raise DataError(f"{name}: has no {EOS} token (the end-of-text id StableLM uses)")
        self.pad_id = PAD_ID
        # The offsets that assign roles must cover whole tokens: GPT-NeoX's ByteLevel post-processor trims
        # whitespace from them, so roles come from a copy without a post-processor. With add_special_tokens=False
        # a post-processor never changes ids, so both give the same ids (tested).
        self._spans = tokenizers.Tokenizer.from_str(tk.to_str())
        self._spans.post_processor = None
        self._rows = max(max(tk.get_vocab(with_added_tokens=True).values()) + 1, tk.get_vocab_size(True))
        specials = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        # Random-token masking draws from ordinary tokens only: a random <|user|> would fake the format.
        self.ordinary_ids = np.array(
            [i for i in range(self._rows) if i not in specials and tk.id_to_token(i) is not None])

    def __len__(self) -> int:
        """Embedding rows this tokenizer needs: the largest id plus one, added tokens included."""
        return self._rows

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of ids; tags and <|endoftext|> are kept unless skip_special_tokens (as in Hugging Face)."""
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory) -> Path:
        """Write `directory/tokenizer.json` atomically (tags included), so the directory reloads the same, and the
        files other tools chat with it through (save_chat_config); returns the tokenizer.json path."""
        path = Path(directory) / "tokenizer.json"
        atomic_write(path, self.tk.to_str(pretty=True).encode())
        save_chat_config(directory, self)
        return path


def load_tokenizer(path) -> Tokenizer:
    """Load a model directory's tokenizer.json (or the file itself) and add the tags it lacks."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{file}: not found (a Hugging Face model directory holds a tokenizer.json)")
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)  # json's message says where the file breaks; the tokenizers library's does not
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    try:
        tk = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the binding raises plain Exception
        raise DataError(f"{file}: not a tokenizer the `tokenizers` library can load: {e}") from None
    return Tokenizer(tk, str(file))


# ----------------------------------------------------------------------------- readers
# Dataset rows -> records: the card's three datasets and the schemas that TRL, axolotl, litgpt and FastChat read,
# recognised from a row's keys; a mixture spec -> encoded examples that fit.

RESERVED = TAGS + (EOS,)  # strings that would tokenize as control ids inside content
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null",
              dict: "object"}
# Role spellings of `messages` (role: user/assistant/system) and ShareGPT (from: human/gpt/system), accepted in both
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def unreadable_json(e: Exception) -> str:
    """Why valid JSON cannot be read, for the RecursionError or ValueError that json.loads raises beyond its
    limits (a malformed text raises JSONDecodeError, reported with its position instead)."""
    if isinstance(e, RecursionError):
        return "JSON nested too deeply to read"
    return f"a number longer than {sys.get_int_max_str_digits()} digits, more than Python reads"  # int()'s limit


def _shown(value) -> str:
    """A value as an error message shows it: a short string quoted, anything else by its JSON type."""
    if isinstance(value, str):  # repr escapes newlines and lone surrogates: the message stays one printable line
        return repr(value) if len(value) <= 40 else f"a {len(value)}-character string"
    return f"a JSON {JSON_TYPES.get(type(value), 'value')}"


def _text(row: dict, key: str, where: str = "", required: bool = True) -> str:
    name = f"{where}{key}"
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"missing field '{name}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"field '{name}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape decodes to half of a UTF-16 pair, not a character
        raise DataError(f"field '{name}' contains a lone surrogate ({value[e.start]!r} at character {e.start}), "
                        "not text") from None
    value = value.strip()  # the format puts its own newlines around every field
    if required and not value:
        raise DataError(f"field '{name}' is empty")
    for tag in RESERVED:
        if tag in value:
            raise DataError(f"field '{name}' contains the reserved token {tag}")
    return value


def _conversation(row: dict, key: str, role: str, content: str) -> ChatRecord:
    """The list row[key] of {role, content} turns -> ChatRecord. Turns must alternate user, assistant, ...,
    ending with the assistant. Two turns of one role in a row are refused, not merged: the card's format
    alternates, and in practice a repeated role means a lost or duplicated turn; merging would train on a text
    nobody wrote (--skip-bad counts such rows). A system message may come first, or as a top-level 'system'
    field (as axolotl reads it), not both and nowhere else."""
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"field '{key}' must be a non-empty list of {{{role}, {content}}}")
    system, texts = _text(row, "system", required=False), []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]."
        if not isinstance(turn, dict):
            raise DataError(f"{key}[{i}] must be an object with {role} and {content}")
        if turn.get(role) is None:
            raise DataError(f"missing field '{where}{role}'")
        spelled = turn[role]
        said = ROLES.get(spelled) if isinstance(spelled, str) else None
        if said is None:
            raise DataError(f"field '{where}{role}' is {_shown(spelled)}; expected user, assistant or system "
                            "(ShareGPT's human and gpt too)")
        if said == "system":
            if i > 0:
                raise DataError(f"field '{where}{role}' is 'system' after the conversation started; only the first "
                                "turn may be a system message")
            if system:
                raise DataError(f"two system messages: a top-level 'system' field and {key}[0]")
            if len(turns) == 1:
                raise DataError(f"field '{where}{role}' is 'system' and no user turn follows it")
            system = _text(turn, content, where, required=False)
            continue
        expected = ("user", "assistant")[len(texts) % 2]
        if said != expected:
            raise DataError(f"conversation does not alternate: {key}[{i}] is {spelled!r}, expected {expected!r}"
                            " (it must go user, assistant, user, ...; two turns of one role are not merged)")
        texts.append(_text(turn, content, where))
    if len(texts) % 2:
        raise DataError(f"conversation ends with a user message ({key}[{len(turns) - 1}]); "
                        "it must end with the assistant")
    return ChatRecord(list(zip(texts[::2], texts[1::2])), system)


def _cot(answer: str):
    """Reads a CoT row whose answer is in the field `answer`."""
    return lambda row: CoTRecord(_text(row, "prompt"), _text(row, "rationale"), _text(row, answer))


def _reddit(row: dict) -> ChatRecord:
    title, body = _text(row, "post_title"), _text(row, "post_text", required=False)
    return ChatRecord([(title + "\n" + body if body else title, _text(row, "comment_text"))])


def _alpaca(row: dict) -> ChatRecord:
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    return ChatRecord([(instruction + "\n\n" + extra if extra else instruction, _text(row, "output"))])


# (name, the keys that identify it, row -> record). A row belongs to the first schema whose keys it holds, and
# its other keys are ignored like any extra column: rows with a rationale are CoT before they are
# prompt/completion, and a whole conversation (messages, conversations) wins over a single-turn pair.
SCHEMAS = (
    ("TinyCoT", {"prompt", "rationale", "target"}, _cot("target")),  # euclaise/TinyCoT
    ("CoT", {"prompt", "rationale", "answer"}, _cot("answer")),
    ("reddit-instruct", {"post_title", "comment_text"}, _reddit),  # euclaise/reddit-instruct-curated
    ("messages", {"messages"}, lambda row: _conversation(row, "messages", "role", "content")),  # oasst2, TRL
    ("ShareGPT", {"conversations"}, lambda row: _conversation(row, "conversations", "from", "value")),
    ("alpaca", {"instruction", "output"}, _alpaca),
    # TRL continues the prompt's text; here the pair is one chat turn, its completion the graded reply
    ("prompt/completion", {"prompt", "completion"},
     lambda row: ChatRecord([(_text(row, "prompt"), _text(row, "completion"))])),
)


def _schema(row) -> tuple:
    """The SCHEMAS entry a row belongs to; DataError naming the keys seen when it fits none."""
    if not isinstance(row, dict):
        raise DataError(f"the row is a JSON {JSON_TYPES.get(type(row), 'value')}, expected an object")
    for schema in SCHEMAS:
        if schema[1] <= row.keys():
            return schema
    keys = sorted(row)
    seen = ", ".join(map(repr, keys[:12])) + (f", ... {len(keys) - 12} more" if len(keys) > 12 else "")
    raise DataError(f"unknown schema (keys [{seen}]); expected messages, conversations (ShareGPT), "
                    "instruction/output (alpaca), prompt/completion, prompt/rationale/answer or target (CoT), "
                    "post_title/comment_text (reddit-instruct)")


def parse_row(row) -> ChatRecord | CoTRecord:
    """One dataset row -> ChatRecord or CoTRecord; the schema is recognised from the keys (see SCHEMAS)."""
    return _schema(row)[2](row)


def _is_json_array(text: str) -> bool:
    """Whether a file is one JSON array rather than JSON Lines: it starts with '[', unless its first line is a
    whole JSON value with more lines after it (JSON Lines whose rows are arrays, each reported as such)."""
    first, _, rest = text.lstrip().partition("\n")
    if not first.startswith("["):
        return False
    if not rest.strip():
        return True  # an array on one line
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return True  # an array spread over lines
    except (RecursionError, ValueError):
        return False  # a first line beyond json.loads's limits: read as JSON Lines, which names that line
    return False  # a whole value, then more lines


def parse_rows(path) -> list:
    """Read a JSON Lines file or a JSON array of rows -> (where, schema name, record) for each good row and
    (where, None, message) for each bad one; where is 'path:line' or 'path[item i]', the message starts with it.
    A file that cannot be read, is blank or is not valid JSON raises DataError."""
    path = Path(path).expanduser()
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: {'only blank lines' if text else 'an empty file'}, no rows")
    if _is_json_array(text):  # anything else is read as JSON Lines (what HF's to_json writes)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
        except (RecursionError, ValueError) as e:
            raise DataError(f"{path}: {unreadable_json(e)}") from None
        located = [(f"{path}[item {i}]", row, None) for i, row in enumerate(rows)]
    else:
        located = json_lines(path, text)
    out = []
    for where, row, error in located:
        try:
            if error:
                raise DataError(error)
            name, _, parse = _schema(row)
            out.append((where, name, parse(row)))
        except DataError as e:
            out.append((where, None, f"{where}: {e}"))
    return out


def read_records(path, skip_bad: bool = False):
    """Read a JSON Lines file or a JSON array of rows -> (records, bad rows skipped, first bad message).
    Without skip_bad the first bad row raises DataError naming file and line (or array item); a file without
    a single good row raises DataError saying why."""
    records, bad, first = [], 0, None
    for _, name, result in parse_rows(path):
        if name:
            records.append(result)
        elif not skip_bad:
            raise DataError(result + " (--skip-bad skips such rows)")
        else:
            bad, first = bad + 1, first or result
    if not records:
        why = f"all {bad} rows are bad (first: {first})" if bad else "an empty JSON array, no rows"
        raise DataError(f"{Path(path).expanduser()}: {why}")
    return records, bad, first


def mixture_parts(spec: str) -> list:
    """`a.jsonl,b.jsonl:1000` -> [('a.jsonl', None), ('b.jsonl', 1000)]: each file and how many rows to draw.
    Any other ':' suffix is part of a file name, unless no such file exists but the name before the ':' does."""
    parts = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise DataError(f"empty entry in data spec {spec!r}")
        path, colon, count = part.rpartition(":")
        if path and re.fullmatch(r"[0-9]+", count):  # ASCII digits: str.isdigit() also takes '²' and '١'
            if len(count.lstrip("0")) > 18:  # more rows than any file holds (int() refuses 4300 digits)
                raise DataError(f"{path}: the spec asks for a {len(count.lstrip('0'))}-digit number of rows")
            if int(count) == 0:
                raise DataError(f"{path}: the spec {part!r} asks for 0 rows (leave the file out instead)")
            parts.append((path, int(count)))
        elif colon and not os.path.exists(os.path.expanduser(part)) and os.path.isfile(os.path.expanduser(path)):
            raise DataError(f"{part}: {_shown(colon + count)} is not a row count (the spec is FILE or FILE:N, "
                            f"N >= 1 rows drawn with the seed; {path} exists, {part} does not)")
        else:
            parts.append((part, None))
    return parts


def sample_rows(path: str, usable: int, count: int, seed: int, part: int) -> list:
    """The indices, in file order, of `count` of a file's `usable` rows, drawn with the seed and the file's place
    `part` in the spec."""
    if count > usable:
        raise DataError(f"{path}: the spec asks for {count} rows but the file has {usable} usable ones")
    return sorted(random.Random(f"mixture:{seed}:{part}").sample(range(usable), count))


def read_mixture(spec: str, seed: int = 0, skip_bad: bool = False, log=print) -> list:
    """`a.jsonl,b.jsonl:1000`: every row of a, 1000 rows of b sampled with the seed (kept in file order)."""
    records = []
    for i, (path, count) in enumerate(mixture_parts(spec)):
        rows, bad, first = read_records(path, skip_bad)
        note = f", skipped {bad} bad rows (first: {first})" if bad else ""
        if count is not None:
            rows = [rows[j] for j in sample_rows(path, len(rows), count, seed, i)]
            note += f", sampled {count}"
        log(f"{path}: {len(rows)} examples{note}")
        records += rows
    return records


def load_dataset(spec: str, tok: Tokenizer, seq_len: int, seed: int = 0, skip_bad: bool = False,
                 truncate: bool = False, log=print) -> list:
    """Read a mixture spec, encode it and fit it to seq_len; logs what was read, skipped and dropped."""
    encoded, dropped = fit_length(encode_many(read_mixture(spec, seed, skip_bad, log), tok), seq_len, truncate)
    log(describe_fit(len(encoded), dropped, seq_len, truncate))
    return encoded


def read_eval_set(spec: str, tok: Tokenizer, seq_len: int, seed: int = 0, skip_bad: bool = False,
                  log=print) -> list:
    """Held-out records from a mixture spec of any schema, for a run's held-out metrics: the teacher-forced loss
    on all of them, greedy exact match on those with an answer (CoTRecord). Records longer than seq_len are left
    out, not cut: a cut example would measure something else than the file holds."""
    records = read_mixture(spec, seed, skip_bad, log)
    kept = [r for r, ex in zip(records, encode_many(records, tok)) if len(ex.ids) <= seq_len]
    if not kept:
        raise DataError(f"evaluation data {spec}: all {len(records)} records are longer than {seq_len} tokens")
    answered = sum(isinstance(r, CoTRecord) for r in kept)
    log(f"evaluation data {spec}: {len(kept)} records ({answered} with an answer for exact match); "
        f"{len(records) - len(kept)} left out as longer than {seq_len} tokens")
    return kept


def overlap(train: list, held_out: list) -> list:
    """Indices of the held-out records identical to a training record (the same formatted text): metrics on
    them measure recall of the training data, not generalisation."""
    seen = {format_record(r) for r in train}
    return [i for i, r in enumerate(held_out) if format_record(r) in seen]


def describe_overlap(shared: list, n_held_out: int) -> str:
    """The log line for overlap's result."""
    if not shared:
        return f"no evaluation record is identical to a training record ({n_held_out} compared)"
    return (f"warning: {len(shared)} of {n_held_out} evaluation records are identical to training records "
            f"(the first is evaluation record {shared[0]})")


# ----------------------------------------------------------------------------- embedded dataset
# The CPU demo's data: chain-of-thought addition and small chat tasks, with a tokenizer of its own.

ADD_PROMPTS = ("What is {a}+{b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "{a}+{b}=?")
WORDS = ("cat dog sun moon tree bird fish star road lamp book door rain snow wind fire milk bread apple "
         "green river stone cloud horse mouse table chair glass paper light night water house plant music "
         "train ocean tiger zebra lemon honey candle garden window pencil").split()
CHAT_TASKS = (  # (instruction template, response function of (word, number, number)); deterministic, so learnable
    ("Reverse the word {w}.", lambda w, n, m: w[::-1]),
    ("Spell {w} with dashes.", lambda w, n, m: "-".join(w)),
    ("Write {w} in capital letters.", lambda w, n, m: w.upper()),
    ("What is the first letter of {w}?", lambda w, n, m: w[0]),
    ("Repeat the word {w} {k} times.", lambda w, n, m: " ".join([w] * (m % 4 + 2))),
    ("What number comes after {n}?", lambda w, n, m: str(n + 1)),
    ("Which is larger, {n} or {m}?", lambda w, n, m: str(max(n, m))),
    ("Count from {n} to {e}.", lambda w, n, m: ", ".join(str(i) for i in range(n, n + m % 5 + 2))),
)
EMBEDDED_VOCAB = 512  # BPE target size; the corpus is small, so training may stop below it


def addition_cot(a: int, b: int) -> tuple:
    """Rationale and answer for a+b, one digit column at a time from the right, carries spelled out:
    457+385 -> "7+5=12, write 2 carry 1; 5+8+1=14, write 4 carry 1; 4+3+1=8, write 8", "842"."""
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, carry = [], 0
    for x, y in zip(xs, ys):
        terms = [int(x), int(y)] + ([carry] if carry else [])
        total, carry = sum(terms), sum(terms) // 10
        steps.append("+".join(map(str, terms)) + f"={total}, write {total % 10}" + (" carry 1" if carry else ""))
    if carry:
        steps.append("write 1")
    return "; ".join(steps), str(a + b)


def _addition(a: int, b: int, rng: random.Random) -> CoTRecord:
    return CoTRecord(rng.choice(ADD_PROMPTS).format(a=a, b=b), *addition_cot(a, b))


def _chat_pair(rng: random.Random) -> ChatRecord:
    template, respond = rng.choice(CHAT_TASKS)
    w, n, m = rng.choice(WORDS), rng.randint(0, 99), rng.randint(0, 99)
    user = template.format(w=w, n=n, m=m, k=m % 4 + 2, e=n + m % 5 + 1)
    return ChatRecord([(user, respond(w, n, m))])


@lru_cache(maxsize=1)
def _embedded_corpus() -> tuple:
    """The embedded tokenizer's training text: fixed, so built once per process (it takes ~0.3 s)."""
    rng = random.Random("embedded-tokenizer")
    corpus = [format_record(_chat_pair(rng)) for _ in range(2000)]
    for digits in range(1, 13):
        corpus += [format_record(_addition(rng.randrange(10 ** digits), rng.randrange(10 ** digits), rng))
                   for _ in range(100)]
    return tuple(corpus)


def embedded_tokenizer(cache_dir=None) -> Tokenizer:
    """A byte-level BPE trained on the embedded tasks (no token holds two digits): <|endoftext|> 0,
    <|padding|> 1, the five tags 2-6. Cached under cache_dir (default $XDG_CACHE_HOME/remask or
    ~/.cache/remask), keyed by a hash of its corpus and settings."""
    corpus = _embedded_corpus()
    specials = [EOS, "<|padding|>", *TAGS]
    tk = tokenizers.Tokenizer(models.BPE())
    # one digit per token (with its leading space, if any): numbers are read and written digit by digit
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(r" ?[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    key = hashlib.sha256("\n".join([tokenizers.__version__, tk.to_str(), str(EMBEDDED_VOCAB), *specials,
                                    *corpus]).encode()).hexdigest()[:16]
    cache = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "remask")
    path = cache / f"embedded-tokenizer-{key}.json"
    if path.is_file():
        try:
            return load_tokenizer(path)
        except DataError:
            pass  # a damaged cache file is rebuilt below
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=EMBEDDED_VOCAB, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(tk, "embedded tokenizer")
    try:
        atomic_write(path, tk.to_str().encode())
    except OSError:
        pass  # a read-only home only costs the ~10 ms retraining next time
    return tok


def embedded_dataset(seed: int = 0, n_train: int = 20000, n_eval: int = 200, digits: int = 3,
                     chat_fraction: float = 0.2, cache_dir=None) -> tuple:
    """(train records, held-out CoTRecords, tokenizer) for the demo. Train: additions of two `digits`-digit
    numbers (a `chat_fraction` share replaced by chat pairs); held-out problems never appear in training,
    in either operand order. The held-out set depends only on (seed, digits), not on n_train."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    pairs = (high - low + 1) * (high - low + 2) // 2  # unordered pairs of digits-digit numbers
    if n_eval > pairs // 2:
        raise ValueError(f"{digits}-digit additions have {pairs} distinct problems; n_eval {n_eval} leaves too "
                         "few for training")
    rng = random.Random(f"embedded-eval:{seed}:{digits}")
    held, evaluation = set(), []
    while len(evaluation) < n_eval:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (min(a, b), max(a, b)) not in held:
            held.add((min(a, b), max(a, b)))
            evaluation.append(_addition(a, b, rng))
    rng = random.Random(f"embedded-train:{seed}:{digits}")
    train = []
    while len(train) < n_train:
        if rng.random() < chat_fraction:
            train.append(_chat_pair(rng))
            continue
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (min(a, b), max(a, b)) not in held:
            train.append(_addition(a, b, rng))
    return train, evaluation, embedded_tokenizer(cache_dir)


# ----------------------------------------------------------------------------- rendering
# `data.py show`: an example as text, with what training does to each token marked; `data.py check`: what
# training would make of each file of a spec, before it runs.

LEGEND = ("⟦…⟧ labels (graded); text outside them is input only.  ⟨x⟩ x is <|mask|> in the masked input, "
          "⟨x→y⟩ x is replaced by y.  Labels dropped by rationale label masking fall outside ⟦…⟧.")


def render(ex: Encoded, tok: Tokenizer, item: dict = None) -> str:
    """An example as text with what training does to each token marked (see LEGEND); `item` is the
    mask_example output to show (default: labels without any masking)."""
    labels = (item["labels"] if item else torch.where(ex.targets, ex.ids, IGNORE_INDEX)).tolist()
    masked = item["masked_ids"].tolist() if item and item["masked_ids"] is not None else ex.ids.tolist()
    ids = ex.ids.tolist()
    out, run, in_label = [], [], False
    for t, i in enumerate(ids):
        is_label = labels[t] != IGNORE_INDEX
        if is_label != in_label or masked[t] != i:
            out.append(tok.decode(run))
            run = []
        if is_label != in_label:
            out.append("⟦" if is_label else "⟧")
            in_label = is_label
        if masked[t] == i:
            run.append(i)
        elif masked[t] == tok.mask_id:
            out.append(f"⟨{tok.decode([i])}⟩")
        else:
            out.append(f"⟨{tok.decode([i])}→{tok.decode([masked[t]])}⟩")
    out.append(tok.decode(run) + ("⟧" if in_label else ""))
    n_mask = sum(m != i for m, i in zip(masked, ids))
    maskable = int(((ex.roles == RESPONSE) | (ex.roles == RATIONALE)).sum())
    dropped = int((ex.targets & (torch.tensor(labels) == IGNORE_INDEX)).sum())
    head = (f"[{'cot' if ex.cot else 'chat'}: {len(ids)} tokens, {sum(y != IGNORE_INDEX for y in labels)} labels"
            f" ({dropped} dropped), {n_mask} of {maskable} maskable inputs masked]")
    return head + "\n" + "".join(out)


def check_data(spec: str, tok: Tokenizer, seq_len: int, seed: int = 0, skip_bad: bool = False,
               truncate: bool = False, log=print) -> int:
    """`data.py check`: per file of a mixture spec, what training would make of it: rows and the schemas they
    were read as, bad rows (the first one quoted), tokens per example, what seq_len drops or cuts, the share of
    target tokens, and rows identical to an earlier one (in any file of the spec). Returns how many examples
    would train; DataError when none would (a bad row stops training unless skip_bad)."""
    total, bad_total, seen = 0, 0, {}
    for i, (path, count) in enumerate(mixture_parts(spec)):
        rows = parse_rows(path)
        good = [(where, name, record) for where, name, record in rows if name]
        bad = [message for _, name, message in rows if not name]
        bad_total += len(bad)
        schemas = ", ".join(f"{name} {n}" for name, n in Counter(name for _, name, _ in good).most_common())
        log(f"{path}: {len(rows)} rows: {schemas or 'none usable'}" + (f"; {len(bad)} bad" if bad else ""))
        if bad:
            log(f"  first bad row: {bad[0]}")
        if count is not None:
            good = [good[j] for j in sample_rows(path, len(good), count, seed, i)]
            log(f"  the spec draws {count} of the {len(rows) - len(bad)} usable rows")
        if not good:
            continue
        examples = encode_many([record for _, _, record in good], tok)
        lengths = np.array([len(ex.ids) for ex in examples])
        kept, dropped = fit_length(examples, seq_len, truncate)
        cut = int((lengths > seq_len).sum()) - dropped if truncate else 0
        targets = sum(int(ex.targets.sum()) for ex in kept) / max(sum(len(ex.ids) for ex in kept), 1)
        log(f"  tokens per example: min {lengths.min()}, median {np.median(lengths):g}, max {lengths.max()}")
        log(f"  {describe_fit(len(kept), dropped, seq_len, truncate)}" + (f"; {cut} cut" if truncate else ""))
        log(f"  target tokens: {100 * targets:.1f}% of the kept examples' tokens")
        repeats = []
        for where, _, record in good:
            text = format_record(record)
            if text in seen:
                repeats.append((where, seen[text]))
            else:
                seen[text] = where
        if repeats:
            log(f"  duplicates: {len(repeats)} rows identical to an earlier row (the first: {repeats[0][0]} "
                f"repeats {repeats[0][1]})")
        total += len(kept)
    if bad_total and not skip_bad:
        raise DataError(f"nothing would train: {bad_total} bad rows stop training (--skip-bad skips them)")
    if not total:
        raise DataError(f"nothing would train: no example of {spec} is usable within {seq_len} tokens")
    log(f"would train on {total} examples")
    return total


# ----------------------------------------------------------------------------- files
# What reading and writing share: a written file appears whole or not at all, with the mode an ordinary open()
# would give it; a read names the file that fails; JSON Lines end at "\n" and nowhere else.

def current_umask() -> int:
    """The process's umask (reading it means setting it, so the old value is put back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write(path, data):
    """Write data (bytes, or str as UTF-8) to path via a temporary file beside it and a rename: never half a file.
    The file gets 0666 less the umask, as open() would give it: mkstemp's 0600 would hide a tokenizer or a log
    from the colleagues a shared directory is for."""
    data = data.encode() if isinstance(data, str) else data
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_text(path: Path) -> str:
    """A UTF-8 text file without its byte-order mark, if any; DataError names the file when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def json_lines(path: Path, text: str) -> list:
    """(where, row, error) for each non-blank line of JSON Lines text: where is 'path:line', error says why a
    line is not JSON (row is None then). Lines end at "\\n" only: str.splitlines() also ends them at U+2028,
    U+2029 and U+0085, which json.dumps(ensure_ascii=False) leaves raw inside strings."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{n}", json.loads(line), None))
            except json.JSONDecodeError as e:
                rows.append((f"{path}:{n}", None, f"malformed JSON ({e.msg} at column {e.colno})"))
            except (RecursionError, ValueError) as e:  # valid JSON, but beyond what Python reads
                rows.append((f"{path}:{n}", None, unreadable_json(e)))
    return rows


def read_json_objects(path, fields: str) -> list:
    """[(where, row)] of a JSON Lines file whose rows are objects holding `fields` (evaluation data); a file that
    cannot be read, a malformed line, a row that is not an object or no rows at all raise DataError."""
    path = Path(path).expanduser()
    rows = []
    for where, row, error in json_lines(path, read_text(path)):
        if error:
            raise DataError(f"{where}: {error}")
        if not isinstance(row, dict):
            raise DataError(f"{where}: the row is a JSON {JSON_TYPES.get(type(row), 'value')}, expected an object "
                            f"with {fields}")
        rows.append((where, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------- downloader (dataset viewer /rows)
# The datasets as JSON Lines through the dataset viewer's /rows API, page by page and resumable.

DEFAULT_ENDPOINT = "https://datasets-server.huggingface.co"
PAGE_ROWS = 100  # the most rows the /rows API returns per request
DATASETS = {  # name: (hub dataset, config, {split: output file})
    "tinycot": ("euclaise/TinyCoT", "default", {"train": "tinycot.jsonl"}),
    "reddit": ("euclaise/reddit-instruct-curated", "default", {"train": "reddit.jsonl"}),
    "oasst2": ("sablo/oasst2_curated", "default", {"train": "oasst2.jsonl"}),
    "gsm8k": ("openai/gsm8k", "main", {"train": "gsm8k-train.jsonl", "test": "gsm8k-test.jsonl"}),
    **{f"arc-{level.lower()}": ("allenai/ai2_arc", f"ARC-{level}",
                                {split: f"ARC-{level}-{split}.jsonl" for split in ("train", "validation", "test")})
       for level in ("Challenge", "Easy")},
}
DATASET_GROUPS = {"arc": ("arc-challenge", "arc-easy")}  # a name that downloads several


class DownloadError(RuntimeError):
    """A download that cannot go on. `resumable`: the same command run again continues from the rows kept in the
    .partial file; False where it would meet the same fault again."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


def _get_json(url: str, retries: int, backoff: float, timeout: float, log) -> dict:
    """GET a JSON document: each attempt's whole answer within `timeout` seconds, however slowly it comes (the
    connection and each read of the status and headers have that timeout too); server errors, rate limits, timeouts
    and cut connections are retried with exponential back-off, other client errors fail at once with the server's
    message."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            log(f"  retry {attempt}/{retries} in {delay:g}s after: {last}")
            time.sleep(delay)
        deadline = time.monotonic() + timeout
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "remask-data/1"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(_read_body(response, deadline, timeout).decode("utf-8"))
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(_read_body(e, deadline, timeout).decode("utf-8")).get("error", "")
            except (ValueError, AttributeError, OSError, http.client.HTTPException, RecursionError):
                message = ""
            last = f"HTTP {e.code} {message or e.reason}".strip()
            if e.code != 429 and e.code < 500:
                raise DownloadError(f"{url}: {last}") from None
        except (OSError, http.client.HTTPException, ValueError, RecursionError) as e:  # refused, cut, late, bad JSON
            last = f"{type(e).__name__}: {e}"
    raise DownloadError(f"{url}: gave up after {retries + 1} attempts ({last})")


def _read_body(response, deadline: float, timeout: float) -> bytes:
    """A response's body, read as it comes (read1: one socket read at a time), until EOF or the monotonic deadline:
    the socket's timeout bounds each read, so a server sending one byte at a time would never meet it."""
    chunks = []
    while chunk := response.read1(1 << 16):
        chunks.append(chunk)
        if time.monotonic() > deadline:  # a TimeoutError (an OSError): retried like any timeout
            raise TimeoutError(f"the answer took more than {timeout:g}s ({sum(map(len, chunks))} bytes so far)")
    return b"".join(chunks)


def _complete_rows(partial: Path) -> int:
    """Rows in a partial file; a torn last line (an interrupted write) is cut off first."""
    if not partial.exists():
        return 0
    data = partial.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(partial, "r+b") as f:
            f.truncate(keep)
    return data.count(b"\n", 0, keep)


def partial_path(path: Path) -> Path:
    """Where the rows of `path` gather until every one is there."""
    return path.with_name(path.name + ".partial")


def download_split(dataset: str, config: str, split: str, path: Path, endpoint: str = DEFAULT_ENDPOINT,
                   retries: int = 6, backoff: float = 1.0, timeout: float = 60.0, log=print) -> Path:
    """Fetch one split into `path` (JSON Lines of the row objects). Rows go to `path.partial` page by page;
    an interrupted run resumes from its row count; the file is renamed into place when every row is there.
    A failure or a signal keeps the .partial file only if it holds rows, and says how many."""
    partial = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        offset = _complete_rows(partial)  # (inside: cutting a torn line may leave an empty file to remove)
        if offset:
            log(f"{path.name}: resuming at row {offset}")
        total = _fetch_rows(dataset, config, split, path, offset, endpoint, retries, backoff, timeout, log)
    except BaseException as e:
        kept = _complete_rows(partial)
        if not kept:
            partial.unlink(missing_ok=True)  # nothing to resume from
            raise
        note = f"{kept} rows are kept in {partial}"
        if not isinstance(e, DownloadError):  # Ctrl-C, a full disk: the caller reports the error itself
            log(f"{path.name}: {note}; the same command resumes after them")
            raise
        resume = "; the same command resumes after them" if e.resumable else ""
        raise DownloadError(f"{e} ({note}{resume})", e.resumable) from None
    if _complete_rows(partial) != total:
        raise DownloadError(f"{partial}: expected {total} rows, found {_complete_rows(partial)}", False)
    if total:
        os.replace(partial, path)
    else:  # an empty split: no row made a .partial file
        atomic_write(path, b"")
    return path


def _fetch_rows(dataset: str, config: str, split: str, path: Path, offset: int, endpoint: str, retries: int,
                backoff: float, timeout: float, log) -> int:
    """Append the split's rows from `offset` on to path's .partial file, one page at a time; returns the split's
    row count."""
    total, first, started, pages = None, offset, time.time(), 0
    while total is None or offset < total:
        query = urllib.parse.urlencode(dict(dataset=dataset, config=config, split=split, offset=offset,
                                            length=PAGE_ROWS))
        url = f"{endpoint.rstrip('/')}/rows?{query}"
        page = _get_json(url, retries, backoff, timeout, log)
        if not isinstance(page, dict) or not isinstance(page.get("rows"), list) \
                or not isinstance(page.get("num_rows_total"), int) or page["num_rows_total"] < 0:
            raise DownloadError(f"{url}: unexpected answer (no rows/num_rows_total): {str(page)[:200]}")
        if page.get("partial"):
            raise DownloadError(f"{url}: the dataset viewer serves only part of {dataset} {split}; "
                                "download its parquet files from the hub instead", False)
        total, rows = page["num_rows_total"], page["rows"]
        if offset > total:
            raise DownloadError(f"{dataset} {split} has {total} rows, fewer than the {offset} fetched before: "
                                "it changed since; --force fetches it again", False)
        if not rows and offset < total:
            raise DownloadError(f"{url}: no rows returned at offset {offset} of {total}")
        for i, item in enumerate(rows):  # all checked before any is written
            if not isinstance(item, dict) or item.get("row_idx") != offset + i \
                    or not isinstance(item.get("row"), dict) or not isinstance(item.get("truncated_cells", []), list):
                raise DownloadError(f"{url}: expected row {offset + i}, got {str(item)[:200]}")
        lines = []
        for i, item in enumerate(rows):
            if item.get("truncated_cells"):
                cut = [f"row {r['row_idx']} ({', '.join(map(str, r['truncated_cells']))})"
                       for r in rows[i:] if r.get("truncated_cells")]
                _append(partial_path(path), lines)  # keep the whole rows before the first cut one
                raise DownloadError(
                    f"{dataset} {split}: the dataset viewer truncated {'; '.join(cut)}; such rows cannot be "
                    f"fetched whole through /rows. Fetch the split's parquet files from the hub and convert "
                    f"them to {path.name} instead", False)
            # a lone surrogate ("\\ud800": JSON, not UTF-8) stays the JSON escape it came as
            lines.append(json.dumps(item["row"], ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n")
        _append(partial_path(path), lines)
        offset, pages = offset + len(rows), pages + 1
        if pages % 10 == 0 or offset >= total:
            rate = (offset - first) / max(time.time() - started, 1e-9)
            log(f"{path.name}: {offset}/{total} rows ({100 * offset / max(total, 1):.1f}%, {rate:.0f} rows/s)")
    return total


def _append(partial: Path, lines: list):
    """Append whole rows to a .partial file, on disk before the offset they imply is used again. The file is
    created with its first rows, so a signal (even SIGKILL) before any row arrives leaves none behind."""
    if not lines:
        return
    with open(partial, "ab") as f:
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())


def download(name: str, out_dir, endpoint: str = DEFAULT_ENDPOINT, retries: int = 6, backoff: float = 1.0,
             timeout: float = 60.0, force: bool = False, log=print) -> list:
    """Download a named dataset (or "all") into out_dir; finished files are kept unless force."""
    names = list(DATASETS) if name == "all" else list(DATASET_GROUPS.get(name, [name]))
    for n in names:
        if n not in DATASETS:
            raise DownloadError(f"unknown dataset {n!r}; choose from {', '.join(DATASETS)} or all")
    paths = []
    for n in names:
        dataset, config, splits = DATASETS[n]
        for split, filename in splits.items():
            path = Path(out_dir).expanduser() / filename
            if force:
                partial_path(path).unlink(missing_ok=True)
            if path.exists() and not force:
                log(f"{path}: already downloaded (--force fetches again)")
            else:
                log(f"{path}: {dataset} ({config}, {split}) from {endpoint}")
                download_split(dataset, config, split, path, endpoint, retries, backoff, timeout, log)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------- models by name (the Hub's own cache)
# `resolve_model("org/name@revision")`: a model on the Hugging Face Hub as a directory, in the cache huggingface_hub
# and transformers share, so nothing is stored twice. The facts come from huggingface_hub 2.4 (constants.py,
# file_download.py, hf_api.py, utils/_http.py, _snapshot_download.py); the code is ours, on http.client.
#   layout   CACHE/models--ORG--NAME/blobs/<etag>                 the files, named by their etag
#                                    snapshots/<commit>/<file>   relative links ../../blobs/<etag>
#                                    refs/<revision>              the commit a branch or tag last resolved to
#            CACHE/.locks/models--ORG--NAME/<etag>.lock           the stock client's lock, so we exclude each other
#   etag     an LFS file's is its SHA-256, any other file's its git blob hash, sha1("blob <size>\0" + bytes): both
#            are checked while the bytes stream in, and a blob is renamed into place only when its hash matches.
#   requests GET /api/models/ORG/NAME/revision/REV (the commit, the file list); per missing file, HEAD
#            /ORG/NAME/resolve/COMMIT/FILE (its etag from X-Linked-Etag else ETag, its size from X-Linked-Size else
#            Content-Length, read on the Hub's redirect to a storage host), then a GET of the same URL, the redirect
#            followed: the token only ever goes to the endpoint's own host.
# Beyond the stock client: an interrupted file resumes from blobs/<etag>.incomplete in the next process too (the
# stock client starts it over), and small files are hash-checked as well as large ones (it checks their size).

HUB_ENDPOINT = "https://huggingface.co"
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
HUB_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"  # huggingface_hub's validate_repo_id, minus unicode
HUB_ID = re.compile(rf"({HUB_NAME}/{HUB_NAME})(?:@(\S+))?")
MODEL_CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "chat_template.jinja")  # what a StableLM needs besides weights
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights that torch.load would unpickle (and so run code)
CHUNK = 1 << 20  # bytes per read of a file body
DEADLINE_BYTES = 1 << 16  # a body must deliver this many bytes (or its rest) within --timeout, or it is retried
PROGRESS_MIN_BYTES = 50 * 10**6  # files at least this large report progress on stderr ...
PROGRESS_EVERY = 5.0  # ... every this many seconds
ENV_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spellings of a true environment variable


class ModelNotFound(DownloadError):
    """No model of that name where it was looked for: on the Hub (which says the same of a private one to someone
    without a token), or offline, in the cache."""


def _hf_home() -> str:
    return os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")


def hub_cache() -> Path:
    """The cache transformers and huggingface_hub read: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") \
        or os.path.join(_hf_home(), "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_token():
    """$HF_TOKEN, else the file `huggingface-cli login` writes ($HF_TOKEN_PATH, else $HF_HOME/token); None without
    one. Line breaks and surrounding spaces are not part of a token."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        path = os.environ.get("HF_TOKEN_PATH") or os.path.join(_hf_home(), "token")
        try:
            token = Path(os.path.expandvars(os.path.expanduser(path))).read_text()
        except FileNotFoundError:
            return None
    return token.replace("\r", "").replace("\n", "").strip() or None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to 1/on/yes/true: resolve from the cache, send nothing."""
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in ENV_TRUE


def parse_model_id(spec: str):
    """'org/name' or 'org/name@revision' -> (repo, revision), the revision 'main' by default; None for anything
    else. A revision is a branch, a tag or a commit hash (refs/pr/1 included), never a path that climbs."""
    m = HUB_ID.fullmatch(spec)
    if not m or len(m[1]) > 96 or "--" in m[1] or ".." in m[1]:
        return None
    revision = m[2] or "main"
    if revision.startswith("/") or any(part in ("", ".", "..") for part in revision.split("/")):
        return None
    return m[1], revision


def resolve_model(spec: str, log=print) -> Path:
    """The model directory `spec` names: an existing local directory as is (it wins over a Hub id of the same
    spelling), else ORG/NAME[@REVISION] as its snapshot directory in the Hub cache, downloaded where missing
    (download_model with the environment's settings). Anything else is a DataError."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"{spec}: a file, not a model directory")
    hub_id = parse_model_id(spec)
    if hub_id is None and (path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1):
        raise DataError(f"{spec}: no such directory")  # spelled as a path, not as a Hub id
    if hub_id is None:
        raise DataError(f"{spec}: neither a directory nor a Hugging Face Hub model id (org/name or "
                        f"org/name@revision)")
    try:
        return download_model(*hub_id, log=log)
    except ModelNotFound as e:
        raise ModelNotFound(f"{spec}: no such local directory, and {e}", False) from None


def download_model(repo: str, revision: str = "main", cache=None, endpoint=None, token=None, offline=None,
                   retries: int = 6, backoff: float = 1.0, timeout: float = 60.0, log=print) -> Path:
    """The snapshot directory of repo at revision in the Hub cache, holding what a StableLM needs (model_files):
    the cached one without a request when the revision is a commit hash or offline is set, else after one metadata
    request, downloading the files the snapshot lacks. cache, endpoint, token and offline default to the
    environment ($HF_HUB_CACHE ..., $HF_ENDPOINT, $HF_TOKEN ..., HF_HUB_OFFLINE); token "" sends none.
    retries/backoff: per request, exponential from backoff seconds unless the server sends Retry-After; timeout:
    seconds a request may take to answer, and a file body to deliver each DEADLINE_BYTES bytes."""
    cache = Path(cache).expanduser() if cache else hub_cache()
    folder = cache / f"models--{repo.replace('/', '--')}"
    cached = _cached_snapshot(folder, revision)
    if hub_offline() if offline is None else offline:
        if cached is None:
            raise ModelNotFound(f"{repo}@{revision} is not in the Hub cache {cache} and HF_HUB_OFFLINE is set: run "
                                f"`python data.py download {repo}@{revision}` where the Hub can be reached", False)
        return cached
    if cached is not None and COMMIT_HASH.fullmatch(revision):
        return cached  # a commit never changes
    session = HubSession(repo, revision, (endpoint or os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/"),
                         hub_token() if token is None else token or None, retries, backoff, timeout, log)
    try:  # with a complete snapshot at hand, a Hub that does not answer at once is not waited for
        commit, names = session.revision_info(retry=cached is None)
    except DownloadError as e:
        if cached is None or not e.resumable:  # resumable: the Hub could not be reached
            raise
        log(f"{repo}@{revision}: using the cached snapshot {cached.name[:12]}, the Hub cannot be reached ({e})")
        return cached
    snapshot = folder / "snapshots" / commit
    files = model_files(repo, revision, names)
    session.place(folder, commit, files)
    if SAFETENSORS_INDEX in files:  # the shards are known once the index is here
        session.place(folder, commit, _index_shards(snapshot / SAFETENSORS_INDEX, names))
    if revision != commit and _read_ref(folder, revision) != commit:
        atomic_write(folder / "refs" / revision, commit)
    return snapshot


def model_files(repo: str, revision: str, names) -> list:
    """Of a repository's top-level files, those a StableLM needs: config.json, the tokenizer files,
    generation_config.json, and the weights as safetensors (the index, whose shards come next, where there is one,
    as model.py reads it first; else model.safetensors). Weights only as pickles are refused: remask never
    unpickles a download."""
    names = set(names)
    if "config.json" not in names:
        raise DataError(f"{repo}@{revision}: no config.json; not a transformers model")
    weights = next((n for n in (SAFETENSORS_INDEX, "model.safetensors") if n in names), None)
    if weights is None:
        pickles = sorted(n for n in names if n.endswith(PICKLES))
        what = f"its weights only as pickles ({', '.join(pickles)})" if pickles else "no model.safetensors"
        raise DataError(f"{repo}@{revision}: has {what}; remask loads safetensors only and never unpickles a "
                        f"download (unpickling can run code): choose a revision with model.safetensors")
    return [n for n in MODEL_CONFIG_FILES if n in names] + [weights]


def _index_shards(index: Path, names) -> list:
    """The shard files an index's weight_map names, each a top-level .safetensors file of the repository."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    for shard in shards:
        if not isinstance(shard, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.safetensors", shard) \
                or shard not in names:
            raise DataError(f"{index}: names {shard!r}, not a .safetensors file of the repository")
    return shards


def _read_ref(folder: Path, revision: str):
    try:
        return (folder / "refs" / revision).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def _cached_snapshot(folder: Path, revision: str):
    """The snapshot directory of revision (a commit hash, or the commit refs/<revision> holds) if it holds a whole
    StableLM (config.json, and model.safetensors or every shard of its index); else None."""
    commit = revision if COMMIT_HASH.fullmatch(revision) else _read_ref(folder, revision)
    if commit is None or not COMMIT_HASH.fullmatch(commit):
        return None
    snapshot = folder / "snapshots" / commit
    if not (snapshot / "config.json").is_file():
        return None
    if (snapshot / SAFETENSORS_INDEX).is_file():
        try:
            shards = _index_shards(snapshot / SAFETENSORS_INDEX, os.listdir(snapshot))
        except DataError:
            return None
        return snapshot if all((snapshot / shard).is_file() for shard in shards) else None
    return snapshot if (snapshot / "model.safetensors").is_file() else None


def _link(blob: Path, pointer: Path):
    """pointer -> blob as a relative link (the cache stays valid when moved), made beside it and renamed over."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    os.replace(tmp, pointer)


@contextmanager
def _exclusive(lock: Path, what: str, log):
    """Hold an flock on `lock` (the path the stock client locks too): one process at a time fetches a blob."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{what}: waiting for another process that is downloading it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a filesystem without locks (some NFS setups): the hash check still guards what is placed
        yield
    finally:
        os.close(fd)


class _Transient(Exception):
    """A failure worth retrying: a dropped or stalled connection, 429 or 5xx. retry_after: the server's wait in
    seconds; progressed: the attempt received bytes before it failed (the count of failures starts again)."""

    def __init__(self, message: str, retry_after=None, progressed: bool = False):
        super().__init__(message)
        self.retry_after, self.progressed = retry_after, progressed


def _origin(url: str) -> tuple:
    u = urllib.parse.urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme)


class _Exchange:
    """One HTTP request and its answer, under a deadline rather than only a per-read timeout (a server sending a
    byte a second passes every read timeout): the answer must arrive within `timeout` seconds, and the body only
    moves the deadline on (extend) as it delivers. A watcher thread shuts the socket down when the deadline passes.
    Proxies come from the environment, as urllib finds them."""

    def __init__(self, method: str, url: str, headers: dict, timeout: float):
        u = urllib.parse.urlsplit(url)
        https, port = u.scheme == "https", _origin(url)[2]
        connection = http.client.HTTPSConnection if https else http.client.HTTPConnection
        target = u.path + (f"?{u.query}" if u.query else "")
        proxy = urllib.request.getproxies().get(u.scheme)
        if proxy and not urllib.request.proxy_bypass(u.hostname):
            p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            self.conn = connection(p.hostname, p.port or 80, timeout=timeout)
            if https:
                self.conn.set_tunnel(u.hostname, port)  # TLS with the host itself, through the proxy
            else:
                target = url  # a plain HTTP proxy takes the whole URL
        else:
            self.conn = connection(u.hostname, port, timeout=timeout)
        self.url, self.timeout, self.expired = url, timeout, False
        self._deadline = time.monotonic() + timeout
        self._closed = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()
        try:
            self.conn.request(method, target or "/", headers=headers)
            self.answer = self.conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise self._failure(e) from None
        except BaseException:
            self.close()
            raise
        self.status, self.headers = self.answer.status, self.answer.headers

    def _watch(self):
        while not self._closed.wait(max(self._deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= self._deadline:
                self.expired = True
                try:
                    self.conn.sock.shutdown(socket.SHUT_RDWR)
                except (AttributeError, OSError):
                    pass  # not connected yet (connecting has the socket timeout), or closed already
                return

    def _failure(self, e) -> _Transient:
        if self.expired:
            return _Transient(f"{self.url}: no answer or progress within {self.timeout:g}s")
        return _Transient(f"{self.url}: {type(e).__name__}: {e}")

    def extend(self):
        self._deadline = time.monotonic() + self.timeout

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes of the body as one read delivers them (b'' at its end); the whole body for n = -1."""
        try:
            data = self.answer.read() if n < 0 else self.answer.read1(n)
        except (OSError, http.client.HTTPException) as e:
            raise self._failure(e) from None
        if not data and self.expired:  # the watcher shut the socket down: say so rather than 'closed'
            raise self._failure(None)
        return data

    def close(self):
        self._closed.set()
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HubSession:
    """Requests about one model repository of a Hub endpoint: its revision's commit and files, a file's etag and
    size, a file's bytes into the cache. Failures worth retrying (_Transient) are retried; the others become one
    line that says what to do."""

    def __init__(self, repo: str, revision: str, endpoint: str, token=None, retries: int = 6, backoff: float = 1.0,
                 timeout: float = 60.0, log=print):
        self.repo, self.revision, self.endpoint, self.token = repo, revision, endpoint, token
        self.retries, self.backoff, self.timeout, self.log = retries, backoff, timeout, log

    def _open(self, method: str, url: str, headers: dict = None, cross_origin: bool = True) -> _Exchange:
        """An answered request, redirects followed (the token goes only to the endpoint's host). cross_origin False
        stops at a redirect to another host and returns it: a file's metadata is on the Hub's redirect to storage.
        429 and 5xx raise _Transient; other errors a DownloadError from _refusal."""
        for _ in range(10):
            sent = {"User-Agent": "remask/1", **(headers or {})}
            if self.token and _origin(url) == _origin(self.endpoint):
                sent["Authorization"] = f"Bearer {self.token}"
            exchange = _Exchange(method, url, sent, self.timeout)
            if exchange.status in (301, 302, 303, 307, 308) and exchange.headers.get("Location"):
                target = urllib.parse.urljoin(url, exchange.headers["Location"])
                if not cross_origin and _origin(target) != _origin(url):
                    return exchange
                exchange.close()
                url = target
                continue
            if exchange.status < 300:
                return exchange
            with exchange:
                body = exchange.read(4096) if method != "HEAD" else b""
            if exchange.status == 429 or exchange.status >= 500:
                wait = exchange.headers.get("Retry-After", "").strip()
                retry_after = float(wait) if re.fullmatch(r"\d+(\.\d+)?", wait) else None
                raise _Transient(f"{url}: HTTP {exchange.status}", retry_after)
            raise self._refusal(exchange, body)
        raise DownloadError(f"{url}: more than 10 redirects", False)

    def _refusal(self, exchange: _Exchange, body: bytes) -> DownloadError:
        """The Hub's error codes (X-Error-Code) as one line that says what to do."""
        code, message = exchange.headers.get("X-Error-Code"), exchange.headers.get("X-Error-Message")
        if not message:
            try:
                message = json.loads(body).get("error")
            except (ValueError, AttributeError):
                message = None
        page = f"{self.endpoint}/{self.repo}"
        if code == "GatedRepo":
            yet = "the token sent has no access yet" if self.token else "no token was sent"
            return DownloadError(f"{self.repo} is a gated model ({yet}): accept its terms at {page} while logged in, "
                                 f"then set HF_TOKEN to a token of that account (or run `huggingface-cli login`)",
                                 False)
        if code == "RepoNotFound" or (exchange.status == 401 and code is None  # as the stock client reads it
                                      and _origin(exchange.url) == _origin(self.endpoint)):
            private = "HF_TOKEN is set but cannot read it" if self.token else "set HF_TOKEN to a token that can"
            return ModelNotFound(f"{self.endpoint} has no model {self.repo} (if it is private, {private})", False)
        if code == "RevisionNotFound":
            return DownloadError(f"{self.repo} has no revision {self.revision!r} (a branch, tag or commit; see "
                                 f"{page}/tree/main)", False)
        if code == "EntryNotFound":
            return DownloadError(f"{exchange.url}: the Hub lists this file but has no such file", False)
        return DownloadError(f"{exchange.url}: HTTP {exchange.status} {message or exchange.answer.reason}", False)

    def _retrying(self, what: str, attempt, retries: int = None):
        """attempt() until it returns; a _Transient failure is retried up to `retries` (default self.retries)
        times in a row, after backoff * 2**k seconds or the server's Retry-After."""
        retries = self.retries if retries is None else retries
        failures = 0
        while True:
            try:
                return attempt()
            except _Transient as e:
                failures = 1 if e.progressed else failures + 1
                if failures > retries:
                    raise DownloadError(f"{what}: gave up after {failures} failed attempts ({e})") from None
                delay = e.retry_after if e.retry_after is not None else self.backoff * 2 ** (failures - 1)
                self.log(f"  {what}: {e}; retry {failures}/{retries} in {delay:g}s")
                time.sleep(delay)

    def revision_info(self, retry: bool = True) -> tuple:
        """(commit, top-level file names) of the revision, from GET /api/models/REPO/revision/REV; retry False
        gives up at the first failure (a resumable DownloadError then: the Hub could not be reached)."""
        url = f"{self.endpoint}/api/models/{self.repo}/revision/{urllib.parse.quote(self.revision, safe='')}"

        def attempt():
            with self._open("GET", url) as exchange:
                return exchange.read()
        body = self._retrying(f"{self.repo}@{self.revision}", attempt, None if retry else 0)
        try:
            info = json.loads(body)
            commit, names = info["sha"], [s["rfilename"] for s in info["siblings"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DownloadError(f"{url}: not the Hub's model metadata ({type(e).__name__}: {e}); is HF_ENDPOINT "
                                f"a Hugging Face Hub?", False) from None
        if not isinstance(commit, str) or not COMMIT_HASH.fullmatch(commit):
            raise DownloadError(f"{url}: {commit!r} is not a commit hash", False)
        return commit, [n for n in names if isinstance(n, str) and "/" not in n]

    def resolve_url(self, commit: str, name: str) -> str:
        return f"{self.endpoint}/{self.repo}/resolve/{commit}/{urllib.parse.quote(name)}"

    def file_info(self, commit: str, name: str) -> tuple:
        """(etag, size) of a file, from a HEAD of its resolve URL read as the stock client reads it: on the Hub's
        redirect to storage, if it redirects there."""
        url = self.resolve_url(commit, name)

        def attempt():
            with self._open("HEAD", url, {"Accept-Encoding": "identity"}, cross_origin=False) as exchange:
                return exchange.status, exchange.headers
        status, headers = self._retrying(f"{self.repo}: {name}", attempt)
        etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
        size = headers.get("X-Linked-Size") or (None if status >= 300 else headers.get("Content-Length"))
        if headers.get("X-Repo-Commit") != commit:
            raise DownloadError(f"{url}: answered for commit {headers.get('X-Repo-Commit')!r}, not {commit}; is "
                                f"HF_ENDPOINT a Hugging Face Hub?", False)
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}", etag) or etag.endswith(".incomplete"):
            raise DownloadError(f"{url}: no usable ETag ({etag!r}): a file cannot be cached without one", False)
        if not (size or "").isdigit():
            raise DownloadError(f"{url}: no size (X-Linked-Size or Content-Length) for {name}", False)
        return etag, int(size)

    def place(self, folder: Path, commit: str, names: list):
        """snapshots/<commit>/<name> for each name, linked to its blob, each blob not cached yet downloaded first.
        The free disk space is checked against the bytes still to come before the first of them."""
        snapshot, blobs = folder / "snapshots" / commit, folder / "blobs"
        todo = [(name, *self.file_info(commit, name)) for name in names if not (snapshot / name).is_file()]
        fetch = [(name, etag, size) for name, etag, size in todo if not (blobs / etag).is_file()]
        blobs.mkdir(parents=True, exist_ok=True)
        need = sum(size - _file_size(blobs / f"{etag}.incomplete") for _, etag, size in fetch)
        free = shutil.disk_usage(blobs).free
        if need > free:
            raise DownloadError(f"{self.repo}: {need / 1e9:.2f} GB still to download but {blobs} has only "
                                f"{free / 1e9:.2f} GB free (HF_HUB_CACHE moves the cache)", False)
        if fetch:
            self.log(f"{self.repo}@{self.revision}: {len(fetch)} files, {need / 1e6:,.1f} MB to download into "
                     f"{folder}")
        for name, etag, size in todo:
            blob = blobs / etag
            if not blob.is_file():
                with _exclusive(folder.parent / ".locks" / folder.name / f"{etag}.lock", name, self.log):
                    if not blob.is_file():  # another process may have placed it while this one waited
                        part = PartialBlob(blob, etag, size)
                        url = self.resolve_url(commit, name)
                        try:
                            self._retrying(f"{self.repo}: {name}", lambda: self._stream(url, part, name))
                        except DownloadError as e:
                            if not part.have:
                                raise
                            raise DownloadError(f"{e}; the {part.have:,} bytes that arrived are kept in "
                                                f"{part.path}: the same command resumes after them") from None
                        part.place(name)
            _link(blob, snapshot / name)

    def _stream(self, url: str, part: PartialBlob, name: str):
        """One GET of the bytes the partial blob still lacks, appended to it. Each attempt starts at the resolve URL,
        so a retry gets a fresh storage URL (they are signed, and expire). A server that answers the Range request
        with the whole file (200) starts it over."""
        if part.have == part.size:
            return
        first = window = part.have
        started = shown = time.monotonic()
        with self._open("GET", url, {"Accept-Encoding": "identity", **({"Range": f"bytes={part.have}-"}
                                                                        if part.have else {})}) as exchange:
            start = re.match(r"bytes (\d+)-", exchange.headers.get("Content-Range", ""))
            if exchange.status == 206 and (not start or int(start[1]) != part.have):
                part.restart()
                raise _Transient(f"{url}: answered another range than bytes={first}-")
            if exchange.status != 206 and part.have:
                part.restart()  # the range was not honoured: from the first byte again
                first = window = 0
            try:
                while part.have < part.size:
                    data = exchange.read(min(CHUNK, part.size - part.have))
                    if not data:
                        raise _Transient(f"{url}: the connection closed at byte {part.have} of {part.size}")
                    part.append(data)
                    if part.have - window >= DEADLINE_BYTES:
                        exchange.extend()
                        window = part.have
                    now = time.monotonic()
                    if part.size >= PROGRESS_MIN_BYTES and (now - shown >= PROGRESS_EVERY or part.have == part.size):
                        shown = now
                        _show_progress(name, part.have, part.size, (part.have - first) / max(now - started, 1e-9))
            except _Transient as e:
                e.progressed = part.have > first
                raise
            finally:
                part.close()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _content_hash(etag: str, size: int):
    """The hash the Hub's etag is of a file's bytes: SHA-256 for LFS files, git's blob sha1 for the others (its
    header included); None for an etag that is neither (a mirror's own): then only the size can be checked."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return hashlib.sha256()
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        return h
    return None


class PartialBlob:
    """blobs/<etag>.incomplete: the bytes of a blob received so far, and the running hash of them (what an
    earlier process left is hashed once, when this one takes over). The file is created with its first byte, so
    an interrupt leaves no partial file or one holding what arrived."""

    def __init__(self, blob: Path, etag: str, size: int):
        self.blob, self.path, self.etag, self.size = blob, blob.with_name(f"{blob.name}.incomplete"), etag, size
        self.file, self.have, self.hash = None, 0, _content_hash(etag, size)
        if _file_size(self.path) > size:
            self.path.unlink()  # not a beginning of this blob
        elif self.path.exists():
            with open(self.path, "rb") as f:
                while data := f.read(CHUNK):
                    self._hash(data)
                    self.have += len(data)

    def restart(self):
        self.close()
        self.path.unlink(missing_ok=True)
        self.have, self.hash = 0, _content_hash(self.etag, self.size)

    def _hash(self, data: bytes):
        if self.hash is not None:
            self.hash.update(data)

    def append(self, data: bytes):
        if self.file is None:
            self.file = open(self.path, "ab")
        self.file.write(data)
        self._hash(data)
        self.have += len(data)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def place(self, name: str):
        """Rename the whole file to blobs/<etag> if its bytes hash to the etag; else remove it and fail, placing
        nothing."""
        if self.hash is not None and self.hash.hexdigest() != self.etag:
            self.path.unlink()
            raise DownloadError(f"{name}: the downloaded bytes hash to {self.hash.hexdigest()}, not to the Hub's "
                                f"etag {self.etag}; they were removed and nothing was placed (run the command "
                                f"again)", False)
        with open(self.path, "ab") as f:  # "ab": an empty file has no partial file until here
            os.fsync(f.fileno())  # the bytes are on disk before their name says the blob is whole
        os.replace(self.path, self.blob)


def _show_progress(name: str, have: int, size: int, rate: float):
    eta = (size - have) / rate if rate > 0 else math.inf
    left = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
    print(f"  {name}: {have / 1e6:,.1f}/{size / 1e6:,.1f} MB ({100 * have / size:.0f}%), {rate / 1e6:.1f} MB/s, "
          f"ETA {left}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- chat template (for other tools)
# What transformers, vLLM and lm-evaluation-harness read to chat with a model as remask does, written into every
# model directory remask writes (Tokenizer.save, quantize.py): the chat format as a Jinja template, rendered the way
# transformers renders it (sandboxed, trim_blocks, lstrip_blocks) to exactly chat_prompt's text (tested), and the
# stop ids of remask's generation. A leading system message is joined to the first user message as
# system + "\n\n" + user (the format has no system tag); contents are stripped as the readers strip them.

CHAT_TEMPLATE = r"""{#- remask's chat format: <|user|>\n{user}\n<|assistant|>\n{assistant}\n<|user|>\n... -#}
{%- set system = '' -%}
{%- set turns = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] | trim -%}
    {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
        {{- raise_exception('roles must alternate user/assistant/user/..., after at most one system message') -}}
    {%- endif -%}
    {%- set content = message['content'] | trim -%}
    {%- if loop.first and system -%}
        {%- set content = system ~ '\n\n' ~ content -%}
    {%- endif -%}
    {{- '<|' ~ message['role'] ~ '|>\n' ~ content ~ '\n' -}}
{%- endfor -%}
{%- if turns and turns[-1]['role'] == 'assistant' -%}
    {{- '<|user|>' -}}
{%- elif turns and add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
{%- endif -%}
"""


def _json_object(path: Path) -> dict:
    """The JSON object in path, or {} where there is none (no file, or not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def save_chat_config(directory, tok: Tokenizer):
    """Write tokenizer_config.json (the template, <|endoftext|> as eos and pad, the tags as special tokens),
    chat_template.jinja (where transformers 4.47+ reads the template first) and generation_config.json's stop ids
    (<|endoftext|> and <|user|>, where remask's generation stops) into a model directory. Keys the two JSON files
    already hold (a copied tokenizer_config.json, the generation_config.json save_pretrained wrote) are kept
    unless set here."""
    directory = Path(directory)
    tokenizer_config = _json_object(directory / "tokenizer_config.json") | {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": tok.tk.id_to_token(PAD_ID),
        "additional_special_tokens": list(TAGS), "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    generation = _json_object(directory / "generation_config.json") | {
        "eos_token_id": [tok.eos_id, tok.user_id], "pad_token_id": PAD_ID}
    generation.pop("_from_model_config", None)  # transformers replaces a file so marked by config.json's one eos id
    atomic_write(directory / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    atomic_write(directory / "chat_template.jinja", CHAT_TEMPLATE)
    atomic_write(directory / "generation_config.json", json.dumps(generation, indent=2))


# ----------------------------------------------------------------------------- GSM8K evaluation (lm-eval harness)
# What EleutherAI lm-evaluation-harness does for `--tasks gsm8k` (yaml metadata version 3.0), minus the model:
#   prompt   ConfigurableTask.fewshot_context + the default ContextSampler: one
#            random.Random(fewshot_random_seed=1234) for the whole task; for each test problem in order,
#            rnd.sample(train_docs, 5); each shot is doc_to_text + target_delimiter " " + doc_to_target +
#            fewshot_delimiter "\n\n", then doc_to_text.
#   stop     HFLM.generate_until: the yaml's `until` plus the tokenizer's EOS, cut post hoc by s.split(term)[0]
#            for each term in that order; at most max_gen_toks=256 new tokens, greedy.
#   filters  RegexFilter + take_first: strict-match takes the first `#### N`, flexible-extract the last number
#            (group_select -1, the first non-empty group of the match); no match -> "[invalid]"; .strip().
#   metric   exact_match_hf_evaluate with regexes_to_ignore (re.sub each, in order, on prediction and reference),
#            ignore_case; aggregated by mean with mean_stderr = sample std (n-1) / sqrt(n).
# Matched only for one process (world_size 1: with data parallelism each rank reseeds and draws other shots) and
# without a chat template. Case folding uses str.lower where the harness uses numpy's np.char.lower on a
# fixed-width array; they differ only for characters whose lower case is longer (e.g. 'İ'), never for numbers.
# Checked equal to lm-eval 0.4.13 run as a library (prompts, cuts, both filters, exact_match, stderr); 0.4.2 (early
# 2024, the card's time) seeds Random(1234) at task creation and draws the same shots.

GSM8K_FEWSHOT = 5  # num_fewshot
GSM8K_SEED = 1234  # simple_evaluate's default fewshot_random_seed
GSM8K_MAX_NEW_TOKENS = 256  # HFLM's default max_gen_toks
GSM8K_STOP = {  # stop strings per prompt format, applied in this order
    "harness": ("Question:", "</s>", "<|im_end|>", EOS),  # the yaml's `until`, then the EOS HFLM appends
    "cot": (TAGS[0], EOS),  # a ReMask CoT reply ends with <|user|>
}
INVALID = "[invalid]"  # RegexFilter's fallback
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_RES = (",", r"\$", r"(?s).*#### ", r"\.$")  # exact_match's regexes_to_ignore, applied in this order


@dataclass
class GSM8KProblem:
    question: str  # verbatim: the harness's templates insert it unchanged
    answer: str  # the worked solution, ending in '#### N'; both the few-shot target and the reference


def read_gsm8k(path) -> list:
    """GSM8K JSON Lines (question, answer per row; what `data.py download gsm8k` writes) -> [GSM8KProblem].
    The first bad row raises DataError naming file and line."""
    problems = []
    for where, row in read_json_objects(path, "question and answer"):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                got = "missing" if row.get(key) is None else f"{type(row[key]).__name__} {row[key]!r:.40}"
                raise DataError(f"{where}: field '{key}' must be a non-empty string, got {got}")
        if "#### " not in row["answer"]:
            raise DataError(f"{where}: field 'answer' has no '#### ' final answer (GSM8K main config expected)")
        problems.append(GSM8KProblem(row["question"], row["answer"]))
    return problems


def gsm8k_fewshot_prompts(problems: list, train: list, k: int = GSM8K_FEWSHOT, seed: int = GSM8K_SEED) -> list:
    """The harness's k-shot prompt for each problem, in order. One generator serves all problems, so a problem's
    shots depend on its position: the first N prompts are the same as those of `--limit N`."""
    if k > len(train):
        raise ValueError(f"{k}-shot prompts need at least {k} training problems, got {len(train)}")
    rnd = random.Random(seed)
    prompts = []
    for problem in problems:
        shots = rnd.sample(train, k)  # the sampler excludes the problem itself only when shots come from its split
        prompts.append("".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
                       + f"Question: {problem.question}\nAnswer:")
    return prompts


def gsm8k_prompts(problems: list, train: list = None, format: str = "harness", k: int = GSM8K_FEWSHOT,
                  seed: int = GSM8K_SEED) -> list:
    """Prompts for `format`: 'harness' (k-shot 'Question: ...\\nAnswer:') or 'cot' (the ReMask CoT template,
    zero-shot)."""
    if format == "cot":
        return [cot_prompt(p.question) for p in problems]
    if format != "harness":
        raise ValueError(f"unknown GSM8K format {format!r}; expected one of {sorted(GSM8K_STOP)}")
    if not train:
        raise ValueError("the harness format needs the training problems for its few-shot examples")
    return gsm8k_fewshot_prompts(problems, train, k, seed)


def cut_at_stop(text: str, stops=GSM8K_STOP["harness"]) -> str:
    """A completion as the harness keeps it: split at each stop string in turn, keeping what comes before.
    Idempotent; equals cutting at the earliest stop string unless two stop strings overlap."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def strict_match(completion: str) -> str:
    """The number after the first '#### ', or '[invalid]'."""
    found = STRICT_RE.findall(completion)
    return found[0].strip() if found else INVALID


def flexible_extract(completion: str) -> str:
    """The last number-like run ('$1,000.', '-3', '7'), or '[invalid]'. A match is a pair of groups of which
    exactly one is non-empty (the alternation); the harness keeps the non-empty one."""
    found = FLEXIBLE_RE.findall(completion)
    if not found:
        return INVALID
    return next(g for g in found[-1] if g).strip()


def cot_final_answer(completion: str) -> str:
    """The strict answer of a ReMask CoT completion: the text after <|answer|>, or '[invalid]' without one."""
    answer = extract_answer(completion)
    return answer if answer else INVALID


def normalize_gsm8k(text: str) -> str:
    """exact_match's normalisation: drop ',' and '$', everything up to the last '#### ', one trailing '.',
    then lower-case. The reference's worked solution becomes its final number."""
    for pattern in IGNORE_RES:
        text = re.sub(pattern, "", text)
    return text.lower()


@dataclass
class GSM8KScore:
    extracted: list  # per example, the filter's answer ('[invalid]' when it found none)
    correct: list  # per example, bool: normalised answer == normalised reference
    accuracy: float  # mean of correct
    stderr: float | None  # sample std (n-1) / sqrt(n), the harness's mean_stderr; None below two examples


def score_gsm8k(completions: list, references: list, format: str = "harness") -> dict:
    """{'strict-match': GSM8KScore, 'flexible-extract': GSM8KScore} for completions already cut at the stop
    strings, against the references' worked solutions. Strict reads '#### N' (harness) or the text after
    <|answer|> (cot); flexible takes the last number of the completion in both formats."""
    if format not in GSM8K_STOP:
        raise ValueError(f"unknown GSM8K format {format!r}; expected one of {sorted(GSM8K_STOP)}")
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    if not completions:
        raise ValueError("no completions to score")
    targets = [normalize_gsm8k(r) for r in references]
    strict = strict_match if format == "harness" else cot_final_answer
    scores = {}
    for name, extract in (("strict-match", strict), ("flexible-extract", flexible_extract)):
        extracted = [extract(c) for c in completions]
        correct = [normalize_gsm8k(e) == t for e, t in zip(extracted, targets)]
        n, mean = len(correct), sum(correct) / len(correct)
        stderr = math.sqrt(sum((c - mean) ** 2 for c in correct) / (n - 1)) / math.sqrt(n) if n > 1 else None
        scores[name] = GSM8KScore(extracted, correct, mean, stderr)
    return scores


# ----------------------------------------------------------------------------- ARC evaluation (lm-eval harness)
# What EleutherAI lm-evaluation-harness does for `--tasks arc_challenge --num_fewshot 25` (and arc_easy), minus the
# model. Followed: tasks/arc/arc_easy.yaml (metadata version 1.0; arc_challenge.yaml includes it and changes only
# dataset_name), api/samplers.py (ContextSampler), api/task.py (ConfigurableTask.fewshot_context,
# construct_requests, process_results), api/metrics.py (mean_stderr) and api/model.py (_encode_pair) of lm-eval
# 0.4.13, checked against it run as a library; the main branch and the early-2024 0.4 sources (the card's time) read
# the same for every step below.
#   docs     allenai/ai2_arc, config ARC-Challenge or ARC-Easy: the questions of the test split in file order, the
#            few-shot examples from the train split (the yaml names no fewshot_split, so fewshot_docs falls back to
#            training_docs).
#   prompt   doc_to_text 'Question: {{question}}\nAnswer:'. One random.Random(1234) serves the whole task: for each
#            question in order, rnd.sample(train, 25) (the extra draw that drops the question itself happens only
#            when the few-shot and the test split are the same split); each shot is doc_to_text + target_delimiter
#            ' ' + the text of its gold choice + fewshot_delimiter '\n\n', then the question's own doc_to_text.
#   requests one log-likelihood request (context, ' ' + text) per choice (doc_to_choice '{{choices.text}}');
#            the gold index is choices.label.index(answerKey).
#   metrics  acc: argmax of the log-likelihoods; acc_norm: argmax of log-likelihood / len(choice text), the length in
#            characters of the choice WITHOUT the leading delimiter; np.argmax takes the first of equal values.
#            Both are averaged with mean_stderr = sample std (n-1) / sqrt(n).
#   tokens   encode_pair = the harness's _encode_pair: whitespace at the end of the context (str.rstrip's, so also
#            '\n' and U+00A0) moves to the front of the continuation; the continuation's tokens are those of the
#            whole string after as many tokens as the context alone has. The split follows that count, not the
#            characters: 'The cat' + 's are' scores only ' are' (the whole string's ' cats' took the 's').

ARC_FEWSHOT = 25  # the card's (and the Open LLM Leaderboard's) num_fewshot for ARC
ARC_SEED = 1234  # simple_evaluate's default fewshot_random_seed


@dataclass
class ARCQuestion:
    id: str
    question: str  # verbatim, as the template inserts it
    choices: list  # the choices' texts, in the file's order
    labels: list  # their labels ('A'.., or '1'..)
    gold: int  # index of the answerKey among the labels


def read_arc(path) -> list:
    """ARC JSON Lines (id, question, choices {text, label}, answerKey per row: what `data.py download arc` writes)
    -> [ARCQuestion]. The first bad row raises DataError naming file, line and field."""
    return [_arc_question(row, where) for where, row in read_json_objects(path, "id, question, choices and answerKey")]


def _arc_question(row: dict, where: str) -> ARCQuestion:
    for key in ("id", "question", "answerKey"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            got = "missing" if row.get(key) is None else f"{type(row[key]).__name__} {row[key]!r:.40}"
            raise DataError(f"{where}: field '{key}' must be a non-empty string, got {got}")
    choices = row.get("choices")
    if not isinstance(choices, dict) or not all(isinstance(choices.get(k), list) for k in ("text", "label")):
        raise DataError(f"{where}: field 'choices' must be an object with lists 'text' and 'label', "
                        f"got {str(choices)[:60]}")
    texts, labels = choices["text"], choices["label"]
    if len(texts) != len(labels) or len(texts) < 2:
        raise DataError(f"{where}: 'choices' needs at least two texts and as many labels, "
                        f"got {len(texts)} texts and {len(labels)} labels")
    for i, (text, label) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or not text:  # acc_norm divides by the text's length
            raise DataError(f"{where}: choice {i} text must be a non-empty string, got {text!r:.40}")
        if not isinstance(label, str):
            raise DataError(f"{where}: choice {i} label must be a string, got {label!r:.40}")
    if len(set(labels)) != len(labels):
        raise DataError(f"{where}: choice labels repeat: {labels}")
    if row["answerKey"] not in labels:
        raise DataError(f"{where}: answerKey {row['answerKey']!r} is not among the choice labels {labels}")
    return ARCQuestion(row["id"], row["question"], list(texts), list(labels), labels.index(row["answerKey"]))


def arc_prompt(question: ARCQuestion) -> str:
    return f"Question: {question.question}\nAnswer:"


def arc_continuations(question: ARCQuestion) -> list:
    """The continuation scored for each choice: the target delimiter ' ' and the choice's text."""
    return [" " + text for text in question.choices]


def arc_contexts(questions: list, train: list, k: int = ARC_FEWSHOT, seed: int = ARC_SEED) -> list:
    """The harness's k-shot context for each question, in order. One generator serves all questions, so a
    question's shots depend on its position: the first N contexts are those of `--limit N`."""
    if k > len(train):
        raise ValueError(f"{k}-shot contexts need at least {k} training questions, got {len(train)}")
    rnd = random.Random(seed)
    contexts = []
    for question in questions:
        shots = rnd.sample(train, k)
        contexts.append("".join(f"{arc_prompt(s)} {s.choices[s.gold]}\n\n" for s in shots) + arc_prompt(question))
    return contexts


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple:
    """(context ids, continuation ids) as lm-evaluation-harness splits a log-likelihood request. An empty context
    becomes <|endoftext|> (the harness's loglikelihood does so: the first token needs something to condition on)."""
    if not context:
        return [tok.eos_id], tok.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tok.encode(context)
    return context_ids, tok.encode(context + continuation)[len(context_ids):]


@dataclass
class ARCScore:
    predictions: list  # per question, the index of the chosen choice
    correct: list  # per question, bool: prediction == gold
    accuracy: float  # mean of correct
    stderr: float | None  # sample std (n-1) / sqrt(n), the harness's mean_stderr; None below two questions


def score_arc(loglikelihoods: list, questions: list) -> dict:
    """{'acc': ARCScore, 'acc_norm': ARCScore} from each question's list of choice log-likelihoods."""
    if len(loglikelihoods) != len(questions):
        raise ValueError(f"{len(loglikelihoods)} sets of log-likelihoods but {len(questions)} questions")
    if not questions:
        raise ValueError("no questions to score")
    predictions = {"acc": [], "acc_norm": []}
    for lls, question in zip(loglikelihoods, questions):
        if len(lls) != len(question.choices):
            raise ValueError(f"question {question.id}: {len(lls)} log-likelihoods for {len(question.choices)} choices")
        lengths = np.array([float(len(text)) for text in question.choices])
        predictions["acc"].append(int(np.argmax(lls)))
        predictions["acc_norm"].append(int(np.argmax(np.array(lls, dtype=np.float64) / lengths)))
    scores = {}
    for name, chosen in predictions.items():
        correct = [c == q.gold for c, q in zip(chosen, questions)]
        n, mean = len(correct), sum(correct) / len(correct)
        stderr = math.sqrt(sum((c - mean) ** 2 for c in correct) / (n - 1)) / math.sqrt(n) if n > 1 else None
        scores[name] = ARCScore(chosen, correct, mean, stderr)
    return scores


# ----------------------------------------------------------------------------- command line
# `python data.py show ...`, `python data.py check ...` and `python data.py download ...` (datasets or a model),
# behind one error boundary.

def _show(args):
    if args.spec == "embedded":
        records, _, tok = embedded_dataset(args.seed, n_train=max(args.limit, 1), n_eval=1, digits=args.digits)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else tok
        examples, dropped = fit_length(encode_many(records, tok), args.seq_len, args.truncate)
        print(describe_fit(len(examples), dropped, args.seq_len, args.truncate))
    else:
        if not args.tokenizer:
            raise DataError("show needs --tokenizer MODEL_DIR for a data file (token counts depend on it)")
        tok = load_tokenizer(args.tokenizer)
        if tok.added_tags:
            print(f"(added to the tokenizer: {' '.join(tok.added_tags)}; {len(tok)} embedding rows needed)")
        examples = load_dataset(args.spec, tok, args.seq_len, args.seed, args.skip_bad, args.truncate)
    cfg = MaskConfig(args.mode, args.input_mask, args.label_mask, args.answer_only, args.mask_with)
    print(LEGEND)
    for index in range(min(args.limit, len(examples))):
        item = mask_example(examples[index], tok, cfg, args.seed, args.epoch, index)
        print(f"\n--- example {index} (mode {cfg.mode}, seed {args.seed}, epoch {args.epoch}) "
              + render(examples[index], tok, item))


def _check(args):
    if not args.tokenizer:
        raise DataError("check needs --tokenizer MODEL_DIR (token counts depend on it)")
    tok = load_tokenizer(args.tokenizer)
    if tok.added_tags:
        print(f"(added to the tokenizer: {' '.join(tok.added_tags)}; {len(tok)} embedding rows needed)")
    check_data(args.spec, tok, args.seq_len, args.seed, args.skip_bad, args.truncate)


def _out_dir_problem(out: str):
    """Why `out` cannot become the output directory, or None: the nearest part of it that exists decides."""
    existing = Path(out).expanduser()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _flag_value(args, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def _flag_problem(args):
    """'--flag value: why' for the first flag out of range, or None; checked before any work starts."""
    if args.command == "show":
        checks = [("--limit", args.limit >= 0, "must be >= 0"),
                  ("--seq-len", args.seq_len >= 1, "must be >= 1"),
                  ("--digits", args.digits >= 1, "must be >= 1"),
                  ("--epoch", args.epoch >= 0, "must be >= 0"),
                  ("--seed", 0 <= args.seed < 2 ** 32, "must be in [0, 2**32)")]
        for flag in ("--input-mask", "--label-mask", "--answer-only"):
            checks.append((flag, 0 <= _flag_value(args, flag) <= 1, "must be a probability in [0, 1]"))
    elif args.command == "check":
        checks = [("--seq-len", args.seq_len >= 1, "must be >= 1"),
                  ("--seed", 0 <= args.seed < 2 ** 32, "must be in [0, 2**32)")]
    else:
        if "/" in args.name and parse_model_id(args.name) is None:
            return f"{args.name}: not a Hub model id (ORG/NAME or ORG/NAME@REVISION)"
        if "/" not in args.name and args.name not in (*DATASETS, *DATASET_GROUPS, "all"):
            return f"{args.name}: no such dataset (choose from {', '.join(DATASETS)}, arc, all) nor a model ORG/NAME"
        url = urllib.parse.urlparse(args.endpoint)
        out_problem = _out_dir_problem(args.out)
        checks = [("--retries", args.retries >= 0, "must be >= 0"),
                  ("--timeout", 0 < args.timeout < math.inf, "must be a number of seconds > 0"),
                  ("--backoff", 0 <= args.backoff < math.inf, "must be a number of seconds >= 0"),
                  ("--endpoint", url.scheme in ("http", "https") and bool(url.netloc), "must be an http(s) URL"),
                  ("--out", out_problem is None, out_problem)]
    return next((f"{flag} {_flag_value(args, flag)}: {why}" for flag, ok, why in checks if not ok), None)


def _fail(message: str, code: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    parser = argparse.ArgumentParser(description="remask data: inspect and check training data, download datasets "
                                                 "and models")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print examples as the model is trained on them, labels and masks marked")
    show.add_argument("spec", help="a data file, a mixture spec (a.jsonl,b.jsonl:1000), or 'embedded'")
    show.add_argument("--tokenizer", help="model directory (or tokenizer.json); default for 'embedded': its own")
    show.add_argument("--limit", type=int, default=3, help="how many examples to print")
    show.add_argument("--mode", default=MaskConfig.mode, choices=MODES)
    show.add_argument("--seed", type=int, default=0, help="sampling and masking seed")
    show.add_argument("--epoch", type=int, default=0, help="epoch whose masks to show")
    show.add_argument("--seq-len", type=int, default=256, help="longer examples are dropped")
    show.add_argument("--truncate", action="store_true", help="cut long examples instead of dropping them")
    show.add_argument("--skip-bad", action="store_true", help="skip (and count) rows that fail to parse")
    show.add_argument("--input-mask", type=float, default=MaskConfig.input_mask)
    show.add_argument("--label-mask", type=float, default=MaskConfig.label_mask)
    show.add_argument("--answer-only", type=float, default=MaskConfig.answer_only)
    show.add_argument("--mask-with", default=MaskConfig.mask_with, choices=["mask", "random"])
    show.add_argument("--digits", type=int, default=3, help="operand digits of the embedded task")
    check = sub.add_parser("check", help="per data file: rows, schemas, bad rows, token counts, what --seq-len "
                           "drops or cuts, duplicates; exit 1 when nothing would train")
    check.add_argument("spec", help="a data file or a mixture spec (a.jsonl,b.jsonl:1000)")
    check.add_argument("--tokenizer", help="model directory (or tokenizer.json) whose tokenizer counts the tokens")
    check.add_argument("--seq-len", type=int, default=256, help="longer examples are dropped")
    check.add_argument("--truncate", action="store_true", help="cut long examples instead of dropping them")
    check.add_argument("--skip-bad", action="store_true", help="as training would skip (and count) bad rows")
    check.add_argument("--seed", type=int, default=0, help="the seed that draws a spec's ':N' rows")
    get = sub.add_parser("download", help="fetch datasets through the Hugging Face dataset viewer API, or a model "
                         "from the Hub into the Hugging Face cache")
    get.add_argument("name", metavar="NAME", help=f"a dataset ({', '.join(DATASETS)}; arc: both ARC sets; all), or "
                     "a model ORG/NAME[@REVISION] from the Hugging Face Hub: into $HF_HUB_CACHE (else $HF_HOME/hub, "
                     "else ~/.cache/huggingface/hub), where transformers finds it too; $HF_ENDPOINT, $HF_TOKEN and "
                     "HF_HUB_OFFLINE=1 are honoured; prints the model's directory last")
    get.add_argument("--out", default="data", help="datasets: output directory, made if missing (files: NAME.jsonl, "
                     "gsm8k-{train,test}.jsonl, ARC-{Challenge,Easy}-{train,validation,test}.jsonl)")
    get.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="datasets: dataset viewer base URL")
    get.add_argument("--retries", type=int, default=6, help="retries per request (exponential back-off)")
    get.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time")
    get.add_argument("--timeout", type=float, default=60.0, help="seconds per request for the whole answer, however "
                     "slowly it comes (a model file's body: per 64 KiB of it); then retried")
    get.add_argument("--force", action="store_true", help="datasets: fetch again even if the file exists")
    args = parser.parse_args(argv)
    # one error boundary: bad flags exit 2 (as argparse's own errors), failures of the work exit 1, and so does
    # the last boundary: an exception no check anticipated (a bug) is one line, its traceback on request
    try:
        problem = _flag_problem(args)
        if problem:
            _fail(problem, 2)
        if args.command == "show":
            _show(args)
        elif args.command == "check":
            _check(args)
        elif "/" in args.name:
            print(download_model(*parse_model_id(args.name), retries=args.retries, backoff=args.backoff,
                                 timeout=args.timeout))
        else:
            download(args.name, args.out, args.endpoint, args.retries, args.backoff, args.timeout, args.force)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (DataError, DownloadError, ValueError) as e:
        _fail(str(e), 1)
    except OSError as e:
        _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e), 1)
    except Exception as e:
        if os.environ.get("REMASK_TRACEBACK", "") not in ("", "0"):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        _fail(f"internal error: {type(e).__name__}: {first_line} (set REMASK_TRACEBACK=1 to see the traceback)", 1)


if __name__ == "__main__":
    main()
