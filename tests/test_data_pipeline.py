"""Data pipeline: real media in shards, splitting over ranks and workers, alpha mixing, exact resume,
corruption accounting."""

import hashlib
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.config import DataConfig
from data_pipeline.loader import MultiTaskLoader
from data_pipeline.media import MediaConfig, log_mel, resample
from data_pipeline.sample_corpus import write_corpus
from data_pipeline.shards import ShardIndex, SkipCounter, open_source, read_raw_samples
from data_pipeline.stream import SourceStream
from data_pipeline.write_shards import main as write_shards_main
from skillnet import load_config
from training.sampling import sampling_probabilities

MODEL = load_config("tiny")
MEDIA = MediaConfig.from_model(MODEL)
SKILLS = {t: MODEL.registry.skill_names(t) for t in MODEL.tasks}
MODALITY_TASK = {"image": "image", "audio": "audio", "video": "video", "code": "code", "text": "masked_lm"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, seed=0, images_n=40, audio_n=16, video_n=8, code_n=24, text_n=40, max_samples=4, progress=False)
    return out


def _pattern(corpus, modality):
    n = len(ShardIndex.load(corpus / modality / f"{modality}.index.json").shards)
    return str(corpus / modality / f"{modality}-{{000000..{n - 1:06d}}}.tar")


def _loader(tokenizer, tasks, **cfg):
    defaults = dict(batch_size=4, num_workers=0, shuffle_buffer=8, shards_per_round=1)
    config = DataConfig(tasks=tasks, **{**defaults, **cfg})
    return MultiTaskLoader(config, tokenizer, MEDIA, SKILLS)


def _task(corpus, modality, name=None):
    return {"name": name or MODALITY_TASK[modality], "modality": modality,
            "sources": [{"shards": _pattern(corpus, modality)}]}


@pytest.mark.parametrize("modality", ["image", "audio", "video", "code", "text"])
def test_every_modality_decodes_into_model_inputs(corpus, tokenizer, modality):
    from skillnet import SkillNetForPreTraining

    batch = next(iter(_loader(tokenizer, [_task(corpus, modality)])))
    assert batch["modality"] == modality and len(batch["keys"]) == 4
    assert batch["skills"] == SKILLS[MODALITY_TASK[modality]]
    if modality == "image":
        assert batch["pixel_values"].shape == (4, 3, 32, 32)
    elif modality == "audio":
        assert batch["input_features"].shape[:2] == (4, 16)
        assert batch["feature_attention_mask"].sum(1).min() > 90  # one second at 100 frames/s
    elif modality == "video":
        assert batch["pixel_values_videos"].shape == (4, 4, 3, 32, 32)
    if modality != "text":
        captions = tokenizer.batch_decode(batch["caption_input_ids"], skip_special_tokens=True)
        assert all(c.strip() for c in captions)
    model = SkillNetForPreTraining(MODEL).eval()
    inputs = {k: batch[k] for k in ("pixel_values", "input_features", "feature_attention_mask", "pixel_values_videos",
                                    "input_ids", "attention_mask") if k in batch}
    out = model(**inputs, modality=modality if modality in ("code", "text") else None, task=batch["task"])
    assert out.last_hidden_state.shape[0] == 4


def test_image_caption_describes_the_picture(corpus):
    """The corpus is learnable: a caption's colour word is the dominant colour of the shape."""
    from data_pipeline.shards import read_raw_samples

    sample = next(read_raw_samples(_pattern(corpus, "image").replace("{000000..000009}", "000000"), SkipCounter()))
    ext = "jpg" if "jpg" in sample else "png"
    pixels = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB")).reshape(-1, 3).astype(int)
    bright = pixels[pixels.max(1) > 150]
    colour = sample["txt"].decode().split()[2]
    channel = {"red": 0, "green": 1, "blue": 2}.get(colour)
    if channel is not None:
        assert np.bincount(bright.argmax(1), minlength=3).argmax() == channel


def test_audio_resampling_and_log_mel():
    rate = 22_050
    t = np.arange(rate) / rate
    tone = torch.from_numpy(np.sin(2 * np.pi * 1000.0 * t)).float()
    down = resample(tone, rate, 16_000)
    assert down.numel() == 16_000
    spectrum = torch.fft.rfft(down).abs()
    assert abs(int(spectrum.argmax()) - 1000) <= 1  # the tone keeps its pitch
    mel = log_mel(down, MEDIA)
    assert mel.shape == (16, 100)
    assert mel.mean(1).argmax() == mel[:, 50].argmax()  # one dominant band, steady over time


def test_corpus_is_deterministic_for_a_seed(tmp_path):
    def digest(root):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*.tar"))}

    kwargs = dict(images_n=6, audio_n=4, video_n=2, code_n=4, text_n=4, max_samples=4, progress=False)
    write_corpus(tmp_path / "a", seed=3, **kwargs)
    write_corpus(tmp_path / "b", seed=3, **kwargs)
    write_corpus(tmp_path / "c", seed=4, **kwargs)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_write_shards_from_folder_manifest_and_hf_dataset(tmp_path, tokenizer):
    import datasets

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), colour).save(folder / f"pic{i}.png")
        (folder / f"pic{i}.txt").write_text(f"a {colour} picture")
    assert write_shards_main(["--input", str(folder), "--modality", "image", "--out", str(tmp_path / "a"),
                              "--max-samples", "2"]) == 0
    index = ShardIndex.load(tmp_path / "a" / "image.index.json")
    assert index.samples == 3 and list(index.shards.values()) == [2, 1] and index.fields == ["png", "txt"]

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"key": f"k{i}", "image": f"folder/pic{i}.png", "caption": f"caption {i}"})
                                + "\n" for i in range(3)))
    assert write_shards_main(["--input", str(manifest), "--modality", "image", "--out", str(tmp_path / "b"),
                              "--prefix", "man"]) == 0

    records = {"image": [str(folder / f"pic{i}.png") for i in range(3)], "text": [f"hf caption {i}" for i in range(3)]}
    ds = datasets.Dataset.from_dict(records).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    assert write_shards_main(["--input", str(tmp_path / "hf"), "--hf", "--modality", "image", "--out",
                              str(tmp_path / "c")]) == 0
    datasets.Dataset.from_dict({"text": ["first paragraph here.", "second one."]}).to_parquet(
        str(tmp_path / "t.parquet"))
    assert write_shards_main(["--input", str(tmp_path / "t.parquet"), "--hf", "--modality", "text", "--out",
                              str(tmp_path / "d")]) == 0

    for out, prefix, n in (("a", "image", 2), ("b", "man", 1), ("c", "image", 1)):
        loader = _loader(tokenizer,
                         [{"name": "image", "modality": "image",
                           "sources": [{"shards": str(tmp_path / out / f"{prefix}-{{000000..{n - 1:06d}}}.tar")}]}],
                         batch_size=3, shards_per_round=2)
        batch = next(iter(loader))
        assert batch["pixel_values"].shape == (3, 3, 32, 32)
        captions = sorted(tokenizer.batch_decode(batch["caption_input_ids"], skip_special_tokens=True))
        assert len(set(captions)) == 3
    text = next(iter(_loader(tokenizer, [{"name": "masked_lm", "modality": "text",
                                          "sources": [{"shards": str(tmp_path / "d" / "text-000000.tar")}]}],
                             batch_size=2)))
    assert sorted(text["texts"]) == ["first paragraph here.", "second one."]


def test_shards_are_split_over_ranks_and_workers_once_per_epoch(corpus, tokenizer):
    """2 ranks x 2 workers = 4 slots over 10 image shards of 4: one epoch reaches every sample once."""
    source = open_source(_pattern(corpus, "image"))
    cfg = DataConfig(tasks=[], shuffle_buffer=5, shards_per_round=2)
    seen = []
    for slot in range(4):
        stream = SourceStream(source, "image.0", slot, 4, cfg, SkipCounter())
        n = sum(source.samples_per_url[source.urls.index(u)] for r in range(stream.rounds_per_epoch)
                for u in stream.round_shards(r))
        seen += [next(stream)["__key__"] for _ in range(n)]
        assert stream.round == stream.rounds_per_epoch - 1 or stream.emitted == 0
    assert len(seen) == len(set(seen)) == 40

    # through the loaders of two ranks with two workers each, on 8 shards (2 per slot): 4 batches of 4 per
    # rank are one epoch, and together they hold every sample once
    eight = str(corpus / "image" / "image-{000000..000007}.tar")
    keys = []
    for rank in (0, 1):
        task = {"name": "image", "modality": "image", "sources": [{"shards": eight}]}
        config = DataConfig(tasks=[task], batch_size=4, num_workers=2, shuffle_buffer=5, shards_per_round=3)
        loader = MultiTaskLoader(config, tokenizer, MEDIA, SKILLS, rank=rank, world_size=2)
        it = iter(loader)
        keys += [k for _ in range(4) for k in next(it)["keys"]]
    assert len(keys) == len(set(keys)) == 32


def test_mixing_follows_the_alpha_rule(corpus, tokenizer):
    assert sampling_probabilities([100, 300], 1.0) == pytest.approx([0.25, 0.75])
    assert sampling_probabilities([100, 300], 0.0) == pytest.approx([0.5, 0.5])
    assert sampling_probabilities([100, 400], 0.5) == pytest.approx([1 / 3, 2 / 3])
    tasks = [_task(corpus, "image"), _task(corpus, "code"), _task(corpus, "text")]
    for alpha in (0.0, 0.5, 1.0):
        loader = _loader(tokenizer, tasks, alpha=alpha)
        expected = sampling_probabilities([40, 24, 40], alpha)
        draws = Counter(loader.task_for_batch(i) for i in range(6000))
        for task, p in zip(["image", "code", "masked_lm"], expected):
            assert abs(draws[task] / 6000 - p) < 4 * math.sqrt(p * (1 - p) / 6000), (alpha, task)
    # the task of batch i is the same on every rank
    other = MultiTaskLoader(DataConfig(tasks=tasks, num_workers=0), tokenizer, MEDIA, SKILLS, rank=1, world_size=2)
    assert [other.task_for_batch(i) for i in range(50)] == [loader.task_for_batch(i) for i in range(50)]


def test_mixed_batches_carry_a_task_per_sample(corpus, tokenizer):
    tasks = [_task(corpus, "text", "masked_lm"), _task(corpus, "text", "next_sentence")]
    batch = next(iter(_loader(tokenizer, tasks, batch_mode="mixed", batch_size=16)))
    assert len(batch["task"]) == 16 and set(batch["task"]) == {"masked_lm", "next_sentence"}
    assert batch["skills"] == [SKILLS[t] for t in batch["task"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_key_sequence(corpus, tokenizer, workers):
    tasks = [_task(corpus, "image"), _task(corpus, "code"), _task(corpus, "text")]
    cfg = dict(num_workers=workers, batch_size=3, shuffle_buffer=6, shards_per_round=1)
    straight = _loader(tokenizer, tasks, **cfg)
    it = iter(straight)
    expected = [(b["task"], b["keys"]) for b in (next(it) for _ in range(14))]

    first = _loader(tokenizer, tasks, **cfg)
    it = iter(first)
    got = [(b["task"], b["keys"]) for b in (next(it) for _ in range(5))]
    state = json.loads(json.dumps(first.state_dict()))  # checkpointable as JSON
    del it, first
    resumed = _loader(tokenizer, tasks, **cfg)
    resumed.load_state_dict(state)
    it = iter(resumed)
    got += [(b["task"], b["keys"]) for b in (next(it) for _ in range(9))]
    assert got == expected
    with pytest.raises(ValueError, match="reshard it"):
        _loader(tokenizer, tasks, **{**cfg, "num_workers": workers + 1}).load_state_dict(state)


def _layout_loaders(tokenizer, tasks, world, workers, cfg):
    return [MultiTaskLoader(DataConfig(tasks=tasks, num_workers=workers, **cfg), tokenizer, MEDIA, SKILLS, rank, world)
            for rank in range(world)]


def _carried(loader, logical, stream) -> int:
    """Samples a slot's carried rounds hold for `stream`, less those already read."""
    source = loader.sources[stream.rsplit(".", 1)[0]][0]
    carry = loader.slot_states[logical]["sources"][stream]["carry"]
    return sum(sum(source.samples_per_url[source.urls.index(u)] for u in spec["urls"]) - spec["skip"] for spec in carry)


def test_a_resharded_stream_reads_the_rest_of_the_epoch_once(corpus, tokenizer):
    """2 ranks x 2 workers read part of an epoch of two tasks; 3 ranks x 1 worker go on from their states and
    read a little; 4 ranks in one process each go on from those. What every slot reads first (its carried
    rounds) and what was read before hold each sample of the epoch exactly once; every batch's task is the
    one drawn for its index, as without a resize."""
    tasks = [_task(corpus, "image"), _task(corpus, "text")]
    cfg = dict(batch_size=2, shuffle_buffer=3, shards_per_round=1, seed=5)
    names = {"image": "image.0", "masked_lm": "masked_lm.0"}
    read = {task: [] for task in names}
    states = None
    for stage, (world, workers, batches) in enumerate([(2, 2, 5), (3, 1, 2), (4, 0, None)]):
        loaders = _layout_loaders(tokenizer, tasks, world, workers, cfg)
        for loader in loaders:
            if states is not None:
                assert loader.needs_reshard(states[0])
                loader.reshard(states)
        if batches is None:  # the last layout: each slot reads its carried rounds
            for loader in loaders:
                want = {task: _carried(loader, 0, stream) for task, stream in names.items()}
                got, it, index = {task: [] for task in names}, iter(loader), loader.consumed
                while any(len(got[t]) < want[t] for t in names):
                    batch = next(it)
                    assert batch["task"] == loader.task_for_batch(index)
                    got[batch["task"]] += batch["keys"]
                    index += 1
                for task in names:
                    read[task] += got[task][:want[task]]
            break
        for loader in loaders:
            it = iter(loader)
            for index in range(loader.consumed, loader.consumed + batches):
                batch = next(it)
                assert batch["task"] == loader.task_for_batch(index)
                read[batch["task"]] += batch["keys"]
        states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    assert len(read["image"]) == len(set(read["image"])) == 40
    assert len(read["masked_lm"]) == len(set(read["masked_lm"])) == 40


def _renamed(tree, old: str, new: str):
    if isinstance(tree, dict):
        return {(new if k == old else k): _renamed(v, old, new) for k, v in tree.items()}
    return [_renamed(v, old, new) for v in tree] if isinstance(tree, list) else tree


def _keys(loader, n: int) -> list:
    it = iter(loader)
    return [next(it)["keys"] for _ in range(n)]


def test_states_of_the_previous_release_resume_and_reshard_the_same(corpus, tokenizer):
    """The previous release saved the count of reshards as `generation`: its states resume and reshard as
    this release's own do (2 ranks resharded to 1, which resumes, then reshards to 2 again)."""
    tasks = [_task(corpus, "image"), _task(corpus, "text")]
    cfg = dict(batch_size=2, shuffle_buffer=3, shards_per_round=1, seed=5)
    two = _layout_loaders(tokenizer, tasks, 2, 0, cfg)
    for loader in two:
        _keys(loader, 3)
    one = _layout_loaders(tokenizer, tasks, 1, 0, cfg)[0]
    one.reshard([json.loads(json.dumps(loader.state_dict())) for loader in two])
    _keys(one, 2)
    state = json.loads(json.dumps(one.state_dict()))
    assert state["reshards"] == 1 and "generation" not in json.dumps(state)
    old = _renamed(state, "reshards", "generation")
    results = []
    for saved in (state, old):
        resumed = _layout_loaders(tokenizer, tasks, 1, 0, cfg)[0]
        resumed.load_state_dict(saved)
        again = _layout_loaders(tokenizer, tasks, 2, 0, cfg)
        for loader in again:
            loader.reshard([saved])
        results.append((_keys(resumed, 60), [_keys(loader, 40) for loader in again]))  # into the next epochs
    assert results[0] == results[1]


def test_a_reshard_refuses_states_that_do_not_map(corpus, tokenizer):
    tasks = [_task(corpus, "image")]
    loader = _layout_loaders(tokenizer, tasks, 1, 0, dict(batch_size=2))[0]
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="data.seed=0, this run has 1"):
        _layout_loaders(tokenizer, tasks, 2, 0, dict(batch_size=2, seed=1))[0].reshard([state])
    fewer = [{**tasks[0], "sources": [{"shards": str(corpus / "image" / "image-{000000..000004}.tar")}]}]
    with pytest.raises(ValueError, match="10 shards in task 'image' source 0; this run has 5"):
        _layout_loaders(tokenizer, fewer, 2, 0, dict(batch_size=2))[0].reshard([state])


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a shard, letting `edit(name, data)` change or drop (None) each member."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin:
            data = edit(info.name, tin.extractfile(info).read())
            if data is not None:
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_counted_and_logged(corpus, tmp_path, tokenizer, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    media = {"image": "image000000", "audio": "audio000000", "video": "video000000"}
    shards = {}
    for modality, victim in media.items():
        src = corpus / modality / f"{modality}-000000.tar"
        out = bad / f"{modality}-000000.tar"

        def edit(name, data, victim=victim):
            if name.startswith(victim) and not name.endswith(".txt"):
                return b"\x00not media at all" * 4  # undecodable media
            if name.startswith(victim[:-1] + "1") and name.endswith(".txt"):
                return b"   "  # empty caption
            if name.startswith(victim[:-1] + "2") and name.endswith(".txt"):
                return None  # missing member
            return data

        _rewrite(src, out, edit)
        shards[modality] = out
        ShardIndex(modality, ["txt"], {out.name: 4}).save(bad / f"{modality}.index.json")

    for modality, victim in media.items():
        # a buffer of one keeps tar order: three bad samples, then the good fourth
        task = {"name": modality, "modality": modality, "sources": [{"shards": str(shards[modality])}]}
        loader = _loader(tokenizer, [task], batch_size=1, shuffle_buffer=1)
        batch = next(iter(loader))
        assert batch["keys"] == [victim[:-1] + "3"]
        assert loader.skipped == {f"undecodable_{modality}": 1, "empty_caption": 1, "missing_member": 1}
    assert "undecodable_image in" in caplog.text and "image-000000.tar" in caplog.text and "image000000" in caplog.text

    truncated = bad / "cut-000000.tar"
    whole = (corpus / "image" / "image-000001.tar").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    skipped = SkipCounter()
    keys = [s["__key__"] for s in read_raw_samples(str(truncated), skipped)]
    assert 0 < len(keys) < 4 and keys == [f"image00000{i}" for i in range(4, 4 + len(keys))]
    assert skipped == {"truncated_shard": 1}


@pytest.mark.parametrize(
    "tasks, error, message",
    [
        ([{"name": "image", "modality": "image", "sources": [{"shards": "/nowhere/img-{000000..000003}.tar"}]}],
         FileNotFoundError, "no shards match"),
        ([{"name": "image", "modality": "smell", "sources": [{"shards": "x.tar"}]}], ValueError,
         "unknown modality 'smell'"),
        ([{"name": "poetry", "modality": "text", "sources": [{"shards": "x.tar"}]}], ValueError,
         r"data tasks \['poetry'\] are not in the model's task table"),
        ([], ValueError, "no tasks"),
    ],
)
def test_bad_data_config_fails_before_training(tokenizer, tasks, error, message):
    with pytest.raises(error, match=message):
        _loader(tokenizer, tasks)


def test_missing_index_names_the_fix(tmp_path, tokenizer, corpus):
    (tmp_path / "img-000000.tar").write_bytes((corpus / "image" / "image-000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match="write_shards --index-only"):
        _loader(tokenizer, [{"name": "image", "modality": "image",
                             "sources": [{"shards": str(tmp_path / "img-000000.tar")}]}])
    assert write_shards_main(["--index-only", str(tmp_path / "img-000000.tar"), "--modality", "image"]) == 0
    assert next(iter(_loader(tokenizer, [{"name": "image", "modality": "image",
                                          "sources": [{"shards": str(tmp_path / "img-000000.tar")}]}])))["keys"]


def test_train_tokenizer_on_shards(corpus, tmp_path):
    from data_pipeline.train_tokenizer import main
    from skillnet.tokenizer import load_tokenizer

    assert main(["--shards", _pattern(corpus, "text"), "--shards", _pattern(corpus, "code"), "--vocab-size", "300",
                 "--out", str(tmp_path)]) == 0
    tok = load_tokenizer(tmp_path)
    assert len(tok) == 300 and tok.decode(tok("def f(x):\n    return x")["input_ids"],
                                          skip_special_tokens=True) == "def f(x):\n    return x"


def test_a_task_trained_by_some_ranks_is_dealt_over_those_ranks_alone(corpus, tokenizer):
    """Split tasks (data-local skill placement): a task's shards go to the ranks that train it, so an
    epoch of it is every sample, not the share of ranks that never read it."""
    tasks = [_task(corpus, "image"), _task(corpus, "text")]
    loaders = _layout_loaders(tokenizer, tasks, 4, 0, dict(batch_size=2, shuffle_buffer=3, shards_per_round=1))
    for rank, loader in enumerate(loaders):
        loader.split_tasks([["image"], ["masked_lm"]], rank % 2)
    assert loaders[0].readers() == {"image": [0, 2], "masked_lm": [1, 3]}
    keys = []
    for loader in loaders[0::2]:  # the ranks training images, 10 batches each: one epoch
        it = iter(loader)
        keys += [k for _ in range(10) for k in next(it)["keys"]]
    assert len(keys) == len(set(keys)) == 40


def test_instruction_batches_hold_the_instruction_and_its_target_and_skip_samples_that_do_not_fit(tokenizer,
                                                                                                  tmp_path):
    """An instruction task's batches: the image, the instruction's tokens with the sample's field written in,
    and the target's (a box as four location tokens, then the end token, -100 after). Samples lacking the
    field or with a box outside their image are skipped and counted."""
    import copy

    from data_pipeline.sample_corpus import images
    from data_pipeline.writer import write_shards
    from skillnet.instructions import add_location_tokens, quantize_box

    samples, fields = list(images(16, np.random.default_rng(1), 32)), {}
    for i, sample in enumerate(samples):
        values = json.loads(sample["json"])
        if i % 4 == 1:
            del values["colour"]
        if i % 4 == 3:
            values["box"] = [0, 0, 99, 5]  # outside the 32 x 32 image
        sample["json"] = json.dumps(values)
        fields[sample["__key__"]] = values
    write_shards(iter(samples), tmp_path, "image", "image", max_samples=4, progress=False)
    tokenizer = copy.deepcopy(tokenizer)
    add_location_tokens(tokenizer)
    template = "[IMAGE:image] where is the [TEXT:colour] shape? -> [BOX:box]"
    task = {"name": "image", "modality": "image", "sources": [{"shards": str(tmp_path / "image.index.json")}],
            "template": template}
    loader = _loader(tokenizer, [task], resample=True)
    batches = [b for b, _ in zip(loader, range(6))]
    bins = set(tokenizer.convert_tokens_to_ids([f"<bin_{i}>" for i in range(1000)]))
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 3, 32, 32) and "caption_input_ids" not in batch
        for key, ids, labels in zip(batch["keys"], batch["input_ids"], batch["decoder_labels"]):
            values = fields[key]
            assert tokenizer.decode(ids, skip_special_tokens=True) == f"where is the {values['colour']} shape?"
            target = labels[labels != -100].tolist()
            assert set(target[:4]) <= bins and target[4:] == [tokenizer.eos_token_id]
            assert tokenizer.convert_ids_to_tokens(target[:4]) == [f"<bin_{b}>" for b in
                                                                  quantize_box(values["box"], 32, 32)]
    assert loader.skipped["bad_fields"] >= 6  # 8 of the 16 samples are bad, and each is drawn more than once
    bad = DataConfig(tasks=[{**task, "template": "[AUDIO:audio] what is it? -> [TEXT:colour]"}])
    with pytest.raises(ValueError, match="task 'image' reads image shards, but its template .* reads "
                                         r"\[AUDIO:audio\]"):
        bad.validate()
