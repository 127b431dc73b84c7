"""Instruction templates (`skillnet/instructions.py`): parsing, the shipped templates' round trip through a
tokenizer, location tokens, closed-set decoding, and bad templates and samples."""

import random

import pytest
import torch

from skillnet import SkillNetForConditionalGeneration, load_config
from skillnet.heads.instruction import Instruction
from skillnet.instructions import (
    BINS,
    Template,
    add_location_tokens,
    box_iou,
    closed_set,
    constraint,
    dequantize_box,
    load_templates,
    location_tokens,
    quantize_box,
    read_box,
)
from skillnet.tokenizer import load_tokenizer, train_tokenizer

WORDS = ("a red square moves left over two blue circles what does the image region describe is the sentiment of "
         "text positive or negative can text1 imply text2 yes maybe no question equivalent summary article audio "
         "say video semantics have same and which").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + ' " ? :' for _ in range(300)]
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, 400, folder)
    return folder


def _value(slot, rng):
    if slot.closed:
        return rng.choice(slot.closed)
    if slot.kind == "BOX":
        return [10.5, 20.0, 200.0, 150.25]
    if slot.kind in ("TEXT", "CODE"):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    return object()  # a media input: read by a front-end, never written


@pytest.mark.parametrize("name", list(load_templates()))
def test_every_shipped_template_round_trips_through_the_tokenizer(name, tokenizer):
    template, rng, size = load_templates()[name], random.Random(name), (320, 240)
    tokenizer = load_tokenizer(tokenizer)
    tokenizer.add_tokens(location_tokens())
    for _ in range(5):
        slots = [p for p in template.pieces if not isinstance(p, str)] + [template.target]
        sample = {s.field: _value(s, rng) for s in slots} | {"width": size[0], "height": size[1]}
        template.check(sample)
        text = template.instruction(sample, size)
        decoded = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
        read = template.read(decoded)
        for slot in slots[:-1]:
            if slot.kind in ("TEXT", "CODE"):
                assert read[slot.field] == sample[slot.field]
            elif slot.kind == "BOX":
                assert quantize_box(read_box(read[slot.field], *size), *size) == quantize_box(sample[slot.field],
                                                                                               *size)
            else:
                assert slot.field not in read
        target = template.target_text(sample, size)
        assert tokenizer.decode(tokenizer(target, add_special_tokens=False)["input_ids"]) == target
    assert {s.kind for s in template.media} <= {"IMAGE", "AUDIO", "VIDEO"}


def test_location_tokens_round_trip_within_one_bin():
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.uniform(1, 2000), rng.uniform(1, 2000)
        x0, x1 = sorted(rng.uniform(0, width) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, height) for _ in range(2))
        bins = quantize_box((x0, y0, x1, y1), width, height)
        assert all(0 <= b < BINS for b in bins)
        back = dequantize_box(bins, width, height)
        assert quantize_box(back, width, height) == bins
        for a, b, size in zip((x0, y0, x1, y1), back, (width, height, width, height)):
            assert abs(a - b) <= size / BINS
    assert quantize_box((0, 0, 320, 240), 320, 240) == (0, 0, BINS - 1, BINS - 1)
    assert len(set(location_tokens())) == BINS


@pytest.mark.parametrize("box", [(-1, 0, 10, 10), (0, 0, 321, 10), (50, 0, 10, 10), (0, 0, 10, 241)])
def test_a_box_outside_the_image_is_refused(box):
    with pytest.raises(ValueError, match=r"is not inside the 320 x 240 image"):
        quantize_box(box, 320, 240)


@pytest.mark.parametrize("text, message", [
    ("[SMELL:odour] what is it? -> [TEXT:answer]", "unknown modality 'SMELL'"),
    ("[IMAGE:image] what does the image describe?", "needs one '->'"),
    ("[TEXT:a] or [TEXT:b]? -> [TEXT:label, closed: yes|no|yes]", "duplicate answers"),
    ("[TEXT:a]? -> [TEXT:label, closed: yes||no]", "an empty answer"),
    ("[TEXT:a, closed: x|y]? -> [TEXT:label]", "only the target may be a closed set"),
    ("[TEXT:a]? -> [IMAGE:picture]", "the target is TEXT or BOX, not IMAGE"),
    ("[TEXT:a]? -> [TEXT:b] [TEXT:c]", "the target must be one slot"),
    ("[TEXT:a][TEXT:b]? -> [TEXT:c]", "need text between them"),
    ("[TEXT:a] and [TEXT:a]? -> [TEXT:c]", "a field used twice"),
    ("[TEXT:] what? -> [TEXT:c]", "needs a field name"),
    ("[TEXT:a, colour: red]? -> [TEXT:c]", "unknown slot option 'colour'"),
    ("[BOX:region, closed: a|b] -> [TEXT:c]", "only a TEXT slot may be a closed set"),
    ("what [is] this? [TEXT:a] -> [TEXT:c]", "a '[' or ']' that is not a slot"),
    ("what is this? -> [TEXT:c]", "no input slot"),
])
def test_a_bad_template_is_refused_in_one_line_naming_it(text, message):
    with pytest.raises(ValueError, match=r"instruction template 'bad'") as error:
        Template.parse("bad", text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_sample_is_refused_naming_the_template_and_the_sample():
    template = load_templates()["entailment"]
    with pytest.raises(ValueError, match=r"sample s7 lacks hypothesis for instruction template 'entailment'"):
        template.check({"premise": "a", "label": "yes"}, "s7")
    with pytest.raises(ValueError, match=r"sample s8: 'perhaps' is not one of the answers of template 'entailment'"):
        template.check({"premise": "a", "hypothesis": "b", "label": "perhaps"}, "s8")
    with pytest.raises(ValueError, match="the sample needs the image's size"):
        load_templates()["grounded_caption"].instruction({"region": (0, 0, 1, 1)})
    grounding = load_templates()["visual_grounding"]
    sample = {"image": object(), "text": "a red square", "width": 64, "height": 48}
    with pytest.raises(ValueError, match=r"sample s9, field region: box \[0, 0, 70, 10\] is not inside the 64 x 48 "
                                         r"image .* \(instruction template 'visual_grounding'\)"):
        grounding.check({**sample, "region": [0, 0, 70, 10]}, "s9")
    with pytest.raises(ValueError, match=r"sample s10 lacks width, height \(the image's size\)"):
        grounding.check({"image": object(), "text": "a", "region": [0, 0, 1, 1]}, "s10")
    grounding.check({**sample, "region": [0, 0, 64, 48]}, "s11")


def test_templates_load_from_a_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("count: '[IMAGE:image] how many shapes are there? -> [TEXT:count, closed: 1|2|3]'\n")
    assert load_templates(path)["count"].target.closed == ("1", "2", "3")
    path.write_text("- just a list\n")
    with pytest.raises(ValueError, match="a mapping of names to template lines"):
        load_templates(path)


def test_closed_set_decoding_only_emits_the_sets_answers(tokenizer):
    tokenizer = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    config = load_config("tiny", num_hidden_layers=2, num_decoder_layers=2, vocab_size=len(tokenizer),
                         decoder_start_token_id=tokenizer.bos_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = SkillNetForConditionalGeneration(config).eval()
    template = load_templates()["entailment"]
    answers = template.target.closed
    rng = random.Random(1)
    texts = [template.instruction({"premise": _value(template.pieces[1], rng),
                                   "hypothesis": _value(template.pieces[3], rng)}) for _ in range(6)]
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    kwargs = dict(task="masked_lm", max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=4)
    free = tokenizer.batch_decode(model.generate(ids["input_ids"], attention_mask=ids["attention_mask"], **kwargs),
                                  skip_special_tokens=True)
    assert any(text.strip() not in answers for text in free)  # unconstrained, a random model says anything
    allow = closed_set(tokenizer, answers, tokenizer.eos_token_id)
    out = model.generate(ids["input_ids"], attention_mask=ids["attention_mask"], prefix_allowed_tokens_fn=allow,
                         **kwargs)
    said = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert len(said) == 24 and set(said) <= set(answers) and len(set(said)) > 1


def test_box_targets_decode_as_four_location_tokens_and_score_by_iou(tokenizer):
    """The location tokens join the tokenizer and the model's embeddings (the output projection stays tied); a
    box target decodes, under its constraint, as exactly four of them, which read back as a box inside the
    image; grounding accuracy counts IoU >= 0.5."""
    tokenizer = load_tokenizer(tokenizer)
    config = load_config("tiny", num_hidden_layers=1, num_decoder_layers=1, vocab_size=len(tokenizer),
                         decoder_start_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = SkillNetForConditionalGeneration(config).eval()
    before = model.get_input_embeddings().weight.detach().clone()
    assert add_location_tokens(tokenizer, model) == BINS and add_location_tokens(tokenizer, model) == 0
    assert model.config.vocab_size == len(tokenizer) == len(before) + BINS
    assert torch.equal(model.get_input_embeddings().weight[:len(before)], before)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = tokenizer(["which region does the text \" a red square \" describe?"] * 3, return_tensors="pt",
                    return_token_type_ids=False)
    target = load_templates()["visual_grounding"].target
    out = model.generate(**ids, task="masked_lm", max_new_tokens=8, do_sample=True, top_k=0,
                         prefix_allowed_tokens_fn=constraint(target, tokenizer, tokenizer.eos_token_id))
    bins = set(tokenizer.convert_tokens_to_ids(location_tokens()))
    for row in out.tolist():
        assert all(t in bins for t in row[1:5]) and row[5] == tokenizer.eos_token_id, row
        x0, y0, x1, y1 = read_box(tokenizer.decode(row[1:5]), 320, 240)
        assert 0 <= x0 < 320 and 0 <= y1 < 240

    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7) and box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0
    gold = ["<bin_0><bin_0><bin_100><bin_100>"] * 2 + ["<bin_500><bin_500><bin_600><bin_600>"]
    said = ["<bin_0> <bin_0> <bin_100> <bin_100>", "<bin_10><bin_10><bin_100><bin_100>", "<bin_0><bin_0><bin_1><bin_1>"]
    scores = Instruction.score(said, gold)
    assert scores["exact_match"] == pytest.approx(1 / 3) and scores["box_accuracy"] == pytest.approx(2 / 3)
    assert scores["mean_iou"] == pytest.approx((1 + 0.81) / 3)
    head = Instruction("grounding", {"type": "instruction", "template": load_templates()["visual_grounding"].line})
    assert head.main_metric == "box_accuracy" and head.new_tokens() == location_tokens()
