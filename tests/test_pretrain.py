"""Pretraining through the real entry point: clear errors for bad configs and data, stop signals, the
partitioned build (the distributed training scenarios are the table in test_distributed.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, rank_env

from pretrain.config import load_pretrain_config
from pretrain.train import main

ROOT = Path(__file__).resolve().parents[1]


# every parameter partitioned: the tiny model's tensors are all below DeepSpeed's default persistence threshold
PARTITION_ALL = "distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0"


IMAGES = "{name: image, modality: image, sources: [{shards: image/image.index.json}]"
"""A data task reading the sample corpus's images, its closing brace left off."""


def _overrides(sample: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data_root={sample}", f"run_dir={run_dir}", "train.log_every=2", PARTITION_ALL, *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.stepz=3"], "unknown config key train.stepz"),
        (["distributed.skill_parallel_size=3"], "skill_parallel_size=3 must divide the world size 1"),
        (["checkpoint.resume=/nowhere"], "resume: /nowhere holds no complete checkpoint"),
        (["data.tasks=[{name: image, modality: image, sources: [{shards: \"/nowhere/x-{000000..000003}.tar\"}]}]"],
         "no shards match"),
        (["data.tasks=[{name: image"], "override data.tasks: its value is not YAML"),
        (["data.tasks=[{name: smell, modality: text, sources: [{shards: x.tar}]}]"], "task 'smell' has no objective"),
        (["data.tasks=[{name: smell, modality: text, sources: [{shards: x.tar}]}]", "objectives.smell=mlm"],
         "unknown task 'smell'"),
        (["data.batch_size=4"], "data.batch_size follows train.micro_batch_size"),
        (["distributed.ds_config=/nowhere/ds.json"], "distributed.ds_config: no file /nowhere/ds.json"),
        (["distributed.ds_config=ds_configs/zero9.json"], "distributed.ds_config: no file ds_configs/zero9.json"),
        (["distributed.ds_config=README.md"], "distributed.ds_config: README.md is not JSON"),
        (["distributed.ds_overrides.zero_optimization.stage=0"], "zero_optimization.stage 0 is not supported"),
        (["data.tasks.0.sources.0.colour=red"], "unknown config key data.tasks[0].sources[0].colour"),
        (["train.caption_task=nothing"], "train.caption_task 'nothing' is not in the model's task table"),
        (["distributed.offload.skills=some"], "distributed.offload.skills must be 'none' or 'inactive'"),
        (["distributed.offload.skills=inactive"], "needs zero_optimization.offload_optimizer.device 'cpu'"),
        (["distributed.offload.skills=inactive", "distributed.ds_config=ds_configs/zero2.json"],
         "needs ZeRO stage 3"),
        (["distributed.offload.skills=inactive", "distributed.ds_config=ds_configs/zero3_offload_partial.json"],
         "with the whole optimizer offloaded (ratio 1)"),
        (["distributed.offload.skills=inactive", "distributed.ds_config=ds_configs/zero3_offload.json"],
         "cannot combine with zero_optimization.offload_param"),
        (["distributed.offload.skills=inactive", "distributed.ds_config=ds_configs/zero3_offload_skills.json",
          "model.router=dense"], "needs a model with named skills"),
        (["distributed.offload.skills=inactive", "distributed.skill_parallel_size=2"],
         "cannot combine with skill_parallel_size > 1"),
        ([f"data.tasks=[{IMAGES}, template: smell}}]"], "task 'image': no shipped instruction template 'smell'"),
        ([f"data.tasks=[{IMAGES}, template: '[AUDIO:audio] what is it? -> [TEXT:kind]'}}]"],
         "task 'image' reads image shards, but its template"),
        ([f"data.tasks=[{IMAGES}, template: caption}}]"],
         "instruction tasks ['image'] train the decoder: the model needs model.num_decoder_layers >= 1"),
        ([f"data.tasks=[{IMAGES}}}]", "objectives.image=instruction"],
         "task 'image': the instruction objective and a template (data.tasks[].template) go together"),
        ([f"data.tasks=[{IMAGES}, template: caption}}]", "distributed.skill_parallel_size=2",
          "distributed.skill_placement=data_local"],
         "instruction tasks (data.tasks[].template) do not run under skill parallelism's data_local placement"),
        ([f"data.tasks=[{IMAGES}, template: visual_grounding}}]", "model.num_decoder_layers=1"],
         "the tokenizer has 1512 tokens (with the location tokens of ['image']'s boxes), the model's vocab_size is "
         "512: set model.vocab_size=1512"),
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
    (folder / "train_state_rank0.pt").touch()
    assert main(["--config", "tiny", *_overrides(sample, run)]) == 2
    assert "does not fit the config: skills is" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda folder: _edit_meta(folder, format=2), "has layout format 2; this release reads format 1"),
    (lambda folder: (folder / "train_state_rank1.pt").unlink(), "lacks train_state_rank1.pt"),
    (lambda folder: (folder / "complete.json").write_text("{"), "unreadable complete.json"),
    (lambda folder: _edit_meta(folder, world_size=3), "lacks train_state_rank2.pt"),
    (lambda folder: _edit_meta(folder, tokenizer={"size": 300, "sha": "ab" * 32}),
     "was trained with another tokenizer (300 tokens, vocabulary hash abababababab) than this run's (512,"),
    (lambda folder: None, "train_state_rank0.pt: "),  # the state files are empty here
])
def test_a_checkpoint_that_does_not_map_is_refused_in_one_line(sample, tmp_path, capsys, change, message):
    from training.checkpoint import check_compatible, fingerprint

    folder = tmp_path / "run" / "checkpoints" / "step00000004"
    folder.mkdir(parents=True)
    model = fingerprint(load_pretrain_config("tiny").model_config())
    (folder / "complete.json").write_text(json.dumps({"format": 1, "step": 4, "world_size": 2, "model": model}))
    for rank in range(2):
        (folder / f"train_state_rank{rank}.pt").touch()
    check_compatible(folder, model)  # as written: fits
    change(folder)
    assert main(["--config", "tiny", *_overrides(sample, tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {folder}") and message in err and err.count("\n") == 1


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "complete.json").read_text())
    (folder / "complete.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.slow
def test_partitioned_build_gives_the_same_initial_weights(tmp_path):
    """Under ZeRO-3 every rank builds its share of the model only (`deepspeed.zero.Init`), with the same
    initial weights as a whole build; built whole, every rank initialises the same weights by itself (no
    collective before the engine has moved them to the rank's device)."""
    out = tmp_path / "weights.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "build_worker.py"), str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=rank_env())
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    saved = torch.load(out, weights_only=False)
    assert saved["whole"].keys() == saved["partitioned"].keys()
    for name, tensor in saved["whole"].items():
        assert torch.equal(saved["partitioned"][name], tensor), name
        assert saved["held"][name] <= -(-saved["full"][name] // 2)  # each rank held its half at most
    assert saved["whole"]["skillnet.encoder.layers.0.ffn.skills.text.fc1.weight"].std() > 0.01  # initialised
    other = torch.load(f"{out}.rank1", weights_only=False)
    assert all(torch.equal(other[name], tensor) for name, tensor in saved["whole"].items())


@pytest.mark.slow
def test_a_finished_run_leaves_nothing_running(sample, tmp_path):
    """Every rank ends its run with the process group destroyed and nothing left running: no gloo thread
    (one still running when the interpreter tears down aborts the process, after the run has printed that
    it finished), no Python thread but the main one. (`benchmarks/exit_stress.py` repeats whole runs.)"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "exit_worker.py"), "--config", "tiny", f"data_root={sample}",
           f"run_dir={tmp_path / 'run'}", "train.steps=4", "checkpoint.every=4"]
    reports = tmp_path / "left"
    reports.mkdir()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=rank_env(EXIT_REPORTS=str(reports)))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    left = [json.loads(p.read_text()) for p in sorted(reports.glob("rank*.json"))]
    assert sorted(r["rank"] for r in left) == [0, 1]
    for rank in left:
        assert rank["code"] == 0 and rank["python"] == ["MainThread"], rank
        assert not [name for name in rank["native"] if "gloo" in name], rank


@pytest.mark.slow
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
    args = _overrides(sample, tmp_path / "run", task, "data.max_consecutive_skips=20", "data.resample=true",
                      "data.num_workers=1")
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", "tiny", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]  # after the progress bar's last line
    assert last.startswith("error: task 'image': the last 20 samples drawn were all unusable (20 undecodable_image) "
                           "from source image.0 (2 shards"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_instruction_tasks_pretrain_beside_the_other_objectives_and_finetune_under_either_router(sample, tmp_path,
                                                                                                 capsys):
    """The shipped instruction config (`tiny-instructions`: captioning, a question, grounding and
    classification over the sample corpus's images and their fields, mixed with masked-token prediction
    and image-caption contrast) on ZeRO-3 with every parameter partitioned: every task trains, each
    instruction task's loss falls, and the export is an encoder-decoder that writes a box as four location
    tokens. `finetune.compare` then finetunes two of the instruction tasks from it under the dense and the skill
    router side by side, each scored by its own main metric."""
    from collections import defaultdict

    import yaml

    from finetune.compare import main as compare_main
    from pretrain.export import main as export_main
    from skillnet import SkillNetForConditionalGeneration
    from skillnet.instructions import constraint, load_templates, location_tokens
    from skillnet.tokenizer import load_tokenizer

    run, out = tmp_path / "run", tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", "tiny-instructions",
                           *_overrides(sample, run, "train.steps=48", "checkpoint.every=48")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-3000:]
    losses = defaultdict(list)
    for line in (run / "steps.jsonl").read_text().splitlines():
        step = json.loads(line)
        losses[step["tasks"][0]].append(step["loss"])
    instructions = {"caption", "colour_question", "grounding", "shape_classification"}
    assert set(losses) == instructions | {"masked_lm", "image"}
    for task in instructions:
        first, last = losses[task][:2], losses[task][-2:]
        assert sum(last) < sum(first), (task, losses[task])
    assert export_main([str(run), str(out)]) == 0
    tokenizer = load_tokenizer(out)
    assert len(tokenizer) == 512 + 1000 and set(location_tokens()) <= set(tokenizer.get_vocab())
    model = SkillNetForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.decoder_start_token_id == tokenizer.bos_token_id
    text = tokenizer(['which region does the text " circle " describe?'], return_tensors="pt",
                     return_token_type_ids=False)
    target = load_templates()["visual_grounding"].target
    allow = constraint(target, tokenizer, tokenizer.eos_token_id)
    ids = model.generate(**text, pixel_values=torch.zeros(1, 3, 32, 32, dtype=torch.uint8), task="grounding",
                         max_new_tokens=8, prefix_allowed_tokens_fn=allow)
    assert all(t.startswith("<bin_") for t in tokenizer.convert_ids_to_tokens(ids[0, 1:5].tolist()))
    assert ids[0, 5] == tokenizer.eos_token_id

    config = load_pretrain_config("tiny-instructions")
    templates = {t.name: t.template for t in config.data.tasks}
    data = {"train": str(sample / "image" / "image-{000000..000004}.tar"),
            "validation": str(sample / "image" / "image-000005.tar"), "max_length": 32}
    tree = {"tasks": [{"name": task, "data": data, "head": {"type": "instruction", "template": templates[task]}}
                      for task in ("colour_question", "grounding")],
            "train": {"steps": 40, "batch_size": 16, "eval_batch_size": 40}, "optim": {"lr": 1e-3}}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(tree))
    rows = "joint_finetuning_dense,skillnet_sparse_pretraining"
    capsys.readouterr()
    assert compare_main(["--config", str(tmp_path / "compare.yaml"), "--pretrained", str(out), "--out",
                         str(tmp_path / "compare"), "--rows", rows]) == 0
    table = json.loads((tmp_path / "compare" / "results.json").read_text())
    assert list(table) == ["Joint finetuning (dense)", "SkillNet, sparse pretraining"]
    for row, system in zip(table, ("joint_finetuning_dense", "skillnet_sparse_pretraining")):
        results = json.loads((tmp_path / "compare" / system / "joint" / "results.json").read_text())["results"]
        assert table[row] == {"colour_question": results["colour_question"]["exact_match"],
                              "grounding": results["grounding"]["box_accuracy"]}
    dense = json.loads((tmp_path / "compare" / "joint_finetuning_dense" / "joint" / "config.json").read_text())
    assert dense["router"] == "dense" and dense["num_decoder_layers"] == 1
    assert "| grounding (box_accuracy) |" in (tmp_path / "compare" / "table.md").read_text()
    assert compare_main(["--config", str(tmp_path / "compare.yaml"), "--pretrained", str(out), "--rows",
                         "dense"]) == 2
    assert "--rows: unknown rows ['dense']" in capsys.readouterr().err


def test_shipped_configs_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_pretrain_config("tiny", ["distributed.ds_config=ds_configs/zero2.json"])
    assert Path(config.distributed.ds_config) == ROOT / "training" / "ds_configs" / "zero2.json"
    assert (load_pretrain_config("tiny", ["distributed.ds_config=zero2"]).distributed.ds_config
            == config.distributed.ds_config)
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2.json").write_text("{}")  # a file of the user's wins
    assert (load_pretrain_config("tiny", ["distributed.ds_config=ds_configs/zero2.json"]).distributed.ds_config
            == "ds_configs/zero2.json")


@pytest.mark.slow
@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_a_signal_checkpoints_and_only_slurms_requeues(sample, tmp_path, sig, requeued):
    """Slurm's `--signal` (SIGUSR1) checkpoints and requeues the job; a plain `scancel` (SIGTERM)
    checkpoints and stops; the loader's workers, signalled too, leave it to the trainer. `scontrol` is
    a stand-in that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "SLURM_JOB_ID": "4242",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "--config", "tiny",
                             *_overrides(sample, run, "train.steps=100000", "checkpoint.every=100000")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (run / "steps.jsonl").exists() or not (run / "steps.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first logging step"
        time.sleep(0.05)
    os.killpg(proc.pid, sig)  # every process, loader workers too, as Slurm signals a job step
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-2000:]
    assert "stopped by signal, checkpointed" in out and ("requeued" in out) == requeued
    assert any((p / "complete.json").exists() for p in (run / "checkpoints").iterdir())
    log = tmp_path / "scontrol.log"
    assert (log.read_text().split() == ["requeue", "4242"]) if requeued else not log.exists()
    assert "Traceback" not in out
