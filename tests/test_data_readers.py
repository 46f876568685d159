"""data.py readers: the three real schemas from hand-written rows, mixtures, bad input, and `data.py show`."""
import json
import os

import pytest

import data
from conftest import NEOX_DIR, quiet, run_cli, write_jsonl

TINYCOT = {"prompt": "What is 2+3?", "rationale": "2+3 means adding 3 to 2.\nThat is 5.", "target": "5",
           "source": "hand"}
REDDIT = {"post_title": "How do magnets work?", "post_text": "I never understood it.  ",
          "comment_text": "Aligned electron spins.", "comment_score": 12, "post_score": 40}
REDDIT_TITLE_ONLY = {"post_title": "ELI5 tides", "post_text": "", "comment_text": "The moon pulls.",
                     "comment_score": 3, "post_score": 7}
OASST = {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]}


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
    (["not", "an", "object"], "the row is a JSON array, expected an object"),
    ('"just text"', "the row is a JSON string, expected an object"),
    (7, "the row is a JSON number, expected an object"),
    (None, "the row is a JSON null, expected an object"),
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
    assert a == data.read_mixture(spec, seed=1, log=quiet)
    b = data.read_mixture(spec, seed=2, log=quiet)
    assert a[:5] == b[:5] and a[5:] != b[5:]  # whole files are whole; ":N" draws depend on the seed
    titles = [r.turns[0][0].split("\n")[0] for r in a[5:]]
    assert len(set(titles)) == 10 and titles == sorted(titles, key=lambda t: int(t[1:]))  # kept in file order
    assert log == [f"{tmp_path}/cot.jsonl: 5 examples", f"{tmp_path}/chat.jsonl: 10 examples, sampled 10"]
    with pytest.raises(data.DataError, match="asks for 60 rows but the file has 50"):
        data.read_mixture(f"{tmp_path}/chat.jsonl:60")
    with pytest.raises(data.DataError, match="empty entry"):
        data.read_mixture(f"{tmp_path}/cot.jsonl,,")


@pytest.mark.parametrize("spec, message", [
    ("d.jsonl:abc", "d.jsonl:abc: ':abc' is not a row count (the spec is FILE or FILE:N"),
    ("d.jsonl:", "d.jsonl:: ':' is not a row count"),
    ("d.jsonl:-3", "d.jsonl:-3: ':-3' is not a row count"),
    ("d.jsonl:2.5", "d.jsonl:2.5: ':2.5' is not a row count"),
    ("d.jsonl:\u00b2", "d.jsonl:\u00b2: ':\u00b2' is not a row count"),  # '²'.isdigit() is True, int('²') fails
    ("d.jsonl:\u0661\u0662", "d.jsonl:\u0661\u0662: ':\u0661\u0662' is not a row count"),  # Arabic-Indic 12
    ("d.jsonl:0000", "d.jsonl: the spec 'd.jsonl:0000' asks for 0 rows"),
    ("d.jsonl:004", "d.jsonl: the spec asks for 4 rows but the file has 3 usable ones"),
    ("d.jsonl:" + "9" * 30, "d.jsonl: the spec asks for a 30-digit number of rows"),
    ("d.jsonl:" + "7" * 5000, "d.jsonl: the spec asks for a 5000-digit number of rows"),  # beyond int()'s 4300
    ("nope.jsonl:abc", "nope.jsonl:abc: no such file"),  # neither name exists: the whole name is missing
    ("nope.jsonl:5", "nope.jsonl: no such file"),
])
def test_a_spec_suffix_that_is_not_a_row_count_says_so(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", [TINYCOT] * 3)
    with pytest.raises(data.DataError) as error:
        data.read_mixture(spec, log=lambda m: None)
    assert str(error.value).startswith(message) and len(str(error.value).splitlines()) == 1, str(error.value)


def test_a_spec_counts_leading_zeros_and_names_with_colons(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", [dict(TINYCOT, prompt=f"q{i}") for i in range(5)])
    assert data.read_mixture("d.jsonl:003", log=lambda m: None) == data.read_mixture("d.jsonl:3", log=lambda m: None)
    write_jsonl(tmp_path / "d.jsonl:abc", [REDDIT])  # a file whose name has a ':' suffix is that file
    assert len(data.read_mixture("d.jsonl:abc", log=lambda m: None)) == 1
    assert len(data.read_mixture(f"{tmp_path}/d.jsonl:2", log=lambda m: None)) == 2


@pytest.mark.parametrize("content,count,message", [
    ("", "", "d.jsonl: an empty file, no rows"),
    ("\n  \n\t\n", "", "d.jsonl: only blank lines, no rows"),
    ("\ufeff", "", "d.jsonl: an empty file, no rows"),  # only a byte-order mark
    ("[]\n", "", "d.jsonl: an empty JSON array, no rows"),
    ('{"broken\n[1]\n', "", r"d.jsonl: all 2 rows are bad \(first: .*d.jsonl:1: malformed JSON"),
    (json.dumps(TINYCOT) + "\n", ":0", r"d.jsonl: the spec 'd.jsonl:0' asks for 0 rows"),
    ('["q", "a"]\n["r", "b"]\n', "", r"d.jsonl:1: the row is a JSON array, expected an object"),
])
def test_a_file_without_rows_says_why(tmp_path, monkeypatch, content, count, message):
    """An empty, blank or all-bad file and a ':0' spec each name their own cause (not 'no examples left'),
    and JSON Lines whose rows are arrays are read line by line, not as one JSON array."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(data.DataError, match=message):
        data.read_mixture("d.jsonl" + count, skip_bad=True, log=quiet)


@pytest.mark.parametrize("text,rows", [
    ('[{"a": 1},\n {"a": 2}]\n', [{"a": 1}, {"a": 2}]),  # an array over several lines
    ('[{"a": 1}, {"a": 2}]', [{"a": 1}, {"a": 2}]),  # an array on one line
    ('  \n[\n{"a": 1}\n]\n', [{"a": 1}]),  # blank lines before it
    ('[1, 2]\n{"a": 1}\n', None),  # a whole value on the first line, then more: JSON Lines
    ('{"a": 1}\n[1]\n', None),
])
def test_json_array_or_json_lines(text, rows):
    assert data._is_json_array(text) == (rows is not None)
    if rows is not None:
        assert json.loads(text) == rows


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(data.DataError, match=f"^{tmp_path}: is a directory, expected a file$"):
        data.read_records(tmp_path)


@pytest.mark.parametrize("kept,dropped,seq_len,truncate,line", [
    (2, 1, 256, False, "2 examples; 1 dropped as longer than 256 tokens"),
    (0, 5, 8, False, "0 examples; 5 dropped as longer than 8 tokens"),
    (7, 0, 64, True, "7 examples (longer ones cut to 64 tokens); 0 dropped as left without labels"),
])
def test_describe_fit(kept, dropped, seq_len, truncate, line):
    assert data.describe_fit(kept, dropped, seq_len, truncate) == line


def test_load_dataset_reports_skipped_and_dropped(neox, tmp_path):
    long = dict(TINYCOT, rationale=" ".join(["word"] * 300))
    write_jsonl(tmp_path / "d.jsonl", [TINYCOT, long, '{"broken', REDDIT])
    log = []
    examples = data.load_dataset(str(tmp_path / "d.jsonl"), neox, 256, skip_bad=True, log=log.append)
    assert len(examples) == 2
    assert log[0].startswith(f"{tmp_path}/d.jsonl: 3 examples, skipped 1 bad rows (first: {tmp_path}/d.jsonl:3:")
    assert log[1] == "2 examples; 1 dropped as longer than 256 tokens"


def test_show_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the embedded tokenizer's cache
    write_jsonl(tmp_path / "d.jsonl", [TINYCOT, OASST])
    data.main(["show", str(tmp_path / "d.jsonl"), "--tokenizer", str(NEOX_DIR),
               "--mode", "sft"])
    out = capsys.readouterr().out
    assert "added to the tokenizer: <|user|> <|assistant|> <|rationale|> <|answer|> <|mask|>; 50282" in out
    assert "--- example 1 (mode sft, seed 0, epoch 0) [chat: " in out
    assert "<|user|>\nWhat is 2+3?\n<|rationale|>\n⟦2+3 means adding 3 to 2.\nThat is 5.\n<|answer|>\n5\n" \
           "<|user|>⟧" in out
    data.main(["show", "embedded", "--limit", "1", "--digits", "2"])
    assert "--- example 0 (mode remask" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "remask").iterdir())
    assert run_cli(data.main, ["show", str(tmp_path / "d.jsonl")], capsys)[::2] == \
        (1, "error: show needs --tokenizer MODEL_DIR for a data file (token counts depend on it)\n")
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    code, _, err = run_cli(data.main, ["show", str(tmp_path / "bad.jsonl"), "--tokenizer", str(NEOX_DIR)], capsys)
    assert code == 1 and err.startswith(f"error: {tmp_path}/bad.jsonl:1: unknown schema")
    for argv in (["--help"], ["show", "--help"], ["download", "--help"]):
        with pytest.raises(SystemExit) as exit:
            data.main(argv)
        assert exit.value.code == 0
    assert "--endpoint" in capsys.readouterr().out


@pytest.fixture(scope="module")
def small_home(tmp_path_factory):
    """A cache holding the embedded tokenizer (trained once here) and a model directory with its tokenizer.json."""
    home = tmp_path_factory.mktemp("small")
    data.embedded_tokenizer(home / "cache" / "remask").save(home / "model")
    return home


@pytest.mark.parametrize("argv,code,message", [
    (["show", "embedded", "--digits", "0"], 2, "--digits 0: must be >= 1"),
    (["show", "embedded", "--limit", "-1"], 2, "--limit -1: must be >= 0"),
    (["show", "embedded", "--seq-len", "0"], 2, "--seq-len 0: must be >= 1"),
    (["show", "embedded", "--epoch", "-2"], 2, "--epoch -2: must be >= 0"),
    (["show", "embedded", "--seed", "-1"], 2, "--seed -1: must be in [0, 2**32)"),
    (["show", "embedded", "--seed", str(2 ** 32)], 2, f"--seed {2 ** 32}: must be in [0, 2**32)"),
    (["show", "embedded", "--input-mask", "1.5"], 2, "--input-mask 1.5: must be a probability in [0, 1]"),
    (["show", "embedded", "--label-mask", "-0.1"], 2, "--label-mask -0.1: must be a probability in [0, 1]"),
    (["show", "embedded", "--answer-only", "nan"], 2, "--answer-only nan: must be a probability in [0, 1]"),
    (["download", "tinycot", "--out", "{file}"], 2, "--out {file}: {file} is a file, not a directory"),
    (["download", "tinycot", "--out", "{file}/sub/dir"], 2, "--out {file}/sub/dir: {file} is a file, not a directory"),
    (["download", "tinycot", "--out", "{tmp}", "--retries", "-1"], 2, "--retries -1: must be >= 0"),
    (["download", "tinycot", "--out", "{tmp}", "--timeout", "0"], 2, "--timeout 0.0: must be a number of seconds > 0"),
    (["download", "tinycot", "--out", "{tmp}", "--timeout", "inf"], 2, "--timeout inf: must be a number of seconds"),
    (["download", "tinycot", "--out", "{tmp}", "--backoff", "-1"], 2, "--backoff -1.0: must be a number of seconds"),
    (["download", "tinycot", "--out", "{tmp}", "--endpoint", "ftp://x"], 2, "--endpoint ftp://x: must be an http(s)"),
    (["download", "tinycot", "--out", "{tmp}", "--endpoint", "localhost"], 2, "--endpoint localhost: must be an"),
    (["show", "{tmp}/missing.jsonl", "--tokenizer", "{tok}"], 1, "{tmp}/missing.jsonl: no such file"),
    (["show", "{tmp}", "--tokenizer", "{tok}"], 1, "{tmp}: is a directory, expected a file"),
    (["show", "{file}", "--tokenizer", "{tok}"], 1, "{file}: an empty file, no rows"),
    (["show", "{file}:0", "--tokenizer", "{tok}"], 1, "{file}: the spec '{file}:0' asks for 0 rows"),
    (["show", "embedded", "--tokenizer", "{tmp}"], 1, "{tmp}/tokenizer.json: not found"),
])
def test_bad_flags_and_files_give_one_error_line(tmp_path, capsys, monkeypatch, small_home, argv, code, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(small_home / "cache"))
    (tmp_path / "empty.jsonl").write_text("")
    names = dict(tmp=tmp_path, file=tmp_path / "empty.jsonl", tok=small_home / "model")
    got, out, err = run_cli(data.main, [a.format(**names) for a in argv], capsys)
    assert got == code and (code == 1 or out == "")  # a bad flag stops before any work
    assert err.startswith("error: " + message.format(**names)) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == [tmp_path / "empty.jsonl"]  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_download_into_an_unwritable_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_cli(data.main, ["download", "tinycot", "--out", str(locked / "data")], capsys)
    assert code == 2 and err == f"error: --out {locked / 'data'}: {locked} is not writable\n"


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_show", interrupted)
    assert run_cli(data.main, ["show", "embedded"], capsys) == (130, "", "interrupted\n")


def test_an_unanticipated_exception_is_one_internal_error_line(capsys, monkeypatch):
    """The last boundary: a bug (here a ZeroDivisionError in `show`) is one line and exit code 1, flags still exit 2;
    REMASK_TRACEBACK=1 lets the traceback through."""
    def bug(args):
        return 1 / 0

    monkeypatch.setattr(data, "_show", bug)
    monkeypatch.delenv("REMASK_TRACEBACK", raising=False)
    assert run_cli(data.main, ["show", "embedded"], capsys) == (
        1, "", "error: internal error: ZeroDivisionError: division by zero (set REMASK_TRACEBACK=1 to see the "
               "traceback)\n")
    assert run_cli(data.main, ["show", "embedded", "--limit", "-1"], capsys)[0] == 2
    monkeypatch.setenv("REMASK_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        data.main(["show", "embedded"])
