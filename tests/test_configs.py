"""Every shipped config loads and builds; `describe` prints counts that follow from the config."""

import re
from pathlib import Path

import pytest

from pretrain.describe import build_meta_model, main
from skillnet import load_config
from skillnet.configuration import CONFIG_DIR

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_named_configs_are_shipped():
    assert {"tiny", "skillnet-nlu-base", "skillnet-nlg-base", "multimodal-base"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_builds(name):
    config = load_config(name)
    model = build_meta_model(config)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_nlu_base_is_bert_base_sized():
    c = load_config("skillnet-nlu-base")
    assert ((c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.vocab_size)
            == (12, 768, 3072, 12, 21128))
    assert len(c.skills) == 7


def _counts(out: str) -> tuple[int, dict[str, int], dict[str, int]]:
    """(total, per skill, per task) as `describe` printed them."""
    total = int(re.search(r"total parameters: ([\d,]+)", out).group(1).replace(",", ""))
    sections = {}
    for title in ("skills", "tasks"):
        body = out.split(f"\n{title} (")[1].split("\n\n")[0] if f"\n{title} (" in out else ""
        sections[title] = {n: int(v.replace(",", ""))
                           for n, v in re.findall(r"^  (\S+)\s+([\d,]+) \(", body, flags=re.M)}
    return total, sections["skills"], sections["tasks"]


def test_describe_counts_follow_from_the_config(capsys):
    """BERT-base arithmetic, as in the paper: one skill over 12 layers is about 57M."""
    assert main(["--config", "skillnet-nlu-base"]) == 0
    total, per_skill, per_task = _counts(capsys.readouterr().out)
    c = load_config("skillnet-nlu-base")
    h, f, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    embeddings = (v + c.max_position_embeddings + c.type_vocab_size) * h + len(c.modalities) * h + 2 * h
    attention = 4 * (h * h + h) + 2 * h  # q, k, v, o and the attention LayerNorm
    skill = 2 * h * f + f + h  # fc1 and fc2 of one skill in one layer
    shared = embeddings + layers * (attention + 2 * h) + (h * h + h)  # + FFN LayerNorm per layer, + pooler
    assert per_skill == {s["name"]: layers * skill for s in c.skills}
    assert per_skill["generic"] == 56_669_184  # "about 57M" (SkillNet-NLU, section 4)
    assert total == shared + len(c.skills) * layers * skill
    for task, skills in c.tasks.items():
        assert per_task[task] == shared + (len(set(skills) | {"generic"})) * layers * skill, task
    assert per_task["reading_comprehension"] == shared + 4 * layers * skill  # the paper's 272M
    assert round(per_task["reading_comprehension"] / 1e6) == 272


def test_describe_baselines_count_the_experts_a_token_uses(capsys):
    assert main(["--config", "skillnet-nlu-base", "router=moe", "num_experts=7", "moe_top_k=2"]) == 0
    total, per_skill, per_task = _counts(capsys.readouterr().out)
    c = load_config("skillnet-nlu-base")
    skill = 2 * c.hidden_size * c.intermediate_size + c.intermediate_size + c.hidden_size
    assert per_skill == {}
    assert total - per_task["masked_lm"] == c.num_hidden_layers * 5 * skill  # 7 experts held, 2 used
    assert round(per_task["masked_lm"] / 1e6) == 159  # the paper's MoE baseline: 159M activated


def test_describe_refuses_bad_input(capsys):
    assert main(["--config", "skillnet-nlu-base", "router=gating"]) == 2
    assert "router must be one of" in capsys.readouterr().err
    assert main(["--config", "no-such-config"]) == 2
    assert "shipped config" in capsys.readouterr().err


PRETRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "pretrain" / "configs").glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_shipped_pretrain_config_loads(path):
    from pretrain.config import load_pretrain_config

    config = load_pretrain_config(path)
    model = config.model_config()
    assert {t.name for t in config.data.tasks} <= set(model.tasks)
    assert Path(config.distributed.ds_config).name in {p.name for p in DS_CONFIGS}


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
def test_shipped_deepspeed_config_parses(path):
    import json

    from deepspeed.runtime.config import DeepSpeedConfig

    config = DeepSpeedConfig(json.loads(path.read_text()))
    assert config.zero_optimization_stage in (2, 3)


def test_the_packaged_deepspeed_configs_are_the_top_level_files(tmp_path):
    """`ds_configs/*.json` is the one copy: a built wheel ships exactly those files as the defaults that
    `distributed.ds_config: zero3` resolves to from any working directory."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from training.config import SHIPPED_DS_CONFIGS

    assert SHIPPED_DS_CONFIGS.resolve() == (ROOT / "ds_configs").resolve()
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "data", "runs", "build", "*.egg-info", "__pycache__", "tests", "benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True)
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))) as wheel:
        packaged = {Path(n).name: wheel.read(n) for n in wheel.namelist() if n.startswith("training/ds_configs/")}
    assert packaged == {p.name: p.read_bytes() for p in DS_CONFIGS} and packaged


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_describe_reads_a_pretraining_config(path, capsys):
    assert main(["--config", str(path)]) == 0
    total, per_skill, _ = _counts(capsys.readouterr().out)
    from pretrain.config import load_pretrain_config

    model = build_meta_model(load_pretrain_config(path).model_config())
    assert total == sum(p.numel() for p in model.parameters()) and "generic" in per_skill


def test_data_root_reads_relative_data_paths_from_one_folder_in_both_applications(tmp_path):
    """`data_root=<folder>` moves a whole corpus at once, in finetuning as in pretraining; absolute paths
    stay, and the dumped config reloads to the same paths."""
    from finetune.config import dump, load_finetune_config
    from pretrain.config import load_pretrain_config

    config = load_finetune_config("nlu_multitask", [f"data_root={tmp_path}", "tasks.1.data.train=/abs/nli.jsonl"])
    assert config.tasks[0].data.train == str(tmp_path / "sentiment_analysis" / "train.jsonl")
    assert config.tasks[0].data.validation == str(tmp_path / "sentiment_analysis" / "dev.jsonl")
    assert config.tasks[1].data.train == "/abs/nli.jsonl"
    dump(config, tmp_path / "resolved.yaml")
    assert load_finetune_config(tmp_path / "resolved.yaml").tasks[0].data.train == config.tasks[0].data.train
    assert load_finetune_config("nlu_multitask").tasks[0].data.train == "data/sentiment_analysis/train.jsonl"
    pretrain = load_pretrain_config("tiny", [f"data_root={tmp_path}"])
    assert pretrain.tokenizer == str(tmp_path / "tokenizer")
    assert pretrain.data.tasks[0].sources[0].shards.startswith(str(tmp_path))
