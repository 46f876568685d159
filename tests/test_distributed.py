"""Training on several ranks, on the CPU with gloo. Data parallelism (DDP, `torchrun remask.py train`): 2 ranks
end with the weights of 1 process. Sharded training (--parallel fsdp, FSDP2): 2 ranks give the weights of 1
process in every mode (so Lilith's trust ratio uses norms of whole tensors, not of the rank's slice), a sharded
stop/resume is bit-identical to an uninterrupted sharded run, and a damaged or differently sharded checkpoint is
refused. One torchrun launch (this file as a script) runs every 2-rank training, 4 steps of tiny_config each."""
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

# conftest first: it puts the repository root on sys.path, also where torchrun runs this file as a script
from conftest import (assert_same_weights, assert_weights_close, quiet, run_metrics, run_weights, tiny_config,
                      train_flags)
import remask
from remask import TrainConfig, TrainError

# remask accumulates 2 micro-batches per rank and step (the reduce-scatter waits for the second) and saves at step 2;
# masked-thought also recomputes blocks (--grad-checkpointing: their weights are all-gathered again in backward);
# sft reduce-scatters after each of its 2 micro-batches (--reduce-every-micro-batch).
RUNS = {"remask": dict(micro_batch=4, save_every=2), "masked-thought": dict(grad_checkpointing=True),
        "sft": dict(micro_batch=4, reduce_every_micro_batch=True)}


def sharded(out, name, mode=None, **overrides):
    """4 optimizer steps of 16 sequences, 8 per rank on 2 ranks."""
    return tiny_config(out, name, **{"mode": mode or name, "epochs": 2, "micro_batch": 8, "parallel": "fsdp",
                                     **overrides})


def from_step_2(out, name, copy=True):
    """A copy of the remask run as a run stopped after step 2: its checkpoint of step 2, nothing after it."""
    if copy:
        shutil.copytree(out / "remask", out / name)
        shutil.rmtree(out / name / "model")
        shutil.rmtree(out / name / "checkpoints" / "step-000004")
    return replace(sharded(out, name, "remask", **RUNS["remask"]), resume=True)


def ddp_flags(out):
    """The command line of the DDP run: 8 sequences per rank of the single process's 16 (micro-batch 16)."""
    single = tiny_config(out, "single", epochs=2)
    return train_flags(replace(single, out=str(out / "ddp"), micro_batch=8)) + ["--group-by-length"]


def worker(out):
    """Under torchrun: the 2-rank runs, one after another in the same processes and one process group (train()
    leaves a group it did not start alone; a group started again on torchrun's store can meet stale keys)."""
    dist.init_process_group("gloo")
    assert remask.main(["train", *ddp_flags(out)]) == 0  # the command line under torchrun
    for name, overrides in RUNS.items():
        remask.train(sharded(out, name, **overrides), log=print)
    resumed = from_step_2(out, "resumed", copy=dist.get_rank() == 0)
    dist.barrier()  # the copy is there before either rank resumes
    remask.train(resumed, log=print)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("2 rank(s)") == len(RUNS) + 2
    return out


def test_two_ddp_processes_match_one(two_ranks, tmp_path):
    """Each rank draws half of every global batch; the weights end as those of one process doing the whole batch."""
    single = tiny_config(tmp_path, "single", micro_batch=16, epochs=2)
    remask.train(single, log=quiet)
    out = two_ranks / "ddp"
    assert [m["step"] for m in run_metrics(out)] == [1, 2, 3, 4]  # logged once, by rank 0
    for m, ref in zip(run_metrics(out), run_metrics(single.out)):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5)  # the global loss, summed over ranks
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)  # Lilith would hide a scale error
    assert_weights_close(run_weights(out), run_weights(single.out))


@pytest.mark.parametrize("name", RUNS)
def test_two_sharded_ranks_match_one_process(two_ranks, tmp_path, name):
    """Weights equal to fp32 rounding (rtol 1e-4, atol 2e-6, as DDP's test): the order of float sums differs.
    A trust ratio of slices would be off by ~1/sqrt(2) per tensor and move the weights far beyond that."""
    single = tiny_config(tmp_path, "single", mode=name, epochs=2, micro_batch=16)
    remask.train(single, log=quiet)
    out = two_ranks / name
    assert [m["step"] for m in run_metrics(out)] == [1, 2, 3, 4]  # logged once, by rank 0
    for m, ref in zip(run_metrics(out), run_metrics(single.out)):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)  # of the whole gradient, not a slice
    assert_weights_close(run_weights(out), run_weights(single.out))


def test_sharded_checkpoints_hold_every_rank_slice_and_checksums(two_ranks):
    checkpoint = remask.checkpoints(two_ranks / "remask")[-1]
    assert checkpoint.name == "step-000004"
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert files == [".remask-owner.json", "checksums.json", "shards/.metadata", "shards/__0_0.distcp",
                     "shards/__1_0.distcp", "trainer.pt"]
    assert remask.verify_checkpoint(checkpoint) == []
    state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    assert state["world"] == 2 and state["step"] == 4


def test_sharded_resume_is_bit_exact(two_ranks):
    """Resumed by 2 ranks from the step-2 checkpoint: the weights and losses of the run that went on."""
    resumed, straight = two_ranks / "resumed", two_ranks / "remask"
    assert [p.name for p in remask.checkpoints(resumed)] == ["step-000002", "step-000004"]
    assert_same_weights(run_weights(resumed), run_weights(straight))
    assert [m["loss"] for m in run_metrics(resumed)] == [m["loss"] for m in run_metrics(straight)]


def test_a_sharded_checkpoint_is_refused_by_one_process(two_ranks):
    """Another number of ranks would give each rank other examples: a clear refusal, before anything loads."""
    cfg = from_step_2(two_ranks, "one-rank")
    with pytest.raises(TrainError, match=r"step-000002 was saved sharded over 2 ranks; this run has no shards"):
        remask.train(cfg, log=quiet)


def test_a_damaged_sharded_checkpoint_is_refused(two_ranks, tmp_path):
    """One flipped bit in one rank's file: the checksums name it before anything is loaded."""
    checkpoint = remask.checkpoints(two_ranks / "remask")[0]
    target = tmp_path / "remask" / "checkpoints" / checkpoint.name
    remask.make_owned(target.parent, "checkpoints")  # a run's checkpoints/, as remask makes it
    shutil.copytree(checkpoint, target)
    shard = target / "shards" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(TrainError, match=r"step-000002: shards/__1_0.distcp: not the bytes that were written"):
        remask.train(replace(sharded(tmp_path, "remask", **RUNS["remask"]), resume=True), log=quiet)
    assert shard.exists()  # nothing of the user's is deleted

# ----------------------------------------------------------------------------- --offload cpu: the wiring on a CPU
# FSDP2's CPU offload runs on a GPU only (tests/test_offload_gpu.py); here: its refusals as a user meets them, the
# advice an out-of-memory error gives, the log's state line and the plan's arithmetic.


@pytest.mark.parametrize("device", [pytest.param([], marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                               reason="a GPU is here")),
                                    ["--device", "cpu"]])
def test_offload_without_a_gpu_is_refused_in_one_line(tmp_path, capsys, device):
    """Before anything is read or written, and no process group is left behind."""
    out = tmp_path / "run"
    code = remask.main(["train", "--parallel", "fsdp", "--offload", "cpu", "--out", str(out), *device])
    err = capsys.readouterr().err.splitlines()
    why = "--device cpu" if device else "torch.cuda.is_available() is False here"
    assert code == 1 and err == [f"error: --offload cpu needs a GPU: FSDP2's CPU offload copies each block's weights "
                                 f"from pinned host memory to an accelerator, and this run is on the CPU ({why}); "
                                 f"drop --offload cpu"]
    assert not out.exists() and not dist.is_initialized()


def test_offload_without_fsdp_is_refused_naming_both_flags(tmp_path, capsys):
    code = remask.main(["train", "--offload", "cpu", "--out", str(tmp_path / "run")])
    assert code == 1 and capsys.readouterr().err.splitlines() == [
        "error: --offload cpu needs --parallel fsdp: FSDP2 is what keeps the state in host memory (one process or "
        "several, under torchrun)"]
    assert "offload" in remask.RUNTIME_FIELDS  # a resume with or without it: the same state, elsewhere


def test_the_log_says_where_the_state_lives():
    model = remask.StableLM(remask.Config.named("debug"))  # 825,600 parameters x 20 bytes, all on the host
    assert remask.state_placement(model) == ("training state (weights, gradients, Lilith's moments) 0.00 GB on the "
                                             "GPU and 0.02 GB in host memory per rank")


def test_out_of_memory_suggests_offload_where_the_plan_fits(monkeypatch):
    """The 3B recipe on one 24 GB card: offload fits only with --grad-checkpointing; an 80 GB card without it."""
    config = remask.Config.named("stablelm-3b-4e1t")
    cfg = TrainConfig(micro_batch=8)
    for gib, flags, gb in ((24, " --grad-checkpointing", 15.7), (80, "", 28.6)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
            total_memory=gib * 2 ** 30))
        advice = remask.offload_advice(cfg, config, torch.device("cuda"), remask.Ranks(), "bf16")
        assert advice == (f"; or keep the state in host memory: --parallel fsdp --offload cpu{flags} (plan per rank: "
                          f"{gb} GB of this GPU's {gib * 2 ** 30 / 1e9:.1f} GB, 72.6 GB of host memory)")
    assert remask.offload_advice(replace(cfg, micro_batch=64, seq_len=4096), config, torch.device("cuda"),
                                 remask.Ranks(), "bf16") == ""  # nothing fits: no false hope
    assert remask.offload_advice(cfg, config, torch.device("cpu"), remask.Ranks(), "bf16") == ""


def test_the_offload_plan_by_hand():
    """StableLM-3B on one rank, micro-batch 8 x 256 tokens (4096 rows x tokens for ReMask's two passes), bf16,
    --grad-checkpointing, accumulating, with the measured activations (111,760 and 15,536 bytes a token)."""
    C, I, V, L = 2560, 6912, 50304, 32
    block = 4 * C * C + 3 * C * I + 4 * C  # q, k, v, o; gate, up, down; two LayerNorms
    root = 2 * V * C + 2 * C  # embeddings, head, final norm
    params = L * block + root
    assert params == 2_795_443_200
    plan = remask.sharded_plan(remask.Config.named("stablelm-3b-4e1t"), 1, 4096, offload=True,
                               grad_checkpointing=True, saved=(111_760, 15_536))
    gradient = 4 * params  # fp32, accumulated unsharded on the GPU until the step's last micro-batch
    gathered = 2 * (root + 2 * block) + 4 * block + (4 + 2) * block  # bf16 root + 2 blocks, a block's grad, staging
    activations = 4096 * (L * 4 * C + 111_760 + 15_536)  # each block's fp32 input, one block's saved tensors
    loss = 2 * 4096 * V * 2 + 6 * 4 * 128 * V  # bf16 logits and their gradient, the loss's fp32 chunk buffers
    assert plan.gpu == gradient + gathered + activations + loss == 15_649_515_520
    # pinned blocks round up to powers of two: q, k, v, o 26.2 MB -> 32 MiB; gate, up, down 70.8 MB -> 128 MiB;
    # a norm's weight or bias 10 KB -> 16 KiB; embeddings and head 515 MB -> 512 MiB
    pinned = L * (4 * 2 ** 25 + 3 * 2 ** 27 + 4 * 2 ** 14) + 2 * 2 ** 29 + 2 * 2 ** 14
    assert plan.pinned == 2 * pinned  # weights and gradients, 36.5 GB where 22.4 would do
    assert plan.host == 2 * pinned + 12 * params + 5 * 4 * V * C  # Lilith's moments and temporaries (embeddings)
    assert (plan.to_gpu, plan.to_host) == (4 * (root + 2 * L * block), 4 * params)
    on_8 = remask.sharded_plan(remask.Config.named("stablelm-3b-4e1t"), 8, 4096, offload=True)
    assert (on_8.to_gpu, on_8.to_host) == (plan.to_gpu / 8, plan.to_host / 8)
    assert on_8.pinned == 2 * (L * (4 * 2 ** 22 + 3 * 2 ** 24 + 4 * 2 ** 11) + 2 * 2 ** 26 + 2 * 2 ** 11)  # 1/8 rows
    # --reduce-every-micro-batch: the root's gradient and its reduce-scatter buffer instead of the whole gradient
    every = remask.sharded_plan(remask.Config.named("stablelm-3b-4e1t"), 1, 4096, offload=True,
                                grad_checkpointing=True, reduce_every_micro_batch=True, saved=(111_760, 15_536))
    assert plan.gpu - every.gpu == gradient - 8 * root


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
