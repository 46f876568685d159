"""data.py embedded demo data: the addition rationales are right digit by digit, held-out problems never
appear in training, everything is a function of the seed, and the small tokenizer is cached atomically."""
import random
import re

import pytest

import data

STEP = re.compile(r"^(\d)\+(\d)(\+1)?=(\d+), write (\d)( carry 1)?$")


def check_addition(a, b, rationale, answer):
    """Re-derive the column additions independently: step i adds the i-th digits from the right plus the
    carry the previous step announced; the written digits, read backwards, are the answer, which is a+b."""
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps = rationale.split("; ")
    carry, written = 0, []
    for i, step in enumerate(steps):
        if i == width:
            assert step == "write 1" and carry == 1 and i == len(steps) - 1
            written.append("1")
            break
        x, y, plus_carry, total, digit, carry_out = STEP.match(step).groups()
        assert (x, y) == (xs[i], ys[i]) and bool(plus_carry) == bool(carry)
        assert int(total) == int(x) + int(y) + carry and digit == total[-1]
        carry = int(total) // 10
        assert bool(carry_out) == bool(carry)
        written.append(digit)
    else:
        assert carry == 0 and len(steps) == width
    assert "".join(reversed(written)) == answer == str(a + b)


def test_the_briefs_worked_example():
    assert data.addition_cot(457, 385) == \
        ("7+5=12, write 2 carry 1; 5+8+1=14, write 4 carry 1; 4+3+1=8, write 8", "842")
    assert data.addition_cot(957, 385) == \
        ("7+5=12, write 2 carry 1; 5+8+1=14, write 4 carry 1; 9+3+1=13, write 3 carry 1; write 1", "1342")


@pytest.mark.parametrize("seed", range(10))
def test_rationales_are_correct_column_by_column(seed):
    rng = random.Random(seed)
    for _ in range(200):
        a, b = rng.randrange(10 ** rng.randint(1, 12)), rng.randrange(10 ** rng.randint(1, 12))
        check_addition(a, b, *data.addition_cot(a, b))


def operands(record):
    a, b = map(int, re.findall(r"\d+", record.prompt))
    return min(a, b), max(a, b)


@pytest.mark.parametrize("digits", [1, 3, 7])
def test_embedded_dataset(tmp_path, digits):
    n_eval = 20 if digits == 1 else 100
    train, held, tok = data.embedded_dataset(seed=4, n_train=600, n_eval=n_eval, digits=digits, cache_dir=tmp_path)
    cot = [r for r in train if isinstance(r, data.CoTRecord)]
    assert len(train) == 600 and len(held) == n_eval and 0.7 < len(cot) / 600 < 0.9  # chat_fraction 0.2
    assert len({operands(r) for r in held}) == n_eval  # distinct problems
    assert not {operands(r) for r in held} & {operands(r) for r in cot}  # never seen in training, either order
    for r in cot + held:
        a, b = operands(r)
        assert len(str(a)) == len(str(b)) == digits
        check_addition(*map(int, re.findall(r"\d+", r.prompt)), r.rationale, r.answer)
    again, held_again, _ = data.embedded_dataset(seed=4, n_train=50, n_eval=n_eval, digits=digits,
                                                 cache_dir=tmp_path)
    assert held_again == held and again == train[:50]  # a function of the seed; n_train does not move the eval
    other, held_other, _ = data.embedded_dataset(seed=5, n_train=50, n_eval=n_eval, digits=digits,
                                                 cache_dir=tmp_path)
    assert other != again and held_other != held
    lengths = [len(e.ids) for e in data.encode_many(train + held, tok)]
    assert max(lengths) <= 256  # the recipe's sequence length holds every example


def test_chat_pairs_are_deterministic_tasks():
    rng = random.Random(0)
    pairs = [data._chat_pair(rng).turns[0] for _ in range(300)]
    for user, reply in pairs:
        if m := re.fullmatch(r"Reverse the word (\w+)\.", user):
            assert reply == m[1][::-1]
        elif m := re.fullmatch(r"Count from (\d+) to (\d+)\.", user):
            assert reply == ", ".join(map(str, range(int(m[1]), int(m[2]) + 1)))
        elif m := re.fullmatch(r"Repeat the word (\w+) (\d+) times\.", user):
            assert reply == " ".join([m[1]] * int(m[2]))
        elif m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", user):
            assert reply == str(max(int(m[1]), int(m[2])))
    patterns = [re.escape(t).replace(r"\{", "{").replace(r"\}", "}") for t, _ in data.CHAT_TASKS]
    patterns = [re.sub(r"{\w}", ".+", p) for p in patterns]
    assert all(any(re.fullmatch(p, u) for u, _ in pairs) for p in patterns)  # every task occurs


def test_embedded_tokenizer_is_small_digit_wise_and_cached(tmp_path):
    tok = data.embedded_tokenizer(tmp_path)
    names = [tok.tk.id_to_token(i) for i in range(7)]
    assert names == ["<|endoftext|>", "<|padding|>", *data.TAGS] and tok.added_tags == []
    assert len(tok) <= 512 and tok.eos_id == 0 and tok.mask_id == 6
    assert all(sum(c.isdigit() for c in tok.decode([i])) <= 1 for i in range(len(tok)))  # no multi-digit token
    assert len(tok.encode("1234567890")) == 10 and len(tok.encode(" 98765")) == 5
    text = "Reverse the word garden. 😀 ünïcode\n\tworks too"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text round-trips
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("embedded-tokenizer-")
    mtime = cached[0].stat().st_mtime_ns
    assert data.embedded_tokenizer(tmp_path).tk.to_str() == tok.tk.to_str()
    assert cached[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    cached[0].write_text('{"truncated": ')  # a damaged cache is rebuilt, identically (training is deterministic)
    assert data.embedded_tokenizer(tmp_path).tk.to_str() == tok.tk.to_str()
    assert list(tmp_path.iterdir()) == cached  # no temporary left behind


def test_bad_arguments():
    with pytest.raises(ValueError, match="digits must be >= 1"):
        data.embedded_dataset(digits=0)
    with pytest.raises(ValueError, match="1-digit additions have 45 distinct problems"):
        data.embedded_dataset(n_eval=30, digits=1)
