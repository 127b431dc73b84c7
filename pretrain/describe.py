"""Print a model config's skills, task-to-skill table, and total and per-task activated parameters.

    python -m pretrain.describe --config skillnet-nlu-base            # a shipped config, by name
    python -m pretrain.describe --config my.yaml router=moe           # a file, with key=value overrides

The model is built on the meta device, so paper-sized configs cost no memory.
"""

from __future__ import annotations

import argparse
import sys

import torch
import yaml

from skillnet import SkillNetConfig, SkillNetForConditionalGeneration, SkillNetModel, load_config
from skillnet.params import count_parameters


def build_meta_model(config: SkillNetConfig) -> torch.nn.Module:
    model_class = SkillNetForConditionalGeneration if config.num_decoder_layers else SkillNetModel
    with torch.device("meta"):
        return model_class(config)


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: override {pair!r} is not key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _m(n: int) -> str:
    return f"{n:,} ({n / 1e6:.1f}M)"


def describe(config: SkillNetConfig) -> str:
    model = build_meta_model(config)
    counts = count_parameters(model)
    skilled = config.skill_layer_indices(config.num_hidden_layers)
    lines = [
        f"router: {config.router}   layers: {config.num_hidden_layers}"
        + (f" + {config.num_decoder_layers} decoder" if config.num_decoder_layers else "")
        + f"   hidden: {config.hidden_size}   ffn: {config.intermediate_size}   heads: {config.num_attention_heads}",
        f"skill layers ({config.skill_layers}): {skilled}   skill attention: {config.skill_attention}",
        f"modalities: {', '.join(config.modalities)}",
        f"total parameters: {_m(counts.total)}",
    ]
    if counts.per_skill:
        width = max(len(n) for n in counts.per_skill)
        lines += ["", "skills (parameters over all skill layers):"]
        lines += [f"  {s['name']:<{width}}  {_m(counts.per_skill[s['name']]):>22}  {s['description']}"
                  for s in config.skills]
    if counts.per_task:
        registry = config.registry if config.skills else None
        width = max(len(t) for t in counts.per_task)
        lines += ["", "tasks (skills -> parameters activated per token, without task heads):"]
        for task, n in counts.per_task.items():
            skills = ", ".join(registry.names[i] for i in registry.task_skills(task)) if registry else config.router
            lines.append(f"  {task:<{width}}  {_m(n):>22}  {skills}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.describe", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file, or the name of a shipped config (e.g. tiny)")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied over the file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, **parse_overrides(args.overrides))
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
