"""A helper program, not a test: training runs that kill themselves (SIGKILL) at one stage of the save of step 3.
Started once by the killed_run fixture of tests/test_checkpoints.py; its kill -9 test then resumes each killed run
and compares the result with a run that was never killed.

    python tests/kill_during_save.py REPO_ROOT

reads one request a line from stdin, [stage, the TrainConfig's fields] as JSON, and prints the exit code of each run
(-9: killed). It imports remask once and forks a child per run (a fork of a process that never ran torch's thread
pools is safe); the child patches remask's torch.save, write_checksums and shutil.rmtree to kill itself at its
stage: "model/ written", "trainer.pt written", "checksums.json half written" or "rotation" (the checkpoint of step 1
partly deleted)."""
import json
import os
import signal
import sys
import traceback

sys.path.insert(0, sys.argv[1])
import remask  # noqa: E402 (from the repository root given on the command line)

saving = ".step-000003."  # the temporary directory of the save of step 3


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def run(stage, settings):
    real_save, real_checksums, real_rmtree = remask.torch.save, remask.write_checksums, remask.shutil.rmtree

    def save(obj, file, *args, **kwargs):
        if stage == "model/ written" and saving in str(file):
            die()
        real_save(obj, file, *args, **kwargs)
        if stage == "trainer.pt written" and saving in str(file):
            die()

    def write_checksums(directory):
        real_checksums(directory)
        if stage == "checksums.json half written" and saving in str(directory):
            text = (directory / "checksums.json").read_text()
            (directory / "checksums.json").write_text(text[:len(text) // 2])
            die()

    def rmtree(path, *args, **kwargs):
        if stage == "rotation" and path.name.startswith(".step-000001."):
            next(f for f in path.rglob("*") if f.is_file()).unlink()  # part of the old checkpoint deleted
            die()
        real_rmtree(path, *args, **kwargs)

    remask.torch.save, remask.write_checksums, remask.shutil.rmtree = save, write_checksums, rmtree
    remask.train(remask.TrainConfig(**settings), log=lambda message: None)


for request in sys.stdin:
    child = os.fork()
    if child == 0:
        signal.alarm(120)  # a hung child ends, and the test fails, rather than the suite hanging
        try:
            run(*json.loads(request))
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
