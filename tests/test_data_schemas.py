"""data.py readers for the common fine-tuning schemas (messages, ShareGPT, alpaca, prompt/completion, CoT), the
system-turn convention, rows beyond what JSON readers take, `data.py check`, and held-out files.

Rows are written as the tools that define each schema write them (TRL and datasets' to_json: JSON Lines; FastChat's
ShareGPT and the alpaca release: an indented JSON array). A seeded property test draws random rows of every schema
and checks that the labels are exactly the reply/rationale/answer text and that answers are never masked."""
import json
import random

import pytest

import data
from conftest import FIXTURES

NEOX = FIXTURES / "gpt-neox-20b-tokenizer"
U, A = "<|user|>", "<|assistant|>"


@pytest.fixture(scope="module")
def neox():
    return data.load_tokenizer(NEOX)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return data.embedded_tokenizer(tmp_path_factory.mktemp("cache"))


def write_jsonl(path, rows, ensure_ascii=True):
    """One line per row: a str is written as it is (a raw line), anything else as JSON."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=ensure_ascii) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_array(path, rows, indent):
    path.write_text(json.dumps(rows, indent=indent, ensure_ascii=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- each schema as its tools write it

def test_each_schema_reads_as_the_card_formats_it(tmp_path):
    messages = [  # TRL's conversational rows, a system message first; axolotl's top-level system
        {"messages": [{"role": "system", "content": "Answer in French. "},
                      {"role": "user", "content": "Say «cat» 😀"}, {"role": "assistant", "content": "chat"},
                      {"role": "user", "content": "And dog?"}, {"role": "assistant", "content": "chien\u2028!"}]},
        {"system": "Be brief.", "messages": [{"role": "user", "content": "漢字?"},
                                             {"role": "assistant", "content": "Chinese characters."}]},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},  # an empty system message is none
    ]
    sharegpt = [  # FastChat: a JSON array of rows with an id
        {"id": "identity_0", "conversations": [{"from": "system", "value": "You are helpful."},
                                               {"from": "human", "value": "Who are you?"},
                                               {"from": "gpt", "value": "An assistant."}]},
        {"id": "identity_1", "conversations": [{"from": "user", "value": "2+2?"},
                                               {"from": "assistant", "value": "4"}]},
    ]
    alpaca = [  # tatsu-lab/stanford_alpaca's alpaca_data.json: input is "" when the instruction stands alone
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well.\nSleep.\nMove."},
        {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen"},
    ]
    completion = [{"prompt": "The sky is", "completion": " blue."}]  # TRL's standard prompt-completion
    cot = [{"prompt": "What is 6*7?", "rationale": "6*7 = 42.", "answer": "42", "source": "x"}]
    files = [write_jsonl(tmp_path / "messages.jsonl", messages, ensure_ascii=False),
             write_array(tmp_path / "sharegpt.json", sharegpt, indent=2),
             write_array(tmp_path / "alpaca_data.json", alpaca, indent=4),
             write_jsonl(tmp_path / "completion.jsonl", completion),
             write_jsonl(tmp_path / "cot.jsonl", cot)]
    rows = [row for path in files for row in data.parse_rows(path)]
    assert [name for _, name, _ in rows] == ["messages"] * 3 + ["ShareGPT"] * 2 + ["alpaca"] * 2 + \
        ["prompt/completion", "CoT"]
    assert [where.split("/")[-1] for where, _, _ in rows] == [
        "messages.jsonl:1", "messages.jsonl:2", "messages.jsonl:3", "sharegpt.json[item 0]", "sharegpt.json[item 1]",
        "alpaca_data.json[item 0]", "alpaca_data.json[item 1]", "completion.jsonl:1", "cot.jsonl:1"]
    assert [data.format_record(record) for _, _, record in rows] == [
        f"{U}\nAnswer in French.\n\nSay «cat» 😀\n{A}\nchat\n{U}\nAnd dog?\n{A}\nchien\u2028!\n{U}",
        f"{U}\nBe brief.\n\n漢字?\n{A}\nChinese characters.\n{U}",
        f"{U}\nHi\n{A}\nHello\n{U}",
        f"{U}\nYou are helpful.\n\nWho are you?\n{A}\nAn assistant.\n{U}",
        f"{U}\n2+2?\n{A}\n4\n{U}",
        f"{U}\nGive three tips for staying healthy.\n{A}\nEat well.\nSleep.\nMove.\n{U}",
        f"{U}\nTranslate to German.\n\nGood morning\n{A}\nGuten Morgen\n{U}",
        f"{U}\nThe sky is\n{A}\nblue.\n{U}",
        f"{U}\nWhat is 6*7?\n<|rationale|>\n6*7 = 42.\n<|answer|>\n42\n{U}",
    ]
    assert rows[0][2].system == "Answer in French." and rows[2][2].system == ""


def test_role_spellings_and_missing_or_null_input_read_alike():
    turns = [("human", "user", "Hi"), ("gpt", "assistant", "Hello")]
    sharegpt = {"conversations": [{"from": spelled, "value": text} for spelled, _, text in turns]}
    spelled_as_messages = {"messages": [{"role": role, "content": text} for _, role, text in turns]}
    also = {"conversations": [{"from": role, "value": text} for _, role, text in turns]}
    assert data.parse_row(sharegpt) == data.parse_row(spelled_as_messages) == data.parse_row(also) == \
        data.ChatRecord([("Hi", "Hello")])
    alpaca = [{"instruction": "Do it.", "input": value, "output": "Done."} for value in ("", "  ", None)]
    assert [data.parse_row(row) for row in alpaca + [{"instruction": "Do it.", "output": "Done."}]] == \
        [data.ChatRecord([("Do it.", "Done.")])] * 4


def test_key_precedence():
    """The first schema whose keys a row holds wins; its other keys are extra columns."""
    cot = {"prompt": "q", "rationale": "r", "answer": "a", "completion": "c"}
    assert data.parse_row(cot) == data.CoTRecord("q", "r", "a")
    assert data.parse_row(dict(cot, target="t")) == data.CoTRecord("q", "r", "t")  # TinyCoT's target first
    chat = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "m"}],
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            "instruction": "i", "output": "o", "prompt": "p", "completion": "c"}
    assert data.parse_row(chat) == data.ChatRecord([("u", "m")])
    del chat["messages"]
    assert data.parse_row(chat) == data.ChatRecord([("x", "y")])
    del chat["conversations"]
    assert data.parse_row(chat) == data.ChatRecord([("i", "o")])
    del chat["output"]
    assert data.parse_row(chat) == data.ChatRecord([("p", "c")])


# ----------------------------------------------------------------------------- the system turn

def test_system_turn_is_prompt_in_training_and_chat_prompt(neox):
    record = data.parse_row({"system": "  Be brief. ", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]})
    assert record == data.ChatRecord([("Hi", "Hello"), ("Bye", "Ciao")], "Be brief.")
    assert data.chat_prompt([], " Hi ", " Be brief.\n") == f"{U}\nBe brief.\n\nHi\n{A}\n"
    assert data.chat_prompt([("Hi", "Hello")], "Bye", "Be brief.") == \
        f"{U}\nBe brief.\n\nHi\n{A}\nHello\n{U}\nBye\n{A}\n"
    assert data.chat_prompt([], "Hi", "  ") == data.chat_prompt([], "Hi") == f"{U}\nHi\n{A}\n"
    ex = data.encode(record, neox)
    first_reply = ex.targets.nonzero()[0].item()
    assert neox.decode(ex.ids[:first_reply].tolist()) == f"{U}\nBe brief.\n\nHi\n{A}\n"
    assert set(ex.roles[:first_reply].tolist()) == {data.TAG, data.PROMPT}


@pytest.mark.parametrize("seed", range(3))
def test_chat_prompt_with_a_system_message_is_a_token_prefix(neox, small, seed):
    """What `remask.py chat --system` feeds tokenizes to a prefix of the training example: use and training agree."""
    rng = random.Random(seed)
    for tok in (neox, small):
        for _ in range(20):
            record = data.ChatRecord([(random_text(rng), random_text(rng)) for _ in range(rng.randint(1, 3))],
                                     random_text(rng))
            prompt = data.chat_prompt(record.turns[:-1], record.turns[-1][0], record.system)
            ex = data.encode(record, tok)
            p = tok.encode(prompt)
            assert ex.ids[:len(p)].tolist() == p and ex.targets[len(p):].all()


# ----------------------------------------------------------------------------- bad rows

TURN = {"role": "user", "content": "u"}
REPLY = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("row,message", [
    ({"instruction": "i", "input": "x"}, r"unknown schema \(keys \['input', 'instruction'\]\); expected messages"),
    ({f"k{i:02}": i for i in range(15)}, r"unknown schema \(keys \['k00', .*'k11', \.\.\. 3 more\]\)"),
    ({"text": "The sky is blue."}, r"unknown schema \(keys \['text'\]\)"),  # TRL's language modeling rows
    ({"instruction": "i", "output": None}, "missing field 'output'"),
    ({"instruction": "i", "input": 3, "output": "o"}, "field 'input' must be a string, got int"),
    ({"instruction": " ", "output": "o"}, "field 'instruction' is empty"),
    ({"prompt": "p", "completion": "  "}, "field 'completion' is empty"),
    ({"prompt": [TURN], "completion": [REPLY]}, "field 'prompt' must be a string, got list"),  # TRL conversational
    ({"prompt": "p", "rationale": "r", "answer": 42}, "field 'answer' must be a string, got int"),
    ({"prompt": "p", "completion": "c <|assistant|>"}, r"field 'completion' contains the reserved token <\|assistant"),
    ({"conversations": {"from": "human", "value": "x"}}, "field 'conversations' must be a non-empty list of {from"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "bing", "value": "y"}]},
     r"field 'conversations\[1\].from' is 'bing'; expected user, assistant or system \(ShareGPT's human and gpt"),
    ({"conversations": [{"value": "x"}]}, r"missing field 'conversations\[0\].from'"),
    ({"conversations": [{"from": "human"}]}, r"missing field 'conversations\[0\].value'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}, {"from": "gpt", "value": "z"}]},
     r"conversation does not alternate: conversations\[2\] is 'gpt', expected 'user' .*one role are not merged"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]},
     r"conversation does not alternate: conversations\[1\] is 'human', expected 'assistant'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, r"field 'messages\[0\].role' is 'tool'; expected"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, r"field 'messages\[0\].role' is a JSON array; expected"),
    ({"messages": [{"role": "x" * 50, "content": "x"}]}, r"field 'messages\[0\].role' is a 50-character string"),
    ({"messages": [TURN, REPLY, {"role": "system", "content": "s"}, TURN, REPLY]},
     r"field 'messages\[2\].role' is 'system' after the conversation started; only the first turn"),
    ({"system": "s", "messages": [{"role": "system", "content": "t"}, TURN, REPLY]},
     r"two system messages: a top-level 'system' field and messages\[0\]"),
    ({"system": ["s"], "messages": [TURN, REPLY]}, "field 'system' must be a string, got list"),
    ({"messages": [{"role": "system", "content": "s"}, REPLY]},
     r"conversation does not alternate: messages\[1\] is 'assistant', expected 'user'"),
    ({"messages": [{"role": "system", "content": "s"}, TURN]},
     r"conversation ends with a user message \(messages\[1\]\)"),
    ('{"instruction": "a\\ud800b", "output": "o"}',
     r"field 'instruction' contains a lone surrogate \('\\ud800' at character 1\), not text"),
    ('{"conversations": [{"from": "human", "value": "\\udfff"}, {"from": "gpt", "value": "y"}]}',
     r"field 'conversations\[0\].value' contains a lone surrogate"),
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply to read"),
    ('{"prompt": "p", "completion": "c", "n": ' + "9" * 5000 + "}", "a number longer than 4300 digits"),
])
def test_bad_rows_give_one_line_naming_file_row_and_field(tmp_path, row, message):
    good = {"prompt": "p", "completion": "c"}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, row])
    with pytest.raises(data.DataError, match=f"^{tmp_path}/rows.jsonl:2: {message}") as error:
        data.read_records(path)
    assert "\n" not in str(error.value)
    records, bad, first = data.read_records(path, skip_bad=True)
    assert len(records) == 1 and bad == 1 and first.startswith(f"{path}:2: ")
    if not isinstance(row, str):  # the same row as an item of a JSON array
        write_array(tmp_path / "rows.json", [good, row], indent=2)
        with pytest.raises(data.DataError, match=rf"rows.json\[item 1\]: {message}"):
            data.read_records(tmp_path / "rows.json")


@pytest.mark.parametrize("text,message", [
    ("[" * 100_000 + "]" * 100_000, r"^{path}: JSON nested too deeply to read$"),  # a JSON array file
    ("[" * 100_000 + "\n" + "]" * 100_000 + "\n", r"^{path}:1: JSON nested too deeply to read"),  # read as lines
    ("[" + "1" * 5000 + "]", r"^{path}: a number longer than 4300 digits"),
])
def test_whole_files_beyond_json_limits(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(data.DataError, match=message.format(path=path)):
        data.read_records(path)


def test_evaluation_files_beyond_json_limits(tmp_path):
    """read_json_objects (GSM8K, ARC) reads through json_lines too: one line naming the row, not a traceback."""
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q", "answer": "#### 1"}, "[" * 50_000])
    with pytest.raises(data.DataError, match=f"^{path}:2: JSON nested too deeply to read$"):
        data.read_json_objects(path, "question and answer")


# ----------------------------------------------------------------------------- property: labels are the replies

PIECES = ["the", " cat", "What", "café", "漢字", "😀", "—", "  ", " ", "\n", "\n\n", "\t", "42", "7", "3.14", "!",
          "?", ",", "<", "|", ">", "don't", "x=1", "(a)", "\u00a0", "e\u0301", "\u2028", '"', "\\"]


def random_text(rng, pad=False):
    while True:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 10))).strip()
        if text and not any(tag in text for tag in data.RESERVED):
            return rng.choice(["", " ", "\n", " \n "]) + text + rng.choice(["", " ", "\n"]) if pad else text


def random_row(rng):
    """(row as its tool writes it, the texts its labels must decode to, one per reply, CoT: one for all)."""
    def t():
        return random_text(rng, pad=True)

    kind = rng.choice(["messages", "sharegpt", "alpaca", "completion", "cot", "tinycot"])
    if kind in ("cot", "tinycot"):
        row = {"prompt": t(), "rationale": t(), "answer" if kind == "cot" else "target": t()}
        final = row.get("answer", row.get("target"))
        return row, [f"{row['rationale'].strip()}\n<|answer|>\n{final.strip()}\n{U}"]
    if kind == "alpaca":
        row = {"instruction": t(), "input": rng.choice(["", None, t()]), "output": t()}
        return row, [row["output"].strip() + f"\n{U}"]
    if kind == "completion":
        row = {"prompt": t(), "completion": t()}
        return row, [row["completion"].strip() + f"\n{U}"]
    role, content, user, assistant = (("role", "content", "user", "assistant") if kind == "messages" else
                                      ("from", "value", *rng.choice([("human", "gpt"), ("user", "assistant")])))
    turns = [{role: (user, assistant)[i % 2], content: t()} for i in range(2 * rng.randint(1, 3))]
    row = {"id": str(rng.random()), "messages" if kind == "messages" else "conversations": turns}
    where = rng.choice(["none", "first", "top"])
    if where == "first":
        turns.insert(0, {role: "system", content: t()})
    elif where == "top":
        row["system"] = t()
    return row, [turn[content].strip() + f"\n{U}" for turn in turns if turn[role] == assistant]


@pytest.mark.parametrize("seed", range(3))
def test_labels_are_exactly_the_replies_and_answers_are_never_masked(tmp_path, neox, small, seed):
    """Random rows of every schema, written to a file and read back: each run of label tokens decodes to one
    reply (with the newline and <|user|> that end it; CoT: rationale through the answer), so prompts, user turns
    and system messages are never graded; under every mode the answer's and replies' labels are never dropped
    and no prompt, tag or answer input is ever masked."""
    rng = random.Random(seed)
    rows = [random_row(rng) for _ in range(60)]
    path = write_jsonl(tmp_path / "rows.jsonl", [row for row, _ in rows], ensure_ascii=seed % 2 == 0)
    records, bad, _ = data.read_records(path)
    assert bad == 0 and len(records) == len(rows)
    for tok in (neox, small):
        normal = tok.tk.normalizer.normalize_str if tok.tk.normalizer else (lambda s: s)
        for index, (ex, (_, replies)) in enumerate(zip(data.encode_many(records, tok), rows)):
            ids, targets = ex.ids.tolist(), ex.targets.tolist()
            runs, run = [], []
            for i, target in zip(ids, targets + [False]):
                if target:
                    run.append(i)
                elif run:
                    runs, run = runs + [run], []
            runs += [run] if run else []
            assert [tok.decode(r).removeprefix("\n") for r in runs] == [normal(text) for text in replies]
            for mode in data.MODES:
                item = data.mask_example(ex, tok, data.MaskConfig(mode, 0.5, 0.5, 0.5), seed, 0, index)
                labels = item["labels"]
                kept = (ex.roles == data.ANSWER) | (ex.roles == data.RESPONSE) | (ex.roles == data.TAG)
                assert (labels[ex.targets & kept] == ex.ids[ex.targets & kept]).all()
                assert (labels[~ex.targets] == data.IGNORE_INDEX).all()
                if item["masked_ids"] is not None:
                    fixed = (ex.roles != data.RESPONSE) & (ex.roles != data.RATIONALE)
                    assert (item["masked_ids"][fixed] == ex.ids[fixed]).all()


# ----------------------------------------------------------------------------- data.py check and show

def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `data.py ARGV`; 0 when it returns."""
    try:
        data.main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_check_reports_each_file(tmp_path, capsys, neox):
    long = {"instruction": "Repeat.", "output": " ".join(["word"] * 80)}
    alpaca = write_array(tmp_path / "alpaca.json", [
        {"instruction": "Say hi.", "input": "", "output": "hi"}, long,
        {"instruction": "Say hi.", "output": "hi"}], indent=4)
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [TURN, REPLY]}, {"conversations": [{"from": "human", "value": "x"}]},
        {"prompt": "Say hi.", "completion": "hi"}, {"prompt": "q", "rationale": "r", "answer": "a"}])
    tok = ["--tokenizer", str(NEOX)]
    code, out, err = run_cli(["check", f"{alpaca},{chat}", *tok, "--seq-len", "32", "--skip-bad"], capsys)
    assert code == 0 and err == ""
    assert out.splitlines()[1:] == [
        f"{alpaca}: 3 rows: alpaca 3",
        "  tokens per example: min 11, median 11, max 90",
        "  2 examples; 1 dropped as longer than 32 tokens",
        "  target tokens: 27.3% of the kept examples' tokens",
        f"  duplicates: 1 rows identical to an earlier row (the first: {alpaca}[item 2] repeats {alpaca}[item 0])",
        f"{chat}: 4 rows: messages 1, prompt/completion 1, CoT 1; 1 bad",
        f"  first bad row: {chat}:2: conversation ends with a user message (conversations[0]); it must end with "
        "the assistant",
        "  tokens per example: min 9, median 11, max 13",
        "  3 examples; 0 dropped as longer than 32 tokens",
        "  target tokens: 39.4% of the kept examples' tokens",
        f"  duplicates: 1 rows identical to an earlier row (the first: {chat}:3 repeats {alpaca}[item 0])",
        "would train on 5 examples",
    ]
    log = []
    assert data.check_data(f"{chat}:2", neox, 12, skip_bad=True, truncate=True, log=log.append) == 2
    assert log[2:5] == ["  the spec draws 2 of the 3 usable rows", "  tokens per example: min 11, median 12, max 13",
                        "  2 examples (longer ones cut to 12 tokens); 0 dropped as left without labels; 1 cut"]
    with pytest.raises(data.DataError, match=r"^nothing would train: 1 bad rows stop training \(--skip-bad"):
        data.check_data(str(chat), neox, 32, log=log.append)
    with pytest.raises(data.DataError, match=f"^nothing would train: no example of {alpaca} is usable within 4 "):
        data.check_data(str(alpaca), neox, 4, log=log.append)
    assert run_cli(["check", str(alpaca)], capsys)[::2] == \
        (1, "error: check needs --tokenizer MODEL_DIR (token counts depend on it)\n")
    assert run_cli(["check", str(alpaca), *tok, "--seq-len", "0"], capsys)[::2] == \
        (2, "error: --seq-len 0: must be >= 1\n")


def test_show_renders_a_row_of_every_schema(tmp_path, capsys):
    rows = [{"system": "Sys.", "messages": [TURN, REPLY]},
            {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
            {"instruction": "i", "input": "n", "output": "o"}, {"prompt": "p", "completion": "c"},
            {"prompt": "q", "rationale": "r", "answer": "a"}]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    code, out, _ = run_cli(["show", str(path), "--tokenizer", str(NEOX), "--mode", "sft", "--limit", "5"], capsys)
    assert code == 0
    assert [block.split("\n", 1)[1] for block in out.split("\n\n--- example ")[1:]] == [
        f"{U}\nSys.\n\nu\n{A}\n⟦a\n{U}⟧", f"{U}\nx\n{A}\n⟦y\n{U}⟧", f"{U}\ni\n\nn\n{A}\n⟦o\n{U}⟧",
        f"{U}\np\n{A}\n⟦c\n{U}⟧", f"{U}\nq\n<|rationale|>\n⟦r\n<|answer|>\na\n{U}⟧\n"]


# ----------------------------------------------------------------------------- held-out files

def test_read_eval_set_and_overlap(tmp_path, neox):
    train = [data.parse_row({"instruction": "Say hi.", "output": "hi"}), data.CoTRecord("q", "r", "a")]
    path = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {"prompt": "q2", "rationale": "r", "answer": "a"},
        {"prompt": "q", "rationale": "r", "answer": "a"},
        {"prompt": "long", "completion": " ".join(["word"] * 80)}])
    log = []
    held_out = data.read_eval_set(str(path), neox, 32, log=log.append)
    assert log == [f"{path}: 4 examples",
                   f"evaluation data {path}: 3 records (2 with an answer for exact match); 1 left out as longer "
                   "than 32 tokens"]
    assert [type(r).__name__ for r in held_out] == ["ChatRecord", "CoTRecord", "CoTRecord"]
    shared = data.overlap(train, held_out)
    assert shared == [0, 2]  # the alpaca and the messages row format alike: identical rows, whatever the schema
    assert data.describe_overlap(shared, len(held_out)) == \
        "warning: 2 of 3 evaluation records are identical to training records (the first is evaluation record 0)"
    assert data.describe_overlap([], 3) == "no evaluation record is identical to a training record (3 compared)"
    with pytest.raises(data.DataError, match=f"evaluation data {path}: all 4 records are longer than 2 tokens"):
        data.read_eval_set(str(path), neox, 2, log=lambda m: None)
