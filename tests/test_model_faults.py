"""Faults around model directories: kill -9 at every stage of write_directory, writers that must refuse to replace
what they did not write, weights that are not finite, and quantize.py's bad inputs (one `error:` line, a non-zero
exit code, no traceback, nothing of the user's touched)."""
import json
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

# ----------------------------------------------------------------------------- config.json and the shard index


def with_config(directory, edit):
    """directory's config.json, edited by edit(dict) (which may also return a replacement)."""
    config = json.loads((directory / "config.json").read_text())
    config = edit(config) or config
    (directory / "config.json").write_text(json.dumps(config))


def in_bf16(directory):
    file = directory / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})


@pytest.mark.parametrize("spelling", [{"torch_dtype": "auto"}, {"dtype": "auto"}, {"torch_dtype": None}, {},
                                      {"torch_dtype": "torch.bfloat16"}, {"dtype": "bfloat16"}])
def test_config_dtype_auto_or_none_is_the_stored_one_and_the_final_save_works(spelling, tmp_path):
    """A dtype of "auto" (transformers: the stored weights' dtype) or none at all loads as the weights' dtype, so the
    save at the end of a run (the model cast back to config.torch_dtype, as remask does) writes bf16 weights again."""
    shutil.copytree(STABLELM_TINY, tmp_path / "m")
    in_bf16(tmp_path / "m")
    with_config(tmp_path / "m", lambda c: {**{k: v for k, v in c.items() if k != "torch_dtype"}, **spelling})
    model = StableLM.from_pretrained(tmp_path / "m", dtype=torch.float32)  # as remask trains it
    assert model.config.torch_dtype == "bfloat16" and isinstance(getattr(torch, model.config.torch_dtype), torch.dtype)
    model.to(getattr(torch, model.config.torch_dtype)).save_pretrained(tmp_path / "out")
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert StableLM.from_pretrained(tmp_path / "out").config.torch_dtype == "bfloat16"


def test_config_dtype_auto_of_an_int8_checkpoint_is_its_float_dtype(tmp_path):
    shutil.copytree(STABLELM_TINY_INT8, tmp_path / "q")
    with_config(tmp_path / "q", lambda c: c.update(torch_dtype="auto"))
    assert StableLM.from_pretrained(tmp_path / "q").config.torch_dtype == "float32"  # not int8: the embedding's


QUANTIZED = {"quant_method": "bitsandbytes", "load_in_8bit": True}
# (what config.json holds instead, the field the one-line message names, and what it says)
BAD_CONFIGS = [
    ({"torch_dtype": "int8"}, "torch_dtype", "must be one of 'float32', 'float16', 'bfloat16', 'float64' or 'auto'"),
    ({"torch_dtype": "fp16"}, "torch_dtype", "got 'fp16'"),
    ({"torch_dtype": 16}, "torch_dtype", "got 16"),
    ({"torch_dtype": None, "dtype": {"": "bfloat16"}}, "dtype", "got {'': 'bfloat16'}"),
    ({"vocab_size": 10**20}, "vocab_size", "is more than 16777216"),
    ({"hidden_size": 2**40}, "hidden_size", "is more than"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers", "is more than 1024"),
    ({"num_attention_heads": -4}, "num_attention_heads", "must be a positive int"),
    ({"intermediate_size": 176.0}, "intermediate_size", "must be a positive int, got 176.0"),
    ({"max_position_embeddings": None}, "max_position_embeddings", "got None"),
    ({"rope_theta": 0}, "rope_theta", "must be a finite number > 0"),
    ({"rope_theta": "10000"}, "rope_theta", "got '10000'"),
    ({"partial_rotary_factor": 1e308}, "partial_rotary_factor", "must be a number from 0 to 1"),
    ({"layer_norm_eps": -1e-5}, "layer_norm_eps", "must be a finite number >= 0"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings", "true or false"),
    ({"bos_token_id": -1}, "bos_token_id", "a token id"),
    ({"eos_token_id": "0"}, "eos_token_id", "a token id"),
    ({"eos_token_id": [0, None]}, "eos_token_id", "a non-empty list of them"),
    ({"eos_token_id": []}, "eos_token_id", "a non-empty list of them"),
    ({"rope_parameters": [10000]}, "rope_parameters", "must be an object"),
    ({"quantization_config": "8bit"}, "quantization_config", "an object or null"),
    ({"quantization_config": {**QUANTIZED, "llm_int8_threshold": "6"}}, "llm_int8_threshold", "finite number >= 0"),
    ({"quantization_config": {**QUANTIZED, "llm_int8_threshold": None}}, "llm_int8_threshold", "got None"),
    ({"quantization_config": {**QUANTIZED, "llm_int8_skip_modules": "lm_head"}}, "llm_int8_skip_modules",
     "a list of module names"),
]


@pytest.mark.parametrize("change, field, message", BAD_CONFIGS, ids=[repr(case[0])[:60] for case in BAD_CONFIGS])
def test_config_fields_are_checked_where_they_are_read(change, field, message, tmp_path):
    shutil.copytree(STABLELM_TINY, tmp_path / "m")
    with_config(tmp_path / "m", lambda c: c.update(change))
    with pytest.raises(ValueError) as error:
        StableLM.from_pretrained(tmp_path / "m")
    text = str(error.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"{tmp_path / 'm' / 'config.json'}: ") and field in text
    assert message in text, text


def test_every_config_field_has_a_check():
    assert set(M.FIELD_CHECKS) == {f.name for f in M.fields(M.Config)} - {"torch_dtype"}


@pytest.mark.parametrize("text, message", [("[" * 100_000 + "]" * 100_000, "maximum recursion depth"),
                                           ('{"vocab_size": ' + "9" * 5000 + "}", "integer string conversion"),
                                           (b"\xff{}", "can't decode byte 0xff")])
def test_config_json_beyond_what_python_reads_is_one_line(text, message, tmp_path):
    shutil.copytree(STABLELM_TINY, tmp_path / "m")
    file = tmp_path / "m" / "config.json"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"^{file}: not valid JSON .*{message}") as error:
        StableLM.from_pretrained(tmp_path / "m")
    assert len(str(error.value).splitlines()) == 1


@pytest.fixture
def sharded(tmp_path):
    """The tiny model in three or more shards, and a valid shard outside its directory (never to be read)."""
    StableLM.from_pretrained(STABLELM_TINY).save_pretrained(tmp_path / "m", max_shard_size=40_000)
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) >= 3
    shutil.copy2(STABLELM_TINY / "model.safetensors", tmp_path / "outside.safetensors")
    return tmp_path / "m"


def first_entry(edit):
    """An index edit that changes the weight map's first entry: edit(name, file) -> (name, file)."""
    def change(index):
        entries = list(index["weight_map"].items())
        entries[0] = edit(*entries[0])
        index["weight_map"] = dict(entries)
    return change


# (a change to model.safetensors.index.json, what the one-line message says)
BAD_INDEXES = {
    "weight_map a list": (lambda i: i.update(weight_map=list(i["weight_map"].items())), "not a safetensors index"),
    "no weight_map": (lambda i: i.pop("weight_map"), "not a safetensors index"),
    "index a list": (lambda i: [i], "not a safetensors index"),
    "file a number": (first_entry(lambda name, file: (name, 1)), "the file 1: expected the name of a file"),
    "file null": (first_entry(lambda name, file: (name, None)), "the file None"),
    "file above": (first_entry(lambda name, file: (name, "../outside.safetensors")), "'../outside.safetensors'"),
    "absolute file": (first_entry(lambda name, file: (name, "{tmp}/outside.safetensors")), "outside.safetensors'"),
    "file in a subdirectory": (first_entry(lambda name, file: (name, f"sub/{file}")), "'sub/model-"),
    "file ..": (first_entry(lambda name, file: (name, "..")), "the file '..'"),
    "backslash": (first_entry(lambda name, file: (name, "..\\outside.safetensors")), "the file '..\\\\outside"),
    "total_size a string": (lambda i: i["metadata"].update(total_size="123"), "total_size (if any) is an int >= 0"),
    "total_size negative": (lambda i: i["metadata"].update(total_size=-1), "got {'total_size': -1}"),
    "metadata a list": (lambda i: i.update(metadata=[1]), "metadata must be an object"),
}


@pytest.mark.parametrize("case", BAD_INDEXES)
def test_shard_index_is_checked_and_nothing_outside_the_directory_is_read(case, sharded, monkeypatch):
    edit, message = BAD_INDEXES[case]
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index = edit(index) or index
    index_file.write_text(json.dumps(index).replace("{tmp}", str(sharded.parent)))
    opened = []
    monkeypatch.setattr(M, "safe_open", lambda file, *args, **kwargs: opened.append(file))
    with pytest.raises(ValueError) as error:
        StableLM.from_pretrained(sharded)
    text = str(error.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"{index_file}: ") and message in text, text
    assert opened == []  # refused before any shard is opened


def test_a_tensor_in_two_shards_and_a_layout_of_several_numbers_are_refused(sharded, tmp_path):
    shards = sorted(sharded.glob("model-*.safetensors"))
    first, second = load_file(shards[0]), load_file(shards[1])
    name = next(iter(first))
    save_file({**second, name: first[name]}, shards[1], metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name} is in both {shards[0]} and {shards[1]}"):
        StableLM.from_pretrained(sharded)
    shutil.copytree(STABLELM_TINY_INT8, tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight_format"] = torch.zeros(2, dtype=torch.uint8)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj.weight_format in .* has shape \[2\]: a layout is one number"):
        StableLM.from_pretrained(tmp_path / "q")

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
