"""`benchmarks/gpu_step.py`: one line without a GPU; its code paths (the trainer's step on both engines, the
plain loop, the FLOP count, the table) run on the CPU with the tiny config."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, rank_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_step.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and "sees none" in done.stdout


@pytest.mark.slow
def test_its_steps_run_on_the_cpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--config", "tiny", "--rounds", "1"],
                          capture_output=True, text=True, timeout=600, env=rank_env(MASTER_PORT=str(free_port())),
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms / step" not in line]
    steps = {(row.split(" | ")[0][2:], row.split(" | ")[1]) for row in rows}
    for objective in ("MLM", "image pairs", "video pairs"):
        for step in ("plain PyTorch", "trainer, zero2", "trainer, zero3"):
            assert any(o.startswith(objective) and s == step for o, s in steps), (objective, step, done.stdout)
    assert all(float(row.split(" | ")[3]) > 0 for row in rows)  # TFLOP/s from counted FLOPs
    assert "engine step / plain step" in done.stdout
    assert "serving masked_lm" in done.stdout and "extracted for the task" in done.stdout
