"""data.py downloader against a local stand-in for the dataset viewer's /rows API (127.0.0.1 only):
pagination, retries of server errors and cut connections, an interrupted download resumed, truncated cells
refused, client errors reported, the atomic final file, a deadline per request that a dripping server cannot
stretch, and no empty .partial file after a signal."""
import signal
import time

import pytest

import data
from conftest import fetch, read_jsonl


def tinycot_rows(n):
    return [{"prompt": f"What is {i}+1?", "rationale": f"{i}+1 = {i + 1} ✓", "target": str(i + 1), "source": "t"}
            for i in range(n)]


def test_pages_retries_and_atomic_file(viewer, tmp_path):
    rows = tinycot_rows(250)
    viewer.tables[("euclaise/TinyCoT", "default", "train")] = rows
    viewer.script = ["500", "cut", "429"]  # the first page fails three ways before it succeeds
    paths, logs = fetch(viewer, "tinycot", tmp_path)
    assert paths == [tmp_path / "tinycot.jsonl"] and read_jsonl(paths[0]) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tinycot.jsonl"]  # no partial or temporary left
    assert [(int(q["offset"]), int(q["length"])) for q in viewer.requests] == \
        [(0, 100)] * 4 + [(100, 100), (200, 100)]
    assert sum("retry" in m for m in logs) == 3 and "tinycot.jsonl: 250/250 rows (100.0%" in logs[-1]
    records, _, _ = data.read_records(paths[0])  # the saved rows read back as TinyCoT examples
    assert records[7] == data.CoTRecord("What is 7+1?", "7+1 = 8 ✓", "8")
    viewer.requests.clear()
    _, logs = fetch(viewer, "tinycot", tmp_path)  # already there: nothing fetched
    assert viewer.requests == [] and "already downloaded" in logs[0]


def test_interrupted_download_resumes_where_it_stopped(viewer, tmp_path):
    rows = tinycot_rows(420)
    viewer.tables[("euclaise/TinyCoT", "default", "train")] = rows
    viewer.down_from = 300  # the server fails for good after three pages: the run gives up
    partial = tmp_path / "tinycot.jsonl.partial"
    with pytest.raises(data.DownloadError, match=r"offset=300.*gave up after 4 attempts \(HTTP 503") as error:
        fetch(viewer, "tinycot", tmp_path)
    assert str(error.value).endswith(f"(300 rows are kept in {partial}; the same command resumes after them)")
    assert not (tmp_path / "tinycot.jsonl").exists() and read_jsonl(partial) == rows[:300]
    with open(partial, "ab") as f:  # and the process died in the middle of writing a line
        f.write(b'{"prompt": "What is 300+')
    viewer.down_from, viewer.requests = None, []
    paths, logs = fetch(viewer, "tinycot", tmp_path)
    assert logs[1] == "tinycot.jsonl: resuming at row 300"
    assert [int(q["offset"]) for q in viewer.requests] == [300, 400]
    assert read_jsonl(paths[0]) == rows and not partial.exists()


def test_truncated_cells_are_refused_naming_the_rows(viewer, tmp_path):
    viewer.tables[("euclaise/reddit-instruct-curated", "default", "train")] = [
        {"post_title": f"t{i}", "post_text": "", "comment_text": "c" * 50} for i in range(180)]
    viewer.truncated = {130: ["comment_text"], 171: ["post_text", "comment_text"]}
    with pytest.raises(data.DownloadError, match=r"truncated row 130 \(comment_text\); "
                                                 r"row 171 \(post_text, comment_text\).*parquet"):
        fetch(viewer, "reddit", tmp_path)
    assert not (tmp_path / "reddit.jsonl").exists()
    assert len(read_jsonl(tmp_path / "reddit.jsonl.partial")) == 130  # only whole rows are kept
    with pytest.raises(data.DownloadError, match=r"truncated row 130") as error:  # the same fault again
        fetch(viewer, "reddit", tmp_path)
    assert str(error.value).endswith(f"(130 rows are kept in {tmp_path / 'reddit.jsonl.partial'})")  # no resume
    viewer.truncated = {0: ["comment_text"]}
    with pytest.raises(data.DownloadError, match=r"truncated row 0 \(comment_text\)"):
        fetch(viewer, "reddit", tmp_path / "first")
    assert list((tmp_path / "first").iterdir()) == []  # nothing fetched, no .partial


def test_gsm8k_splits_and_client_errors(viewer, tmp_path):
    train = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(120)]
    test = [{"question": "t", "answer": "#### 1"}]
    viewer.tables[("openai/gsm8k", "main", "train")] = train
    viewer.tables[("openai/gsm8k", "main", "test")] = test
    paths, _ = fetch(viewer, "gsm8k", tmp_path)
    assert [p.name for p in paths] == ["gsm8k-train.jsonl", "gsm8k-test.jsonl"]
    assert read_jsonl(paths[0]) == train and read_jsonl(paths[1]) == test
    viewer.requests.clear()
    with pytest.raises(data.DownloadError, match="HTTP 404 The dataset does not exist"):
        fetch(viewer, "oasst2", tmp_path)
    assert len(viewer.requests) == 1  # a client error is not retried
    with pytest.raises(data.DownloadError, match="unknown dataset 'nope'"):
        fetch(viewer, "nope", tmp_path)
    with pytest.raises(data.DownloadError, match="gave up after 2 attempts"):
        data.download("tinycot", tmp_path, "http://127.0.0.1:9", retries=1, backoff=0.0, timeout=2.0,
                      log=lambda m: None)  # nothing listens on port 9 (discard): connection refused, retried


def test_download_command_all(viewer, tmp_path, capsys):
    for (dataset, config, splits) in data.DATASETS.values():
        for split in splits:
            viewer.tables[(dataset, config, split)] = tinycot_rows(3)
    data.main(["download", "all", "--out", str(tmp_path), "--endpoint", viewer.endpoint, "--backoff", "0"])
    arc = [f"ARC-{level}-{split}.jsonl" for level in ("Challenge", "Easy") for split in ("test", "train", "validation")]
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        [*arc, "gsm8k-test.jsonl", "gsm8k-train.jsonl", "oasst2.jsonl", "reddit.jsonl", "tinycot.jsonl"]
    viewer.tables[("sablo/oasst2_curated", "default", "train")] = tinycot_rows(5)
    data.main(["download", "oasst2", "--out", str(tmp_path), "--endpoint", viewer.endpoint, "--force"])
    assert len(read_jsonl(tmp_path / "oasst2.jsonl")) == 5
    viewer.down_from = 0
    with pytest.raises(SystemExit) as exit:
        data.main(["download", "tinycot", "--out", str(tmp_path / "new"), "--endpoint", viewer.endpoint,
                   "--retries", "0"])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert err.endswith("gave up after 1 attempts (HTTP 503 Service unavailable)\n")  # nothing kept, nothing said
    assert list((tmp_path / "new").iterdir()) == []  # no empty .partial left behind


SEPARATORS = "\u2028 \u2029 \u0085 \x1c \x1d \x1e \x0b \x0c"  # all line breaks to str.splitlines()


def test_rows_with_unicode_line_separators_read_back(viewer, tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings; the downloader's files
    must read back row for row with read_records and read_gsm8k."""
    tinycot = [dict(row, rationale=row["rationale"] + SEPARATORS) for row in tinycot_rows(5)]
    gsm8k = [{"question": f"q{i}{SEPARATORS}?", "answer": f"{SEPARATORS}#### {i}"} for i in range(3)]
    viewer.tables[("euclaise/TinyCoT", "default", "train")] = tinycot
    viewer.tables[("openai/gsm8k", "main", "train")] = gsm8k
    viewer.tables[("openai/gsm8k", "main", "test")] = gsm8k
    fetch(viewer, "tinycot", tmp_path)
    fetch(viewer, "gsm8k", tmp_path)
    assert "\u2028" in (tmp_path / "tinycot.jsonl").read_text(encoding="utf-8")  # written raw, not escaped
    records, bad, _ = data.read_records(tmp_path / "tinycot.jsonl")
    assert bad == 0 and records == [data.parse_row(row) for row in tinycot]
    assert data.read_gsm8k(tmp_path / "gsm8k-test.jsonl") == [data.GSM8KProblem(r["question"], r["answer"])
                                                              for r in gsm8k]


def test_ctrl_c_keeps_only_a_partial_file_with_rows(viewer, tmp_path, monkeypatch):
    viewer.tables[("euclaise/TinyCoT", "default", "train")] = tinycot_rows(250)
    real_get_json, calls = data._get_json, []

    def interrupted_at(page):
        def get_json(*args):
            calls.append(1)
            if len(calls) > page:
                raise KeyboardInterrupt
            return real_get_json(*args)
        return get_json

    monkeypatch.setattr(data, "_get_json", interrupted_at(0))
    with pytest.raises(KeyboardInterrupt):
        fetch(viewer, "tinycot", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no empty .partial
    calls.clear()
    monkeypatch.setattr(data, "_get_json", interrupted_at(2))
    logs = []
    with pytest.raises(KeyboardInterrupt):
        fetch(viewer, "tinycot", tmp_path, log=logs.append)
    partial = tmp_path / "tinycot.jsonl.partial"
    assert logs[-1] == f"tinycot.jsonl: 200 rows are kept in {partial}; the same command resumes after them"
    assert len(read_jsonl(partial)) == 200


def test_a_dripping_server_meets_the_deadline_of_the_whole_request(viewer, tmp_path):
    """A body sent one byte per 0.2 s never lets a per-read timeout expire; the deadline of the whole request does
    (0.5 s here), for an answer and for an error's body alike, and the request is retried like any timeout."""
    rows = tinycot_rows(30)
    viewer.tables[("euclaise/TinyCoT", "default", "train")] = rows
    viewer.script = ["drip", "drip 500"]  # the first page: a dripping answer, then a dripping error, then served
    started = time.monotonic()
    paths, logs = fetch(viewer, "tinycot", tmp_path, timeout=0.5)
    assert time.monotonic() - started < 5  # the answer alone would take 9 minutes at this rate
    assert read_jsonl(paths[0]) == rows
    retries = [m for m in logs if "retry" in m]
    assert len(retries) == 2 and "TimeoutError: the answer took more than 0.5s" in retries[0]
    assert "HTTP 500" in retries[1]  # the error's dripping body is cut at the deadline too (message unknown)
    viewer.script = ["drip"] * 2
    started = time.monotonic()
    with pytest.raises(data.DownloadError, match=r"gave up after 2 attempts \(TimeoutError: the answer took more"):
        fetch(viewer, "tinycot", tmp_path / "again", retries=1, timeout=0.5)
    assert time.monotonic() - started < 5
    assert list((tmp_path / "again").iterdir()) == []  # no empty .partial


def test_a_signal_during_the_first_request_leaves_no_partial_file(viewer, tmp_path):
    """Ctrl-C (SIGINT, here from a timer) while the first page is still coming: nothing is kept, not even an empty
    .partial file; the .partial file appears with the first rows."""
    viewer.tables[("euclaise/TinyCoT", "default", "train")] = tinycot_rows(30)
    viewer.script = ["drip"]
    previous = signal.signal(signal.SIGALRM, lambda *args: signal.default_int_handler(signal.SIGINT, None))
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            fetch(viewer, "tinycot", tmp_path, timeout=30.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_split_and_odd_answers(viewer, tmp_path):
    """An empty split is an empty file; answers that break the /rows contract are one DownloadError each, and a row
    holding a lone surrogate (valid JSON, not UTF-8) is written as the JSON escape it came as."""
    viewer.tables[("openai/gsm8k", "main", "train")] = []
    viewer.tables[("openai/gsm8k", "main", "test")] = [{"question": "q\ud800", "answer": "#### 1"}]
    paths, _ = fetch(viewer, "gsm8k", tmp_path)
    assert paths[0].read_bytes() == b"" and not data.partial_path(paths[0]).exists()
    assert paths[1].read_bytes() == b'{"question": "q\\ud800", "answer": "#### 1"}\n'
    assert read_jsonl(paths[1]) == [{"question": "q\ud800", "answer": "#### 1"}]
    viewer.tables[("euclaise/TinyCoT", "default", "train")] = tinycot_rows(3)
    for edit, message in [(lambda page: {**page, "num_rows_total": -1}, "unexpected answer"),
                          (lambda page: {**page, "rows": [{**page["rows"][0], "truncated_cells": "prompt"}]},
                           "expected row 0, got"),
                          (lambda page: {**page, "rows": [{**page["rows"][0], "row": [1]}]}, "expected row 0")]:
        viewer.edit = edit
        with pytest.raises(data.DownloadError, match=message):
            fetch(viewer, "tinycot", tmp_path / "odd")
        assert list((tmp_path / "odd").iterdir()) == []
