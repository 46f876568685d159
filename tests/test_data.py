"""data.py core: tokenizer, formats, whole-string encoding, roles and labels, masking, batching, rendering.

Property tests draw random records (unicode, whitespace runs, newlines, digits) from seeds and check invariants
that follow from the format's definition, against the tokenizers library's own encoding of the whole string."""
import json
import os
import random
import stat

import pytest
import torch

import data
from conftest import NEOX_DIR

PIECES = ["the", "cat", " sat", "What", "is", "café", "漢字", "😀", "—", "  ", " ", "\n", "\n\n", "\t", "42", "7",
          "3.14", "!", "?", ",", "<", "|", ">", "'s", "don't", "x=1", "(a)", "\u00a0", "e\u0301"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return data.embedded_tokenizer(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", params=["neox", "small"])
def tok(request, neox, small):
    return neox if request.param == "neox" else small


def random_text(rng, pad=False):
    """Random non-blank text; stripped as the readers strip, or (pad) with the spaces and newlines that
    records built directly in code may carry around their fields."""
    while True:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))).strip()
        if text and not any(tag in text for tag in data.RESERVED):
            if pad:
                text = rng.choice(["", " ", "   ", "\n", " \n "]) + text + rng.choice(["", "  ", "\n", "\t "])
            return text


def random_record(rng, pad=False):
    if rng.random() < 0.5:
        return data.CoTRecord(random_text(rng, pad), random_text(rng, pad), random_text(rng, pad))
    return data.ChatRecord([(random_text(rng, pad), random_text(rng, pad)) for _ in range(rng.randint(1, 3))])


def random_records(seed, n=40):
    rng = random.Random(seed)
    return [random_record(rng, pad=i % 2 == 1) for i in range(n)]


# ----------------------------------------------------------------------------- tokenizer

def test_neox_fixture_ids_and_single_tag_ids(neox):
    """The fixture's expected ids (made without the tags) hold, with each tag's old pieces now one new id."""
    assert neox.added_tags == list(data.TAGS)
    ids = [neox.user_id, neox.assistant_id, neox.rationale_id, neox.answer_id, neox.mask_id]
    assert ids == [50277, 50278, 50279, 50280, 50281]  # the first spare rows of StableLM's 50304
    assert len(neox) == 50282 and neox.eos_id == 0 and neox.pad_id == 0
    old = {(29, 93, 4537, 49651): neox.user_id, (29, 93, 515, 5567, 49651): neox.assistant_id}
    for case in json.loads((NEOX_DIR / "expected.json").read_text()):
        expected, i = [], 0
        while i < len(case["ids"]):
            piece = next((p for p in old if tuple(case["ids"][i:i + len(p)]) == p), None)
            expected.append(old[piece] if piece else case["ids"][i])
            i += len(piece) if piece else 1
        assert neox.encode(case["text"]) == expected, case["text"]
    assert neox.encode("The weather is always wonderful") == [510, 8588, 310, 1900, 9386]
    for tag, i in zip(data.TAGS, ids):
        assert neox.encode(f"a{tag}b") == [66, i, 67]


def test_random_replacement_pool_excludes_special_tokens(neox, small):
    for tok in (neox, small):
        pool = set(tok.ordinary_ids.tolist())
        assert not pool & {tok.eos_id, 1, tok.user_id, tok.assistant_id, tok.rationale_id, tok.answer_id,
                           tok.mask_id}
        assert len(pool) == len(tok) - 7
    assert 50254 in set(neox.ordinary_ids.tolist())  # the space-run added tokens are ordinary text


def test_save_reload_round_trip(neox, tmp_path):
    path = neox.save(tmp_path / "model")
    assert sorted(p.name for p in path.parent.iterdir()) == [  # the chat files beside it, no temporary left behind
        "chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    again = data.load_tokenizer(tmp_path / "model")
    assert again.added_tags == [] and len(again) == len(neox) and again.mask_id == neox.mask_id
    text = data.format_record(data.CoTRecord("What is 2+2?", "2+2=4", "4"))
    assert again.encode(text) == neox.encode(text)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(neox, tmp_path, umask):
    """atomic_write (tokenizer.json, the embedded tokenizer cache, remask's logs and loss.svg) gives 0666 less the
    umask, as open() does, not mkstemp's 0600; replacing a file gives the new file that mode too."""
    old = os.umask(umask)
    try:
        (tmp_path / "old.txt").write_text("x")
        os.chmod(tmp_path / "old.txt", 0o600)
        data.atomic_write(tmp_path / "old.txt", "new")
        paths = [tmp_path / "old.txt", neox.save(tmp_path / "model"), tmp_path / "plain.txt"]
        paths[2].write_text("open() for comparison")
        data.embedded_tokenizer(tmp_path / "cache")
        paths += list((tmp_path / "cache").iterdir())
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o666 & ~umask] * 4
    assert (tmp_path / "old.txt").read_text() == "new" and len(paths) == 4


def test_tokenizer_errors(tmp_path):
    with pytest.raises(data.DataError, match="tokenizer.json: not found"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0",\n "model": {')
    with pytest.raises(data.DataError, match=r"not valid JSON \(line 2 column"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(data.DataError, match="not a tokenizer the `tokenizers` library can load"):
        data.load_tokenizer(tmp_path)
    neox_json = json.loads((NEOX_DIR / "tokenizer.json").read_text())
    neox_json["added_tokens"] = neox_json["added_tokens"][1:]
    del neox_json["model"]["vocab"]["<|endoftext|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(neox_json))
    with pytest.raises(data.DataError, match="has no <\\|endoftext\\|> token"):
        data.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- formats and encoding

def test_formats_by_hand():
    assert data.format_record(data.CoTRecord("Q", "R", "A")) == \
        "<|user|>\nQ\n<|rationale|>\nR\n<|answer|>\nA\n<|user|>"
    assert data.format_record(data.ChatRecord([("u1", "a1"), ("u2", "a2")])) == \
        "<|user|>\nu1\n<|assistant|>\na1\n<|user|>\nu2\n<|assistant|>\na2\n<|user|>"
    assert data.chat_prompt([("u1", "a1")], " u2 ") == "<|user|>\nu1\n<|assistant|>\na1\n<|user|>\nu2\n<|assistant|>\n"
    assert data.chat_prompt([], "hi") == "<|user|>\nhi\n<|assistant|>\n"
    assert data.cot_prompt("Q") == "<|user|>\nQ\n<|rationale|>\n"


def test_roles_and_labels_by_hand(neox):
    ex = data.encode(data.ChatRecord([("What is 1+1?", "1+1=2")]), neox)
    # <|user|> \n What ␣is ␣1 + 1 ? \n <|assistant|> \n 1 + 1 = 2 \n <|user|>
    assert ex.ids.tolist() == [50277, 187, 1276, 310, 337, 12, 18, 32, 187, 50278, 187, 18, 12, 18, 30, 19, 187, 50277]
    T, P, R = data.TAG, data.PROMPT, data.RESPONSE
    assert ex.roles.tolist() == [T, T, P, P, P, P, P, P, T, T, T, R, R, R, R, R, T, T]
    assert ex.targets.tolist() == [False] * 11 + [True] * 7 and not ex.cot
    cot = data.encode(data.CoTRecord("Q", "R", "A"), neox)
    roles = [data.ROLE_NAMES[r] for r in cot.roles.tolist()]
    assert roles == ["tag", "tag", "prompt", "tag", "tag", "tag", "rationale", "tag", "tag", "tag", "answer", "tag",
                     "tag"]
    assert cot.targets.tolist() == [False] * 6 + [True] * 7 and cot.cot


@pytest.mark.parametrize("seed", range(10))
def test_encoding_equals_whole_string_encoding(tok, seed):
    """Roles come from one encoding of the whole string: the ids are exactly what the (unmodified) tokenizer
    gives for format_record(record)."""
    records = random_records(seed)
    for record, ex in zip(records, data.encode_many(records, tok)):
        assert ex.ids.tolist() == tok.tk.encode(data.format_record(record), add_special_tokens=False).ids
        assert len(ex.roles) == len(ex.targets) == len(ex.ids)


@pytest.mark.parametrize("seed", range(4))
def test_roles_equal_the_plain_loop_of_the_docstring(tok, seed):
    """encode_many's reduceat computes, per token, the max role and any-target over the characters it covers."""
    records = random_records(seed)
    for record, ex in zip(records, data.encode_many(records, tok)):
        segments = data._segments(record)
        char_role = [role for text, role, _ in segments for _ in text]
        char_target = [target for text, _, target in segments for _ in text]
        offsets = tok._spans.encode(data.format_record(record), add_special_tokens=False).offsets
        assert ex.roles.tolist() == [max(char_role[start:end]) for start, end in offsets]
        assert ex.targets.tolist() == [any(char_target[start:end]) for start, end in offsets]


def _fields(record):
    if isinstance(record, data.CoTRecord):
        return [(record.prompt, data.PROMPT), (record.rationale, data.RATIONALE), (record.answer, data.ANSWER)]
    return [(text, role) for u, a in record.turns for text, role in ((u, data.PROMPT), (a, data.RESPONSE))]


@pytest.mark.parametrize("seed", range(10))
def test_roles_and_targets_follow_the_format(tok, seed):
    """Between consecutive tags lies one field: its tokens decode to '\\n' + content + '\\n', carry the field's
    role except pure-newline framing tokens (role tag), and the targets are exactly everything after the
    prompt side: for chat each response with its newline and the next <|user|>; for CoT everything after
    '<|rationale|>\\n'."""
    tags = {tok.user_id, tok.assistant_id, tok.rationale_id, tok.answer_id}
    records = random_records(seed)
    for record, ex in zip(records, data.encode_many(records, tok)):
        ids, roles, targets = ex.ids.tolist(), ex.roles.tolist(), ex.targets.tolist()
        cuts = [i for i, t in enumerate(ids) if t in tags]
        expected_tags = ([tok.user_id, tok.rationale_id, tok.answer_id, tok.user_id] if ex.cot else
                         [tok.user_id] + [tok.assistant_id, tok.user_id] * len(record.turns))
        assert [ids[i] for i in cuts] == expected_tags and cuts[0] == 0 and cuts[-1] == len(ids) - 1
        assert all(roles[i] == data.TAG for i in cuts)
        for (text, role), (a, b) in zip(_fields(record), zip(cuts, cuts[1:])):
            span = range(a + 1, b)
            normal = tok.tk.normalizer.normalize_str(text) if tok.tk.normalizer else text  # NFC for GPT-NeoX
            assert tok.decode(ids[a + 1:b]) == "\n" + normal + "\n"
            for i in span:
                assert roles[i] == role or (roles[i] == data.TAG and tok.decode([ids[i]]).strip("\n") == "")
            # the field's own tokens hold all of its text: no content character is left to a framing token
            assert normal in tok.decode([ids[i] for i in span if roles[i] == role])
        if ex.cot:
            start = cuts[1] + 1 + (roles[cuts[1] + 1] == data.TAG)  # after <|rationale|> and its own newline
            assert targets == [i >= start for i in range(len(ids))]
        else:
            expected = [False] * len(ids)
            for a, b in zip(cuts[1::2], cuts[2::2]):  # <|assistant|> ... next <|user|>
                for i in range(a + 1 + (roles[a + 1] == data.TAG), b + 1):
                    expected[i] = True
            assert targets == expected


@pytest.mark.parametrize("seed", range(6))
def test_prompt_side_is_a_token_prefix(tok, seed):
    """What generation feeds (chat_prompt / cot_prompt) tokenizes to a prefix of the training example, and
    the training targets are exactly the tokens after it."""
    rng = random.Random(seed)
    for _ in range(20):
        record = data.CoTRecord(random_text(rng), random_text(rng), random_text(rng))
        prompt = data.cot_prompt(record.prompt)
        if rng.random() < 0.5:
            record = data.ChatRecord([(random_text(rng), random_text(rng)) for _ in range(rng.randint(1, 3))])
            prompt = data.chat_prompt(record.turns[:-1], record.turns[-1][0])
        ex = data.encode(record, tok)
        p = tok.encode(prompt)
        assert ex.ids[:len(p)].tolist() == p
        assert ex.targets[len(p):].all()
        if isinstance(record, data.CoTRecord) or len(record.turns) == 1:
            assert not ex.targets[:len(p)].any()


def test_extract_answer():
    assert data.extract_answer("7+5=12, write 2\n<|answer|>\n12\n<|user|>\n") == "12"
    assert data.extract_answer("x<|answer|> 42 <|endoftext|>") == "42"
    assert data.extract_answer("no answer tag") is None


def test_fit_length_drops_or_truncates(neox):
    records = [data.CoTRecord(" ".join(["word"] * n), "r", "a") for n in (1, 50, 400)]
    examples = data.encode_many(records, neox)
    kept, dropped = data.fit_length(examples, 32)
    assert [len(e.ids) for e in kept] == [len(examples[0].ids)] and dropped == 2
    kept, dropped = data.fit_length(examples, 32, truncate=True)
    assert dropped == 2  # the cut long prompts keep no label: nothing to learn
    kept, dropped = data.fit_length(examples[:1], 10, truncate=True)
    assert len(kept[0].ids) == 10 and kept[0].targets.any() and dropped == 0


# ----------------------------------------------------------------------------- masking

def _items(tok, cfg, seed, n=60):
    rng = random.Random(seed)
    examples = data.encode_many([random_record(rng) for _ in range(n)], tok)
    return examples, [data.mask_example(ex, tok, cfg, seed, 0, i) for i, ex in enumerate(examples)]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mask_with", ["mask", "random"])
def test_masks_touch_only_content_and_rationale_labels(neox, seed, mask_with):
    cfg = data.MaskConfig("remask", input_mask=0.5, label_mask=0.3, answer_only=0.2, mask_with=mask_with)
    examples, items = _items(neox, cfg, seed)
    for ex, it in zip(examples, items):
        assert it["input_ids"] is ex.ids and torch.equal(it["kl_mask"], ex.targets)
        changed = it["masked_ids"] != ex.ids
        assert (ex.roles[changed] == data.RESPONSE).logical_or(ex.roles[changed] == data.RATIONALE).all()
        if mask_with == "mask":
            assert (it["masked_ids"][changed] == neox.mask_id).all()
        dropped = ex.targets & (it["labels"] == data.IGNORE_INDEX)
        assert (ex.roles[dropped] == data.RATIONALE).all()
        kept = it["labels"] != data.IGNORE_INDEX
        assert torch.equal(it["labels"][kept], ex.ids[kept]) and not (kept & ~ex.targets).any()
        if not ex.cot:
            assert not dropped.any()


def _binomial_ok(k, n, p, sigmas=5.0):
    return abs(k - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5 + 1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p_in,p_label,p_answer", [(0.4, 0.1, 0.1), (0.15, 0.3, 0.25)])
def test_mask_and_drop_rates_match_probabilities(small, seed, p_in, p_label, p_answer):
    """Input masking is Bernoulli(p_in) per maskable token; an example is answer-only with probability
    p_answer; otherwise each rationale label drops with probability p_label: all within 5 binomial sigmas."""
    rng = random.Random(seed)
    records = [data._addition(rng.randint(100, 999), rng.randint(100, 999), rng) for _ in range(400)]
    examples = data.encode_many(records, small)
    cfg = data.MaskConfig("remask", p_in, p_label, p_answer)
    masked = maskable = answer_only = dropped = kept_pool = 0
    for i, ex in enumerate(examples):
        it = data.mask_example(ex, small, cfg, seed, 3, i)
        content = (ex.roles == data.RESPONSE) | (ex.roles == data.RATIONALE)
        maskable += int(content.sum())
        masked += int((it["masked_ids"] != ex.ids).sum())
        rationale = ex.roles == data.RATIONALE
        n_drop = int((rationale & (it["labels"] == data.IGNORE_INDEX)).sum())
        if n_drop == int(rationale.sum()):
            answer_only += 1
        else:
            dropped, kept_pool = dropped + n_drop, kept_pool + int(rationale.sum())
    assert _binomial_ok(masked, maskable, p_in), (masked, maskable)
    assert _binomial_ok(answer_only, len(examples), p_answer), answer_only
    assert _binomial_ok(dropped, kept_pool, p_label), (dropped, kept_pool)


def test_modes(neox):
    examples, remask = _items(neox, data.MaskConfig("remask"), 0, n=20)
    _, thought = _items(neox, data.MaskConfig("masked-thought"), 0, n=20)
    _, sft = _items(neox, data.MaskConfig("sft"), 0, n=20)
    for ex, r, m, s in zip(examples, remask, thought, sft):
        assert torch.equal(r["masked_ids"], m["masked_ids"]) and torch.equal(r["labels"], m["labels"])
        assert s["masked_ids"] is None
        assert torch.equal(s["labels"], torch.where(ex.targets, ex.ids, data.IGNORE_INDEX))
    assert any((r["labels"] != s["labels"]).any() for r, s in zip(remask, sft))  # CoT label dropping happened
    with pytest.raises(ValueError, match="mode must be"):
        data.MaskConfig("spin")
    with pytest.raises(ValueError, match="input_mask must be a probability"):
        data.MaskConfig(input_mask=1.5)
    with pytest.raises(ValueError, match="mask_with"):
        data.MaskConfig(mask_with="zeros")


def test_random_replacements_cover_the_vocabulary(small):
    rng = random.Random(0)
    records = [data._addition(rng.randint(10 ** 6, 10 ** 7 - 1), rng.randint(10 ** 6, 10 ** 7 - 1), rng)
               for _ in range(100)]
    cfg = data.MaskConfig(input_mask=1.0, mask_with="random")
    seen = set()
    for i, ex in enumerate(data.encode_many(records, small)):
        it = data.mask_example(ex, small, cfg, 0, 0, i)
        seen |= set(it["masked_ids"][(ex.roles == data.RATIONALE)].tolist())
    pool = set(small.ordinary_ids.tolist())
    assert seen <= pool and len(seen) > 0.9 * len(pool)  # ~9000 draws over ~500 ids: nearly all appear


def test_masks_are_a_pure_function_of_seed_epoch_index(neox):
    cfg = data.MaskConfig(input_mask=0.5)
    ex = data.encode(data.CoTRecord("Q", " ".join(["step"] * 60), "A"), neox)

    def draw(seed, epoch, index):
        it = data.mask_example(ex, neox, cfg, seed, epoch, index)
        return torch.cat([it["masked_ids"], it["labels"]])

    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    variants = [draw(1, 2, 3), draw(2, 2, 3), draw(1, 3, 3), draw(1, 2, 4), draw(0, 0, 0), draw(0, 0, 1)]
    assert len({tuple(v.tolist()) for v in variants}) == len(variants)
    with pytest.raises(ValueError, match="seed must be"):
        data.mask_example(ex, neox, cfg, -1, 0, 0)


@pytest.mark.parametrize("seed", range(4))
def test_label_alignment_after_shifting(neox, seed):
    """Labels are aligned with input_ids; after the usual shift (logits[:, :-1] vs labels[:, 1:]) the last
    prompt-side position predicts the first target, and a label's role is the role of the token it names."""
    examples, items = _items(neox, data.MaskConfig("sft"), seed, n=30)
    batch = data.collate(items)
    shifted = batch["labels"][:, 1:]  # (B, T-1): the token position t must predict
    for b, ex in enumerate(examples):
        first = int(ex.targets.float().argmax())
        assert shifted[b, first - 1] == ex.ids[first]
        assert not ex.targets[:first].any()
        valid = shifted[b, :len(ex.ids) - 1] != data.IGNORE_INDEX
        assert torch.equal(shifted[b, :len(ex.ids) - 1][valid], ex.ids[1:][valid])
        assert (ex.roles[1:][valid] != data.PROMPT).all()


# ----------------------------------------------------------------------------- batching

def test_collate_pads_right_to_a_multiple_of_8(neox):
    examples, items = _items(neox, data.MaskConfig(), 5, n=7)
    batch = data.collate(items, pin_memory=False)
    T = max(len(e.ids) for e in examples)
    assert batch["input_ids"].shape == (7, -(-T // 8) * 8) and batch["input_ids"].shape[1] % 8 == 0
    for b, (ex, it) in enumerate(zip(examples, items)):
        n = len(ex.ids)
        for key, pad in (("input_ids", 0), ("masked_ids", 0), ("labels", -100), ("kl_mask", False)):
            assert torch.equal(batch[key][b, :n], it[key])
            assert (batch[key][b, n:] == pad).all()
    assert batch["kl_mask"].dtype == torch.bool and batch["labels"].dtype == torch.int64
    sft = data.collate([data.mask_example(examples[0], neox, data.MaskConfig("sft"), 0, 0, 0)])
    assert sft["masked_ids"] is None and sft["input_ids"].shape[1] % 8 == 0


@pytest.fixture(scope="module")
def corpus(small):
    records, _, _ = data.embedded_dataset(0, n_train=203, n_eval=1, digits=2)
    return data.encode_many(records, small)


@pytest.mark.parametrize("group", [False, True])
def test_loader_covers_each_epoch_once_and_shards_the_global_batch(small, corpus, group):
    cfg = data.MaskConfig()
    one = data.Loader(corpus, small, cfg, global_batch=24, micro_batch=5, seed=7, group_by_length=group)
    ranks = [data.Loader(corpus, small, cfg, 24, 5, seed=7, group_by_length=group, rank=r, world_size=3)
             for r in range(3)]
    assert len(one) == 9  # ceil(203 / 24): the partial last batch is kept
    assert len(data.Loader(corpus, small, cfg, 24, 5, drop_last=True)) == 8
    for epoch in (0, 1):
        seen = []
        for step in range(len(one)):
            whole = [i for mb in one.step_indices(epoch, step) for i in mb]
            shares = [[i for mb in r.step_indices(epoch, step) for i in mb] for r in ranks]
            assert sorted(sum(shares, [])) == sorted(whole)  # the ranks split exactly the same global batch
            if step < len(one) - 1:
                assert [len(s) for s in shares] == [8, 8, 8]
                assert all(len(mb) <= 5 for mb in ranks[0].step_indices(epoch, step))
            seen += whole
        assert sorted(seen) == list(range(len(corpus)))
    assert one.order(0).tolist() != one.order(1).tolist()


def test_length_grouping_keeps_each_step_and_sorts_micro_batches(small, corpus):
    cfg = data.MaskConfig()
    plain = data.Loader(corpus, small, cfg, 40, 8, seed=1)
    grouped = data.Loader(corpus, small, cfg, 40, 8, seed=1, group_by_length=True)
    for step in range(len(plain)):
        a, b = plain.step_indices(2, step), grouped.step_indices(2, step)
        assert sorted(sum(a, [])) == sorted(sum(b, []))
        longest = [max(len(corpus[i].ids) for i in mb) for mb in b]
        assert longest == sorted(longest, reverse=True)


def test_loader_batches_are_order_independent_and_resumable(small, corpus):
    loader = data.Loader(corpus, small, data.MaskConfig(input_mask=0.5), 32, 8, seed=3, pin_memory=False)
    full = list(loader.iterate(1))
    resumed = list(loader.iterate(1, start_step=4))
    assert [s for s, _ in resumed] == list(range(4, len(loader)))
    for (s1, mbs1), (s2, mbs2) in zip(full[4:], resumed):
        for x, y in zip(mbs1, mbs2):
            assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "masked_ids", "labels", "kl_mask", "index"))
    step, micro = full[2]
    for batch in micro:  # each row is the example's own mask_example, whatever batch it landed in
        for row, i in enumerate(batch["index"].tolist()):
            it = data.mask_example(corpus[i], small, loader.mask, 3, 1, i)
            n = len(it["input_ids"])
            assert torch.equal(batch["masked_ids"][row, :n], it["masked_ids"])
            assert torch.equal(batch["labels"][row, :n], it["labels"])


def test_loader_argument_errors(small, corpus):
    with pytest.raises(ValueError, match="not divisible by world_size"):
        data.Loader(corpus, small, data.MaskConfig(), 10, 2, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        data.Loader(corpus, small, data.MaskConfig(), 10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no examples"):
        data.Loader([], small, data.MaskConfig(), 10, 2)


# ----------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("seed", range(4))
def test_render_marks_labels_and_masks(neox, seed):
    rng = random.Random(seed)
    ascii_records = [data.CoTRecord(f"q{n}", " ".join(["word"] * rng.randint(1, 30)), str(n)) for n in range(10)]
    ascii_records += [data.ChatRecord([("hi there", "hello friend"), ("and", "again")])]
    examples = data.encode_many(ascii_records, neox)
    for i, (record, ex) in enumerate(zip(ascii_records, examples)):
        plain = data.render(ex, neox).split("\n", 1)[1]
        assert plain.replace("⟦", "").replace("⟧", "") == data.format_record(record)
        if ex.cot:  # one label span: everything after the prompt side
            assert plain == data.cot_prompt(record.prompt) + "⟦" + \
                data.format_record(record)[len(data.cot_prompt(record.prompt)):] + "⟧"
        it = data.mask_example(ex, neox, data.MaskConfig(input_mask=0.5), seed, 0, i)
        text = data.render(ex, neox, it)
        n_masked = int((it["masked_ids"] != ex.ids).sum())
        assert text.count("⟨") == n_masked and f"{n_masked} of" in text.split("\n", 1)[0]
