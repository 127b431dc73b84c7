"""The README's two commands are the ones that work: CI runs the test command verbatim."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    main_job, tests = _readme_commands()
    assert tests.endswith("-m pytest") and main_job == "bash scripts/setup.sh && bash slurm/pretrain_multimodal.sh"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests


@pytest.mark.slow
def test_readme_main_job_runs(tmp_path):
    """The main job as the README runs it (setup already done): local ranks, tiny config, sample corpus."""
    main_job, _ = _readme_commands()
    job = main_job.split("&& ", 1)[1]
    env = {**os.environ, "PYTHON": sys.executable, "SAMPLE": str(tmp_path / "sample"), "RUN_DIR": str(tmp_path / "run"),
           "MASTER_PORT": str(free_port()), "ARGS": "train.steps=6 checkpoint.every=3"}
    out = subprocess.run(job, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "trained to step 6" in out.stdout
    assert f"exported:    {tmp_path / 'run' / 'export'}" in out.stdout
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()
    log = out.stdout + out.stderr  # third-party noise is filtered where it is raised
    for noise in ("Setting accelerator to CPU", "all_gather_into_tensor", "reduce_scatter_tensor", "OMP_NUM_THREADS"):
        assert noise not in log, log[-3000:]
    assert list((tmp_path / "run" / "tensorboard").iterdir())

    # the export serves transformers' pipelines as it is: its default task's skills, its own tokenizer
    from transformers import pipeline

    export = str(tmp_path / "run" / "export")
    assert len(pipeline("fill-mask", model=export, top_k=2)("a [MASK] of text")) == 2
    assert torch.tensor(pipeline("feature-extraction", model=export)("a line of text")).shape[-1] == 32

    # the quick start's next step: finetune the export (the sample corpus is under SAMPLE here)
    finetune = [line for line in (ROOT / "README.md").read_text().splitlines() if "-m finetune --config" in line][0]
    command = finetune.split("`")[1].replace("runs/tiny/export", str(tmp_path / "run" / "export"))
    images = tmp_path / "sample" / "image"
    command += (f" 'tasks.0.data.train={images}/image-{{000000..000004}}.tar'"
                f" tasks.0.data.validation={images}/image-000005.tar"
                f" train.steps=4 output_dir={tmp_path / 'finetuned'}")
    out = subprocess.run(command.replace(".venv/bin/python", sys.executable, 1), shell=True, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "text_to_image: recall@1" in out.stdout and (tmp_path / "finetuned" / "model.safetensors").exists()


def test_readme_model_example_runs():
    """The README's model example, as a user would paste it: each call returns a loss or outputs."""
    example = (ROOT / "README.md").read_text().split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["out"].loss.ndim == 0 and torch.isfinite(scope["out"].loss)
    assert scope["img"] is not None and scope["mix"] is not None
