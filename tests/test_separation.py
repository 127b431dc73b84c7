"""The separation benchmark (`benchmarks/separation.py`): its generated tasks, and its quick run end to end.
Who wins is the benchmark's output (reported in the README), not a test's business."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import separation  # noqa: E402


def _rows(folder: Path, task: str, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (folder / task / f"{split}.jsonl").read_text().splitlines()]


def test_generated_tasks_are_reproducible_balanced_and_follow_the_conflict_knob(tmp_path):
    sizes = separation.generate(tmp_path / "a", 0.5)
    separation.generate(tmp_path / "b", 0.5)
    separation.generate(tmp_path / "c", 0.0)
    assert sizes == {name: n for name, (_, _, n) in separation.TASKS.items()}
    for name in separation.TASKS:
        first, second = (tmp_path / run / name / "train.jsonl" for run in "ab")
        assert first.read_bytes() == second.read_bytes()
        assert len(_rows(tmp_path / "a", name)) == sizes[name] and len(_rows(tmp_path / "a", name, "dev")) == 400
    for name in ("topic_a", "topic_b"):
        labels = [r["label"] for r in _rows(tmp_path / "a", name)]
        assert 0.4 < labels.count("yes") / len(labels) < 0.6
    # the knob moves topic_b only: topic_a's data is the same at every conflict
    assert _rows(tmp_path / "a", "topic_a") == _rows(tmp_path / "c", "topic_a")
    assert _rows(tmp_path / "a", "topic_b") != _rows(tmp_path / "c", "topic_b")
    for row in _rows(tmp_path / "a", "tags"):  # valid BIO: I- only inside an entity
        assert len(row["tags"]) == len(row["tokens"]) == separation.LENGTH
        assert all(t != "I-ENT" or p != "O" for p, t in zip(["O", *row["tags"]], row["tags"]))
    tags = [t for r in _rows(tmp_path / "a", "tags") for t in r["tags"]]
    assert tags.count("B-ENT") > 0.1 * len(tags)


@pytest.mark.slow
def test_quick_run_fills_every_row_with_finite_numbers_that_depend_on_the_seed(tmp_path):
    out = tmp_path / "separation"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "separation.py"), "--quick", "--seeds", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    rows = [s.row for s in separation.systems() + separation.ablations()] + [separation.PRETRAINED,
                                                                             separation.LONGER]
    table = (out / "table.md").read_text()
    for row in rows:
        assert f"| {row} |" in table or f"| {row.removeprefix('SkillNet w/o ')} |" in table, row
        for seed in (0, 1):
            scores = runs[separation._key(separation.DEFAULT_CONFLICT, seed, row)]
            assert set(scores) == set(separation.TASKS) and all(math.isfinite(v) for v in scores.values())
    for c in separation.CONFLICTS:  # the sweep
        assert f"| {c} | " in table
        assert separation._key(c, 1, separation.SKILLNET) in runs
    differing = [row for row in rows if runs[separation._key(1.0, 0, row)] != runs[separation._key(1.0, 1, row)]]
    assert len(differing) >= len(rows) - 2, differing  # the seeds are used (a row may still tie by chance)
    from PIL import Image

    with Image.open(out / "separation.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    # the ablation's routes leave the skill out: the finetuned model's task table says so
    work = out / "work" / "c1.0" / "seed0"
    ablated = json.loads((work / "skillnet_w_o_token" / "joint" / "config.json").read_text())
    full = json.loads((work / "skillnet" / "joint" / "config.json").read_text())
    assert full["tasks"]["tags"] == ["token"] and ablated["tasks"]["tags"] == [] and ablated["always_generic"]
    assert ablated["tasks"]["topic_a"] == full["tasks"]["topic_a"] == ["sequence", "pattern_a"]
    no_generic = json.loads((work / "skillnet_w_o_generic" / "joint" / "config.json").read_text())
    assert no_generic["always_generic"] is False and full["always_generic"] is True
    # a second call finds every run in results.json and trains nothing
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "separation.py"), "--quick", "--seeds", "2",
                            "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and f"{len(runs)} already in" in again.stdout, again.stdout[-2000:]
