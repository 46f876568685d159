"""Shared test setup: the repository root on sys.path, fixture paths, the `gpu` marker's skip, and what several test
modules use: the tiny training run (its config, weights, metrics and command line; a micro-step that goes wrong),
weight comparisons, JSON Lines files, a command run in-process, the GPT-NeoX tokenizer, the tiny model with another
tokenizer, and a local stand-in for the dataset viewer. Test modules import the helpers with `from conftest import`;
pytest hands them the fixtures by name."""
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402 (the repository's modules, from the line above)
import remask  # noqa: E402
from model import StableLM  # noqa: E402

TESTS = Path(__file__).resolve().parent  # this directory: the fixtures, and the helper programs tests start
FIXTURES = TESTS / "fixtures"
NEOX_DIR = FIXTURES / "gpt-neox-20b-tokenizer"  # StableLM's GPT-NeoX tokenizer.json and expected ids
STABLELM_TINY = FIXTURES / "stablelm-tiny"  # a 2-layer StableLM (320 vocabulary rows) made by transformers
STABLELM_TINY_INT8 = FIXTURES / "stablelm-tiny-int8"  # the same model as a bitsandbytes 8-bit checkpoint


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# ----------------------------------------------------------------------------- the tiny training run


def tiny_config(tmp_path, name="run", **overrides) -> remask.TrainConfig:
    """2-digit additions, the 0.9M-parameter debug model, 16 sequences a step: ~0.1 s a step on 2 cores. On the
    CPU even where a GPU is (bit-exact comparisons; the GPU path has its own tests)."""
    settings = dict(out=str(tmp_path / name), n_train=32, global_batch=16, micro_batch=8, seq_len=64, digits=2,
                    epochs=1, lr=3e-3, log_every=1, save_every=0, n_eval=0, threads=1, device="cpu")
    return remask.TrainConfig(**{**settings, **overrides})


def train_flags(cfg) -> list:
    """The `train` command line of cfg: --flag=value for every field but booleans and empty strings."""
    return [f"--{remask._flag(k)}={v}" for k, v in asdict(cfg).items() if not isinstance(v, bool) and v != ""]


def run_weights(out) -> dict:
    """The final weights of the run in directory out: {name: tensor} of its model/model.safetensors."""
    return load_file(os.path.join(out, "model", "model.safetensors"))


def run_metrics(out) -> list:
    """The rows of the run's metrics.jsonl, one per logged step."""
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def quiet(message):
    """A log that drops every message."""


def fail_micro_step(monkeypatch, call, effect):
    """Make remask.micro_step_loss's `call`-th call (from 1) go wrong: its loss is replaced by effect(loss)."""
    real, calls = remask.micro_step_loss, []

    def wrapped(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (effect(loss), parts) if len(calls) == call else (loss, parts)
    monkeypatch.setattr(remask, "micro_step_loss", wrapped)

# ----------------------------------------------------------------------------- comparing weights


def assert_same_weights(got, expected):
    """Two state dicts ({name: tensor}) hold the same tensors bit for bit: names, dtypes and values."""
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name], w), name


def assert_weights_close(got, expected):
    """Two state dicts hold the same tensors to float32 rounding (the same sums taken in another order)."""
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=2e-6)

# ----------------------------------------------------------------------------- files and the command line


def write_jsonl(path, rows):
    """One line per row in UTF-8: a str is written as it is (a raw line), anything else as JSON (non-ASCII raw)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def read_jsonl(path) -> list:
    """The rows of a JSON Lines file, split at newlines only (str.splitlines would also cut at a raw U+2028)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_cli(main, argv, capsys):
    """(exit code, stdout, stderr) of a command's main(argv) run in this process: the code main returns or exits
    with; any other exception (a traceback) fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err

# ----------------------------------------------------------------------------- tokenizer and model fixtures


@pytest.fixture(scope="module")
def neox():
    """The GPT-NeoX tokenizer of the fixture with the ReMask tags added (50282 ids)."""
    return data.load_tokenizer(NEOX_DIR)


def save_tiny_model(tok, path):
    """Save the stablelm-tiny fixture, its vocabulary grown to tok's, with tok at path: a model directory for tok."""
    model = StableLM.from_pretrained(STABLELM_TINY)
    model.resize_vocab(len(tok))
    model.save_pretrained(path)
    tok.save(path)
    return path

# ----------------------------------------------------------------------------- a local dataset viewer


@pytest.fixture
def viewer():
    """A server holding tables {(dataset, config, split): rows}. `state.script` is a list of faults served to
    the next requests in turn ("500", "429", "cut": half a body then a closed connection, "drip": the body one
    byte per 0.2 s); `state.down_from` makes every request at or past that offset fail with 503; `state.edit`
    changes each page before it is sent."""
    state = SimpleNamespace(tables={}, script=[], down_from=None, truncated={}, requests=[], edit=lambda page: page)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, body, fault=None):
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if fault == "drip":
                try:
                    for i in range(len(raw)):
                        self.wfile.write(raw[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:  # the client gave up and closed the connection
                    pass
                self.close_connection = True
                return
            self.wfile.write(raw[:len(raw) // 2] if fault == "cut" else raw)
            self.close_connection = fault == "cut"

        def do_GET(self):
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            state.requests.append(q)
            fault = state.script.pop(0) if state.script else None
            if url.path != "/rows":
                return self.reply(404, {"error": "Not found."})
            offset, length = int(q["offset"]), int(q["length"])
            if fault in ("500", "429"):
                return self.reply(int(fault), {"error": "try later"})
            if fault == "drip 500":
                return self.reply(500, {"error": "try later, " + "slowly " * 50}, "drip")
            if state.down_from is not None and offset >= state.down_from:
                return self.reply(503, {"error": "Service unavailable"})
            table = state.tables.get((q["dataset"], q["config"], q["split"]))
            if table is None:
                return self.reply(404, {"error": "The dataset does not exist, or is not accessible."})
            if length > 100:
                return self.reply(422, {"error": "Parameter 'length' must not be greater than 100"})
            rows = [{"row_idx": i, "row": table[i], "truncated_cells": state.truncated.get(i, [])}
                    for i in range(offset, min(offset + length, len(table)))]
            features = [{"feature_idx": j, "name": k, "type": {"dtype": "string", "_type": "Value"}}
                        for j, k in enumerate(table[0] if table else {})]
            self.reply(200, state.edit({"features": features, "rows": rows, "num_rows_total": len(table),
                                        "num_rows_per_page": 100, "partial": False}), fault)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def fetch(viewer, name, out, **kw):
    """data.download(name, out) from the viewer, retries without waiting: (the files written, the log lines)."""
    logs = []
    kw = dict(retries=3, backoff=0.0, timeout=10.0, log=logs.append) | kw
    return data.download(name, out, viewer.endpoint, **kw), logs
