"""Checkpoints that can be trusted: each records the size and CRC-32 of every file it holds in checksums.json,
written last; --resume verifies the newest and falls back to the newest intact one, naming what is wrong (or
refuses, listing every checkpoint's damage); rotation never deletes the checkpoint just written; a kill -9 at any
stage of a save (tests/kill_during_save.py) leaves a run that resumes bit-exactly; training data changed under the
same path is refused."""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import zlib
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import data
import remask
from conftest import (ROOT, TESTS, assert_same_weights, fail_micro_step, quiet, run_weights, tiny_config,
                      train_flags, write_jsonl)
from model import OWNER
from remask import TrainError

FILES = ("model/model.safetensors", "model/config.json", "model/tokenizer.json", "trainer.pt", "checksums.json")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Checkpoints of steps 1, 2 and 3 of a 4-step run, copied by each test that damages them."""
    cfg = tiny_config(tmp_path_factory.mktemp("base"), epochs=2, save_every=1, keep=3, stop_at=3)
    remask.train(cfg, log=quiet)
    return cfg


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same 4-step run without interruption: what every resumed run must end with, bit for bit."""
    cfg = tiny_config(tmp_path_factory.mktemp("straight"), epochs=2)
    remask.train(cfg, log=quiet)
    return run_weights(cfg.out)


def copy_run(base, tmp_path, **overrides):
    shutil.copytree(base.out, tmp_path / "run")
    return replace(base, out=str(tmp_path / "run"), **overrides)


def finite_garbage(n):
    return np.full(n // 4 + 1, 0.5, dtype=np.float32).tobytes()[:n]  # finite weights: only a checksum can tell


def damage(file, how):
    content = file.read_bytes()
    if how == "missing":
        file.unlink()
    elif how == "truncated":
        file.write_bytes(content[:len(content) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "garbage":  # 4 KB (or half of a small file) overwritten in the middle, the size unchanged
        n = min(4096, len(content) // 2)
        start = len(content) // 4
        file.write_bytes(content[:start] + finite_garbage(n) + content[start + n:])


def saves_of(out):
    return [p.name for p in remask.checkpoints(out)]


def save_fresh(out):
    """Checkpoint 1 of a fresh debug model, without training."""
    model = remask.StableLM(remask.Config.named("debug"))
    return remask.save_checkpoint(out, 1, model, data.embedded_tokenizer(), remask.Lilith(model.parameters(), lr=1e-3),
                                  tiny_config(out), keep=1, data=remask.data_fingerprint([]))

# ----------------------------------------------------------------------------- what a checkpoint holds


def test_checksums_record_every_file_and_are_written_last(tmp_path, monkeypatch):
    real = remask.write_checksums

    def checked(directory):  # everything else is in place when the checksums are written
        assert (directory / "trainer.pt").is_file() and (directory / "model" / "config.json").is_file()
        assert not (directory / "checksums.json").exists()
        real(directory)
    monkeypatch.setattr(remask, "write_checksums", checked)
    path = save_fresh(tmp_path)
    recorded = json.loads((path / "checksums.json").read_text())["files"]
    held = {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file()}
    assert set(recorded) == held - {"checksums.json"} and set(FILES) - {"checksums.json"} <= held
    for name, entry in recorded.items():
        assert entry["size"] == (path / name).stat().st_size
        assert int(entry["crc32"], 16) == zlib.crc32((path / name).read_bytes())
    assert remask.verify_checkpoint(path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_checkpoints_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = save_fresh(tmp_path)
    finally:
        os.umask(previous)
    for p in [path, *path.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~umask, p


def test_data_fingerprint_depends_on_every_token_and_the_order():
    train, _, tok = data.embedded_dataset(0, 8, 0, 2)
    examples = data.encode_many(train, tok)
    fingerprint = remask.data_fingerprint(examples)
    assert fingerprint == remask.data_fingerprint(data.encode_many(train, tok))
    assert fingerprint["examples"] == 8 and len(fingerprint["sha256"]) == 64
    assert remask.data_fingerprint(examples[::-1]) != fingerprint
    flipped = data.Encoded(examples[3].ids, examples[3].roles, examples[3].targets.clone(), examples[3].cot)
    flipped.targets[-1] = ~flipped.targets[-1]
    assert remask.data_fingerprint([*examples[:3], flipped, *examples[4:]]) != fingerprint
    a, b = examples[0], examples[1]  # the same tokens cut into examples elsewhere
    joined = data.Encoded(torch.cat([a.ids, b.ids[:1]]), torch.cat([a.roles, b.roles[:1]]),
                          torch.cat([a.targets, b.targets[:1]]), a.cot)
    rest = data.Encoded(b.ids[1:], b.roles[1:], b.targets[1:], b.cot)
    assert remask.data_fingerprint([joined, rest]) != remask.data_fingerprint([a, b])

# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "missing"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_falls_back_to_the_previous_checkpoint(tmp_path, base, name, how):
    cfg = copy_run(base, tmp_path)
    newest = remask.checkpoints(cfg.out)[-1]
    damage(newest / name, how)
    lines = []
    assert remask.find_resume_checkpoint(cfg.out, lines.append).name == "step-000002"
    assert len(lines) == 1 and "step-000003" in lines[0] and f"({name}: " in lines[0], lines


def test_garbage_in_the_weights_is_skipped_and_the_resumed_run_is_bit_exact(tmp_path, base, straight):
    """4 KB of finite garbage in the newest weights once trained to the end unnoticed."""
    cfg = copy_run(base, tmp_path)
    newest = remask.checkpoints(cfg.out)[-1]
    damage(newest / "model" / "model.safetensors", "garbage")
    loaded = remask.StableLM.from_pretrained(newest / "model")  # loads, and every weight is finite
    assert all(p.isfinite().all() for p in loaded.parameters())
    lines = []
    summary = remask.train(replace(cfg, resume=True, stop_at=0), log=lines.append)
    skipped = [line for line in lines if "skipping" in line]
    assert len(skipped) == 1 and "step-000003 (model/model.safetensors: not the bytes that were written" in skipped[0]
    assert any("resumed from" in line and line.endswith("step-000002 at step 2") for line in lines)
    assert summary["step"] == 4 and remask.verify_checkpoint(remask.checkpoints(cfg.out)[-1]) == []
    assert_same_weights(run_weights(cfg.out), straight)


def test_nan_garbage_never_becomes_the_last_good_checkpoint(tmp_path, base, monkeypatch):
    """NaN bytes in the newest weights: the run resumes from the one before, and when its loss then goes NaN the
    message names that one as the last good checkpoint, not the damaged one."""
    cfg = copy_run(base, tmp_path)
    weights_file = remask.checkpoints(cfg.out)[-1] / "model" / "model.safetensors"
    content = weights_file.read_bytes()
    nan = np.full(1024, np.nan, dtype=np.float32).tobytes()
    weights_file.write_bytes(content[:-len(nan)] + nan)
    fail_micro_step(monkeypatch, 1, lambda loss: loss * float("nan"))
    with pytest.raises(TrainError, match=r"loss is nan at step 3.*last good checkpoint: \S*step-000002\. "):
        remask.train(replace(cfg, resume=True, stop_at=0), log=quiet)


def test_no_intact_checkpoint_is_refused_listing_each(tmp_path, base, capsys):
    cfg = copy_run(base, tmp_path)
    first, second, third = remask.checkpoints(cfg.out)
    damage(first / "trainer.pt", "empty")
    damage(second / "checksums.json", "missing")
    damage(third / "model" / "tokenizer.json", "truncated")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    assert remask.main(["train", *train_flags(cfg), "--resume"]) == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --resume: no intact checkpoint") and "\n" not in message
    assert "Traceback" not in message
    for path, problem in ((third, r"model/tokenizer\.json: \d+ bytes, \d+ were written"),
                          (second, r"checksums\.json: missing"), (first, r"trainer\.pt: 0 bytes")):
        assert re.search(f"{path.name}: {problem}", message), message
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.name != "train.log"} == \
        {p: t for p, t in before.items() if p.name != "train.log"}  # nothing touched


def test_a_checkpoint_whose_files_match_but_do_not_load_is_one_line(tmp_path, base):
    cfg = copy_run(base, tmp_path)
    newest = remask.checkpoints(cfg.out)[-1]
    (newest / "trainer.pt").write_bytes(b"\x80 not a torch file")
    remask.write_checksums(newest)  # as if written so: the checksums cannot catch it, the loader must
    with pytest.raises(TrainError, match=r"^--resume: \S*step-000003 does not load: \w+: [^\n]*$"):
        remask.train(replace(cfg, resume=True), log=quiet)


def test_rotation_keeps_the_checkpoint_just_written_over_damaged_later_ones(tmp_path, base, straight):
    """Steps 2 and 3 damaged, --keep 1: the run resumes from step 1 and saves step 2 again; rotation then deletes
    step 1 but keeps the new step 2, never trading it for the damaged step 3 (sorted by step, it is older)."""
    cfg = copy_run(base, tmp_path, keep=1)
    for path in remask.checkpoints(cfg.out)[1:]:
        damage(path / "model" / "model.safetensors", "garbage")
    remask.train(replace(cfg, resume=True, stop_at=2), log=quiet)
    second, third = remask.checkpoints(cfg.out)
    assert (second.name, third.name) == ("step-000002", "step-000003")
    assert remask.verify_checkpoint(second) == [] and remask.verify_checkpoint(third) != []
    remask.train(replace(cfg, resume=True, stop_at=0), log=quiet)
    assert saves_of(cfg.out) == ["step-000004"]
    assert_same_weights(run_weights(cfg.out), straight)

# ----------------------------------------------------------------------------- kill -9 during a save


@pytest.fixture(scope="module")
def killed_run():
    """run(stage, cfg) -> the exit code of a training run killed at that stage (-9), from tests/kill_during_save.py."""
    server = subprocess.Popen([sys.executable, str(TESTS / "kill_during_save.py"), str(ROOT)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    def run(stage, cfg):
        server.stdin.write(json.dumps([stage, asdict(cfg)]) + "\n")
        server.stdin.flush()
        return int(server.stdout.readline())
    yield run
    server.stdin.close()
    server.wait(timeout=60)


@pytest.mark.parametrize("stage, resumed_from", [("model/ written", 2), ("trainer.pt written", 2),
                                                 ("checksums.json half written", 2), ("rotation", 3)])
def test_kill_at_each_stage_of_a_save_then_resume_is_bit_exact(tmp_path, straight, killed_run, stage, resumed_from):
    cfg = tiny_config(tmp_path, epochs=2, save_every=1, keep=2)
    assert killed_run(stage, cfg) == -signal.SIGKILL
    assert any(p.name.startswith(".step-") for p in (tmp_path / "run" / "checkpoints").iterdir())  # left behind
    lines = []
    summary = remask.train(replace(cfg, resume=True), log=lines.append)
    resumed = tmp_path / "run" / "checkpoints" / f"step-{resumed_from:06d}"
    assert f"resumed from {resumed} at step {resumed_from}" in lines and not any("skipping" in l for l in lines)
    assert summary["step"] == 4 and saves_of(cfg.out) == ["step-000003", "step-000004"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")] == [OWNER]
    assert_same_weights(run_weights(cfg.out), straight)

# ----------------------------------------------------------------------------- the data is part of the recipe


def as_tinycot_rows(records):
    """CoT records as rows of TinyCoT's schema (prompt, rationale, target)."""
    return [{"prompt": r.prompt, "rationale": r.rationale, "target": r.answer} for r in records]


def test_resume_refuses_training_data_changed_under_the_same_path(tmp_path):
    additions = [r for r in data.embedded_dataset(0, 200, 0, 2)[0] if isinstance(r, data.CoTRecord)]
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, as_tinycot_rows(additions[:64]))
    cfg = tiny_config(tmp_path, data=str(rows), stop_at=1)
    remask.train(cfg, log=quiet)
    write_jsonl(rows, as_tinycot_rows(additions[:20]))
    with pytest.raises(TrainError, match=r"the training data changed since \S*step-000001: 64 examples -> 20;"):
        remask.train(replace(cfg, resume=True), log=quiet)
    write_jsonl(rows, as_tinycot_rows(additions[64:128]))
    with pytest.raises(TrainError, match=r"changed since \S*step-000001: same count \(64 examples\), different"):
        remask.train(replace(cfg, resume=True), log=quiet)
    write_jsonl(rows, as_tinycot_rows(additions[:64]))  # the data put back: the run goes on
    assert remask.train(replace(cfg, resume=True, stop_at=2), log=quiet)["step"] == 2
