"""data.py readers: the three real schemas from hand-written rows, mixtures, bad input, and `data.py show`."""
import json

import pytest

import data
from conftest import FIXTURES

TINYCOT = {"prompt": "What is 2+3?", "rationale": "2+3 means adding 3 to 2.\nThat is 5.", "target": "5",
           "source": "hand"}
REDDIT = {"post_title": "How do magnets work?", "post_text": "I never understood it.  ",
          "comment_text": "Aligned electron spins.", "comment_score": 12, "post_score": 40}
REDDIT_TITLE_ONLY = {"post_title": "ELI5 tides", "post_text": "", "comment_text": "The moon pulls.",
                     "comment_score": 3, "post_score": 7}
OASST = {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_each_schema_reads_as_the_card_formats_it(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [TINYCOT, REDDIT, REDDIT_TITLE_ONLY, OASST])
    records, bad, first = data.read_records(path)
    assert bad == 0 and first is None
    texts = [data.format_record(r) for r in records]
    assert texts == [
        "<|user|>\nWhat is 2+3?\n<|rationale|>\n2+3 means adding 3 to 2.\nThat is 5.\n<|answer|>\n5\n<|user|>",
        "<|user|>\nHow do magnets work?\nI never understood it.\n<|assistant|>\nAligned electron spins.\n<|user|>",
        "<|user|>\nELI5 tides\n<|assistant|>\nThe moon pulls.\n<|user|>",
        "<|user|>\nHi!\n<|assistant|>\nHello.\n<|user|>\nName a prime.\n<|assistant|>\n7\n<|user|>",
    ]
    missing_body = dict(REDDIT_TITLE_ONLY)
    del missing_body["post_text"]
    assert data.parse_row(missing_body) == records[2]
    assert data.parse_row({**REDDIT_TITLE_ONLY, "post_text": None}) == records[2]


def test_json_array_files_and_blank_lines(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([TINYCOT, OASST], indent=1))
    records, _, _ = data.read_records(tmp_path / "rows.json")
    assert [type(r).__name__ for r in records] == ["CoTRecord", "ChatRecord"]
    write_jsonl(tmp_path / "rows.jsonl", [TINYCOT, "", "   ", OASST])  # blank lines are not rows
    assert data.read_records(tmp_path / "rows.jsonl")[0] == records
    (tmp_path / "bad.json").write_text('[{"prompt": "a",\n ]')
    with pytest.raises(data.DataError, match=r"bad.json: not valid JSON \(line 2 column"):
        data.read_records(tmp_path / "bad.json")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "rationale": "r"}, "unknown schema"),
    ({"prompt": "p", "rationale": None, "target": "t"}, "missing field 'rationale'"),
    ({"prompt": "p", "rationale": "  \n", "target": "t"}, "field 'rationale' is empty"),
    ({"prompt": "p", "rationale": "r", "target": ""}, "field 'target' is empty"),
    ({"prompt": 3, "rationale": "r", "target": "t"}, "field 'prompt' must be a string, got int"),
    ({"prompt": "p <|user|> q", "rationale": "r", "target": "t"}, "reserved token <\\|user\\|>"),
    ({"prompt": "p", "rationale": "r", "target": "t<|endoftext|>"}, "reserved token <\\|endoftext\\|>"),
    ({"post_title": "t", "post_text": 5, "comment_text": "c"}, "field 'post_text' must be a string"),
    ({"post_title": "t", "comment_text": " "}, "field 'comment_text' is empty"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"role": "system", "content": "be nice"}]}, "'messages\\[0\\].role' is 'system'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "does not alternate: messages\\[0\\] is 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "does not alternate: messages\\[1\\] is 'user', expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "ends with a user message \\(messages\\[2\\]\\)"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     "missing field 'messages\\[1\\].content'"),
    ({"messages": [{"role": "user", "content": "a"}, "b"]}, "messages\\[1\\] must be an object"),
    (["not", "an", "object"], "must be a JSON object, got list"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [TINYCOT, row])
    with pytest.raises(data.DataError, match=f"rows.jsonl:2: .*{message}"):
        data.read_records(path)
    records, bad, first = data.read_records(path, skip_bad=True)
    assert len(records) == 1 and bad == 1 and first.startswith(f"{path}:2: ")


def test_malformed_json_line_and_skip_bad(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [TINYCOT, '{"prompt": "a", "rationale": ', REDDIT, "[1, 2"])
    with pytest.raises(data.DataError, match=r"rows.jsonl:2: malformed JSON .*--skip-bad skips such rows"):
        data.read_records(path)
    records, bad, first = data.read_records(path, skip_bad=True)
    assert len(records) == 2 and bad == 2 and first.startswith(f"{path}:2: malformed JSON")
    with pytest.raises(data.DataError, match="nope.jsonl: no such file"):
        data.read_records(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match="latin1.jsonl: not UTF-8 text"):
        data.read_records(tmp_path / "latin1.jsonl")


def test_mixture_samples_with_the_seed(tmp_path):
    write_jsonl(tmp_path / "cot.jsonl", [dict(TINYCOT, prompt=f"q{i}") for i in range(5)])
    write_jsonl(tmp_path / "chat.jsonl", [dict(REDDIT, post_title=f"t{i}") for i in range(50)])
    spec = f"{tmp_path}/cot.jsonl, {tmp_path}/chat.jsonl:10"
    log = []
    a = data.read_mixture(spec, seed=1, log=log.append)
    assert len(a) == 15 and sum(isinstance(r, data.CoTRecord) for r in a) == 5
    assert a == data.read_mixture(spec, seed=1, log=lambda m: None)
    b = data.read_mixture(spec, seed=2, log=lambda m: None)
    assert a[:5] == b[:5] and a[5:] != b[5:]  # whole files are whole; ":N" draws depend on the seed
    titles = [r.turns[0][0].split("\n")[0] for r in a[5:]]
    assert len(set(titles)) == 10 and titles == sorted(titles, key=lambda t: int(t[1:]))  # kept in file order
    assert log == [f"{tmp_path}/cot.jsonl: 5 examples", f"{tmp_path}/chat.jsonl: 10 examples, sampled 10"]
    with pytest.raises(data.DataError, match="asks for 60 rows but the file has 50"):
        data.read_mixture(f"{tmp_path}/chat.jsonl:60")
    with pytest.raises(data.DataError, match="empty entry"):
        data.read_mixture(f"{tmp_path}/cot.jsonl,,")


def test_load_dataset_reports_skipped_and_dropped(tmp_path):
    tok = data.load_tokenizer(FIXTURES / "gpt-neox-20b-tokenizer")
    long = dict(TINYCOT, rationale=" ".join(["word"] * 300))
    write_jsonl(tmp_path / "d.jsonl", [TINYCOT, long, '{"broken', REDDIT])
    log = []
    examples = data.load_dataset(str(tmp_path / "d.jsonl"), tok, 256, skip_bad=True, log=log.append)
    assert len(examples) == 2
    assert log[0].startswith(f"{tmp_path}/d.jsonl: 3 examples, skipped 1 bad rows (first: {tmp_path}/d.jsonl:3:")
    assert log[1] == "2 examples; 1 dropped as longer than 256 tokens"


def test_show_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the embedded tokenizer's cache
    write_jsonl(tmp_path / "d.jsonl", [TINYCOT, OASST])
    data.main(["show", str(tmp_path / "d.jsonl"), "--tokenizer", str(FIXTURES / "gpt-neox-20b-tokenizer"),
               "--mode", "sft"])
    out = capsys.readouterr().out
    assert "added to the tokenizer: <|user|> <|assistant|> <|rationale|> <|answer|> <|mask|>; 50282" in out
    assert "--- example 1 (mode sft, seed 0, epoch 0) [chat: " in out
    assert "<|user|>\nWhat is 2+3?\n<|rationale|>\n⟦2+3 means adding 3 to 2.\nThat is 5.\n<|answer|>\n5\n" \
           "<|user|>⟧" in out
    data.main(["show", "embedded", "--limit", "1", "--digits", "2"])
    assert "--- example 0 (mode remask" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "remask").iterdir())
    with pytest.raises(SystemExit, match="show needs --tokenizer"):
        data.main(["show", str(tmp_path / "d.jsonl")])
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(SystemExit, match="bad.jsonl:1: unknown schema"):
        data.main(["show", str(tmp_path / "bad.jsonl"), "--tokenizer", str(FIXTURES / "gpt-neox-20b-tokenizer")])
    for argv in (["--help"], ["show", "--help"], ["download", "--help"]):
        with pytest.raises(SystemExit) as exit:
            data.main(argv)
        assert exit.value.code == 0
    assert "--endpoint" in capsys.readouterr().out
