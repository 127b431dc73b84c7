"""`sbatch slurm/pretrain_multimodal.sh` on a real two-node Slurm cluster on localhost: the job trains on
2 nodes x 1 task (CPU, gloo), is signalled, checkpoints and requeues itself, resumes, finishes and exports."""

import json
import re
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, ensure_installed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = ensure_installed()
    if why:
        pytest.skip(f"no Slurm here: {why}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()


def _wait(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_sbatch_trains_requeues_on_signal_resumes_and_exports(cluster, tmp_path):
    run, out = tmp_path / "run", tmp_path / "job.out"
    env = {"RUN_DIR": str(run), "SAMPLE": str(tmp_path / "sample"), "ARGS": "train.steps=30 checkpoint.every=5"}
    submit = cluster.cmd("env", *(f"{k}={v}" for k, v in env.items()), "sbatch", "--parsable", "--nodes=2",
                         "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
                         f"--chdir={ROOT}", str(ROOT / "slurm" / "pretrain_multimodal.sh"))
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    first = run / "checkpoints" / "step00000005" / "complete.json"
    _wait(first.exists, 600, "the first checkpoint")
    assert cluster.cmd("scancel", "--signal=USR1", job).returncode == 0  # as --signal=USR1@300 would
    _wait(lambda: cluster.job(job).get("Restarts") == "1", 300, "the job to requeue itself")

    def ended() -> bool:
        state = cluster.job(job)
        if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
            # skip Slurm's hold of a requeued job (about 2 minutes); set while the requeue is still being
            # processed, the start time can be overwritten, so it is set again while the hold lasts
            cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
        return state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")

    _wait(ended, 900, "the job to end", 2)
    state = cluster.job(job)
    log = out.read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    stopped = re.search(r"trained to step (\d+) \(stopped by signal, checkpointed, requeued\)", log)
    assert stopped and 5 <= int(stopped.group(1)) < 30 and "trained to step 30\n" in log
    steps = [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, 31))  # the signalled run's steps, then the resumed run's
    from skillnet import SkillNetForPreTraining

    model = SkillNetForPreTraining.from_pretrained(run / "export")
    assert model.config.num_hidden_layers == 2 and f"exported:    {run / 'export'}" in log
