"""Pretraining through the real entry point: DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) under torchrun,
checkpoints, a kill and an exact resume, and clear errors for bad configs."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

from pretrain.prepare_sample import main as prepare_sample
from pretrain.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    assert prepare_sample(["--out", str(out), "--vocab-size", "512"]) == 0
    return out


# every parameter partitioned: the tiny model's tensors are all below DeepSpeed's default persistence threshold
PARTITION_ALL = "distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0"


def _overrides(sample: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data_root={sample}", f"run_dir={run_dir}", "train.log_every=2", PARTITION_ALL, *extra]


def _torchrun(args: list[str], port: int | None = None, nproc: int = 2, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port or free_port()),
           "-m", "pretrain", "--config", "tiny", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank and loader worker under it, as a node failure would (torchrun
    starts its ranks in sessions of their own, so killing its process group is not enough)."""
    import psutil

    parent = psutil.Process(proc.pid)
    victims = [parent, *parent.children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    """The loss of every step; a step run again after a resume replaces the killed run's entry."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())}


def _tasks(run_dir: Path) -> dict[int, list[str]]:
    return {r["step"]: r["tasks"] for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())}


def assert_close_to_update(got: dict, expected: dict, rel: float = 1e-2) -> None:
    """Trained weights equal up to a small fraction of each tensor's update from the initial weights (built as
    the trainer builds them: seed 0, the tiny config). Per element, Adam turns rounding differences in tiny
    gradients into sign flips of a whole learning-rate step, so elements are not compared one by one."""
    from skillnet import SkillNetForPreTraining, load_config

    torch.manual_seed(0)
    initial = SkillNetForPreTraining(load_config("tiny")).state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        update = (tensor - initial[name]).norm()
        assert (got[name] - tensor).norm() <= rel * update + 1e-6, (name, float((got[name] - tensor).norm()), float(update))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of a ZeRO-3 checkpoint (DeepSpeed's own zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def test_two_ranks_zero3_killed_and_resumed_matches_uninterrupted(sample, tmp_path):
    steps = ["train.steps=24", "checkpoint.every=4", "checkpoint.keep_last=2"]
    straight = tmp_path / "straight"
    out = _finish(_torchrun(_overrides(sample, straight, *steps)))
    assert "trained to step 24" in out and str(straight / "tensorboard") in out

    killed = tmp_path / "killed"
    proc = _torchrun(_overrides(sample, killed, *steps))
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step00000008" / "complete.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    _kill_tree(proc)
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if (p / "complete.json").exists())
    assert done and done[-1] < "step00000024", "the kill came after the run had finished"
    (killed / "checkpoints" / "notes").mkdir()  # a folder of the user's: never touched
    out = _finish(_torchrun(_overrides(sample, killed, *steps)))
    assert "trained to step 24" in out

    # The resumed run continues with the same data (every step's task) and the same state: every step's loss
    # and the final weights are bit-identical to the uninterrupted run's.
    got, expected_losses = _losses(killed), _losses(straight)
    assert _tasks(killed) == _tasks(straight)
    assert got == expected_losses
    final = "checkpoints/step00000024"
    expected, got = _weights(straight / final), _weights(killed / final)
    assert expected.keys() == got.keys() and len(expected) > 50
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["notes", "step00000020", "step00000024"]  # keep_last=2, nothing half-written left

    # the export: a Hugging Face folder with the same weights, fp32 or bf16
    from pretrain.export import main as export_main
    from skillnet import SkillNetForPreTraining

    assert export_main([str(straight / final), str(tmp_path / "hf")]) == 0
    model = SkillNetForPreTraining.from_pretrained(tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert export_main([str(straight / final), str(tmp_path / "hf16"), "--dtype", "bf16"]) == 0
    half = SkillNetForPreTraining.from_pretrained(tmp_path / "hf16", dtype=torch.bfloat16)
    assert all(torch.equal(t, expected[n].to(torch.bfloat16)) for n, t in half.state_dict().items())
    assert export_main([str(tmp_path / "hf"), str(tmp_path / "nope")]) == 2  # not a checkpoint

    losses = _losses(straight)
    records = [json.loads(line) for line in (straight / "steps.jsonl").read_text().splitlines()]
    assert set(r["tasks"][0] for r in records) > {"image", "masked_lm"}
    assert list(losses) == list(range(1, 25))
    # one ZeRO-3 trace per kind of model call: every call of a task seen before runs along its trace
    seen = set()
    for r in records:
        assert r["zero3_traced"] == (r["zero3_calls"] if r["tasks"][0] in seen else 0), r
        seen.add(r["tasks"][0])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.stepz=3"], "unknown config key train.stepz"),
        (["distributed.skill_parallel_size=3"], "skill_parallel_size=3 must divide the world size 1"),
        (["checkpoint.resume=/nowhere"], "resume: /nowhere holds no complete checkpoint"),
        (["data.tasks=[{name: image, modality: image, sources: [{shards: \"/nowhere/x-{000000..000003}.tar\"}]}]"], "no shards match"),
        (["data.tasks=[{name: image"], "override data.tasks: its value is not YAML"),
        (["data.tasks=[{name: smell, modality: text, sources: [{shards: x.tar}]}]"], "task 'smell' has no objective"),
        (["data.tasks=[{name: smell, modality: text, sources: [{shards: x.tar}]}]", "objectives.smell=mlm"], "unknown task 'smell'"),
        (["data.batch_size=4"], "data.batch_size follows train.micro_batch_size"),
    ],
)
def test_bad_config_fails_in_one_line_before_any_work(sample, tmp_path, capsys, extra, message):
    assert main(["--config", "tiny", *_overrides(sample, tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_model_is_refused(sample, tmp_path, capsys):
    run = tmp_path / "run"
    folder = run / "checkpoints" / "step00000004"
    folder.mkdir(parents=True)
    model = json.loads(json.dumps({"skills": [{"name": "text", "description": ""}], "hidden_size": 32}))
    (folder / "complete.json").write_text(json.dumps({"step": 4, "world_size": 1, "model": model}))
    assert main(["--config", "tiny", *_overrides(sample, run)]) == 2
    assert "does not fit the config: skills is" in capsys.readouterr().err


def test_one_process_zero2_with_accumulation_and_activation_checkpointing(sample, tmp_path):
    """No launcher: a single rank; the ZeRO-2 config, 2 micro-batches per step, recomputed layers."""
    run = tmp_path / "run"
    args = _overrides(sample, run, "train.steps=4", "checkpoint.every=2", "train.gradient_accumulation=2",
                      "train.activation_checkpointing=true", "distributed.ds_config=ds_configs/zero2.json")
    out = subprocess.run([sys.executable, "-m", "pretrain", "--config", "tiny", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    records = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(len(r["tasks"]) == 2 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run / "checkpoints" / "step00000004" / "complete.json").exists()


def test_zero3_with_cpu_offload(sample, tmp_path):
    """The offload config: optimizer and parameters on the CPU, stepped by DeepSpeed's CPU Adam."""
    run = tmp_path / "run"
    args = _overrides(sample, run, "train.steps=3", "checkpoint.every=3", "distributed.ds_config=ds_configs/zero3_offload.json")
    out = subprocess.run([sys.executable, "-m", "pretrain", "--config", "tiny", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (run / "checkpoints" / "step00000003" / "complete.json").exists()
    assert len((run / "steps.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_bf16_trains_resumes_exactly_and_exports(sample, tmp_path, ds_config):
    """bf16 on 2 ranks (DeepSpeed runs it on CPU) with the shipped configs, which accumulate and reduce
    gradients in fp32: a run resumed from its first checkpoint repeats the uninterrupted run's losses and
    weights, and the export (ZeRO-2's layout as well as ZeRO-3's) equals DeepSpeed's own consolidation."""
    import shutil

    from pretrain.export import main as export_main

    args = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3", "train.bf16=true",
            f"distributed.ds_config=ds_configs/{ds_config}.json"]
    first, second = tmp_path / "first", tmp_path / "second"
    _finish(_torchrun(_overrides(sample, first, *args)))
    saved = next((first / "checkpoints" / "step00000004").glob("*model_states.pt"))
    ds = torch.load(saved, weights_only=False)["ds_config"]
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["communication_data_type"] == "fp32"
    shutil.copytree(first / "checkpoints" / "step00000002", second / "checkpoints" / "step00000002")
    _finish(_torchrun(_overrides(sample, second, *args)))
    assert _losses(second) == {s: loss for s, loss in _losses(first).items() if s > 2}
    final = "checkpoints/step00000004"
    expected, got = _weights(first / final), _weights(second / final)
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    assert export_main([str(first / final), str(tmp_path / "hf")]) == 0
    from skillnet import SkillNetForPreTraining

    model = SkillNetForPreTraining.from_pretrained(tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_partitioned_build_gives_the_same_initial_weights(tmp_path):
    """Under ZeRO-3 every rank builds its share of the model only (`deepspeed.zero.Init`), with the same
    initial weights as a whole build."""
    out = tmp_path / "weights.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "build_worker.py"), str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    saved = torch.load(out, weights_only=False)
    assert saved["whole"].keys() == saved["partitioned"].keys()
    for name, tensor in saved["whole"].items():
        assert torch.equal(saved["partitioned"][name], tensor), name
        assert saved["held"][name] <= -(-saved["full"][name] // 2)  # each rank held its half at most
    assert saved["whole"]["skillnet.encoder.layers.0.ffn.skills.text.fc1.weight"].std() > 0.01  # initialised


def test_a_task_whose_data_never_decodes_stops_the_run_in_one_line(sample, tmp_path):
    """Every sample of the only task is broken: the run ends with one line naming the task, the source
    and the reasons (raised in a DataLoader worker, without its traceback), instead of hanging."""
    import io
    import tarfile

    from data_pipeline.shards import ShardIndex

    broken = tmp_path / "broken"
    broken.mkdir()
    for s in range(2):
        with tarfile.open(broken / f"img-{s:06d}.tar", "w") as tar:
            for i in range(4):
                for ext, data in (("png", b"\x00 not an image"), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"k{s}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    ShardIndex("image", ["png", "txt"], {f"img-{s:06d}.tar": 4 for s in range(2)}).save(broken / "img.index.json")
    task = f"data.tasks=[{{name: image, modality: image, sources: [{{shards: {broken / 'img.index.json'}}}]}}]"
    args = _overrides(sample, tmp_path / "run", task, "data.max_consecutive_skips=20", "data.resample=true", "data.num_workers=1")
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", "tiny", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]  # after the progress bar's last line
    assert last.startswith("error: task 'image': the last 20 samples drawn were all unusable (20 undecodable_image) "
                           "from source image.0 (2 shards"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_shipped_configs_resolve_from_any_working_directory(tmp_path, monkeypatch):
    from pretrain.config import load_pretrain_config

    monkeypatch.chdir(tmp_path)
    config = load_pretrain_config("tiny", ["distributed.ds_config=ds_configs/zero2.json"])
    assert Path(config.distributed.ds_config) == ROOT / "ds_configs" / "zero2.json"
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2.json").write_text("{}")  # a file of the user's wins
    assert load_pretrain_config("tiny", ["distributed.ds_config=ds_configs/zero2.json"]).distributed.ds_config == "ds_configs/zero2.json"


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_a_signal_checkpoints_and_only_slurms_requeues(sample, tmp_path, sig, requeued):
    """Slurm's `--signal` (SIGUSR1) checkpoints and requeues the job; a plain `scancel` (SIGTERM)
    checkpoints and stops. `scontrol` is a stand-in that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "SLURM_JOB_ID": "4242",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "--config", "tiny",
                             *_overrides(sample, run, "train.steps=100000", "checkpoint.every=100000")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run / "steps.jsonl").exists() or not (run / "steps.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first logging step"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-2000:]
    assert "stopped by signal, checkpointed" in out and ("requeued" in out) == requeued
    assert any((p / "complete.json").exists() for p in (run / "checkpoints").iterdir())
    log = tmp_path / "scontrol.log"
    assert (log.read_text().split() == ["requeue", "4242"]) if requeued else not log.exists()
    assert "Traceback" not in out
