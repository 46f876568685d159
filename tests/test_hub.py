"""data.py's models by name against a local stand-in for the Hugging Face Hub (127.0.0.1 only): the revision metadata,
`resolve` with a redirect to a storage host on another port, the headers the stock client reads, Range, the Hub's
error codes, and faults (a connection dropped mid-file, a wrong byte, 429 with Retry-After, 500, a server trickling
bytes, a process killed mid-file). The cache must have huggingface_hub's layout: a cache laid out by hand is read
offline without a request, and where huggingface_hub imports, its snapshot_download and remask fill two caches with
the same files at the same paths, each readable offline by the other."""
import hashlib
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

import data
from conftest import FIXTURES
from model import StableLM

TINY = FIXTURES / "stablelm-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def tiny_repo():
    """The files of a small StableLM repository, plus what remask must leave alone (README, a pickle)."""
    files = {name: (TINY / name).read_bytes() for name in ("config.json", "generation_config.json",
                                                           "model.safetensors")}
    files["tokenizer.json"] = (FIXTURES / "gpt-neox-20b-tokenizer" / "tokenizer.json").read_bytes()
    files["tokenizer_config.json"] = json.dumps({"eos_token": "<|endoftext|>"}).encode()
    files["special_tokens_map.json"] = b""  # an empty file is a file too
    files["README.md"] = "# tiny ✓\n".encode()
    files["pytorch_model.bin"] = b"pickles are never fetched"
    return files


WANTED = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "model.safetensors"]


@pytest.fixture
def hub():
    """A Hub at hub.url serving state.repos {repo: {"refs": {revision: commit}, "commits": {commit: {name: bytes}},
    "gated": bool}}; files ending .safetensors/.bin are LFS: `resolve` redirects them (302) to a storage server on
    another port. state.faults["api" | "resolve" | "storage" | "small"] lists faults served to the next such
    requests in turn ("small": GETs of the files served by the Hub itself). Every request is logged as (server,
    method, path, headers)."""
    state = SimpleNamespace(repos={}, faults={"api": [], "resolve": [], "storage": [], "small": []}, log=[],
                            token="good",
                            release=threading.Event(), stall_bytes=0)

    def blob(sha):
        for repo in state.repos.values():
            for files in repo["commits"].values():
                for content in files.values():
                    if hashlib.sha256(content).hexdigest() == sha:
                        return content
        return None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send(self, code, headers=(), body=b""):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def error(self, code, error_code, message):
            self.send(code, [("X-Error-Code", error_code), ("X-Error-Message", message),
                             ("Content-Type", "application/json")], json.dumps({"error": message}).encode())

        def fault(self, where):
            fault = state.faults[where].pop(0) if state.faults[where] else None
            if fault == "429":
                self.send(429, [("Retry-After", "0.3")], b"slow down")
            elif fault == "500":
                self.send(500, [], b"oops")
            return fault

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            state.log.append((self.server.name, self.command, path, dict(self.headers)))
            if self.server.name == "storage":
                return self.storage(path)
            parts = path.strip("/").split("/")
            if parts[0] == "api":  # /api/models/ORG/NAME/{revision,tree}/REV
                if self.fault("api") in ("429", "500"):
                    return
                repo, kind, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            else:  # /ORG/NAME/resolve/REV/FILE
                if self.fault("resolve") in ("429", "500"):
                    return
                repo, kind, rev, name = "/".join(parts[:2]), parts[2], parts[3], "/".join(parts[4:])
            auth = self.headers.get("Authorization")
            if repo not in state.repos:
                return self.error(404 if auth else 401, "RepoNotFound", "Repository not found")
            r = state.repos[repo]
            commit = r["refs"].get(rev, rev if rev in r["commits"] else None)
            if commit is None:
                return self.error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            files = r["commits"][commit]
            if kind == "revision":
                body = {"id": repo, "sha": commit, "siblings": [{"rfilename": n} for n in files], "gated": r["gated"]}
                return self.send(200, [("Content-Type", "application/json")], json.dumps(body).encode())
            if kind == "tree":  # what huggingface_hub 2.4's snapshot_download lists
                body = [{"type": "file", "oid": git_blob_sha1(c), "size": len(c), "path": n,
                         **({"lfs": {"oid": hashlib.sha256(c).hexdigest(), "size": len(c), "pointerSize": 134}}
                            if n.endswith((".safetensors", ".bin")) else {})} for n, c in files.items()]
                return self.send(200, [("Content-Type", "application/json")], json.dumps(body).encode())
            if r["gated"] and auth != f"Bearer {state.token}":
                return self.error(403 if auth else 401, "GatedRepo", "Access to model " + repo + " is restricted.")
            if name not in files:
                self.send(404, [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", commit)], b"Entry not found")
                return
            content = files[name]
            if name.endswith((".safetensors", ".bin")):
                sha = hashlib.sha256(content).hexdigest()
                return self.send(302, [("Location", f"{state.storage_url}/{sha}?signature=x"),
                                       ("X-Repo-Commit", commit), ("X-Linked-Etag", f'"{sha}"'),
                                       ("X-Linked-Size", str(len(content))),
                                       ("ETag", f'"{git_blob_sha1(b"pointer " + content[:8])}"')])
            etag = git_blob_sha1(content)
            if self.command == "GET" and self.fault("small") == "wrong":
                content = bytes([content[0] ^ 1]) + content[1:]
            self.send(200, [("X-Repo-Commit", commit), ("ETag", f'"{etag}"')], content)

        def storage(self, path):
            fault = self.fault("storage")
            if fault in ("429", "500"):
                return
            content = blob(path.strip("/"))
            if content is None:
                return self.send(404, [], b"no such blob")
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") and fault != "whole" else 0
            body = content[start:]
            if fault == "wrong":
                body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 1]) + body[len(body) // 2 + 1:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if fault == "drop":  # half the body, then the connection goes
                self.wfile.write(body[:len(body) // 2])
                self.close_connection = True
            elif fault == "trickle":  # a byte every 50 ms: passes any read timeout, never a deadline
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass
                self.close_connection = True
            elif fault == "stall":  # some bytes, then nothing until released, then the connection goes
                self.wfile.write(body[:state.stall_bytes])
                self.wfile.flush()
                state.release.wait(10)
                self.close_connection = True
            elif self.command != "HEAD":
                self.wfile.write(body)

    servers = []
    for name in ("hub", "storage"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.name, server.daemon_threads = name, True
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
    state.url, state.storage_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    state.repos["org/tiny"] = {"refs": {"main": COMMIT}, "commits": {COMMIT: tiny_repo()}, "gated": False}
    yield state
    state.release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def fetch(hub, cache, repo="org/tiny", revision="main", **kw):
    """download_model against the fake Hub, with back-offs short enough for tests."""
    options = dict(cache=cache, endpoint=hub.url, token="", offline=False, retries=3, backoff=0.001, timeout=5.0,
                   log=lambda message: None) | kw
    return data.download_model(repo, revision, **options)


def logged(hub, server=None):
    return [entry for entry in hub.log if server in (None, entry[0])]


def cache_files(folder: Path) -> dict:
    """{relative path: (link target or None, bytes)} of blobs/, snapshots/ and refs/ in a model's cache folder."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in ("blobs", "snapshots", "refs") and (path.is_file() or path.is_symlink()):
            out[str(rel)] = (os.readlink(path) if path.is_symlink() else None, path.read_bytes())
    return out

# ----------------------------------------------------------------------------- names


def test_model_specs(tmp_path, monkeypatch):
    assert data.parse_model_id("stabilityai/stablelm-3b-4e1t") == ("stabilityai/stablelm-3b-4e1t", "main")
    assert data.parse_model_id("org/name@v1.0") == ("org/name", "v1.0")
    assert data.parse_model_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    assert data.parse_model_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for bad in ("name", "a/b/c", "org/na--me", "org/-name", "org/name@../../x", "org/name@", "./org/name", "~/x"):
        assert data.parse_model_id(bad) is None, bad
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert data.resolve_model("org/name") == Path("org/name")  # a local directory wins over the Hub id
    (tmp_path / "file").write_text("x")
    with pytest.raises(data.DataError, match="a file, not a model directory"):
        data.resolve_model("file")
    with pytest.raises(data.DataError, match="neither a directory nor a Hugging Face Hub model id"):
        data.resolve_model("no-such-dir")

# ----------------------------------------------------------------------------- the cache


def test_download_writes_the_hub_cache_layout(hub, tmp_path):
    files = hub.repos["org/tiny"]["commits"][COMMIT]
    snapshot = fetch(hub, tmp_path, token="good")
    folder = tmp_path / "models--org--tiny"
    assert snapshot == folder / "snapshots" / COMMIT
    assert sorted(os.listdir(snapshot)) == sorted(WANTED)  # no README, no pickle
    for name in WANTED:
        etag = hashlib.sha256(files[name]).hexdigest() if name.endswith(".safetensors") else git_blob_sha1(files[name])
        assert os.readlink(snapshot / name) == f"../../blobs/{etag}"
        assert (folder / "blobs" / etag).read_bytes() == files[name]
    assert (folder / "refs" / "main").read_text() == COMMIT
    assert not list((folder / "blobs").glob("*.incomplete"))
    storage = logged(hub, "storage")
    assert len(storage) == 1 and "Authorization" not in storage[0][3]  # the token stays on the Hub
    assert all(h.get("Authorization") == "Bearer good" for _, _, _, h in logged(hub, "hub"))
    model = StableLM.from_pretrained(snapshot)  # remask's loaders read the snapshot like any directory
    assert model.config.vocab_size == StableLM.from_pretrained(TINY).config.vocab_size
    assert data.load_tokenizer(snapshot).eos_id == 0


def test_a_cached_model_costs_one_request_a_commit_none(hub, tmp_path):
    fetch(hub, tmp_path)
    hub.log.clear()
    assert fetch(hub, tmp_path) == tmp_path / "models--org--tiny" / "snapshots" / COMMIT
    assert [(s, m, p) for s, m, p, _ in hub.log] == [("hub", "GET", "/api/models/org/tiny/revision/main")]
    hub.log.clear()
    assert fetch(hub, tmp_path, revision=COMMIT).name == COMMIT
    assert fetch(hub, tmp_path, endpoint="http://127.0.0.1:9", offline=True).name == COMMIT
    assert hub.log == []
    with pytest.raises(data.ModelNotFound, match="org/tiny@v2 is not in the Hub cache .* HF_HUB_OFFLINE"):
        fetch(hub, tmp_path, revision="v2", offline=True)
    hub.faults["api"] = ["500"] * 10  # the Hub is down: the cached snapshot of main is used, without waiting
    messages = []
    assert fetch(hub, tmp_path, backoff=10, log=messages.append).name == COMMIT
    assert "the Hub cannot be reached" in messages[-1]


def test_a_cache_laid_out_by_hand_is_read_offline(tmp_path, monkeypatch):
    """huggingface_hub's layout, written here file by file, resolves with no request at all (HF_HUB_OFFLINE=1 and
    an endpoint nothing listens on)."""
    folder = tmp_path / "hub" / "models--org--tiny"
    for name in ("config.json", "model.safetensors"):
        content = (TINY / name).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        (folder / "snapshots" / OLD_COMMIT).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / OLD_COMMIT / name).symlink_to(f"../../blobs/{blob.name}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(OLD_COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert data.hub_cache() == tmp_path / "hub"
    assert data.resolve_model("org/tiny") == folder / "snapshots" / OLD_COMMIT
    assert data.resolve_model(f"org/tiny@{OLD_COMMIT}") == folder / "snapshots" / OLD_COMMIT
    with pytest.raises(data.ModelNotFound, match="org/other: no such local directory, and org/other@main is not in "
                                                 "the Hub cache"):
        data.resolve_model("org/other")
    (folder / "blobs" / hashlib.sha256((TINY / "model.safetensors").read_bytes()).hexdigest()).unlink()
    with pytest.raises(data.DownloadError, match="not in the Hub cache"):  # a dangling link is not a model
        data.resolve_model("org/tiny")


def test_sharded_weights_come_with_their_index(hub, tmp_path):
    StableLM.from_pretrained(TINY).save_pretrained(tmp_path / "sharded", max_shard_size=200_000)
    files = {p.name: p.read_bytes() for p in (tmp_path / "sharded").iterdir()}
    files["tokenizer.json"] = hub.repos["org/tiny"]["commits"][COMMIT]["tokenizer.json"]
    files["model.safetensors"] = b"not read: the index comes first, as model.py reads it"
    hub.repos["org/sharded"] = {"refs": {"main": OLD_COMMIT}, "commits": {OLD_COMMIT: files}, "gated": False}
    snapshot = fetch(hub, tmp_path / "cache", repo="org/sharded")
    shards = sorted(n for n in files if n.startswith("model-"))
    assert len(shards) > 1 and sorted(os.listdir(snapshot)) == sorted(
        ["config.json", "generation_config.json", "tokenizer.json", data.SAFETENSORS_INDEX, *shards])
    StableLM.from_pretrained(snapshot)
    assert fetch(hub, tmp_path / "cache", repo="org/sharded", offline=True) == snapshot

# ----------------------------------------------------------------------------- faults


def test_a_dropped_connection_resumes_with_range(hub, tmp_path):
    hub.faults["storage"] = ["drop"]
    snapshot = fetch(hub, tmp_path)
    assert (snapshot / "model.safetensors").read_bytes() == (TINY / "model.safetensors").read_bytes()
    ranges = [h.get("Range") for _, _, _, h in logged(hub, "storage")]
    assert ranges[0] is None and ranges[1] == f"bytes={(TINY / 'model.safetensors').stat().st_size // 2}-"
    hub.faults["storage"] = ["drop"] + ["500"] * 4  # progress resets the count of failures; then three in a row
    with pytest.raises(data.DownloadError, match=r"gave up after 4 failed attempts .*; the 285,220 bytes that "
                                                 r"arrived are kept in .*\.incomplete: the same command resumes"):
        fetch(hub, tmp_path / "again")
    fetch(hub, tmp_path / "again")
    assert logged(hub, "storage")[-1][3]["Range"] == "bytes=285220-"


def test_a_killed_download_resumes_in_the_next_process(hub, tmp_path):
    """A child process is killed (SIGKILL, no cleanup) while the weights stream in; before their first byte there
    is no partial file, after it one holding what arrived; the next process resumes from it and places one blob."""
    content = (TINY / "model.safetensors").read_bytes()
    partial = tmp_path / "models--org--tiny" / "blobs" / f"{hashlib.sha256(content).hexdigest()}.incomplete"
    hub.faults["storage"], hub.stall_bytes = ["stall"], 100_000
    pid = os.fork()
    if pid == 0:  # the child downloads until killed
        try:
            fetch(hub, tmp_path)
        finally:
            os._exit(1)
    try:
        deadline = time.time() + 10
        while not logged(hub, "storage") and time.time() < deadline:
            time.sleep(0.01)
        while data._file_size(partial) < hub.stall_bytes and time.time() < deadline:
            time.sleep(0.01)
        assert partial.stat().st_size == hub.stall_bytes
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        hub.release.set()
    snapshot = fetch(hub, tmp_path)
    assert (snapshot / "model.safetensors").read_bytes() == content
    assert logged(hub, "storage")[-1][3].get("Range") == f"bytes={hub.stall_bytes}-"
    assert sorted(p.name for p in partial.parent.iterdir()) == sorted(os.path.basename(os.readlink(snapshot / n))
                                                                      for n in WANTED)


def test_the_partial_file_appears_with_the_first_byte(hub, tmp_path, monkeypatch):
    """An interrupt (Ctrl-C) before the first byte of a file leaves no empty partial file behind."""
    def interrupted(self, n=-1):
        raise KeyboardInterrupt
    monkeypatch.setattr(data._Exchange, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch(hub, tmp_path)
    assert not list((tmp_path / "models--org--tiny" / "blobs").glob("*.incomplete"))


def test_a_wrong_byte_is_refused_and_nothing_placed(hub, tmp_path):
    hub.faults["storage"] = ["wrong"]
    with pytest.raises(data.DownloadError, match="model.safetensors: the downloaded bytes hash to .*nothing was "
                                                 "placed"):
        fetch(hub, tmp_path)
    blobs = tmp_path / "models--org--tiny" / "blobs"
    sha = hashlib.sha256((TINY / "model.safetensors").read_bytes()).hexdigest()
    assert not (blobs / sha).exists() and not (blobs / f"{sha}.incomplete").exists()
    assert not (tmp_path / "models--org--tiny" / "snapshots" / COMMIT / "model.safetensors").exists()
    assert not (tmp_path / "models--org--tiny" / "refs" / "main").exists()
    fetch(hub, tmp_path)  # the next run starts over and succeeds


def test_a_small_file_is_checked_against_its_git_blob_hash(hub, tmp_path):
    hub.faults["small"] = ["wrong"]
    with pytest.raises(data.DownloadError, match=r"config.json: the downloaded bytes hash to \w+, not to the Hub's "
                                                 r"etag \w{40}; .*nothing was placed"):
        fetch(hub, tmp_path)
    assert not (tmp_path / "models--org--tiny" / "snapshots" / COMMIT / "config.json").exists()
    assert not list((tmp_path / "models--org--tiny" / "blobs").iterdir())


def test_a_corrupt_partial_file_is_refused(hub, tmp_path):
    content = (TINY / "model.safetensors").read_bytes()
    blobs = tmp_path / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{hashlib.sha256(content).hexdigest()}.incomplete").write_bytes(b"x" + content[1:1000])
    with pytest.raises(data.DownloadError, match="hash to"):
        fetch(hub, tmp_path)
    assert not list(blobs.glob("*.incomplete"))


def test_a_range_answered_with_the_whole_file_starts_over(hub, tmp_path):
    content = (TINY / "model.safetensors").read_bytes()
    blobs = tmp_path / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{hashlib.sha256(content).hexdigest()}.incomplete").write_bytes(content[:1000])
    hub.faults["storage"] = ["whole"]
    snapshot = fetch(hub, tmp_path)
    assert (snapshot / "model.safetensors").read_bytes() == content
    assert logged(hub, "storage")[0][3].get("Range") == "bytes=1000-"


def test_429_waits_retry_after_and_500_is_retried(hub, tmp_path):
    hub.faults["api"], hub.faults["resolve"], hub.faults["storage"] = ["429"], ["500"], ["500", "429"]
    messages = []
    start = time.monotonic()
    fetch(hub, tmp_path, log=messages.append)
    assert time.monotonic() - start >= 0.6  # two Retry-After: 0.3, the back-off itself being 1 ms
    retries = [m for m in messages if "; retry " in m]
    assert len(retries) == 4 and "HTTP 429" in retries[0] and "in 0.3s" in retries[0] and "HTTP 500" in retries[1]
    hub.faults["api"] = ["500"] * 4
    with pytest.raises(data.DownloadError, match=r"org/tiny@v1: gave up after 4 failed attempts \(.*HTTP 500\)"):
        fetch(hub, tmp_path / "other", revision="v1")


def test_a_trickling_server_meets_the_deadline(hub, tmp_path):
    """A server sending a byte every 50 ms never trips a read timeout; the deadline (0.3 s per 64 KiB here) ends
    the request, and the retry resumes after the bytes that did arrive."""
    hub.faults["storage"] = ["trickle"]
    messages = []
    start = time.monotonic()
    snapshot = fetch(hub, tmp_path, timeout=0.3, log=messages.append)
    assert time.monotonic() - start < 3
    assert any("no answer or progress within 0.3s" in m for m in messages)
    assert (snapshot / "model.safetensors").read_bytes() == (TINY / "model.safetensors").read_bytes()
    assert logged(hub, "storage")[1][3]["Range"].startswith("bytes=")


def test_free_disk_space_is_checked_before_the_first_byte(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(data.DownloadError, match=r"GB still to download but .* has only 0.00 GB free"):
        fetch(hub, tmp_path)
    assert not logged(hub, "storage") and not list((tmp_path / "models--org--tiny" / "blobs").iterdir())


def test_long_files_show_progress_on_stderr(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "PROGRESS_MIN_BYTES", 1_000_000)
    fetch(hub, tmp_path)
    err = capsys.readouterr().err
    assert "tokenizer.json: 2.5/2.5 MB (100%), " in err and " MB/s, ETA 0m00s" in err
    assert "model.safetensors" not in err  # 0.6 MB

# ----------------------------------------------------------------------------- the Hub's answers


def test_the_hubs_refusals_are_one_line(hub, tmp_path):
    hub.repos["org/tiny"]["gated"] = True
    with pytest.raises(data.DownloadError, match=r"org/tiny is a gated model \(no token was sent\): accept its "
                                                 r"terms at http://127.0.0.1:\d+/org/tiny .* set HF_TOKEN"):
        fetch(hub, tmp_path)
    with pytest.raises(data.DownloadError, match=r"the token sent has no access yet"):
        fetch(hub, tmp_path, token="bad")
    fetch(hub, tmp_path, token="good")
    with pytest.raises(data.ModelNotFound, match=r"has no model org/nope \(if it is private, set HF_TOKEN"):
        fetch(hub, tmp_path, repo="org/nope")
    with pytest.raises(data.DownloadError, match=r"org/tiny has no revision 'v9'"):
        fetch(hub, tmp_path, revision="v9", token="good")
    hub.repos["org/pickles"] = {"refs": {"main": COMMIT}, "gated": False, "commits": {COMMIT: {
        "config.json": b"{}", "pytorch_model.bin": b"x", "tokenizer.json": b"{}"}}}
    hub.log.clear()
    with pytest.raises(data.DataError, match=r"org/pickles@main: has its weights only as pickles "
                                             r"\(pytorch_model.bin\); .* never unpickles"):
        fetch(hub, tmp_path, repo="org/pickles")
    assert len(hub.log) == 1  # refused before any file request


def test_a_missing_entry_and_a_missing_local_directory(hub, tmp_path, monkeypatch):
    hub.repos["org/ghost"] = {"refs": {"main": COMMIT}, "gated": False,
                              "commits": {COMMIT: {"config.json": b"{}", "model.safetensors": b"x"}}}
    real = data.HubSession.revision_info
    monkeypatch.setattr(data.HubSession, "revision_info",
                        lambda self, retry=True: (COMMIT, ["config.json", "model.safetensors", "tokenizer.json"]))
    with pytest.raises(data.DownloadError, match=r"tokenizer.json: the Hub lists this file but has no such file"):
        fetch(hub, tmp_path, repo="org/ghost")
    monkeypatch.setattr(data.HubSession, "revision_info", real)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.ModelNotFound, match=r"^runs/model: no such local directory, and http://127.0.0.1:\d+ "
                                                 r"has no model runs/model"):
        data.resolve_model("runs/model")
    (tmp_path / "token").write_text("good\n")
    hub.repos["org/tiny"]["gated"] = True
    assert data.hub_token() == "good"
    assert data.resolve_model("org/tiny").name == COMMIT  # the token file `huggingface-cli login` writes


def test_a_proxy_from_the_environment_is_used(hub, tmp_path, monkeypatch):
    """http_proxy and no_proxy as urllib reads them: the Hub through the proxy (here the fake Hub itself, asked
    for the whole URL), storage on 127.0.0.1 directly."""
    monkeypatch.setenv("http_proxy", hub.url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    fetch(hub, tmp_path, endpoint="http://hub.invalid", token="good")
    assert {h["Host"] for _, _, _, h in logged(hub, "hub")} == {"hub.invalid"}
    assert all(h["Authorization"] == "Bearer good" for _, _, _, h in logged(hub, "hub"))
    assert len(logged(hub, "storage")) == 1


def test_the_download_command_prints_the_model_directory(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_TOKEN", "good")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data.main(["download", "org/tiny"])
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "models--org--tiny" / "snapshots" / COMMIT)
    for bad, why in (("org/na--me", "not a Hub model id"), ("nope", "no such dataset")):
        with pytest.raises(SystemExit) as exit:
            data.main(["download", bad])
        assert exit.value.code == 2 and why in capsys.readouterr().err

# ----------------------------------------------------------------------------- the stock client


def test_the_stock_client_and_remask_fill_the_same_cache(hub, tmp_path):
    """snapshot_download (cache A) and remask (cache B) against the same Hub: the same blobs, links and refs at the
    same paths; each reads the other's cache offline."""
    hf = pytest.importorskip("huggingface_hub")
    a = Path(hf.snapshot_download("org/tiny", cache_dir=tmp_path / "a", endpoint=hub.url, token=False,
                                  allow_patterns=WANTED))
    b = fetch(hub, tmp_path / "b")
    assert a.relative_to(tmp_path / "a") == b.relative_to(tmp_path / "b")
    assert cache_files(tmp_path / "a" / "models--org--tiny") == cache_files(tmp_path / "b" / "models--org--tiny")
    hub.log.clear()
    assert fetch(hub, tmp_path / "a", offline=True) == a
    assert Path(hf.snapshot_download("org/tiny", cache_dir=tmp_path / "b", local_files_only=True)) == b
    assert Path(hf.hf_hub_download("org/tiny", "model.safetensors", cache_dir=tmp_path / "b",
                                   local_files_only=True)) == b / "model.safetensors"
    assert hub.log == []
