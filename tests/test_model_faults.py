"""Faults around model directories: kill -9 at every stage of write_directory, writers that must refuse to replace
what they did not write, weights that are not finite, and quantize.py's bad inputs (one `error:` line, a non-zero
exit code, no traceback, nothing of the user's touched)."""
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import quantize
from conftest import NEOX_DIR, STABLELM_TINY, STABLELM_TINY_INT8, assert_same_weights, run_cli
from model import StableLM, check_replaceable, make_owned, owner, recover_directory, write_directory

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def copy_model(src, directory):
    """A model directory's files copied with the standard library only (safe in a forked child)."""
    for name in MODEL_FILES:
        shutil.copy2(src / name, directory / name)


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def tree(directory):
    """Every path under directory with its bytes (None for directories): what a refused command must not change."""
    return {str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes() for p in directory.rglob("*")}


def assert_loads_as(directory, src):
    """Loading directory gives the weights of the model directory src."""
    assert_same_weights(StableLM.from_pretrained(directory).state_dict(), StableLM.from_pretrained(src).state_dict())

# ----------------------------------------------------------------------------- kill -9 at each stage of a write


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def dying_on_call(function, n):
    """function, except that its n-th call kills the process before it does anything."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            die()
        return function(*args, **kwargs)
    return wrapper


def half_fill(directory):
    shutil.copy2(STABLELM_TINY_INT8 / "config.json", directory / "config.json")
    die()


# stage: (patches applied in the child, whether the atomic exchange is used, what `dest` holds right after the kill)
STAGES = {
    "during fill": (dict(fill=half_fill), True, "old"),
    "after fill, before marking complete": (dict(rename=1), True, "old"),
    "complete, before the exchange": (dict(_exchange=1), True, "old"),
    "after the exchange, before cleanup": (dict(delete=1), True, "new"),
    "fallback: between the two renames": (dict(rename=3), False, None),
    "fallback: after the renames, before cleanup": (dict(delete=1), False, "new"),
}


def killed_write(dest, patches, exchange):
    """write_directory(dest, <the int8 fixture>) in a forked child that kills itself (SIGKILL) where patches say."""
    pid = os.fork()
    if pid == 0:  # the child: only the standard library runs here (no torch ops after a fork)
        try:
            fill = patches.get("fill", lambda directory: copy_model(STABLELM_TINY_INT8, directory))
            if not exchange:
                M._exchange = lambda a, b: False
            if "_exchange" in patches:
                M._exchange = dying_on_call(M._exchange, patches["_exchange"])
            if "rename" in patches:
                M._rename = dying_on_call(M._rename, patches["rename"])
            if "delete" in patches:
                M._delete = dying_on_call(M._delete, patches["delete"])
            write_directory(dest, fill)
        finally:
            os._exit(1)  # never reached: every stage kills the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def remask_model(directory, src=STABLELM_TINY):
    """A model directory remask wrote (its owner record says so): what a later write may replace."""
    write_directory(directory, lambda d: copy_model(src, d))


@pytest.mark.parametrize("then", ["load", "write"])
@pytest.mark.parametrize("stage", STAGES)
def test_kill_leaves_the_old_or_the_new_directory(stage, then, tmp_path):
    patches, exchange, held = STAGES[stage]
    dest = tmp_path / "model"
    remask_model(dest)
    killed_write(dest, patches, exchange)
    left = leftovers(tmp_path)
    assert left  # the kill left something behind to repair or remove
    if held is not None:
        assert (dest / "config.json").read_bytes() == (
            (STABLELM_TINY if held == "old" else STABLELM_TINY_INT8) / "config.json").read_bytes()
    if then == "load":  # reading changes nothing: the leftovers stay for the next write, a missing dest says why
        if held is None:  # two renames: nothing at dest for an instant, the complete new directory beside it
            with pytest.raises(FileNotFoundError, match="a killed write left .model.new-"):
                StableLM.from_pretrained(dest)
        else:
            assert_loads_as(dest, STABLELM_TINY if held == "old" else STABLELM_TINY_INT8)
        assert leftovers(tmp_path) == left
    else:  # the next write puts things right (proven leftovers only), then writes
        write_directory(dest, lambda directory: copy_model(STABLELM_TINY, directory))
        assert_loads_as(dest, STABLELM_TINY)
        assert leftovers(tmp_path) == []


def test_kill_of_a_first_write_before_its_rename(tmp_path):
    killed_write(tmp_path / "model", dict(rename=2), exchange=True)  # complete, not yet at its place
    assert not (tmp_path / "model").exists() and leftovers(tmp_path)
    recover_directory(tmp_path / "model")  # what the next write does first
    assert_loads_as(tmp_path / "model", STABLELM_TINY_INT8)
    assert leftovers(tmp_path) == []


def test_recovery_leaves_a_live_writer_alone(tmp_path):
    busy = tmp_path / ".model.tmp-0123456789abcdef"
    make_owned(busy, "model")
    M.update_owner(busy, {**owner(busy), "token": "0123456789abcdef"})
    lock = M._lock(busy, blocking=True)  # what a writer in another process holds
    try:
        recover_directory(tmp_path / "model")
        assert busy.is_dir()
    finally:
        os.close(lock)
    recover_directory(tmp_path / "model")
    assert not busy.exists()


@pytest.mark.parametrize("name, proof", [
    (".model.new-0123456789abcdef", "none"),  # named like a leftover, holds no owner record
    (".model.old-0123456789abcdef", "other token"),  # an owner record whose token is not in its name
    (".model.tmp-killed", "own token"),  # not a token remask makes
    (".model.old-notes", "none"),
])
def test_what_only_looks_like_a_leftover_is_never_touched(name, proof, tmp_path):
    """A sibling named like a leftover but without remask's proof: neither loading nor writing the model touches it."""
    remask_model(tmp_path / "model")
    look_alike = tmp_path / name
    look_alike.mkdir()
    (look_alike / "notes.txt").write_text("mine")
    if proof != "none":
        token = name.rpartition("-")[2] if proof == "own token" else "fedcba9876543210"
        (look_alike / M.OWNER).write_text(f'{{"remask": "model", "token": "{token}"}}')
    before = tree(tmp_path / name)
    StableLM.from_pretrained(tmp_path / "model")
    write_directory(tmp_path / "model", lambda d: copy_model(STABLELM_TINY_INT8, d))
    assert tree(tmp_path / name) == before

# ----------------------------------------------------------------------------- what a writer may replace


@pytest.mark.parametrize("setup, replaceable", [
    ("absent", True), ("empty", True), ("remask model", True), ("remask checkpoint", False),
    ("model files, no owner record", False), ("owner record of another token only", True), ("unreadable record", False),
])
def test_only_what_remask_wrote_is_replaceable(setup, replaceable, tmp_path):
    path = tmp_path / "out"
    if setup == "empty":
        path.mkdir()
    elif setup.startswith("remask"):
        make_owned(path, setup.split()[1])
        copy_model(STABLELM_TINY, path)
    elif setup == "model files, no owner record":
        path.mkdir()
        copy_model(STABLELM_TINY, path)
    elif setup == "owner record of another token only":
        path.mkdir()
        (path / M.OWNER).write_text('{"remask": "model", "token": "abc"}')  # the token proves only the leftovers
    elif setup == "unreadable record":
        path.mkdir()
        (path / M.OWNER).write_text('{"remask": "model", "tok')
    if replaceable:
        check_replaceable(path, "model")
    else:
        with pytest.raises(FileExistsError, match=f"{path}: exists, holds .* left alone"):
            check_replaceable(path, "model")


@pytest.mark.parametrize("kind", ["unrelated files", "run directory", "file"])
def test_save_pretrained_refuses_what_it_did_not_write(kind, tmp_path):
    dest = tmp_path / "out"
    if kind == "file":
        dest.write_text("mine")
    else:
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
        if kind == "run directory":
            (dest / "checkpoints" / "step-000010").mkdir(parents=True)
            (dest / "checkpoints" / "step-000010" / "trainer.pt").write_text("state")
            (dest / "config.json").write_text("{}")
    before = tree(tmp_path)
    model = StableLM.from_pretrained(STABLELM_TINY)
    what = "exists and is not a directory" if kind == "file" else "exists, holds .*notes.txt"
    with pytest.raises(FileExistsError, match=f"{dest}: {what}"):
        model.save_pretrained(dest)
    assert tree(tmp_path) == before


def test_save_pretrained_replaces_a_model_directory_through_a_link_with_umask_modes(tmp_path):
    real = tmp_path / "disk" / "model"
    make_owned(real, "model")  # a model directory remask wrote
    copy_model(STABLELM_TINY_INT8, real)
    (real / "tokenizer.json").write_text("{}")
    (tmp_path / "model").symlink_to(real)

    def private_tokenizer(directory):  # as a mkstemp-and-rename writer leaves it
        (directory / "tokenizer.json").write_text("new")
        os.chmod(directory / "tokenizer.json", 0o600)

    old_umask = os.umask(0o027)
    try:
        StableLM.from_pretrained(STABLELM_TINY).save_pretrained(tmp_path / "model", extra=private_tokenizer)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "model").is_symlink()
    assert_loads_as(real, STABLELM_TINY)
    assert (real / "tokenizer.json").read_text() == "new" and leftovers(real.parent) == []
    assert os.stat(real).st_mode & 0o777 == 0o750
    assert {os.stat(p).st_mode & 0o777 for p in real.iterdir()} == {0o640}


def test_the_two_rename_fallback_replaces_too(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "_exchange", lambda a, b: False)
    dest = tmp_path / "model"
    write_directory(dest, lambda d: copy_model(STABLELM_TINY_INT8, d))
    write_directory(dest, lambda d: copy_model(STABLELM_TINY, d))
    assert_loads_as(dest, STABLELM_TINY)
    assert leftovers(tmp_path) == []

# ----------------------------------------------------------------------------- weights that are not finite


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_refuses_non_finite_weights_naming_the_tensor(value, dtype, tmp_path):
    shutil.copytree(STABLELM_TINY, tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    tensors = {k: v.to(dtype) for k, v in load_file(file).items()}
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{file}: tensor model.layers.1.mlp.down_proj.weight .* 1 of 11264 values"):
        StableLM.from_pretrained(tmp_path / "m")


def test_load_refuses_weights_that_overflow_the_requested_dtype(tmp_path):
    shutil.copytree(STABLELM_TINY, tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"][0] = 1e6  # finite in float32, infinite in float16
    save_file(tensors, file, metadata={"format": "pt"})
    StableLM.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="tensor model.norm.weight"):
        StableLM.from_pretrained(tmp_path / "m", dtype=torch.float16)

# ----------------------------------------------------------------------------- quantize.py: bad input


@pytest.fixture
def workspace(tmp_path):
    """src: a whole float model directory (with a tokenizer); notes: a directory of unrelated files."""
    shutil.copytree(STABLELM_TINY, tmp_path / "src")
    shutil.copy2(NEOX_DIR / "tokenizer.json", tmp_path / "src" / "tokenizer.json")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "notes" / "results").mkdir()
    (tmp_path / "a-file").write_text("mine")
    return tmp_path


def corrupt(src, kind):
    file = src / "model.safetensors"
    if kind == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    else:
        tensors = load_file(file)
        tensors["model.embed_tokens.weight"][0, 0] = float("nan")
        save_file(tensors, file, metadata={"format": "pt"})


# (arguments with {w} for the workspace, a setup step or None, what the error line must contain)
BAD_INPUTS = [
    (["{w}/missing", "{w}/out"], None, "missing: no such directory"),
    (["{w}/notes", "{w}/out"], None, "notes/config.json: no such config file"),
    (["{w}/src", "{w}/out"], "truncated", "src/model.safetensors: broken safetensors file"),
    (["{w}/src", "{w}/out"], "nan", "tensor model.embed_tokens.weight"),
    (["{w}/src", "{w}/out", "--prompts", "0"], None, "--prompts 0"),
    (["{w}/src", "{w}/out", "--prompts", "-2"], None, "--prompts -2"),
    (["{w}/src", "{w}/out", "--prompt-len", "0"], None, "--prompt-len 0"),
    (["{w}/src", "{w}/out", "--threshold", "-1"], None, "--threshold -1.0"),
    (["{w}/src", "{w}/out", "--threshold", "inf"], None, "--threshold inf"),
    (["{w}/src", "{w}/out", "--threshold", "nan"], None, "--threshold nan"),
    (["{w}/src", "{w}/out", "--skip", "lm_head", "mlp.gate"], None, "--skip mlp.gate: no such linear layer"),
    (["{w}/src", "{w}/src"], None, "src) is IN ("),
    (["{w}/src", "{w}"], None, ") contains IN ("),
    (["{w}/src", "{w}/notes"], None, "notes: exists, holds results/, todo.txt and was not made by remask"),
    (["{w}/src", "{w}/a-file"], None, "a-file: exists and is not a directory"),
    (["{w}/src", "{w}/out", "--dequantize"], None, "--dequantize needs an 8-bit checkpoint"),
]


@pytest.mark.parametrize("argv, setup, message", BAD_INPUTS, ids=[" ".join(case[0][2:]) or case[2].split(":")[0]
                                                                  for case in BAD_INPUTS])
def test_quantize_bad_input_is_one_line_and_touches_nothing(argv, setup, message, workspace, capsys):
    if setup:
        corrupt(workspace / "src", setup)
    before = tree(workspace)
    code, out, err = run_cli(quantize.main, [a.format(w=workspace) for a in argv], capsys)
    output = out + err
    lines = output.splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in output
    assert tree(workspace) == before


def test_quantize_refuses_an_8bit_input_and_ctrl_c_exits_130(workspace, capsys, monkeypatch):
    code, out, err = run_cli(quantize.main, [STABLELM_TINY_INT8, workspace / "out"], capsys)
    output = out + err
    assert code == 1 and "already an 8-bit checkpoint" in output and "--dequantize" in output
    shutil.copytree(STABLELM_TINY_INT8, workspace / "out")
    make_owned(workspace / "out", "model")  # a model directory remask wrote: replaceable
    before = tree(workspace)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(quantize, "_copy_tokenizer", lambda src: interrupted)  # inside the write of OUT
    code, out, err = run_cli(quantize.main, [workspace / "src", workspace / "out", "--prompts", "1"], capsys)
    output = out + err
    assert code == 130 and "Traceback" not in output
    assert [line for line in output.splitlines() if "interrupted" in line] == [output.splitlines()[-1]]
    assert tree(workspace) == before


def test_quantize_help_says_what_happens_to_an_existing_out(capsys):
    code, out, err = run_cli(quantize.main, ["--help"], capsys)
    output = out + err
    assert code == 0 and "--dequantize" in output
    text = " ".join(output.split())  # argparse wraps the epilog anywhere
    assert "An existing OUT is replaced" in text and "a model directory remask wrote" in text and "refused" in text
