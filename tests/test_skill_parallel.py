"""Skill parallelism: the placements, and real 2-rank DeepSpeed ZeRO-3 runs with the skills split over the
ranks (gloo), compared with the same training where every rank holds every skill."""

import json
import math
import re
import shutil
import warnings

import pytest
import torch
from conftest import free_port
from test_pretrain import _finish, _losses, _overrides, _torchrun, _weights, assert_close_to_update, sample  # noqa: F401

from pretrain.export import main as export_main
from pretrain.skill_parallel import balanced, data_local
from pretrain.train import main
from skillnet import SkillNetForPreTraining, load_config

MULTIMODAL = load_config("tiny").registry
TASKS = {t: sorted(set(MULTIMODAL.skill_names(t)) | ({"text", "generic"} if t in ("image", "audio", "video", "code") else set()))
         for t in ("masked_lm", "next_sentence", "masked_code", "code", "image", "audio", "video")}


def _records(run):
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def test_balanced_placement_deals_every_skill_once():
    names = load_config("skillnet-nlu-base").registry.names
    placement = balanced(names, 2)
    assert placement.slots == [names[0::2], names[1::2]] and placement.width == 4 and not placement.shared
    assert sorted(sum(placement.slots, [])) == sorted(names)
    with pytest.raises(ValueError, match="skill_parallel_size=8 exceeds the model's 7 skills"):
        balanced(names, 8)


def test_data_local_placement_keeps_tasks_with_their_skills():
    weights = {"masked_lm": 0.2, "next_sentence": 0.2, "masked_code": 0.1, "code": 0.1, "image": 0.2, "audio": 0.1, "video": 0.1}
    placement = data_local(MULTIMODAL.names, TASKS, weights, 2)
    assert placement.shared == ["generic"]  # every task activates it: held by every rank
    assert sorted(sum(placement.slots, []) + placement.shared) == sorted(MULTIMODAL.names)
    assert sorted(sum(placement.task_slots, [])) == sorted(weights)

    def local_share(p):
        where = {t: s for s, tasks in enumerate(p.task_slots or [list(weights)] * p.size) for t in tasks}
        return sum(w * sum(k in p.shared or k in p.slots[where[t]] for k in TASKS[t]) / len(TASKS[t])
                   for t, w in weights.items())

    assert local_share(placement) > 0.8  # text tasks sit with the text skill, media tasks with theirs
    # balanced, with every task on every rank, keeps on average only the skills of one position of two
    assert local_share(placement) > local_share(balanced(MULTIMODAL.names, 2)) + 0.2
    assert abs(sum(weights[t] for t in placement.task_slots[0]) - 0.5) <= 0.1  # the mixture stays close
    with pytest.raises(ValueError, match="needs at least skill_parallel_size=3 pretraining tasks"):
        data_local(MULTIMODAL.names, TASKS, {"image": 0.5, "audio": 0.5}, 3)


def test_two_ranks_split_skills_train_like_every_rank_holding_all(sample, tmp_path):  # noqa: F811
    """P=2 on 2 ranks: the same losses and gradient norms as P=1 (float tolerance: the skill sums are added
    in another order), bytes exchanged, and an export that merges both ranks' skills into the same model."""
    steps = ["train.steps=6", "checkpoint.every=6"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _finish(_torchrun(_overrides(sample, whole, *steps)))
    _finish(_torchrun(_overrides(sample, split, *steps, "distributed.skill_parallel_size=2")))
    expected, got = _records(whole), _records(split)
    assert [r["tasks"] for r in got] == [r["tasks"] for r in expected]
    for a, b in zip(got, expected):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
        assert a["skill_bytes"] > 0 and b["skill_bytes"] == 0
    placement = json.loads((split / "skill_placement.json").read_text())
    assert placement["slots"] == [["text", "sound", "code"], ["image", "video", "generic"]]

    final = "checkpoints/step00000006"
    assert export_main([str(split / final), str(tmp_path / "hf")]) == 0
    model = SkillNetForPreTraining.from_pretrained(tmp_path / "hf")
    assert_close_to_update(model.state_dict(), _weights(whole / final))


def test_data_local_placement_trains_resumes_exactly_and_exports(sample, tmp_path):  # noqa: F811
    """Each rank trains on its own tasks with the generic skill shared and a padding skill evening out the
    structure; gradient accumulation and recomputed layers on; a run resumed from a checkpoint continues
    bit-identically; the export holds every skill and no padding."""
    args = ["train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=5", "train.gradient_accumulation=2",
            "train.activation_checkpointing=true", "distributed.skill_parallel_size=2",
            "distributed.skill_placement=data_local"]
    first, second = tmp_path / "first", tmp_path / "second"
    _finish(_torchrun(_overrides(sample, first, *args)))
    placement = json.loads((first / "skill_placement.json").read_text())
    assert placement["shared"] == ["generic"] and len(placement["slots"][0]) != len(placement["slots"][1])
    records = _records(first)
    seen = set()
    for r in records:  # each micro-batch: one task per position, each from that position's tasks
        assert len(r["tasks"]) == 2 and all(t in placement["task_slots"][g] for pair in r["tasks"] for g, t in enumerate(pair))
        assert r["skill_bytes"] > 0 and math.isfinite(r["loss"])
        # every rank calls the same modules (its own batch and the other positions' blank samples in one call,
        # each held skill called once), so a ZeRO-3 trace per combination of tasks holds from its second use
        pairs = [tuple(pair) for pair in r["tasks"]]
        assert r["zero3_calls"] == 2 and r["zero3_traced"] >= sum(pair in seen for pair in pairs), r
        seen.update(pairs)
    assert sum(r["zero3_traced"] for r in records) > 0
    # TensorBoard's losses are every rank's: the tasks of both positions appear (logged every 2 steps of 6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(first / "tensorboard"))
    board.Reload()
    trained = {t for r in records for pair in r["tasks"] for t in pair}
    assert {tag.removeprefix("loss/") for tag in board.Tags()["scalars"] if tag.startswith("loss/")} == trained

    shutil.copytree(first / "checkpoints" / "step00000003", second / "checkpoints" / "step00000003")
    _finish(_torchrun(_overrides(sample, second, *args)))
    assert _losses(second) == {s: loss for s, loss in _losses(first).items() if s > 3}
    final = "checkpoints/step00000006"
    a = torch.load(first / final / "zero_pp_rank_1_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
    b = torch.load(second / final / "zero_pp_rank_1_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
    assert all(torch.equal(x, y) for x, y in zip(a["fp32_flat_groups"], b["fp32_flat_groups"]))

    assert export_main([str(first / final), str(tmp_path / "hf")]) == 0
    model = SkillNetForPreTraining.from_pretrained(tmp_path / "hf")
    assert not [n for n in model.state_dict() if "padding" in n]
    names = set(model.state_dict())
    assert all(f"skillnet.encoder.layers.0.ffn.skills.{s}.fc1.weight" in names for s in MULTIMODAL.names)

    # resuming with another placement is refused before training
    assert main(["--config", "tiny", *_overrides(sample, second, "train.steps=8", "distributed.skill_parallel_size=1")]) == 2


def test_four_ranks_two_positions_partition_each_skill_over_two_ranks(sample, tmp_path):  # noqa: F811
    """World 4, P=2: each skill is held by two ranks and ZeRO-3-partitioned between them (the 2-rank tests
    have one holder per skill); training and the merged export match P=1 on 4 ranks."""
    import os
    import subprocess
    import sys

    from test_pretrain import ROOT

    def run(folder, port, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(port),
               "-m", "pretrain", "--config", "tiny", *_overrides(sample, folder, "train.steps=4", "checkpoint.every=4",
                                                                "data.num_workers=0", *extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode and re.search(r"exitcode: -\d+", done.stdout + done.stderr):
            # A rank killed by a signal from native code (seen about once in ten 4-rank runs on 2 cores, cause
            # not found yet): say so with its stacks (faulthandler), and run once more from scratch.
            fault = re.findall(r"(?:Fatal Python error|exitcode: -\d+).*", done.stdout + done.stderr)
            warnings.warn(f"a rank died by a signal, running again: {fault[:4]}")
            shutil.rmtree(folder, ignore_errors=True)
            cmd[cmd.index("--master_port") + 1] = str(free_port())
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    whole, split = tmp_path / "whole", tmp_path / "split"
    run(whole, free_port())
    run(split, free_port(), "distributed.skill_parallel_size=2")
    for a, b in zip(_records(split), _records(whole)):
        assert a["tasks"] == b["tasks"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    optim = torch.load(split / "checkpoints" / "step00000004" / "zero_pp_rank_2_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    assert {tuple(g["partition_ranks"]) for g in optim["ds_zero_partition_groups"]} == {(0, 1, 2, 3), (0, 2)}
    assert export_main([str(split), str(tmp_path / "hf")]) == 0
    model = SkillNetForPreTraining.from_pretrained(tmp_path / "hf")
    assert_close_to_update(model.state_dict(), _weights(whole / "checkpoints" / "step00000004"))
