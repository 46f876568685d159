"""--offload cpu on a GPU (FSDP2's CPUOffloadPolicy in one process), marked `gpu`: skipped without CUDA, and never
run yet (no GPU was available when it was written). A 2-layer model of StableLM-3B's width and vocabulary (416M
parameters, fp32 master weights) trains 4 optimizer steps of 8 sequences, 2 micro-batches each:

- offloaded, its weights end as a plain run's (whole model on the GPU) to fp32 rounding, with the tolerances of the
  sharded tests (rtol 1e-4, atol 2e-6): both in fp32, so that the only difference is where Lilith steps (the CPU or
  the GPU) and the float sums that go with it;
- offloaded, a run stopped after step 2 and resumed ends bit for bit as the run that went on;
- offloaded in bf16 (the recipe), its peak GPU memory stays below the plan's GPU side (remask.sharded_plan) plus 15%
  (what the plan leaves out: cuBLAS workspaces, the allocator's rounding, autocast's fp32 copies of the norms);
- the log says where the state lives: 8.32 GB (20 bytes a parameter) on the GPU for the plain run, in host memory
  for the offloaded ones.
The runs go in one subprocess (this file as a script), the straight and the stopped run with torch's deterministic
algorithms and the cuBLAS workspace they need, so that they repeat bit for bit; each run's checkpoints (6.7 GB
apiece) are deleted when done."""
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import remask  # noqa: E402
from remask import Config, StableLM, TrainConfig  # noqa: E402
from conftest import run_metrics, run_weights  # noqa: E402

pytestmark = pytest.mark.gpu

MICRO_BATCH, SEQ_LEN = 4, 64
RUNS = {"plain": dict(), "offload": dict(parallel="fsdp", offload="cpu"),
        "stopped": dict(parallel="fsdp", offload="cpu", stop_at=2),
        "bf16": dict(parallel="fsdp", offload="cpu", precision="bf16")}
MEMORY_MARGIN = 1.15


def model_config(tok) -> Config:
    """StableLM-3B's width and vocabulary, 2 blocks, stored in fp32 (the final model/ keeps the master weights)."""
    return replace(Config.named("stablelm-3b-4e1t"), num_hidden_layers=2, eos_token_id=tok.eos_id,
                   bos_token_id=tok.eos_id, torch_dtype="float32")


def run_config(out, name, **overrides) -> TrainConfig:
    """4 optimizer steps of 8 embedded additions (2 epochs of 16), 2 micro-batches of 4 per step, on the GPU."""
    settings = dict(model=str(out / "model"), out=str(out / name), n_train=16, global_batch=8,
                    micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, digits=2, epochs=2, lr=1e-3, log_every=1,
                    save_every=0, keep=1, n_eval=0, device="auto", precision="fp32")
    return TrainConfig(**{**settings, **overrides})


def worker(out):
    """The runs, in this process. The two whose weights must agree bit for bit use deterministic kernels only (not
    warn_only: with it, memory-efficient attention keeps its non-deterministic backward); an op without one stops
    the run with its name."""
    tok = data.embedded_tokenizer()
    torch.manual_seed(0)
    StableLM(model_config(tok)).save_pretrained(out / "model", extra=tok.save)
    for name, overrides in RUNS.items():
        torch.use_deterministic_algorithms(name in ("offload", "stopped"))
        remask.train(run_config(out, name, **overrides), log=print)
        if name != "stopped":
            shutil.rmtree(out / name / "checkpoints")
    torch.use_deterministic_algorithms(True)
    remask.train(run_config(out, "stopped", **{**RUNS["stopped"], "stop_at": 0, "resume": True}), log=print)
    shutil.rmtree(out / "stopped" / "checkpoints")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.cuda.is_available():  # the conftest skips `gpu` tests first; this guards a direct call
        pytest.skip("needs CUDA")
    out = tmp_path_factory.mktemp("offload")
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # what deterministic cuBLAS needs, before CUDA starts
    run = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, env=env, timeout=480)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return out, run.stdout


def test_offloaded_weights_match_a_plain_run(runs):
    out, _ = runs
    initial = load_file(out / "model" / "model.safetensors")
    plain, offloaded = run_weights(out / "plain"), run_weights(out / "offload")
    for m, ref in zip(run_metrics(out / "offload"), run_metrics(out / "plain")):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    for key, w in plain.items():
        torch.testing.assert_close(offloaded[key], w, rtol=1e-4, atol=2e-6)
    moved = max((w - initial[key]).abs().max().item() for key, w in plain.items())
    assert moved > 20 * 2e-6  # the steps moved the weights far beyond the tolerance


def test_offloaded_stop_and_resume_is_bit_exact(runs):
    out, _ = runs
    straight, resumed = run_weights(out / "offload"), run_weights(out / "stopped")
    for key, w in straight.items():
        assert torch.equal(resumed[key], w), key
    assert [m["loss"] for m in run_metrics(out / "stopped")] == [m["loss"] for m in run_metrics(out / "offload")]


def test_offloaded_peak_gpu_memory_is_within_the_plan(runs):
    """bf16, 2 micro-batches a step: the whole fp32 gradient accumulates on the GPU, the state stays on the host."""
    out, _ = runs
    peak = max(m["peak_mem_gb"] for m in run_metrics(out / "bf16")) * 1e9
    config = model_config(data.embedded_tokenizer())
    plan = remask.sharded_plan(config, 1, remask.PASSES["remask"] * MICRO_BATCH * SEQ_LEN, offload=True,
                               accumulating=True, compute_bytes=2)
    print(f"peak {peak / 1e9:.2f} GB, plan {plan.gpu / 1e9:.2f} GB")
    assert peak < MEMORY_MARGIN * plan.gpu  # the plan holds no state: 8.32 GB of it would not fit the bound


def test_the_log_says_where_the_state_lives(runs):
    _, log = runs
    assert log.count("8.32 GB on the GPU and 0.00 GB in host memory per rank") == 1  # the plain run
    assert log.count("0.00 GB on the GPU and 8.32 GB in host memory per rank") == 4  # offloaded: 3 runs + a resume


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
