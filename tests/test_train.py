"""remask.py's training loop on the CPU with tiny_config (conftest.py): every mode learns, gradient accumulation
gives the step that one big batch gives, the step never waits on the device, --resume is bit-exact, checkpoints are
atomic, failures stop with messages that say what to do, the log, metrics.jsonl and loss.svg hold what they promise,
the MFU formula, the command line's flags and help, and bf16 autocast over fp32 weights."""
import json
import os
import re
import shutil
import signal
import xml.etree.ElementTree as ET
from dataclasses import fields, replace

import pytest
import torch

import data
import model as M
import remask
from conftest import (STABLELM_TINY, assert_same_weights, assert_weights_close, fail_micro_step, quiet, run_metrics,
                      run_weights, tiny_config)
from remask import TrainConfig, TrainError


# ----------------------------------------------------------------------------- learning, logging, metrics


@pytest.mark.parametrize("mode", remask.MODES)
def test_every_mode_learns_a_repeated_batch(tmp_path, mode):
    """One batch of 16 examples seen 6 times (the masks change per epoch): the loss falls well below its start."""
    cfg = tiny_config(tmp_path, mode=mode, n_train=16, epochs=6)
    remask.train(cfg, log=quiet)
    history = run_metrics(cfg.out)
    assert [m["step"] for m in history] == list(range(1, 7))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    for m in history:  # the parts this mode has, and no others
        assert {"ce_masked", "ce_full", "kl"} & m.keys() == set(remask.PARTS[mode])
    if mode == "remask":  # the loss is its parts put together
        for m in history:
            assert m["loss"] == pytest.approx(0.5 * (m["ce_masked"] + m["ce_full"]) + 0.1 * m["kl"], rel=1e-5)


def test_log_metrics_curve_and_model_hold_what_they_promise(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2, log_every=2)
    lines = []
    summary = remask.train(cfg, log=lines.append)
    history = run_metrics(cfg.out)
    assert [m["step"] for m in history] == [2, 4]  # every log_every steps, each averaging its steps
    line = re.compile(r"step (\d+)/4 \| loss [\d.]+ \(ce_masked [\d.]+, ce_full [\d.]+, kl [\d.]+\) \| lr [\d.e+-]+ \| "
                      r"grad norm [\d.]+ \| [\d,]+ tok/s \| MFU n/a \| peak mem [\d.]+ GB \| ETA \d+m\d\ds")
    logged = [m for m in map(line.fullmatch, lines) if m]
    assert [int(m[1]) for m in logged] == [2, 4]
    for m in history:
        assert m["total_steps"] == 4 and m["mfu"] is None and m["tokens_per_s"] > 0 and m["peak_mem_gb"] > 0
        assert m["lr"] == remask.one_cycle_lr(m["step"] - 1, 4, cfg.lr)  # the lr of the step just taken
        assert m["grad_norm"] > 0 and m["eta_s"] >= 0 and m["elapsed_s"] > 0
    assert open(os.path.join(cfg.out, "train.log")).read().splitlines()[-len(lines):] == lines
    svg = ET.parse(os.path.join(cfg.out, "loss.svg")).getroot()
    points = svg.find("{http://www.w3.org/2000/svg}polyline").get("points").split()
    assert len(points) == len(history)
    model = remask.StableLM.from_pretrained(summary["model"])  # a Hugging Face directory with its tokenizer
    assert len(data.load_tokenizer(summary["model"])) <= model.config.vocab_size


def test_mfu_formula_on_a_known_device(monkeypatch):
    """2 passes x B x T x (6N + 12LHQT) per ReMask micro-step against the device's peak (PaLM appendix B)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert remask.peak_flops(torch.device("cuda"), torch.bfloat16) == 989e12
    assert remask.peak_flops(torch.device("cuda"), torch.float32) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert remask.peak_flops(torch.device("cuda"), torch.bfloat16) is None  # unknown: n/a, never a guess
    assert remask.peak_flops(torch.device("cpu"), torch.bfloat16) is None

# ----------------------------------------------------------------------------- the step's arithmetic


def step_gradients(cfg, micro_batch, per_micro_batch_mean=False):
    """Gradients of the first optimizer step with the given micro-batch size."""
    train, _, tok = data.embedded_dataset(cfg.seed, cfg.n_train, 1, cfg.digits)
    examples, _ = data.fit_length(data.encode_many(train, tok), cfg.seq_len)
    torch.manual_seed(0)
    model = remask.StableLM(replace(remask.Config.named("debug"), vocab_size=len(tok)))
    loader = data.Loader(examples, tok, cfg.mask_config(), cfg.global_batch, micro_batch, cfg.seed)
    batches = loader.micro_batches(0, 0)
    counts = remask.step_counts(batches, torch.device("cpu"))
    for batch in batches:
        if per_micro_batch_mean:  # the common mistake: each micro-batch normalised by its own counts
            counts = remask.step_counts([batch], torch.device("cpu")) * len(batches)
        loss, _ = remask.micro_step_loss(model, batch, cfg.mode, cfg.kl_weight, counts, torch.device("cpu"),
                                         remask.nullcontext())
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", remask.MODES)
def test_gradient_accumulation_gives_the_whole_batch_gradient(tmp_path, mode):
    """One micro-batch of 16 or four of 4: the same gradient, because every micro-batch is normalised by the
    label count of the whole step; per-micro-batch means (examples of unequal length) give another one."""
    cfg = tiny_config(tmp_path, mode=mode, seed=3)
    whole = step_gradients(cfg, 16)
    for g, ref in zip(step_gradients(cfg, 4), whole):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
    wrong = step_gradients(cfg, 4, per_micro_batch_mean=True)
    assert max((g - ref).abs().max() / ref.abs().max() for g, ref in zip(wrong, whole)) > 1e-3


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", remask.MODES)
def test_the_step_reads_nothing_back_from_the_device(tmp_path, mode, device):
    """Between log steps the host never waits for the device: the whole optimizer step (masking, micro-batches,
    forward, chunked loss, backward, grad norm, Lilith) runs with the model on the meta device, which holds
    shapes but no values, so any .item(), nonzero, torch.equal or copy to the host raises; on a GPU, CUDA's
    sync debug mode turns any synchronisation into an error."""
    cfg = tiny_config(tmp_path, mode=mode, grad_checkpointing=True)
    train, _, tok = data.embedded_dataset(cfg.seed, cfg.n_train, 1, cfg.digits)
    examples, _ = data.fit_length(data.encode_many(train, tok), cfg.seq_len)
    loader = data.Loader(examples, tok, cfg.mask_config(), cfg.global_batch, 8, cfg.seed)  # 2 micro-batches
    device = torch.device(device)
    with device:
        model = remask.StableLM(replace(remask.Config.named("debug"), vocab_size=len(tok)))
    model.gradient_checkpointing = True
    optimizer = remask.Lilith(model.parameters(), lr=1e-3)
    autocast = remask._autocast(device, "bf16") if device.type == "cuda" else remask.nullcontext()
    previous = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2):
            loss, parts = remask.accumulate_gradients(model, loader.micro_batches(0, step), mode, 0.1, device,
                                                      autocast)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(previous)
    assert loss.device == parts.device == grad_norm.device == device and parts.shape == (3,)


def test_accumulated_training_equals_one_big_batch(tmp_path):
    """The whole optimizer step, Lilith included, over three steps: micro-batch 4 vs 16."""
    a, b = tiny_config(tmp_path, "a", micro_batch=16, epochs=2), tiny_config(tmp_path, "b", micro_batch=4, epochs=2)
    for cfg in (a, b):
        remask.train(cfg, log=quiet)
    assert_weights_close(run_weights(b.out), run_weights(a.out))


# ----------------------------------------------------------------------------- checkpoints and resume


def test_resume_is_bit_exact(tmp_path):
    straight = tiny_config(tmp_path, "straight", epochs=3, save_every=2)
    remask.train(straight, log=quiet)
    split = replace(straight, out=str(tmp_path / "split"), stop_at=3)
    first = remask.train(split, log=quiet)
    assert first["step"] == 3 and "model" not in first
    assert [p.name for p in remask.checkpoints(split.out)] == ["step-000002", "step-000003"]
    remask.train(replace(split, stop_at=0, resume=True), log=quiet)
    assert_same_weights(run_weights(split.out), run_weights(straight.out))
    timings = ("tokens_per_s", "peak_mem_gb", "elapsed_s", "eta_s")  # what may differ from run to run
    assert run_metrics(split.out) == [{**m, **{k: ms[k] for k in timings}}
                                      for m, ms in zip(run_metrics(straight.out), run_metrics(split.out))]


def test_resume_refuses_a_changed_recipe_and_a_missing_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, stop_at=1)
    with pytest.raises(TrainError, match="--resume: no checkpoint"):
        remask.train(replace(cfg, resume=True), log=quiet)
    remask.train(cfg, log=quiet)
    with pytest.raises(TrainError, match=r"--lr 0\.003.*0\.001"):
        remask.train(replace(cfg, resume=True, lr=1e-3), log=quiet)
    with pytest.raises(TrainError, match="--kl-weight"):
        remask.train(replace(cfg, resume=True, kl_weight=0.2), log=quiet)
    with pytest.raises(TrainError, match="--resume to continue.*--overwrite"):
        remask.train(cfg, log=quiet)  # a fresh run never silently mixes with an old one


def test_a_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2, save_every=1, keep=2, stop_at=3)
    remask.train(cfg, log=quiet)
    assert [p.name for p in remask.checkpoints(cfg.out)] == ["step-000002", "step-000003"]  # the last K kept
    # a save killed mid-way (here: the optimizer file fails after the model is written)
    monkeypatch.setattr(remask, "write_trainer_state", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    model = remask.StableLM.from_pretrained(remask.checkpoints(cfg.out)[-1] / "model")
    with pytest.raises(OSError, match="disk full"):
        remask.save_checkpoint(cfg.out, 4, model, data.embedded_tokenizer(), torch.optim.SGD(model.parameters()),
                               cfg, keep=2, data=remask.data_fingerprint([]))
    monkeypatch.undo()
    # and saves killed without any cleanup: their temporary directories are never trained on; the one that carries
    # remask's proof (its name's token in its owner record) is removed by the next save, a look-alike is left alone
    root = tmp_path / "run" / "checkpoints"
    partial, look_alike = root / ".step-000004.tmp-0123456789abcdef", root / ".step-000004.tmp-killed"
    for directory in (partial, look_alike):
        shutil.copytree(root / "step-000003", directory)
        (directory / "trainer.pt").write_bytes(b"\x80 torn")
    M.update_owner(partial, {"remask": "checkpoint", "token": "0123456789abcdef"})
    assert [p.name for p in remask.checkpoints(cfg.out)] == ["step-000002", "step-000003"]
    summary = remask.train(replace(cfg, stop_at=0, resume=True), log=quiet)
    assert summary["step"] == 4 and not partial.exists() and look_alike.exists()
    straight = tiny_config(tmp_path, "straight", epochs=2)
    remask.train(straight, log=quiet)
    assert_same_weights(run_weights(cfg.out), run_weights(straight.out))

# ----------------------------------------------------------------------------- failures


def test_nan_loss_stops_naming_the_step_and_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2, save_every=2)
    fail_micro_step(monkeypatch, 5, lambda loss: loss * float("nan"))  # step 3's first micro-batch
    with pytest.raises(TrainError, match=r"loss is nan at step 3.*last good checkpoint: .*step-000002"):
        remask.train(cfg, log=quiet)


def test_non_finite_weights_stop_before_they_are_saved(tmp_path, monkeypatch):
    """A step whose update leaves inf in the weights (the loss of that step was still finite) must not be saved as a
    good checkpoint: the read-back of a checkpoint step checks the weights too."""
    real_step = remask.Lilith.step

    def poisoned(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
    monkeypatch.setattr(remask.Lilith, "step", poisoned)
    cfg = tiny_config(tmp_path, epochs=2, save_every=1, keep=5, log_every=4)
    with pytest.raises(TrainError, match=r"weights are not finite at step 3.*last good checkpoint: .*step-000002"):
        remask.train(cfg, log=quiet)
    assert [p.name for p in remask.checkpoints(cfg.out)] == ["step-000001", "step-000002"]


def test_out_of_memory_names_the_flags(tmp_path, monkeypatch):
    def oom(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    fail_micro_step(monkeypatch, 1, oom)
    with pytest.raises(TrainError, match=r"--micro-batch 4 .*--grad-checkpointing"):
        remask.train(tiny_config(tmp_path), log=quiet)


def test_ctrl_c_saves_and_stops(tmp_path, monkeypatch):
    def interrupt(loss):
        os.kill(os.getpid(), signal.SIGINT)
        return loss
    fail_micro_step(monkeypatch, 3, interrupt)  # during step 2
    cfg = tiny_config(tmp_path, epochs=2)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    summary = remask.train(cfg, log=quiet)
    assert summary["interrupted"] and summary["step"] == 2
    assert [p.name for p in remask.checkpoints(cfg.out)] == ["step-000002"]
    assert signal.getsignal(signal.SIGINT) == before  # the handler is put back


def test_bad_model_paths_and_mismatched_tokenizers(tmp_path):
    with pytest.raises(TrainError, match="--model .*nowhere: no such directory"):
        remask.train(tiny_config(tmp_path, model=str(tmp_path / "nowhere")), log=quiet)
    model_dir = tmp_path / "tiny-model"
    shutil.copytree(STABLELM_TINY, model_dir)
    with pytest.raises(data.DataError, match="tokenizer.json: not found"):
        remask.train(tiny_config(tmp_path, model=str(model_dir)), log=quiet)
    data.embedded_tokenizer().save(model_dir)  # 512 rows: the 320-row fixture must grow
    lines = []
    remask.train(tiny_config(tmp_path, "grown", model=str(model_dir), max_steps=1), log=lines.append)
    assert any(re.search(r"growing the vocabulary from 320 to 512 rows", line) for line in lines)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
    with pytest.raises(TrainError, match="eos_token_id is 7.*does not belong"):
        remask.train(tiny_config(tmp_path, "mismatch", model=str(model_dir)), log=quiet)
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TrainError, match="broken safetensors"):
        remask.train(tiny_config(tmp_path, "broken", model=str(model_dir)), log=quiet)

# ----------------------------------------------------------------------------- command line


def test_a_flag_per_field_and_the_card_defaults(capsys):
    parser = remask.build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["train", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert f"--{remask._flag(f.name)}" in help_text and f.metadata["help"].split()[0] in help_text
    recipe = remask.config_from_args(parser.parse_args(["train", "--model", "m", "--data", "d"]), remask.DEMO)
    assert (recipe.mode, recipe.seq_len, recipe.micro_batch, recipe.global_batch, recipe.epochs, recipe.lr,
            recipe.kl_weight, recipe.input_mask, recipe.label_mask, recipe.answer_only, recipe.seed) == \
        ("remask", 256, 16, 256, 6, 1e-5, 0.1, 0.4, 0.1, 0.1, 0)
    demo = remask.config_from_args(parser.parse_args(["train", "--lr", "0.01"]), remask.DEMO)
    assert demo == TrainConfig(**{**remask.DEMO, "lr": 0.01})  # the preset, then the flags given
    assert remask.config_from_args(parser.parse_args(["train", "--no-group-by-length"]), {}).group_by_length is False
    with pytest.raises(ValueError, match="--micro-batch must be >= 1"):
        remask.config_from_args(parser.parse_args(["train", "--micro-batch", "0"]), {})
    with pytest.raises(ValueError, match="--input-mask"):
        TrainConfig(input_mask=1.5)


@pytest.mark.parametrize("log_every, save_every, stop_at, saved, logged", [
    (3, 2, 5, [2, 4, 5], [3, 5]),  # checkpoints between log steps, and at the stop
    (2, 3, 4, [3, 4], [2, 4]),
    (4, 1, 3, [1, 2, 3], [3]),
])
def test_save_every_fires_on_its_own_steps_through_the_command_line(tmp_path, log_every, save_every, stop_at,
                                                                     saved, logged):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--n-train", "96", "--global-batch", "16", "--micro-batch", "16",
            "--seq-len", "64", "--digits", "2", "--epochs", "1", "--n-eval", "0", "--threads", "1", "--device", "cpu",
            "--keep", "10", "--log-every", str(log_every), "--save-every", str(save_every), "--stop-at", str(stop_at)]
    assert remask.main(args) == 0
    assert [int(p.name.split("-")[1]) for p in remask.checkpoints(out)] == saved
    assert [m["step"] for m in run_metrics(out)] == logged


@pytest.mark.parametrize("command", [[], ["train"], ["compare"], ["generate"]])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        remask.build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0 and "usage: remask.py" in capsys.readouterr().out


@pytest.mark.parametrize("device, compile", [("cpu", False), pytest.param("cuda", False, marks=pytest.mark.gpu),
                                             pytest.param("cuda", True, marks=pytest.mark.gpu)])
def test_bf16_autocast_over_fp32_weights(tmp_path, device, compile):
    """--precision bf16 runs the model under bf16 autocast (bf16 logits into the chunked loss) while the weights
    and Lilith's state stay fp32: the GPU configuration, on the CPU as well as on a GPU (eager and compiled)."""
    cfg = tiny_config(tmp_path, precision="bf16", n_train=8, global_batch=8, epochs=4, device=device, compile=compile)
    remask.train(cfg, log=quiet)
    history = run_metrics(cfg.out)
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    assert all(w.dtype == torch.float32 for w in run_weights(cfg.out).values())
    state = torch.load(remask.checkpoints(cfg.out)[-1] / "trainer.pt", weights_only=False)["optimizer"]["state"]
    assert all(s["v_avg"].dtype == torch.float32 for s in state.values())
