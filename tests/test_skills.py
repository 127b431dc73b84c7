import pytest
import torch

from skillnet import SkillNetConfig, SkillRegistry, skill_set
from skillnet.skills import Route


def test_nlu_table_matches_paper():
    entries = skill_set("nlu")
    reg = SkillRegistry(entries["skills"], entries["tasks"])
    assert len(reg) == 7
    names = lambda task: {reg.names[i] for i in reg.task_skills(task)}
    # Table 2 and section 3.5 of SkillNet-NLU; s7 (generic) always on.
    assert names("sentiment_analysis") == {"sequence", "sentiment", "generic"}
    assert names("natural_language_inference") == {"sequence", "interaction", "generic"}
    assert names("semantic_similarity") == {"sequence", "interaction", "finance", "generic"}
    assert names("text_classification") == {"sequence", "generic"}
    assert names("named_entity_recognition") == {"token", "generic"}
    assert names("reading_comprehension") == {"token", "interaction", "question", "generic"}
    assert names("masked_lm") == {"token", "generic"}
    assert names("next_sentence") == {"sequence", "interaction", "generic"}


def test_shipped_sets():
    assert [s["name"] for s in skill_set("nlg")["skills"]] == ["open_ended", "non_open_ended", "conversation",
                                                               "data_to_text", "question", "generic"]
    assert [s["name"] for s in skill_set("multimodal")["skills"]] == ["text", "image", "sound", "video", "code",
                                                                      "generic"]
    with pytest.raises(ValueError, match="unknown skill set 'vision'"):
        skill_set("vision")


def test_generic_can_be_turned_off():
    entries = skill_set("nlu")
    reg = SkillRegistry(entries["skills"], entries["tasks"], always_generic=False)
    assert reg.task_skills("text_classification") == (reg.index["sequence"],)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tasks={"t": ["sequence", "telepathy"]}), r"task 't': unknown skills \['telepathy'\]"),
        (dict(tasks={"t": []}, always_generic=False), "task 't' activates no skill"),
        (dict(generic_skill="common"), "generic_skill 'common' is not among the skills"),
        (dict(skills=[{"name": "a"}, {"name": "a"}], tasks={}, generic_skill=None), r"skills declared twice: \['a'\]"),
        (dict(skills=[{"name": "bad.name"}], tasks={}, generic_skill=None), "skill name 'bad.name'"),
        (dict(router="gating"), "router must be one of"),
        (dict(skill_layers="middle"), "skill_layers must be"),
        (dict(modalities=["text", "smell"]), r"unknown modalities \['smell'\]"),
    ],
)
def test_bad_config_is_refused_with_a_clear_error(kwargs, message):
    base = dict(skill_set="nlu")
    if "skills" in kwargs:
        base = {}
    with pytest.raises(ValueError, match=message):
        SkillNetConfig(**{**base, **kwargs})


def test_skill_layer_placement():
    c = SkillNetConfig(skill_set="nlu", num_hidden_layers=12)
    assert c.skill_layer_indices(12) == list(range(12))
    c.skill_layers = "every:2"
    assert c.skill_layer_indices(12) == [1, 3, 5, 7, 9, 11]
    c.skill_layers = "top:3"
    assert c.skill_layer_indices(12) == [9, 10, 11]
    c.skill_layers = [0, 5]
    assert c.skill_layer_indices(12) == [0, 5]


def test_route_groups_samples_by_skill_set():
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    route = Route.from_mask(mask)
    groups = {skills: samples.tolist() for samples, skills in route.groups}
    assert groups == {(0, 2): [0, 2], (1, 2): [1]}
    assert route.active == (0, 1, 2)
    single = Route.from_mask(mask[[0, 2]])
    assert single.groups == [(None, (0, 2))]
    with pytest.raises(ValueError, match="no active skill"):
        Route.from_mask(torch.zeros(2, 3, dtype=torch.bool))
