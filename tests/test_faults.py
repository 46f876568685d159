"""Faults a user meets with `remask.py train`: every bad input is one `error:` line that names the flag or file,
exit code 1 and no traceback, checked before anything the user has is touched (an existing run keeps its
checkpoints, train.log and metrics.jsonl even under --overwrite); the demo starts over only in its own directory;
SIGTERM, like Ctrl-C, finishes the step, saves and exits (143), and --resume then ends bit for bit where an
uninterrupted run ends."""
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import data
import remask
from conftest import ROOT, STABLELM_TINY_INT8, assert_same_weights, quiet, run_weights

# the tiny_config run (conftest.py) as flags: 2 steps of 16 two-digit additions, ~0.1 s a step
TINY_FLAGS = ["--n-train", "32", "--global-batch", "16", "--micro-batch", "8", "--seq-len", "64", "--digits", "2",
              "--epochs", "1", "--lr", "3e-3", "--log-every", "1", "--save-every", "0", "--n-eval", "0",
              "--threads", "1", "--device", "cpu"]


def snapshot(directory) -> dict:
    """Every file under directory with a hash of its bytes."""
    root = Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run directory as a user has it: checkpoints, train.log, metrics.jsonl, loss.svg, model/."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert remask.main(["train", *TINY_FLAGS, "--out", str(out), "--save-every", "1"]) == 0
    return out


@pytest.fixture
def run_dir(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def int8_model(tmp_path) -> Path:
    path = tmp_path / "int8"
    shutil.copytree(STABLELM_TINY_INT8, path)
    data.embedded_tokenizer().save(path)
    return path


def one_error_line(capsys, *names):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and captured.err.strip() == errors[0], captured.err
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


# Bad inputs with --overwrite on an existing run: validation comes before the run directory is touched.
BAD_FLAGS = [
    (["--lr", "0"], ["--lr must be > 0"]),
    (["--lr", "inf"], ["--lr must be a finite number"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--kl-weight", "nan"], ["--kl-weight"]),
    (["--weight-decay", "-1"], ["--weight-decay must be >= 0"]),
    (["--pct-start", "1"], ["--pct-start"]),
    (["--input-mask", "1.5"], ["--input-mask must be a probability"]),
    (["--answer-only", "-0.1"], ["--answer-only must be a probability"]),
    (["--micro-batch", "0"], ["--micro-batch must be >= 1"]),
    (["--device", "foo"], ["--device foo"]),
    (["--model", "{tmp}/nowhere"], ["--model", "nowhere"]),
    (["--model", "{int8}"], ["--model", "8-bit (LLM.int8) checkpoint", "quantize.py --dequantize"]),
    (["--data", "{tmp}/missing.jsonl"], ["missing.jsonl"]),
    (["--data", "{tmp}"], ["is a directory"]),
]


@pytest.mark.parametrize("flags, names", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_and_touch_nothing(run_dir, tmp_path, capsys, flags, names):
    before = snapshot(run_dir)
    flags = [f.format(tmp=tmp_path, int8=int8_model(tmp_path) if "{int8}" in f else "") for f in flags]
    embedded = {"--n-train", "--digits"} if "--data" in flags else set()  # flags --data makes an error of
    tiny = [f for i, f in enumerate(TINY_FLAGS) if f not in embedded and TINY_FLAGS[i - 1] not in embedded]
    assert remask.main(["train", *tiny, "--out", str(run_dir), "--overwrite", *flags]) == 1
    one_error_line(capsys, *[n.format(tmp=tmp_path) for n in names])
    assert snapshot(run_dir) == before


def test_a_run_directory_is_never_started_over_without_overwrite(run_dir, capsys):
    before = snapshot(run_dir)
    assert remask.main(["train", *TINY_FLAGS, "--out", str(run_dir)]) == 1  # the demo preset too: no --model/--data
    one_error_line(capsys, str(run_dir / "checkpoints"), "--resume", "--overwrite")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("where", ["file", "under a file", "read-only"])
def test_an_out_that_cannot_be_a_directory(tmp_path, capsys, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine\n")
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    if where == "read-only" and os.access(read_only, os.W_OK):  # root ignores permissions, not sysfs
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no directory this user cannot write to")
        out = Path("/sys/remask-test")
    else:
        out = {"file": blocker, "under a file": blocker / "run", "read-only": read_only / "run"}[where]
    assert remask.main(["train", *TINY_FLAGS, "--out", str(out)]) == 1
    one_error_line(capsys, f"--out {out}")
    assert blocker.read_text() == "mine\n" and not (read_only / "run").exists()


def test_a_global_batch_larger_than_the_data_is_clamped_with_a_warning(tmp_path):
    lines = []
    flags = dict(n_train=32, global_batch=1000, micro_batch=8, seq_len=64, digits=2, epochs=2, save_every=0,
                 n_eval=0, threads=1, device="cpu", out=str(tmp_path / "run"))
    remask.train(remask.TrainConfig(**flags), log=lines.append)
    warning = "warning: --global-batch 1000 is larger than the 32 training examples: each step takes all 32"
    assert f"{warning} (one step per epoch)" in lines
    assert any("2 steps of 32 sequences" in line for line in lines)  # what the log claims is what runs


def test_usage_errors_stay_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        remask.main(["train", "--micro-batch", "abc"])
    assert exit_.value.code == 2 and "--micro-batch" in capsys.readouterr().err


def test_a_failed_resume_writes_its_error_to_train_log(run_dir, capsys):
    checkpoints = snapshot(run_dir / "checkpoints")
    assert remask.main(["train", *TINY_FLAGS, "--out", str(run_dir), "--resume", "--lr", "1e-3"]) == 1
    line = one_error_line(capsys, "--lr")
    assert (run_dir / "train.log").read_text().splitlines()[-1] == line
    assert snapshot(run_dir / "checkpoints") == checkpoints


def test_the_demo_starts_over_only_in_its_own_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # `make train` twice: the demo's runs/demo starts over
        assert remask.main(["train", *TINY_FLAGS, "--stop-at", "1"]) == 0
    assert [p.name for p in remask.checkpoints(tmp_path / "runs" / "demo")] == ["step-000001"]
    assert remask.main(["train", *TINY_FLAGS, "--stop-at", "1", "--out", "elsewhere"]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path / "elsewhere")
    assert remask.main(["train", *TINY_FLAGS, "--stop-at", "1", "--out", "elsewhere"]) == 1
    one_error_line(capsys, "holds checkpoints")
    assert snapshot(tmp_path / "elsewhere") == before


def test_ctrl_c_during_set_up_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(remask, "load_examples", interrupted)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    assert remask.main(["train", *TINY_FLAGS, "--out", str(tmp_path / "run")]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted (SIGINT)\n" and "Traceback" not in captured.out
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGINT) == before


def test_a_second_signal_quits_at_once():
    with remask._StopOnSignal(log=quiet) as stopper:
        stopper.in_loop = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.signum == signal.SIGTERM  # the first one: the loop stops at its next step
        with pytest.raises(remask.Interrupted) as quit_:
            os.kill(os.getpid(), signal.SIGTERM)
    assert quit_.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interruption_crosses_processes_intact(signum):
    """A compare worker's interruption reaches its parent pickled: the same signal name and exit code."""
    again = pickle.loads(pickle.dumps(remask.Interrupted(signum)))
    assert type(again) is remask.Interrupted and again.exit_code == 128 + signum and str(again) == signum.name


def test_sigterm_saves_and_resume_is_bit_exact(tmp_path):
    """A training process gets SIGTERM after its second step: it finishes the step it is in, saves, exits 143;
    --resume then ends with the weights of a run that was never interrupted."""
    flags = [*TINY_FLAGS, "--n-train", "48", "--epochs", "2"]  # 6 steps: the signal lands mid-run
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-u", str(ROOT / "remask.py"), "train", *flags, "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not child.stdout.readline().startswith("step 2/6"):  # one pipe: communicate() reads what is buffered
        assert child.poll() is None
    child.send_signal(signal.SIGTERM)
    output = child.communicate(timeout=120)[0]
    assert child.returncode == 143, output[-3000:]
    assert "SIGTERM: stopping after this step" in output and "Traceback" not in output
    saved = remask.checkpoints(out)
    assert len(saved) == 1 and 2 <= int(saved[0].name.split("-")[1]) < 6
    assert remask.main(["train", *flags, "--out", str(out), "--resume"]) == 0
    assert remask.main(["train", *flags, "--out", str(tmp_path / "straight")]) == 0
    assert_same_weights(run_weights(out), run_weights(tmp_path / "straight"))
