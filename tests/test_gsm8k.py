"""data.py GSM8K evaluation: the lm-evaluation-harness gsm8k.yaml v3.0 prompt, stop strings, filters and score.

Expected values are worked by hand from the harness's rules (lm-evaluation-harness 0.4.13: lm_eval/tasks/gsm8k/
gsm8k.yaml, filters/extraction.py, api/metrics.py, api/samplers.py); the properties restate
those rules independently (earliest stop string, sample std with n-1) and check them on seeded random cases.
"""
import json
import math
import random
import statistics

import numpy as np
import pytest

import data
from conftest import write_jsonl
from data import INVALID, GSM8KProblem

# The first training and first test problem of openai/gsm8k (main), verbatim.
NATALIA = GSM8KProblem(
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
JANET = GSM8KProblem(
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market?",
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18")


# ----------------------------------------------------------------------------- extraction and normalisation

EXTRACTION = [  # (completion, strict-match, flexible-extract)
    (" Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18", "18"),
    (" The answer is 72.", INVALID, "72."),  # no '#### ': strict fails, flexible keeps the trailing '.'
    (" #### 1,234", "1,234", "1,234"),
    (" #### -5", "-5", "-5"),
    (" #### 3.5", "3.5", "3.5"),
    (" #### 72\n#### 73", "72", "73"),  # strict takes the first, flexible the last
    (" #### $72", INVALID, "$72"),  # strict allows no '$' after '#### '
    (" ####72", INVALID, "72"),  # strict needs the space
    (" #### 18.\nThen 4 more", "18.", "4"),  # a lone digit is the second group's match
    (" She has 5 apples", INVALID, "5"),
    (" no numbers here", INVALID, INVALID),
    ("", INVALID, INVALID),
    (" #### - 5", INVALID, "5"),
    (" #### ,.,", ",.,", ",.,"),  # the character class takes punctuation alone
    (" 1, 2, 3", INVALID, "3"),  # '1,' and '2,' match the long group, '3' only the short one
    (" x-7y", INVALID, "-7"),
    (" It is -3.5 degrees", INVALID, "-3.5"),
    (" costs $1,000.50, so #### 1000.50 total", "1000.50", "1000.50"),
]


@pytest.mark.parametrize("completion,strict,flexible", EXTRACTION)
def test_extraction_table(completion, strict, flexible):
    assert data.strict_match(completion) == strict
    assert data.flexible_extract(completion) == flexible


NORMALISATION = [  # (prediction, reference, exact_match)
    ("72", NATALIA.answer, True),
    ("72.", NATALIA.answer, True),  # one trailing '.' is ignored
    ("72..", NATALIA.answer, False),  # only one
    ("$72", NATALIA.answer, True),
    ("72.0", NATALIA.answer, False),  # strings, not numbers
    (INVALID, NATALIA.answer, False),
    ("1,234", "x\n#### 1234", True),
    ("1234", "x\n#### 1,234", True),  # the reference is normalised too
    ("-5", "x\n#### -5", True),
    ("5", "x\n#### -5", False),
    ("2", "a #### 1\nb #### 2", True),  # everything up to the LAST '#### ' goes
    ("#### 18", JANET.answer, True),  # a prediction loses its '#### ' like the reference
    ("SEVENTY-TWO", "x\n#### seventy-two", True),  # ignore_case
]


@pytest.mark.parametrize("prediction,reference,equal", NORMALISATION)
def test_normalisation_table(prediction, reference, equal):
    assert (data.normalize_gsm8k(prediction) == data.normalize_gsm8k(reference)) is equal


def test_reference_normalises_to_its_final_number():
    assert data.normalize_gsm8k(NATALIA.answer) == "72"
    assert data.normalize_gsm8k(JANET.answer) == "18"  # the '$' inside the solution is gone before the cut
    assert data.normalize_gsm8k("$1,000.") == "1000"


def _formatted(rng: random.Random, value: int) -> str:
    return rng.choice([str(value), f"{value:,}", f"{value:,}."])


@pytest.mark.parametrize("seed", range(20))
def test_written_answers_score_right(seed):
    """Invariant: '#### N' written with or without thousands commas and a final '.' is strict-correct (after
    any reasoning with other numbers); 'the answer is [$]N' is flexible-correct and strict-invalid."""
    rng = random.Random(seed)
    value = rng.choice([rng.randint(0, 9), rng.randint(10, 10 ** 7), -rng.randint(1, 10 ** 4)])
    reference = f"{rng.randint(2, 9)} * {rng.randint(2, 9)} = <<x>>{rng.randint(10, 99)} things.\n#### {value}"
    reasoning = f" First {rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 2000)}.\n"
    strict_text = reasoning + "#### " + _formatted(rng, value)
    dollar = "$" if value >= 0 and rng.random() < 0.5 else ""
    flexible_text = reasoning + "So the answer is " + dollar + _formatted(rng, value)
    target = data.normalize_gsm8k(reference)
    assert target == str(value)
    assert data.normalize_gsm8k(data.strict_match(strict_text)) == target
    assert data.normalize_gsm8k(data.flexible_extract(strict_text)) == target
    assert data.normalize_gsm8k(data.flexible_extract(flexible_text)) == target
    assert data.strict_match(flexible_text) == INVALID


# ----------------------------------------------------------------------------- few-shot prompt

TINY_TRAIN = [GSM8KProblem(f"What is {i}+{i}?", f"{i}+{i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}")
              for i in range(7)]
TINY_TEST = [GSM8KProblem("What is 10+1?", "10+1 = 11\n#### 11"), GSM8KProblem("What is 3+4?", "#### 7")]


def test_five_shot_prompt_exact():
    """random.Random(1234).sample(range(7), 5) draws 6,3,0,4,5 and then 6,4,0,5,3 from the same generator."""
    first = ("Question: What is 6+6?\nAnswer: 6+6 = <<6+6=12>>12\n#### 12\n\n"
             "Question: What is 3+3?\nAnswer: 3+3 = <<3+3=6>>6\n#### 6\n\n"
             "Question: What is 0+0?\nAnswer: 0+0 = <<0+0=0>>0\n#### 0\n\n"
             "Question: What is 4+4?\nAnswer: 4+4 = <<4+4=8>>8\n#### 8\n\n"
             "Question: What is 5+5?\nAnswer: 5+5 = <<5+5=10>>10\n#### 10\n\n"
             "Question: What is 10+1?\nAnswer:")
    second = ("Question: What is 6+6?\nAnswer: 6+6 = <<6+6=12>>12\n#### 12\n\n"
              "Question: What is 4+4?\nAnswer: 4+4 = <<4+4=8>>8\n#### 8\n\n"
              "Question: What is 0+0?\nAnswer: 0+0 = <<0+0=0>>0\n#### 0\n\n"
              "Question: What is 5+5?\nAnswer: 5+5 = <<5+5=10>>10\n#### 10\n\n"
              "Question: What is 3+3?\nAnswer: 3+3 = <<3+3=6>>6\n#### 6\n\n"
              "Question: What is 3+4?\nAnswer:")
    assert data.gsm8k_prompts(TINY_TEST, TINY_TRAIN) == [first, second]


def test_real_rows_keep_their_text_verbatim():
    prompt = data.gsm8k_fewshot_prompts([JANET], [NATALIA], k=1)[0]
    assert prompt == f"Question: {NATALIA.question}\nAnswer: {NATALIA.answer}\n\nQuestion: {JANET.question}\nAnswer:"


@pytest.mark.parametrize("seed", range(10))
def test_prompt_stream_properties(seed):
    """Invariants: the i-th prompt holds the i-th draw of Random(seed).sample over the training rows, in draw
    order, then the problem; a prefix of the problems (--limit) gets the same prompts."""
    rng = random.Random(seed)
    train = [GSM8KProblem(f"q{i} {rng.random()}", f"a{i}\n#### {i}") for i in range(rng.randint(5, 40))]
    test = [GSM8KProblem(f"t{i}", f"#### {i}") for i in range(rng.randint(1, 12))]
    k = rng.randint(1, 5)
    prompts = data.gsm8k_fewshot_prompts(test, train, k, seed)
    draws = random.Random(seed)
    for problem, prompt in zip(test, prompts):
        picked = draws.sample(range(len(train)), k)
        blocks = prompt.split("\n\n")
        assert blocks[-1] == f"Question: {problem.question}\nAnswer:"
        assert blocks[:-1] == [f"Question: {train[j].question}\nAnswer: {train[j].answer}" for j in picked]
        assert prompt.count("Question: ") == k + 1
    limit = rng.randint(0, len(test))
    assert data.gsm8k_fewshot_prompts(test[:limit], train, k, seed) == prompts[:limit]


def test_prompt_formats_and_errors():
    assert data.gsm8k_prompts([NATALIA], format="cot") == [f"<|user|>\n{NATALIA.question}\n<|rationale|>\n"]
    with pytest.raises(ValueError, match="unknown GSM8K format"):
        data.gsm8k_prompts([NATALIA], TINY_TRAIN, format="chat")
    with pytest.raises(ValueError, match="training problems"):
        data.gsm8k_prompts([NATALIA], None)
    with pytest.raises(ValueError, match="at least 5"):
        data.gsm8k_prompts([NATALIA], TINY_TRAIN[:4])


# ----------------------------------------------------------------------------- stop strings

STOPS = [  # (generated text, what the harness keeps)
    (" 9 eggs.\n#### 18\n\nQuestion: Tom has", " 9 eggs.\n#### 18\n\n"),  # v3.0 no longer stops at '\n\n'
    (" 42</s>Question:", " 42"),
    (" 42<|im_end|>\n", " 42"),
    (" 7\n#### 7<|endoftext|><|endoftext|>", " 7\n#### 7"),  # the EOS the harness adds to `until`
    (" #### 5 with no stop", " #### 5 with no stop"),
    ("Question: at once", ""),
    (" question: lower case goes on", " question: lower case goes on"),
]


@pytest.mark.parametrize("text,kept", STOPS)
def test_stop_strings(text, kept):
    assert data.cut_at_stop(text) == kept


def test_cot_stop_and_answer():
    text = "48/2 = 24, 48 + 24 = 72\n<|answer|>\n72\n<|user|>\nWhat about"
    kept = data.cut_at_stop(text, data.GSM8K_STOP["cot"])
    assert kept == "48/2 = 24, 48 + 24 = 72\n<|answer|>\n72\n"
    assert data.cot_final_answer(kept) == "72"
    assert data.cot_final_answer("no tag 72") == INVALID
    assert data.cot_final_answer("r\n<|answer|>\n") == INVALID


def test_cut_is_sequential_split_like_the_harness():
    """The harness splits at each term in turn; with overlapping terms that is not the earliest match."""
    assert data.cut_at_stop("abc", ("bc", "ab")) == "a"
    assert data.cut_at_stop("abc", ("ab", "bc")) == ""


@pytest.mark.parametrize("seed", range(20))
def test_cut_is_earliest_stop(seed):
    """Invariant for the real stop lists (no two strings overlap): the kept text is everything before the
    earliest stop string; it contains none, and cutting again changes nothing."""
    rng = random.Random(seed)
    for fmt, stops in data.GSM8K_STOP.items():
        pieces = [" 12", "\n", "#### ", "Question", ":", "<|", "im_end|>", "</", "s>", "x", *stops]
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        kept = data.cut_at_stop(text, stops)
        first = min([text.find(s) for s in stops if s in text], default=len(text))
        assert kept == text[:first], fmt
        assert not any(s in kept for s in stops)
        assert data.cut_at_stop(kept, stops) == kept


# ----------------------------------------------------------------------------- score

def test_score_by_hand():
    completions = [" 24 + 48 = 72\n#### 72",  # both right
                   " #### 18.",  # both right (trailing '.')
                   " She makes $18",  # strict invalid, flexible right
                   " #### 17\nso 18 it is"]  # strict wrong, flexible '18' right
    references = [NATALIA.answer, JANET.answer, JANET.answer, "x\n#### 19"]
    scores = data.score_gsm8k(completions, references)
    strict, flexible = scores["strict-match"], scores["flexible-extract"]
    assert strict.extracted == ["72", "18.", INVALID, "17"]
    assert strict.correct == [True, True, False, False]
    assert flexible.extracted == ["72", "18.", "$18", "18"]
    assert flexible.correct == [True, True, True, False]
    # strict: mean 1/2, sample variance 4 * (1/2)^2 / 3 = 1/3, stderr sqrt(1/3) / 2
    assert strict.accuracy == 0.5 and strict.stderr == pytest.approx(0.28867513459481287, rel=1e-15)
    # flexible: mean 3/4, sample variance (3 * (1/4)^2 + (3/4)^2) / 3 = 1/4, stderr 1/2 / 2
    assert flexible.accuracy == 0.75 and flexible.stderr == pytest.approx(0.25, rel=1e-15)


def test_score_cot_format():
    completions = ["24 + 48 = 72\n<|answer|>\n72\n",
                   "so 18 dollars\n<|answer|>\n$18.",
                   "she makes 18 dollars",  # no <|answer|>: strict invalid, flexible reads the 18
                   "9 * 2 = 18\n<|answer|>\n18 dollars"]  # the answer text is not only the number
    scores = data.score_gsm8k(completions, [NATALIA.answer, JANET.answer, JANET.answer, JANET.answer], "cot")
    assert scores["strict-match"].extracted == ["72", "$18.", INVALID, "18 dollars"]
    assert scores["strict-match"].correct == [True, True, False, False]
    assert scores["flexible-extract"].correct == [True, True, True, True]
    assert scores["flexible-extract"].stderr == 0.0


@pytest.mark.parametrize("seed", range(10))
def test_stderr_is_sample_std_over_sqrt_n(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 60)
    right = [rng.random() < rng.random() for _ in range(n)]
    completions = [f"#### {1 if r else 2}" for r in right]
    score = data.score_gsm8k(completions, ["#### 1"] * n)["strict-match"]
    assert score.accuracy == sum(right) / n
    assert score.stderr == pytest.approx(statistics.stdev(map(float, right)) / math.sqrt(n), abs=1e-15)
    assert score.stderr == pytest.approx(np.std(right, ddof=1) / np.sqrt(n), abs=1e-15)


def test_score_errors_and_single_example():
    assert data.score_gsm8k(["#### 72"], [NATALIA.answer])["strict-match"].stderr is None  # harness: N/A
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        data.score_gsm8k(["a", "b"], [NATALIA.answer])
    with pytest.raises(ValueError, match="no completions"):
        data.score_gsm8k([], [])
    with pytest.raises(ValueError, match="unknown GSM8K format"):
        data.score_gsm8k(["a"], [NATALIA.answer], "chat")


# ----------------------------------------------------------------------------- reading

def test_read_round_trip(tmp_path):
    rows = [{"question": NATALIA.question + " ", "answer": NATALIA.answer}, {"question": JANET.question,
                                                                             "answer": JANET.answer}]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1], ensure_ascii=False)])
    problems = data.read_gsm8k(path)
    assert problems == [GSM8KProblem(NATALIA.question + " ", NATALIA.answer), JANET]  # verbatim, blank skipped


@pytest.mark.parametrize("lines,message", [
    (['{"question": "q", "answer": "#### 1"}', '{"question": "q", '], r"gsm8k.jsonl:2: malformed JSON"),
    (['["q", "#### 1"]'], r"gsm8k.jsonl:1: the row is a JSON array, expected an object with question and"),
    (['{"question": "q"}'], r":1: field 'answer' must be a non-empty string, got missing"),
    (['{"question": 5, "answer": "#### 5"}'], r":1: field 'question' must be a non-empty string, got int 5"),
    (['{"question": "  ", "answer": "#### 5"}'], r":1: field 'question' must be a non-empty string"),
    (['{"question": "q", "answer": "it is 5"}'], r":1: field 'answer' has no '#### ' final answer"),
    ([""], r"gsm8k.jsonl: no rows"),
])
def test_read_errors(tmp_path, lines, message):
    with pytest.raises(data.DataError, match=message):
        data.read_gsm8k(write_jsonl(tmp_path / "gsm8k.jsonl", lines))


def test_read_missing_and_binary(tmp_path):
    with pytest.raises(data.DataError, match="nope.jsonl: no such file"):
        data.read_gsm8k(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(data.DataError, match="bad.jsonl: not UTF-8"):
        data.read_gsm8k(bad)
