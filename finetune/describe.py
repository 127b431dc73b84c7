"""What a finetuning config would train: per task, its skills, the parameters one input token activates
(trunk with the task's skills, its head and prompts) and the parameters that train.

    python -m finetune.describe --config finetune/configs/sentiment_analysis.yaml --init <model folder> [key=value ...]

Compare configs to compare choices: reusing skills, adding a skill (`new_skills`) with `freeze_old`, or
prompt tuning (`tasks[].prompts` with `freeze_old`).
"""

from __future__ import annotations

import argparse
import sys

from training.metrics import quiet_third_party

from .config import load_finetune_config
from .train import build_model


def describe(config) -> list[dict]:
    """One row per task: name, skills, activated and trainable parameter counts."""
    from skillnet.params import activated_parameters

    model, trainable = build_model(config)
    rows = []
    for task in config.tasks:
        modality = model.head(task.name).modality
        skills = model.registry.skill_names(task.name)
        own = [p for name, p in model.named_parameters()
               if name.startswith((f"heads.{task.name}.", f"prompts.{task.name}."))]
        shared = {n for n in trainable if not n.startswith(("heads.", "prompts."))}
        rows.append({
            "task": task.name, "skills": skills,
            "activated": activated_parameters(model.skillnet, set(skills), modality) + sum(p.numel() for p in own),
            "trainable": sum(p.numel() for n, p in model.named_parameters() if n in shared)
                         + sum(p.numel() for p in own),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.describe", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--init", help="the model folder the config would start from")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    quiet_third_party()
    try:
        config = load_finetune_config(args.config, args.overrides)
        config.init = args.init or config.init
        rows = describe(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'task':32s} {'activated':>12s} {'trainable':>12s}  skills")
    for r in rows:
        print(f"{r['task']:32s} {r['activated']:12,d} {r['trainable']:12,d}  {', '.join(r['skills'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
