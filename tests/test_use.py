"""The commands that use a trained model: GSM8K evaluation (pipeline and score arithmetic), chat history, generate,
and their answers to bad input (one `error:` line, a non-zero exit, nothing run).

The scripted completions give a known accuracy, so the arithmetic of the score is checked without a model; the
end-to-end runs use the tiny StableLM fixture (its vocabulary grown for the embedded tokenizer; context 128 tokens)
through the CLI. ARC has its own module, test_arc.py.
"""
import io
import re
import subprocess
import sys

import pytest
import torch

import model as M
import remask
from conftest import ROOT, read_jsonl, run_cli, save_tiny_model, write_jsonl
from data import GSM8K_STOP, GSM8KProblem, chat_prompt, cot_prompt, embedded_tokenizer, gsm8k_prompts, score_gsm8k
from remask import chat_loop, completion_text, evaluate_gsm8k, greedy_completions, load_for_inference

TRAIN = [GSM8KProblem(f"What is {i} + {i}?", f"{i} + {i} = {2 * i}\n#### {2 * i}") for i in range(1, 8)]
TEST = [GSM8KProblem("Tom has 3 apples and buys 4. How many?", "3 + 4 = <<3+4=7>>7\n#### 7"),
        GSM8KProblem("A box holds 1,200 pens; 200 are sold. How many are left?", "1200 - 200 = 1000\n#### 1,000"),
        GSM8KProblem("It is -2 degrees and drops 3. What is it now?", "-2 - 3 = -5\n#### -5")]


def as_gsm8k_rows(problems):
    """GSM8K problems as rows of the dataset's schema (question, answer)."""
    return [{"question": p.question, "answer": p.answer} for p in problems]


def scripted(completions):
    """A stand-in for the model: returns fixed completions and records what it was asked."""
    asked = []

    def complete(prompts, stop_strings):
        asked.append((list(prompts), stop_strings))
        return completions[:len(prompts)]
    return complete, asked


def test_gsm8k_score_of_a_scripted_model():
    """Row 0 strict and flexible right; row 1 only flexible right ('1000.' after no '####'); row 2 both wrong."""
    complete, asked = scripted(["3 + 4 = 7\n#### 7", "So the answer is $1,000.", "#### 5 degrees, or -6"])
    scores, rows = evaluate_gsm8k(complete, TEST, TRAIN, "harness")
    assert asked == [(gsm8k_prompts(TEST, TRAIN, "harness"), GSM8K_STOP["harness"])]
    strict, flexible = scores["strict-match"], scores["flexible-extract"]
    assert strict.correct == [True, False, False] and flexible.correct == [True, True, False]
    assert strict.accuracy == pytest.approx(1 / 3) and flexible.accuracy == pytest.approx(2 / 3)
    # stderr = sample std / sqrt(n): for 1/3 of 3, sqrt(((2/3)^2 + 2 (1/3)^2) / 2) / sqrt(3) = 1/3
    assert strict.stderr == pytest.approx(1 / 3) and flexible.stderr == pytest.approx(1 / 3)
    assert [r["strict-match"] for r in rows] == ["7", "[invalid]", "5"]
    assert [r["flexible-extract_correct"] for r in rows] == [True, True, False]
    assert rows[1]["prompt"].endswith(f"Question: {TEST[1].question}\nAnswer:")


def test_gsm8k_limit_and_cot_format():
    complete, asked = scripted(["7+... \n<|answer|>\n7\n", "<|answer|>\n999"])
    scores, rows = evaluate_gsm8k(complete, TEST, None, "cot", limit=2)
    assert asked[0] == ([cot_prompt(p.question) for p in TEST[:2]], GSM8K_STOP["cot"])
    assert scores["strict-match"].correct == [True, False] and len(rows) == 2


@pytest.mark.parametrize("generated, harness_strict, cot_strict", [
    # the harness decodes with skip_special_tokens=True: a tag inside the answer vanishes from its text
    (" #### 1<|answer|>2", "12", "2"),
    (" ####<|answer|> 5", "5", "5"),
    ("<|rationale|>3 + 4 = 7\n#### 7", "7", "[invalid]"),
    (" #### 7\n<|answer|>\n8\n<|user|>\nQuestion: next", "7", "8"),
])
def test_generated_tags_are_decoded_as_each_format_reads_them(neox, generated, harness_strict, cot_strict):
    """Generated ids (tags are single special ids of the GPT-NeoX tokenizer with the ReMask tags), then
    <|endoftext|>: the harness format scores the text without tags, the CoT format keeps them to find the answer."""
    ids = neox.encode(generated) + [neox.eos_id, *neox.encode(" #### 99")]  # nothing after <|endoftext|> counts
    assert neox.user_id in ids or neox.answer_id in ids or neox.rationale_id in ids
    harness = completion_text(neox, ids, (neox.eos_id,), GSM8K_STOP["harness"], skip_special_tokens=True)
    cot = completion_text(neox, ids, (neox.user_id, neox.eos_id), GSM8K_STOP["cot"])
    reference = "1 + 1 = 2\n#### " + harness_strict
    assert score_gsm8k([harness], [reference], "harness")["strict-match"].extracted == [harness_strict]
    assert score_gsm8k([cot], ["#### " + cot_strict], "cot")["strict-match"].extracted == [cot_strict]


def test_chat_keeps_history_in_the_chat_format_and_resets():
    lines = iter(["hello", "", "how are you?", "/reset", "again", "/exit", "never read"])
    prompts = []

    def respond(prompt):
        prompts.append(prompt)
        return f"reply {len(prompts)}"

    history = chat_loop(respond, read_line=lambda _: next(lines), write=lambda *a: None)
    assert prompts == [chat_prompt([], "hello"),
                       "<|user|>\nhello\n<|assistant|>\nreply 1\n<|user|>\nhow are you?\n<|assistant|>\n",
                       chat_prompt([], "again")]
    assert history == [("again", "reply 3")]


def test_chat_goes_on_after_undecodable_lines_and_refused_turns():
    """A strict UTF-8 terminal raises while decoding; a surrogateescape one hands the bytes over as surrogates.
    A turn the model cannot take (respond raises ValueError: the conversation outgrew the context) is not kept."""
    lines = iter(["hello", "undecodable", "caf\udcc3", "too long", "again"])
    notes, asked = [], []

    def read_line(_):
        line = next(lines, None)
        if line is None:
            raise EOFError
        if line == "undecodable":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return line

    def respond(prompt):
        asked.append(prompt)
        if "too long" in prompt:
            raise ValueError("the prompt is 130 tokens and --max-new-tokens 5: 135 tokens do not fit")
        return "ok"

    history = chat_loop(respond, read_line=read_line, write=lambda *a, **k: notes.append(" ".join(map(str, a))))
    assert history == [("hello", "ok"), ("again", "ok")]
    assert sum("not valid UTF-8" in n for n in notes) == 2 and any("not answered: the prompt is 130" in n
                                                                    for n in notes)
    assert len(asked) == 3 and "caf" not in "".join(asked)


def test_chat_ends_at_end_of_input():
    def read_line(_):
        raise EOFError
    assert chat_loop(lambda p: "x", read_line=read_line, write=lambda *a: None) == []


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The stablelm-tiny fixture with its vocabulary grown to the embedded tokenizer's, saved with it."""
    path = tmp_path_factory.mktemp("tiny")
    tok = embedded_tokenizer(tmp_path_factory.mktemp("cache"))
    return save_tiny_model(tok, path / "model")


def test_eval_command_end_to_end(tiny_model_dir, tmp_path, capsys):
    for name, rows in (("test", TEST), ("train", TRAIN)):
        write_jsonl(tmp_path / f"{name}.jsonl", as_gsm8k_rows(rows))
    out = tmp_path / "results.jsonl"
    assert remask.main(["eval", "gsm8k", "--model", str(tiny_model_dir), "--data", str(tmp_path / "test.jsonl"),
                        "--fewshot-data", str(tmp_path / "train.jsonl"), "--max-new-tokens", "6", "--batch-size", "2",
                        "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rows = read_jsonl(out)
    assert len(rows) == 3 and [r["reference"] for r in rows] == [p.answer for p in TEST]
    for name in ("strict-match", "flexible-extract"):
        accuracy = sum(r[f"{name}_correct"] for r in rows) / 3
        assert f"{name}: {accuracy:.4f}" in printed
    assert rows[0]["prompt"] == gsm8k_prompts(TEST, TRAIN, "harness")[0]


def test_generate_and_chat_commands_run(tiny_model_dir, capsys, monkeypatch):
    assert remask.main(["generate", "--model", str(tiny_model_dir), "--prompt", "What is 2+2?", "--max-new-tokens",
                        "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(chat_prompt([], "What is 2+2?"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset\nhello\n/exit\n"))
    assert remask.main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("you> ") == 4


def test_compiled_decoding_gives_the_same_completions(tiny_model_dir, monkeypatch):
    """--compile: the same GSM8K completions (stop strings, a short last batch) through the compiled decode step;
    the eager backend keeps this fast on a CPU (test_model.py runs inductor with CUDA graphs on a GPU)."""
    step = torch.compile(M.decode_step, backend="eager", fullgraph=True)
    monkeypatch.setattr(M, "_compiled_decode_step", lambda: step)
    tok, model, device = load_for_inference(tiny_model_dir, "cpu")
    prompts = gsm8k_prompts(TEST, TRAIN, "harness")
    completions = [greedy_completions(model, tok, prompts, 8, device, batch_size=2, stop_ids=(tok.eos_id,),
                                      stop_strings=GSM8K_STOP["harness"], compile=compile) for compile in (False, True)]
    assert completions[0] == completions[1] and len(completions[0]) == 3


def test_eval_command_errors_clearly(tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, as_gsm8k_rows(TEST[:1]))
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "no final answer"}\n')
    cases = [(("--model", tiny_model_dir, "--data", good), "--fewshot-data"),
             (("--model", tiny_model_dir, "--data", tmp_path / "missing.jsonl", "--format", "cot"), "missing.jsonl"),
             (("--model", tiny_model_dir, "--data", tmp_path / "bad.jsonl", "--format", "cot"), "bad.jsonl:1"),
             (("--model", tmp_path / "nowhere", "--data", good, "--format", "cot"), "nowhere")]
    for args, message in cases:
        code, _, said = run_cli(remask.main, ["eval", "gsm8k", *args], capsys)
        assert code == 1 and said.startswith("error: ") and message in said, said


# ----------------------------------------------------------------------------- bad input: one line, non-zero exit

BAD_INPUT = [  # (command and flags after --model DIR, what the one error line must say)
    (["generate", "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, got -5"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "100000"], "do not fit the model's context of 128"),
    (["generate", "--prompt", "hi", "--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["generate", "--prompt", "hi", "--top-k", "-3"], "--top-k must be at least 1, got -3"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["generate", "--prompt", "7 + 8 = 15. " * 60, "--max-new-tokens", "5"],
     "tokens and --max-new-tokens 5: .* tokens do not fit the model's context of 128"),
    (["generate", "--prompt", "caf\udcc3"], "--prompt is not valid UTF-8 text"),
    (["chat", "--max-new-tokens", "128"], "--max-new-tokens 128 leaves no room for a message"),
    (["chat", "--top-k", "0"], "--top-k must be at least 1"),
    (["eval", "gsm8k", "--limit", "0", "FEWSHOT"], "--limit must be at least 1, got 0"),
    (["eval", "gsm8k", "--limit", "-3", "FEWSHOT"], "--limit must be at least 1, got -3"),
    (["eval", "gsm8k", "--batch-size", "0", "FEWSHOT"], "--batch-size must be at least 1, got 0"),
    (["eval", "gsm8k", "--max-new-tokens", "0", "FEWSHOT"], "--max-new-tokens must be at least 1"),
    (["eval", "gsm8k", "--max-new-tokens", "128", "FEWSHOT"], "--max-new-tokens 128 leaves no room for a prompt"),
    (["eval", "gsm8k", "--output", "TMP", "FEWSHOT"], "--output .*: is a directory"),
    (["eval", "gsm8k", "--output", "TMP/test.jsonl/out.jsonl", "FEWSHOT"], "test.jsonl is a file, not a directory"),
    (["eval", "gsm8k"], "eval gsm8k needs --fewshot-data"),
    (["eval", "arc"], "eval arc needs --fewshot-data"),
    (["eval", "arc-easy", "--format", "cot"], "--format cot is for gsm8k only"),
    (["eval", "arc", "FEWSHOT"], "test.jsonl:1: field 'id' must be a non-empty string"),  # GSM8K rows as ARC
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a[:3]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_error_line(tiny_model_dir, tmp_path, capsys, args, message):
    data_file, fewshot_file = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    write_jsonl(data_file, as_gsm8k_rows(TEST))
    write_jsonl(fewshot_file, as_gsm8k_rows(TEST))
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    if "FEWSHOT" in args:
        args[args.index("FEWSHOT"):] = ["--fewshot-data", str(fewshot_file)]
    if args[0] == "eval":
        args += ["--data", str(data_file)]
    before = sorted(tmp_path.rglob("*"))
    code, _, said = run_cli(remask.main, [*args, "--model", tiny_model_dir, "--device", "cpu"], capsys)
    assert code != 0 and said.startswith("error: ") and "\n" not in said.strip(), said
    assert re.search(message, said), said
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_chat_says_so_for_undecodable_bytes_and_goes_on(tiny_model_dir):
    """Bytes that are not UTF-8 typed into chat (the default stdin hands them over as surrogates)."""
    run = subprocess.run([sys.executable, str(ROOT / "remask.py"), "chat", "--model", str(tiny_model_dir),
                          "--max-new-tokens", "3", "--device", "cpu"], capture_output=True, timeout=120, cwd=ROOT,
                         input=b"caf\xc3\n\xff\xfe\nhello\n/exit\n")
    out, err = run.stdout.decode("utf-8", "replace"), run.stderr.decode("utf-8", "replace")
    assert run.returncode == 0 and "Traceback" not in err, err
    assert out.count("not valid UTF-8") == 2 and out.count("you> ") == 4


def test_gsm8k_prompts_longer_than_the_context_are_cut_on_the_left(tiny_model_dir, tmp_path, capsys):
    """As HFLM.generate_until: the prompt keeps its last (context - max_new_tokens) tokens; the run says so."""
    for name, rows in (("test", TEST), ("train", TRAIN)):
        write_jsonl(tmp_path / f"{name}.jsonl", as_gsm8k_rows(rows))
    assert remask.main(["eval", "gsm8k", "--model", str(tiny_model_dir), "--data", str(tmp_path / "test.jsonl"),
                        "--fewshot-data", str(tmp_path / "train.jsonl"), "--max-new-tokens", "4", "--output",
                        str(tmp_path / "out.jsonl"), "--device", "cpu"]) == 0
    said = capsys.readouterr().err
    assert "3 of 3 prompts exceed 124 tokens (the model's context less --max-new-tokens): cut on the left" in said
    tok, model, device = load_for_inference(tiny_model_dir, "cpu")
    prompt = gsm8k_prompts(TEST, TRAIN, "harness")[0]
    cut = tok.encode(prompt)[-124:]
    assert len(tok.encode(prompt)) > 124
    expected = completion_text(tok, M.generate(model, torch.tensor([cut]), 4, stop_ids=(tok.eos_id,))[0, 124:].tolist(),
                               (tok.eos_id,), GSM8K_STOP["harness"], skip_special_tokens=True)
    assert read_jsonl(tmp_path / "out.jsonl")[0]["completion"] == expected
