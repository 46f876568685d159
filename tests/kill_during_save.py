"""A helper program, not a test: training runs that kill themselves (SIGKILL) at one stage of the save of step 3.
Started once by the killed_run fixture of tests/test_checkpoints.py; its kill -9 test then resumes each killed run
and compares the result with a run that was never killed.

    python tests/kill_during_save.py REPO_ROOT

reads one request a line from stdin, [stage, the TrainConfig's fields] as JSON, and prints the exit code of each run
(-9: killed). It imports remask once and forks a child per run (a fork of a process that never ran torch's thread
pools is safe); the child replaces remask's write_trainer_state and write_checksums and model's _delete (named
seams of the code) with versions that kill it at its stage: "model/ written", "trainer.pt written", "checksums.json
half written" or "rotation" (the checkpoint of step 1 partly deleted)."""
import json
import os
import signal
import sys
import traceback

sys.path.insert(0, sys.argv[1])
import model  # noqa: E402 (from the repository root given on the command line)
import remask  # noqa: E402

saving = ".step-000003."  # the temporary directory of the save of step 3


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def run(stage, settings):
    real_trainer_state, real_checksums, real_delete = remask.write_trainer_state, remask.write_checksums, model._delete

    def write_trainer_state(directory, *args, **kwargs):
        if stage == "model/ written" and saving in str(directory):
            die()
        real_trainer_state(directory, *args, **kwargs)
        if stage == "trainer.pt written" and saving in str(directory):
            die()

    def write_checksums(directory):
        real_checksums(directory)
        if stage == "checksums.json half written" and saving in str(directory):
            text = (directory / "checksums.json").read_text()
            (directory / "checksums.json").write_text(text[:len(text) // 2])
            die()

    def delete(path):
        if stage == "rotation" and path.name.startswith(".step-000001."):
            next(f for f in path.rglob("*") if f.is_file() and f.name != model.OWNER).unlink()  # partly deleted
            die()
        real_delete(path)

    # remask's and model.py's named seams: what a save does at each stage
    remask.write_trainer_state, remask.write_checksums, model._delete = write_trainer_state, write_checksums, delete
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
