"""The explorer end to end as a process (``python -m explorer run``) on the real CPU engines: steps are committed
exactly once, progress is served by the status API, and a SIGKILLed coordinator resumes where it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from explorer import local_engine, sink
from kubeplane import paths
from tests.auth import job_headers
from tests.conftest import free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.vllm


def write_config(tmp_path: Path, engines: list[local_engine.LocalEngine], steps: int, port: int) -> Path:
    rows = [json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i)}) for i in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join([*rows, "{not json}"]) + "\n")
    held_out = [json.dumps({"question": f"What is {i} times 2?", "answer": str(2 * i)}) for i in range(2)]
    (tmp_path / "held-out.jsonl").write_text("\n".join(held_out) + "\n")
    cfg = {
        "job": "restart", "namespace": "local", "statusPort": port,
        "rollout": {"name": "rollout", "model": {"path": "tiny", "servedName": "tiny"},
                    "engines": [{"index": i, "url": e.base_url, "rankOffset": 1 + i, "worldSize": 1}
                                for i, e in enumerate(engines)]},
        "taskset": {"path": str(tmp_path / "train.jsonl")},
        "workflow": {"name": "math", "maxTokens": 8},
        "explore": {"batchSize": 3, "repeatTimes": 2, "totalSteps": steps, "evalInterval": 3, "evalOnStart": True,
                    "evalTasksets": [{"name": "held-out", "path": str(tmp_path / "held-out.jsonl"),
                                      "repeatTimes": 3}]},
        "scheduler": {"runnersPerEngine": 1, "taskTimeoutSeconds": 60},
        "sync": {"method": "gloo", "style": "trainer_driven", "port": free_port()},
        "experiences": {"path": str(tmp_path / "out"), "format": "jsonl"},
    }  # fmt: skip
    path = tmp_path / "explorer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_explorer(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "explorer", "run", "--config", str(config)],
                                cwd=paths.repo_root(), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def test_killed_coordinator_resumes_at_the_last_committed_step_without_duplicates(
    cpu_engines: list[local_engine.LocalEngine], tmp_path: Path, tiny_model_dir: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, cpu_engines, steps=6, port=port)
    # First run: a sync every 2 steps and no trainer, so it holds still after step 2 (however fast the engines are)
    # and is killed there; the second run is trainer-driven and goes to the end.
    body = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**body, "sync": {**body["sync"], "style": "fixed", "interval": 2}}))
    out = sink.ExperienceSink(tmp_path / "out")
    first = run_explorer(config, tmp_path / "first.log")
    try:
        report = wait_for(lambda: _report(port) if "step 2 done" in (_report(port) or {}).get("message", "") else None,
                          timeout=420, what=lambda: f"step 2 reported by the status API; last report "
                          f"{_report(port)}; explorer log tail:\n{_tail(tmp_path / 'first.log')}")  # fmt: skip
        assert report["phase"] == "Running" and report["totalSteps"] == 6
        assert report["experiences"] == 12 and report["failedTasks"] == 0 and report["experiencesPerSecond"] > 0
        assert report["missingTasks"] == 0  # no step's wait expired
        held_out = report["eval"]["held-out"]  # evalOnStart: before step 1, each task 3 times
        assert held_out["step"] == 0 and held_out["metrics"]["runs"] == 6 and held_out["metrics"]["tasks"] == 2
        assert 0 <= held_out["metrics"]["pass@1"] <= held_out["metrics"]["pass@3"] <= 1
        engines = report["engines"]
        assert [(e["index"], e["healthy"]) for e in engines] == [(0, True), (1, True)], engines
        first.kill()  # SIGKILL: no chance to clean up
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    config.write_text(yaml.safe_dump(body))
    done_before = out.committed_steps()
    assert done_before == {1, 2}
    files_before = {s: (tmp_path / "out" / f"step-{s:08d}.jsonl").read_bytes() for s in done_before}

    second = run_explorer(config, tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert f"{tmp_path / 'train.jsonl'}:6: not valid JSON" in log  # the bad row is named, the rest ran
    assert out.committed_steps() == {1, 2, 3, 4, 5, 6}
    assert all(entry["missingTasks"] == [] for entry in out.manifest()["steps"].values())
    evals = out.manifest()["eval"]["held-out"]  # on start (first run), then every 3 steps; not again on resume
    assert sorted(evals, key=int) == ["0", "3", "6"] and all(e["runs"] == 6 for e in evals.values()), evals
    for step, body in files_before.items():
        assert (tmp_path / "out" / f"step-{step:08d}.jsonl").read_bytes() == body  # never rewritten
    for step in range(1, 7):
        exps = out.read_step(step)
        assert sorted((e.task_id, e.run_id) for e in exps) == [(t, r) for t in range(3) for r in range(2)]
        assert all(e.batch_id == str(step) for e in exps)
    # The taskset cursor survived the kill: step s takes rows 3(s-1), 3(s-1)+1, 3(s-1)+2 (mod 5).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for step in range(1, 7):
        first_task = next(e for e in out.read_step(step) if e.task_id == 0)
        row = (3 * (step - 1)) % 5
        assert f"What is {row} plus {row}?" in tokenizer.decode(first_task.tokens[: first_task.prompt_length])


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _report(port: int) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/status", timeout=1, headers=job_headers())
        data: dict[str, Any] = response.raise_for_status().json()
        return data
    except (httpx.HTTPError, ValueError):
        time.sleep(0.2)
        return None
