"""remask's promises about the user's files, each checked as a property over several cases: everything under the
test's directory is hashed before a refused command and after it, and must not have changed.

1. Ownership: remask deletes, replaces or recovers only what carries its proof (an owner record; a leftover's
   token); anything else in the way is a refusal before any work, naming the path.
2. Inputs are never outputs, whatever the spelling of the paths (links, '..', relative or absolute).
3. Reading never changes anything (tests/test_model_faults.py: loading beside a killed write's leftovers).
4. One writer at a time: a second run on an --out that a live process writes is refused.
5. Inputs are checked where they are read, before any work; what a mode or data source ignores is an error.
7. The last boundary: an exception nobody anticipated is one `error: internal error` line.
(6, nothing waits forever: tests/test_hub.py and tests/test_data_download.py.)"""
import fcntl
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

import model as M
import remask
from conftest import ROOT, STABLELM_TINY, quiet, run_cli, tiny_config, write_jsonl


def snapshot(root) -> dict:
    """Every path under root with a hash of its bytes (links as their targets): what a refusal must not change."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "dir"
    return found


def refused(tmp_path, capsys, argv, message):
    """`remask.py ARGV` ends in one error line holding message, and nothing under tmp_path changed."""
    before = snapshot(tmp_path)
    code, out, err = run_cli(remask.main, [str(a) for a in argv], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and "internal error" not in err
    assert snapshot(tmp_path) == before


def cot_rows(n):
    return [{"prompt": f"{i}+1?", "rationale": f"{i}+1={i + 1}", "target": str(i + 1)} for i in range(n)]

# ----------------------------------------------------------------------------- 1. ownership


@pytest.mark.parametrize("name", ["train.log", "metrics.jsonl", "loss.svg", "model", "checkpoints"])
def test_a_run_refuses_an_out_holding_files_it_did_not_write(name, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    if name in ("model", "checkpoints"):
        (out / name).mkdir()
        (out / name / "notes.txt").write_text("mine")
    else:
        (out / name).write_text("mine")
    refused(tmp_path, capsys, ["train", "--out", out, "--n-train", "32", "--device", "cpu"], str(out / name))


def test_overwrite_replaces_only_the_runs_own_outputs(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2, save_every=1)
    remask.train(cfg, log=quiet)
    mine = [tmp_path / "run" / "checkpoints" / "notes.txt", tmp_path / "run" / "results.csv",
            tmp_path / "run" / "checkpoints" / "step-000999"]
    mine[0].write_text("mine")
    mine[1].write_text("mine")
    mine[2].mkdir()  # named like a checkpoint, without remask's owner record
    before = {p: snapshot(p.parent)[p.name] for p in mine}
    remask.train(replace(cfg, overwrite=True), log=quiet)
    assert {p: snapshot(p.parent)[p.name] for p in mine} == before
    assert [p.name for p in remask.checkpoints(cfg.out)] == ["step-000003", "step-000004"]


@pytest.mark.parametrize("what", ["a training run", "unrelated files"])
def test_compare_refuses_an_out_that_is_not_a_comparison(what, tmp_path, capsys):
    out = tmp_path / "out"
    if what == "a training run":
        remask.train(tiny_config(tmp_path, "out/sft-seed0", mode="sft"), log=quiet)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    refused(tmp_path, capsys, ["compare", "--out", out, "--seeds", "1", "--n-train", "32"], "choose another --out")


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_out_is_never_the_current_directory(out, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(tmp_path, capsys, ["train", "--out", out], "--out is empty")
    refused(tmp_path, capsys, ["compare", "--out", out], "--out is empty")

# ----------------------------------------------------------------------------- 2. inputs are never outputs


@pytest.mark.parametrize("layout", ["out is the model's parent", "out/model links to the model", "out is the model",
                                    "out inside the model", "data inside out/checkpoints"])
def test_train_never_writes_into_what_it_reads(layout, tmp_path, capsys, monkeypatch):
    data_file = write_jsonl(tmp_path / "train.jsonl", cot_rows(40))
    model = tmp_path / "work" / "model"
    shutil.copytree(STABLELM_TINY, model)
    out = {"out is the model's parent": tmp_path / "work", "out is the model": model,
           "out inside the model": model / "run"}.get(layout, tmp_path / "run")
    if layout == "out/model links to the model":
        out.mkdir()
        (out / "model").symlink_to(model)
    if layout == "data inside out/checkpoints":
        (out / "checkpoints").mkdir(parents=True)
        data_file = write_jsonl(out / "checkpoints" / "train.jsonl", cot_rows(40))
    spelled = os.path.relpath(model, tmp_path)  # a relative spelling of the same path
    monkeypatch.chdir(tmp_path)
    refused(tmp_path, capsys, ["train", "--model", spelled, "--data", data_file, "--out", out, "--device", "cpu"],
            "would change an input")


def test_eval_output_is_never_an_input(tmp_path, capsys):
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "2+2?", "answer": "#### 4"}])
    for output in (test, tmp_path / "." / "train.jsonl"):
        refused(tmp_path, capsys, ["eval", "gsm8k", "--model", STABLELM_TINY, "--data", test, "--fewshot-data", train,
                                   "--output", output], "would change an input")
    refused(tmp_path, capsys, ["eval", "arc", "--model", STABLELM_TINY, "--data", test, "--fewshot-data",
                               tmp_path / "x" / ".." / "test.jsonl", "--output", tmp_path / "o.jsonl"],
            "is the --data file")

# ----------------------------------------------------------------------------- 4. one writer at a time


def test_a_second_run_on_a_live_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    M.make_owned(out, "run", wrote=[])
    fd = os.open(out, os.O_RDONLY)  # what the first run's process holds
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        refused(tmp_path, capsys, ["train", "--out", out, "--n-train", "32", "--device", "cpu"],
                "another remask process is writing this run")
    finally:
        os.close(fd)

# ----------------------------------------------------------------------------- 5. inputs checked before any work


@pytest.mark.parametrize("argv, message", [
    (["--mode", "sft", "--kl-weight", "0.2"], "--kl-weight does nothing under --mode sft"),
    (["--mode", "sft", "--input-mask", "0.3"], "--input-mask does nothing under --mode sft"),
    (["--mode", "masked-thought", "--kl-weight", "0.2"], "--kl-weight does nothing under --mode masked-thought"),
    (["--data", "{tmp}/d.jsonl", "--digits", "3"], "--digits does nothing with --data"),
    (["--data", "{tmp}/d.jsonl", "--n-train", "100"], "--n-train does nothing with --data"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--n-train", "1000000000"], "--n-train must be in [1, 1000000]"),
    (["--eval-data", "{tmp}/d.jsonl"], "--eval-data needs --data"),
    (["--data", "{tmp}/d.jsonl", "--eval-data", "{tmp}/d.jsonl", "--n-eval", "3"], "pass one of them"),
])
def test_what_a_mode_or_source_ignores_is_an_error(argv, message, tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", cot_rows(40))
    refused(tmp_path, capsys, ["train", "--out", tmp_path / "run"] + [a.format(tmp=tmp_path) for a in argv], message)


def test_a_sequence_longer_than_the_context_is_refused(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", cot_rows(40))
    context = json.loads((STABLELM_TINY / "config.json").read_text())["max_position_embeddings"]
    model = tmp_path / "model"
    shutil.copytree(STABLELM_TINY, model)
    remask.embedded_tokenizer().save(model)
    code, out, err = run_cli(remask.main, ["train", "--model", str(model), "--data", str(tmp_path / "d.jsonl"),
                                           "--out", str(tmp_path / "run"), "--seq-len", str(context + 1),
                                           "--device", "cpu"], capsys)
    assert code == 1 and f"longer than the model's context of {context}" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_torn_metrics_line_does_not_block_a_resume(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2, save_every=1, stop_at=2)
    remask.train(cfg, log=quiet)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo\n\n')
    summary = remask.train(replace(cfg, stop_at=0, resume=True), log=quiet)
    assert summary["step"] == 4 and [m["step"] for m in map(json.loads, metrics.read_text().splitlines())
                                     if "loss" in m] == [1, 2, 3, 4]


def test_resume_accepts_another_spelling_of_the_same_data(tmp_path, monkeypatch):
    data_file = write_jsonl(tmp_path / "d.jsonl", cot_rows(40))
    cfg = tiny_config(tmp_path, data=str(data_file), epochs=2, save_every=1, stop_at=2)
    remask.train(cfg, log=quiet)
    monkeypatch.chdir(tmp_path)
    summary = remask.train(replace(cfg, data="./d.jsonl", stop_at=0, resume=True), log=quiet)
    assert summary["step"] == summary["total_steps"] > 2

def test_a_file_size_limit_while_saving_is_one_line_and_leaves_no_temporary(tmp_path):
    """RLIMIT_FSIZE (ulimit -f) reached by a checkpoint's weights: an OS error naming the file, not an internal one."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # noqa: E731
    run = subprocess.run([sys.executable, str(ROOT / "remask.py"), "train", "--out", str(tmp_path / "run"),
                          "--n-train", "64", "--max-steps", "2", "--save-every", "1", "--n-eval", "0", "--threads", "1",
                          "--device", "cpu"], preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr and "internal error" not in run.stderr
    assert run.stderr.splitlines()[-1].startswith("error: ") and "cannot be written" in run.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [M.OWNER]  # no temporary left

# ----------------------------------------------------------------------------- 7. the last boundary


def test_an_unanticipated_failure_is_one_line_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(remask, "load_examples", lambda *a, **k: 1 / 0)
    argv = ["train", "--out", str(tmp_path / "run"), "--n-train", "32", "--device", "cpu"]
    code, out, err = run_cli(remask.main, argv, capsys)
    assert code == 1 and err == ("error: internal error: ZeroDivisionError: division by zero (set REMASK_TRACEBACK=1 "
                                 "to see the traceback)\n")
    monkeypatch.setenv("REMASK_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        remask.main(argv)
