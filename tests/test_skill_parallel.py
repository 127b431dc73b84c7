"""Skill parallelism's placements (the distributed runs with skills split over ranks are rows of the table
in test_distributed.py)."""


import pytest

from pretrain.skill_parallel import balanced, data_local
from skillnet import load_config

MULTIMODAL = load_config("tiny").registry
TASKS = {t: sorted(set(MULTIMODAL.skill_names(t))
                   | ({"text", "generic"} if t in ("image", "audio", "video", "code") else set()))
         for t in ("masked_lm", "next_sentence", "masked_code", "code", "image", "audio", "video")}


def test_balanced_placement_deals_every_skill_once():
    names = load_config("skillnet-nlu-base").registry.names
    placement = balanced(names, 2)
    assert placement.slots == [names[0::2], names[1::2]] and placement.width == 4 and not placement.shared
    assert sorted(sum(placement.slots, [])) == sorted(names)
    with pytest.raises(ValueError, match="skill_parallel_size=8 exceeds the model's 7 skills"):
        balanced(names, 8)


def test_data_local_placement_keeps_tasks_with_their_skills():
    weights = {"masked_lm": 0.2, "next_sentence": 0.2, "masked_code": 0.1, "code": 0.1, "image": 0.2, "audio": 0.1,
               "video": 0.1}
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


