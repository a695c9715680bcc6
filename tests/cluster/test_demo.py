"""The README's main command, end to end: plane + CRD + operator + examples/ until every job runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kubeplane import paths

pytestmark = pytest.mark.cluster


def test_demo_runs_every_example_job_on_fake_gpu_nodes_and_tears_down() -> None:
    out = subprocess.run([sys.executable, "-m", "explorer_operator.demo", "--exit-when-running"], cwd=paths.repo_root(),
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "job(s) Running" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()]
    jobs = [r for r in rows if len(r) > 2 and r[1] == "Running" and r[0] == "gsm8k"]
    assert jobs and jobs[0][2] == jobs[0][3] == "2"  # READY == DESIRED engines
    engines = [r for r in rows if r and r[0].startswith("gsm8k-engine-")]
    assert len(engines) == 2 and all(r[2] == "Running" and r[6].startswith("kwok-gpu-") for r in engines)
