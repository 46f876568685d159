"""ARC-Challenge / ARC-Easy as lm-evaluation-harness scores them: prompts, the token split, acc and acc_norm,
log-likelihoods (batching, padding, left truncation), the reader, the downloader and the `eval arc` command.

Expected values are worked by hand from the harness's rules (tasks/arc/arc_easy.yaml, api/samplers.py, api/task.py,
api/metrics.py, models/huggingface.py); log-likelihoods are checked against a plain one-sequence forward pass of
the tiny StableLM fixture, computed here without batching, padding or position selection.
"""
import json
import math
import random

import pytest
import torch

import data
import remask
from conftest import STABLELM_TINY, fetch, read_jsonl, save_tiny_model, write_jsonl
from data import ARCQuestion, DataError
from model import StableLM
from remask import evaluate_arc, loglikelihood_tokens, loglikelihoods


def question(i, n_choices=4, gold=None):
    texts = [f"answer {i}.{c}" for c in range(n_choices)]
    return ARCQuestion(f"Q{i}", f"Which is right number {i}?", texts, list("ABCDE"[:n_choices]),
                       i % n_choices if gold is None else gold)


TRAIN = [question(i) for i in range(30)]
TEST = [question(100 + i, n_choices=3 + i % 3) for i in range(5)]


# ----------------------------------------------------------------------------- prompts and choices

def test_prompt_and_choice_strings_of_unseen_questions():
    q = ARCQuestion("Mercury_7", "Which  gas do plants take in?\n(Hint: air)",
                    ["oxygen ", "carbon dioxide", "Ünïcode"], ["1", "2", "3"], 1)
    assert data.arc_prompt(q) == "Question: Which  gas do plants take in?\n(Hint: air)\nAnswer:"
    assert data.arc_continuations(q) == [" oxygen ", " carbon dioxide", " Ünïcode"]  # verbatim after one space


def test_fewshot_contexts_by_hand():
    """k=2 from three training questions: random.Random(1234).sample(range(3), 2) gives [1, 0], and the same
    generator's next draw gives [0, 2]; each shot is 'Question: q\\nAnswer: <gold text>\\n\\n'."""
    train = [question(0, gold=2), question(1, gold=0), question(2, gold=1)]
    contexts = data.arc_contexts(TEST[:2], train, k=2)
    assert contexts[0] == ("Question: Which is right number 1?\nAnswer: answer 1.0\n\n"
                           "Question: Which is right number 0?\nAnswer: answer 0.2\n\n"
                           "Question: Which is right number 100?\nAnswer:")
    assert contexts[1] == ("Question: Which is right number 0?\nAnswer: answer 0.2\n\n"
                           "Question: Which is right number 2?\nAnswer: answer 2.1\n\n"
                           "Question: Which is right number 101?\nAnswer:")


def test_fewshot_contexts_share_one_generator():
    """25 distinct shots per question from one Random(1234) shared in order: a question's shots depend on its
    position (so --limit N gives the first N contexts of the full run), not on its text."""
    contexts = data.arc_contexts(TEST, TRAIN)
    assert data.arc_contexts(TEST[:2], TRAIN) == contexts[:2]
    renamed = [ARCQuestion(q.id, "other text", q.choices, q.labels, q.gold) for q in TEST]
    assert [c.rsplit("\n\n", 1)[0] for c in data.arc_contexts(renamed, TRAIN)] == \
        [c.rsplit("\n\n", 1)[0] for c in contexts]
    rnd = random.Random(1234)
    for context in contexts:
        shots = rnd.sample(TRAIN, 25)
        blocks = context.split("\n\n")
        assert len(blocks) == 26 and len(set(blocks[:25])) == 25
        assert blocks[:25] == [f"Question: {s.question}\nAnswer: {s.choices[s.gold]}" for s in shots]
    with pytest.raises(ValueError, match="25-shot contexts need at least 25"):
        data.arc_contexts(TEST, TRAIN[:24])


# ----------------------------------------------------------------------------- the token split

@pytest.mark.parametrize("context, continuation, context_tail, continuation_tokens", [
    ("Question: Which is a metal?\nAnswer:", " iron", ["Ċ", "Answer", ":"], ["Ġiron"]),
    ("Answer: ", "iron", ["Answer", ":"], ["Ġiron"]),  # the trailing space moves: ' iron', never 'Ġ' + 'iron'
    ("Answer:  ", "iron", ["Answer", ":"], ["  ", "iron"]),  # all of it (GPT-NeoX has whitespace-run tokens)
    ("Answer:\n", "x", ["Answer", ":"], ["Ċ", "x"]),  # str.rstrip: a newline is whitespace too
    ("Answer:\u00a0", "iron", ["Answer", ":"], ["Âł", "iron"]),  # and so is U+00A0
    ("The cat", "s are", ["The", "Ġcat"], ["Ġare"]),  # split by token count: ' cats' took the 's'
    ("Question: Café?\nAnswer:", " 東京 😀", ["Ċ", "Answer", ":"],
     ["Ġ", "æĿ", "±", "äº", "¬", "ĠðŁĺ", "Ģ"]),  # byte-level pieces of multi-byte characters
    ("", " iron", ["<|endoftext|>"], ["Ġiron"]),  # an empty context conditions on <|endoftext|>
])
def test_context_continuation_token_split(neox, context, continuation, context_tail, continuation_tokens):
    context_ids, continuation_ids = data.encode_pair(neox, context, continuation)
    assert [neox.tk.id_to_token(i) for i in context_ids[-3:]] == context_tail
    assert [neox.tk.id_to_token(i) for i in continuation_ids] == continuation_tokens
    if context:
        assert context_ids == neox.encode(context.rstrip())


# ----------------------------------------------------------------------------- acc and acc_norm

def test_acc_and_acc_norm_disagree_by_hand():
    """acc takes the largest log-likelihood, acc_norm the largest per character of the choice text (the leading
    space not counted). Log-likelihoods are negative, so a long choice wins acc_norm with a lower total."""
    questions = [
        # short right answer (-4 over 5 chars = -0.8/char) vs a long wrong one (-6 over 30 = -0.2/char)
        ARCQuestion("a", "q", ["right", "a very long wrong answer here."], ["A", "B"], 0),
        # a short wrong answer with the higher total (-2 / 2 = -1.0) vs a long right one (-3 / 20 = -0.15)
        ARCQuestion("b", "q", ["no", "a long right answer."], ["A", "B"], 1),
        # characters, not bytes: 'ééééé' is 5 long (10 UTF-8 bytes): -5/5 = -1.0 beats -7.5/6 = -1.25
        ARCQuestion("c", "q", ["ééééé", "abcdef"], ["A", "B"], 0),
        # equal values: np.argmax takes the first
        ARCQuestion("d", "q", ["xx", "yy", "zz"], ["1", "2", "3"], 1),
    ]
    lls = [[-4.0, -6.0], [-2.0, -3.0], [-5.0, -7.5], [-1.0, -1.0, -1.0]]
    assert len("a very long wrong answer here.") == 30 and len("a long right answer.") == 20
    scores = data.score_arc(lls, questions)
    assert scores["acc"].predictions == [0, 0, 0, 0] and scores["acc_norm"].predictions == [1, 1, 0, 0]
    assert scores["acc"].correct == [True, False, True, False]
    assert scores["acc_norm"].correct == [False, True, True, False]
    # mean 0.5 of four: sample std sqrt(4 * 0.25 / 3), over sqrt(4)
    for name in ("acc", "acc_norm"):
        assert scores[name].accuracy == 0.5 and scores[name].stderr == pytest.approx(math.sqrt(1 / 3) / 2)
    one = data.score_arc([[-1.0, -2.0]], questions[:1])
    assert one["acc"].accuracy == 1.0 and one["acc"].stderr is None
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 choices"):
        data.score_arc([[-1.0, -2.0]], questions[3:])


def test_evaluate_arc_with_a_scripted_model():
    """evaluate_arc sends one (context, ' ' + text) request per choice, in order, and regroups the answers."""
    asked = []

    def loglikelihood(requests):
        asked.extend(requests)
        return [(-float(len(cont)) - i, i % 2 == 0) for i, (_, cont) in enumerate(requests)]  # the first wins

    scores, rows = evaluate_arc(loglikelihood, TEST, TRAIN, limit=3)
    contexts = data.arc_contexts(TEST[:3], TRAIN)
    assert asked == [(c, " " + t) for c, q in zip(contexts, TEST[:3]) for t in q.choices]
    assert [r["prompt"] for r in rows] == contexts and [r["gold"] for r in rows] == [q.gold for q in TEST[:3]]
    # ' answer 100.0' is 13 characters; the requests of question 1 are numbers 3 to 6
    assert rows[0]["loglikelihoods"] == [-13.0, -14.0, -15.0] and rows[0]["greedy"] == [True, False, True]
    assert rows[1]["loglikelihoods"] == [-16.0, -17.0, -18.0, -19.0] and rows[1]["greedy"] == [False, True] * 2
    assert [r["prediction"] for r in rows] == [0, 0, 0] == [r["prediction_norm"] for r in rows]
    assert scores["acc"].accuracy == sum(q.gold == 0 for q in TEST[:3]) / 3
    with pytest.raises(ValueError, match="--limit must be at least 1, got 0"):
        evaluate_arc(loglikelihood, TEST, TRAIN, limit=0)


# ----------------------------------------------------------------------------- log-likelihoods on the tiny model

@pytest.fixture(scope="module")
def tiny_model():
    """The stablelm-tiny fixture in eval mode."""
    torch.manual_seed(0)
    return StableLM.from_pretrained(STABLELM_TINY).eval()


def reference_loglikelihood(model, context, continuation, max_length):
    """One unpadded sequence through the whole model, the straightforward way."""
    ids = (context + continuation)[-(max_length + 1):]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)  # (T, V)
    picked = logprobs[-len(continuation):].gather(-1, torch.tensor(continuation)[:, None])
    greedy = logprobs[-len(continuation):].argmax(-1).tolist() == continuation
    return picked.sum().item(), greedy


def test_loglikelihoods_match_a_plain_forward_pass_in_any_batch(tiny_model):
    """Random pairs of varied lengths (some longer than max_length, so their contexts are cut on the left):
    batch sizes 1, 3 and 8 give the same values to 2e-5 (float32; only the padded length of the matrices differs),
    and each equals an unbatched forward pass of the cut sequence."""
    rnd = random.Random(0)
    pairs = [([rnd.randrange(320) for _ in range(rnd.randint(1, 60))],
              [rnd.randrange(320) for _ in range(rnd.randint(1, 6))]) for _ in range(11)]
    pairs.append(([5] * 80, [7, 8, 9]))  # longer than max_length 48: cut on the left
    results = {bs: loglikelihood_tokens(tiny_model, pairs, torch.device("cpu"), batch_size=bs, max_length=48)
               for bs in (1, 3, 8)}
    for bs in (3, 8):
        assert [g for _, g in results[bs]] == [g for _, g in results[1]]
        assert [ll for ll, _ in results[bs]] == pytest.approx([ll for ll, _ in results[1]], abs=2e-5)
    for (context, continuation), (ll, greedy) in zip(pairs, results[8]):
        expected, expected_greedy = reference_loglikelihood(tiny_model, context, continuation, 48)
        assert ll == pytest.approx(expected, abs=2e-5) and greedy == expected_greedy
        assert ll < 0


def test_greedy_flag_and_request_checks(tiny_model):
    context = [11, 12, 13]
    ids = torch.tensor([context])
    with torch.no_grad():
        for _ in range(3):  # the model's own greedy continuation
            ids = torch.cat([ids, tiny_model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    greedy_continuation = ids[0, 3:].tolist()
    other = [(greedy_continuation[0] + 1) % 320] + greedy_continuation[1:]
    results = loglikelihood_tokens(tiny_model, [(context, greedy_continuation), (context, other)], torch.device("cpu"))
    assert [g for _, g in results] == [True, False] and results[0][0] > results[1][0]
    with pytest.raises(ValueError, match="1 to 128 continuation tokens, got 3 and 0"):
        loglikelihood_tokens(tiny_model, [(context, [])], torch.device("cpu"))


# ----------------------------------------------------------------------------- reader and downloader

def arc_row(i, n_choices=4, key=None):
    labels = list("ABCDE"[:n_choices])
    return {"id": f"Mercury_{i}", "question": f"Question text {i} – ünïcode\u2028line",
            "choices": {"text": [f"choice {c} of {i}" for c in range(n_choices)], "label": labels},
            "answerKey": key or labels[i % n_choices]}


def test_read_arc(tmp_path):
    rows = [arc_row(0), arc_row(1, 3), {**arc_row(2, 5), "answerKey": "E"},
            {**arc_row(3), "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"}]
    questions = data.read_arc(write_jsonl(tmp_path / "arc.jsonl", rows))
    assert [q.gold for q in questions] == [0, 1, 4, 2] and [len(q.choices) for q in questions] == [4, 3, 5, 4]
    assert questions[0].question == "Question text 0 – ünïcode\u2028line"  # U+2028 inside a string is no line end
    assert questions[1].choices == ["choice 0 of 1", "choice 1 of 1", "choice 2 of 1"]


@pytest.mark.parametrize("line, message", [
    ('{"id": "x", "question": "q"', "malformed JSON"),
    ('["x"]', "the row is a JSON array, expected an object"),
    (json.dumps({**arc_row(0), "answerKey": "F"}), "answerKey 'F' is not among the choice labels"),
    (json.dumps({**arc_row(0), "question": ""}), "field 'question' must be a non-empty string"),
    (json.dumps({k: v for k, v in arc_row(0).items() if k != "answerKey"}), "field 'answerKey'"),
    (json.dumps({**arc_row(0), "choices": ["a", "b"]}), "field 'choices' must be an object"),
    (json.dumps({**arc_row(0), "choices": {"text": ["a", "b"], "label": ["A"]}}), "2 texts and 1 labels"),
    (json.dumps({**arc_row(0), "choices": {"text": ["a", ""], "label": ["A", "B"]}}), "choice 1 text"),
    (json.dumps({**arc_row(0), "choices": {"text": ["a", "b"], "label": ["A", "A"]}}), "labels repeat"),
])
def test_read_arc_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(arc_row(0)) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        data.read_arc(path)


def test_read_arc_file_errors(tmp_path):
    for path, message in ((tmp_path / "missing.jsonl", "no such file"), (tmp_path, "a directory"),
                          (write_jsonl(tmp_path / "empty.jsonl", []), "no rows")):
        with pytest.raises(DataError, match=message):
            data.read_arc(path)


def test_download_arc_both_configs_all_splits(viewer, tmp_path):
    tables = {(config, split): [arc_row(i) for i in range(n)]
              for config, n in (("ARC-Challenge", 130), ("ARC-Easy", 7)) for split in ("train", "validation", "test")}
    for (config, split), rows in tables.items():
        viewer.tables[("allenai/ai2_arc", config, split)] = rows
    paths, _ = fetch(viewer, "arc", tmp_path)
    assert [p.name for p in paths] == [f"ARC-{level}-{split}.jsonl" for level in ("Challenge", "Easy")
                                       for split in ("train", "validation", "test")]
    written = (tmp_path / "ARC-Challenge-test.jsonl").read_text(encoding="utf-8").split("\n")  # U+2028 stays inside
    assert [json.loads(line) for line in written if line] == tables[("ARC-Challenge", "test")]  # two pages
    assert len(data.read_arc(tmp_path / "ARC-Easy-validation.jsonl")) == 7
    assert {q["config"] for q in viewer.requests} == {"ARC-Challenge", "ARC-Easy"}


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def neox_model_dir(tmp_path_factory, neox):
    """The tiny StableLM with its vocabulary grown to the GPT-NeoX tokenizer's (context 128 tokens)."""
    return save_tiny_model(neox, tmp_path_factory.mktemp("neox-tiny") / "model")


def test_eval_arc_command_end_to_end(neox_model_dir, neox, tmp_path, capsys):
    """Four questions of 3, 4, 5 and 3 choices; 25-shot contexts (far beyond the 128-token context: cut on the
    left) in batches of 4, against the log-likelihoods computed here one request at a time."""
    train = write_jsonl(tmp_path / "train.jsonl", [arc_row(i) for i in range(30)])
    test = write_jsonl(tmp_path / "test.jsonl", [arc_row(100 + i, 3 + i % 3) for i in range(5)])
    out = tmp_path / "arc.jsonl"
    assert remask.main(["eval", "arc", "--model", str(neox_model_dir), "--data", str(test), "--fewshot-data",
                        str(train), "--batch-size", "4", "--limit", "4", "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "15 of 15 requests exceed the model's context of 128 tokens" in printed.err
    rows = read_jsonl(out)
    questions, shots = data.read_arc(test)[:4], data.read_arc(train)
    assert [r["prompt"] for r in rows] == data.arc_contexts(questions, shots)
    model = StableLM.from_pretrained(neox_model_dir).eval()
    requests = [(r["prompt"], " " + text) for r, q in zip(rows, questions) for text in q.choices]
    expected = loglikelihoods(model, neox, requests, torch.device("cpu"), batch_size=1)
    assert [ll for r in rows for ll in r["loglikelihoods"]] == pytest.approx([ll for ll, _ in expected], abs=2e-5)
    for name in ("acc", "acc_norm"):
        accuracy = sum(r[name] for r in rows) / 4
        assert f"{name}: {accuracy:.4f} ± " in printed.out
    assert "ARC-Challenge (25-shot, 4 questions" in printed.out
