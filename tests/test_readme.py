"""The README's two commands are the ones that work: CI runs the test command verbatim."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    main_job, tests = _readme_commands()
    assert tests.endswith("-m pytest") and main_job.startswith("bash scripts/setup.sh")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests


def test_readme_main_job_runs():
    main_job, _ = _readme_commands()
    job = main_job.split("&& ", 1)[1].replace(".venv/bin/python", sys.executable)
    out = subprocess.run(job, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "total parameters" in out.stdout and "image, generic" in out.stdout
