"""`sbatch slurm/pretrain_multimodal.sh` and `sbatch slurm/finetune.sh` on a real two-node Slurm cluster on
localhost: each job trains on 2 nodes x 1 task (CPU, gloo), is signalled, checkpoints and requeues itself,
resumes, finishes, and exports or saves its model; a plain `scancel` checkpoints and ends a job."""

import json
import re
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, ensure_installed

pytestmark = pytest.mark.slow  # real launchers and multi-rank training runs

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


_HELD_SINCE: dict[str, float] = {}


def _ended(cluster, job: str) -> bool:
    state = cluster.job(job)
    if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
        # skip Slurm's hold of a requeued job (about 2 minutes); set while the requeue is still being
        # processed, the start time can be overwritten, so it is set again while the hold lasts. Not in the
        # first seconds: a job started in the second its previous run's credential was revoked is refused
        # by the nodes ("Job credential revoked") and fails
        held = _HELD_SINCE.setdefault(job, time.monotonic())
        if time.monotonic() - held >= 2:
            cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    return state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")


def _submit(cluster, script: str, env: dict[str, str], out: Path) -> str:
    """`sbatch` a script of `slurm/` on 2 nodes x 1 task with `env`; the job's id."""
    submit = cluster.cmd("env", *(f"{k}={v}" for k, v in env.items()), "sbatch", "--parsable", "--nodes=2",
                         "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
                         f"--chdir={ROOT}", str(ROOT / "slurm" / script))
    assert submit.returncode == 0, submit.stderr
    return submit.stdout.strip().split(";")[0]


def test_sbatch_trains_requeues_on_signal_resumes_and_exports(cluster, tmp_path):
    run, out = tmp_path / "run", tmp_path / "job.out"
    env = {"RUN_DIR": str(run), "SAMPLE": str(tmp_path / "sample"), "ARGS": "train.steps=16 checkpoint.every=4"}
    job = _submit(cluster, "pretrain_multimodal.sh", env, out)
    _wait(lambda: any((run / "checkpoints").glob("step*/complete.json")), 600, "the first checkpoint")
    assert cluster.cmd("scancel", "--signal=USR1", job).returncode == 0  # as --signal=USR1@300 would
    _wait(lambda: cluster.job(job).get("Restarts") == "1", 300, "the job to requeue itself")

    _wait(lambda: _ended(cluster, job), 900, "the job to end", 2)
    state = cluster.job(job)
    log = out.read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    stopped = re.search(r"trained to step (\d+) \(stopped by signal, checkpointed, requeued\)", log)
    assert stopped and 4 <= int(stopped.group(1)) < 16 and "trained to step 16\n" in log
    assert "Traceback" not in log
    steps = [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, 17))  # the signalled run's steps, then the resumed run's
    from skillnet import SkillNetForPreTraining

    model = SkillNetForPreTraining.from_pretrained(run / "export")
    assert model.config.num_hidden_layers == 2 and f"exported:    {run / 'export'}" in log


def test_a_plain_scancel_checkpoints_and_ends_the_job(cluster, tmp_path):
    """A plain `scancel` sends SIGTERM to every process of the job, the loader's workers included: the
    ranks checkpoint and stop, and the job is not requeued."""
    run, out = tmp_path / "run", tmp_path / "job.out"
    env = {"RUN_DIR": str(run), "SAMPLE": str(tmp_path / "sample"),
           "ARGS": "train.steps=100000 checkpoint.every=5"}
    job = _submit(cluster, "pretrain_multimodal.sh", env, out)
    _wait(lambda: any((run / "checkpoints").glob("step*/complete.json")), 600, "the first checkpoint")
    assert cluster.cmd("scancel", job).returncode == 0
    _wait(lambda: _ended(cluster, job), 300, "the job to end", 2)
    state, log = cluster.job(job), out.read_text()
    assert state["JobState"] == "CANCELLED" and state.get("Restarts") == "0", log[-3000:]
    stopped = re.search(r"trained to step (\d+) \(stopped by signal, checkpointed\)\n", log)
    assert stopped, log[-3000:]
    assert (run / "checkpoints" / f"step{int(stopped.group(1)):08d}" / "complete.json").exists()
    assert "Traceback" not in log and "requeue" not in log


def test_sbatch_finetunes_requeues_on_signal_and_resumes(cluster, workspace, tmp_path):
    """`sbatch slurm/finetune.sh`: 2 nodes x 1 task, signalled after its first checkpoint, requeued, resumed
    from the checkpoint it wrote when signalled, finished with the model saved. The job reads its config at
    every start: it runs without end until signalled, and the requeued run is then given ten more steps
    (a short run could finish, and drop its first checkpoint, before the test saw it)."""
    import yaml
    from conftest import finetune_config

    root, files, init = workspace
    out, log_file = tmp_path / "model", tmp_path / "job.out"
    config = Path(finetune_config(root, files, ["sentiment", "ner"]))
    endless = yaml.safe_load(config.read_text())
    endless["train"]["steps"] = 100000
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(endless))
    env = {"INIT": str(init), "CONFIG": str(config), "OUT": str(out), "ARGS": "checkpoint.every=5 train.batch_size=8"}
    job = _submit(cluster, "finetune.sh", env, log_file)
    # any complete checkpoint: the job runs at tens of steps a second and keeps only its last three
    _wait(lambda: any((out / "checkpoints").glob("step*/complete.json")), 600, "the first checkpoint")
    assert cluster.cmd("scancel", "--signal=USR1", job).returncode == 0
    stopped = _wait(lambda: re.search(r"finetuned to step (\d+) \(stopped by signal, checkpointed, requeued\)",
                                      log_file.read_text()), 300, "the job to checkpoint and requeue itself")
    last = int(stopped.group(1)) + 10
    config.write_text(yaml.safe_dump({**endless, "train": {**endless["train"], "steps": last}}))
    _wait(lambda: cluster.job(job).get("Restarts") == "1", 300, "the job to requeue itself")
    _wait(lambda: _ended(cluster, job), 900, "the job to end", 2)
    log = log_file.read_text()
    assert cluster.job(job)["JobState"] == "COMPLETED", log[-3000:]
    assert int(stopped.group(1)) >= 5 and f"finetuned model: {out}" in log
    assert "Traceback" not in log
    steps = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, last + 1))
    from skillnet import SkillNetForMultiTask

    model = SkillNetForMultiTask.from_pretrained(out)
    assert set(model.config.task_heads) == {"sentiment_analysis", "named_entity_recognition"}
