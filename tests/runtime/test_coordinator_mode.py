"""``python -m explorer coordinator`` as the operator runs it in the coordinator pod, on loopback: it starts a Ray
head that a CPU worker joins with the worker pod's own command, serves the status and sync APIs, and explores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from explorer import credentials, local_engine, sink
from explorer.weight_sync.trainer import TrainerClient
from explorer_operator import builders
from explorer_operator.builders import JobRef
from kubeplane import paths
from tests.conftest import free_port
from tests.runtime.sync_support import original_state
from tests.runtime.test_explorer import _report, write_config
from tests.waiting import wait_for

pytestmark = pytest.mark.vllm
HEAD_IP = "127.0.0.2"


def worker_command(ray_port: int) -> list[str]:
    """The CPU worker pod's command from the builder, pointed at loopback instead of the coordinator Service."""
    from explorer_operator import models

    spec = models.ExplorerJobSpec.model_validate({"model": {"path": "/m"}, "taskset": {"path": "/t.jsonl"},
                                                  "coordinator": {"cpuWorkers": 1}})  # fmt: skip
    command: list[str] = builders.build_worker_pod(JobRef("j", "ns", "u"), spec, 0)["spec"]["containers"][0]["command"]
    assert command[:3] == ["ray", "start", "--block"] and command[3].endswith(f":{builders.RAY_PORT}")
    ray = str(Path(sys.executable).with_name("ray"))
    # 127.0.0.2/3 rather than 127.0.0.1: Ray rewrites "127.0.0.1" to the machine's outward address.
    return [ray, *command[1:3], f"--address={HEAD_IP}:{ray_port}", "--node-ip-address=127.0.0.3", "--num-cpus=1"]


def pod_env() -> dict[str, str]:
    """The worker pod's Ray settings from the builder, with the token path pointed at this run's job token."""
    from explorer_operator import models

    spec = models.ExplorerJobSpec.model_validate({"model": {"path": "/m"}, "taskset": {"path": "/t.jsonl"},
                                                  "coordinator": {"cpuWorkers": 1}})  # fmt: skip
    container = builders.build_worker_pod(JobRef("j", "ns", "u"), spec, 0)["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("RAY_")}
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": f"{credentials.MOUNT_DIR}/job-token"}
    return env | {"RAY_AUTH_TOKEN_PATH": str(credentials.directory() / credentials.JOB_TOKEN)}


def check_prometheus_metrics(base: str, step_experiences: int) -> None:
    """The coordinator's /metrics after step 1 (3 tasks x 2 runs) and the eval on start (2 tasks x 3 runs)."""
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(f"{base}/metrics").status_code == 401  # as /status: the job token
    response = httpx.get(f"{base}/metrics", headers=credentials.job_headers())
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}  # fmt: skip

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("explorer_tasks_total", kind="rollout", outcome="ok") == 3
    assert value("explorer_tasks_total", kind="eval", outcome="ok") == 2
    assert value("explorer_experiences_total", kind="rollout") == step_experiences == 6
    assert value("explorer_experiences_total", kind="eval") == 6
    assert value("explorer_reward_count", kind="rollout", eval_set="") == 6
    assert value("explorer_response_length_tokens_count", kind="eval") == 6
    assert value("explorer_step") == 1 and value("explorer_eval", eval_set="held-out", metric="runs") == 6
    per_engine = {dict(labels)["engine"]: v for (name, labels), v in samples.items()
                  if name == "explorer_engine_requests_total"}  # fmt: skip
    assert set(per_engine) == {"0", "1"} and all(v > 0 for v in per_engine.values()), per_engine
    assert sum(per_engine.values()) >= 5  # every task asked at least once
    latency_counts = sum(v for (name, _), v in samples.items() if name == "explorer_engine_request_seconds_count")
    assert latency_counts == sum(per_engine.values())
    assert value("explorer_task_attempt_seconds_count", kind="rollout") >= 3


def test_coordinator_starts_a_ray_head_that_a_cpu_worker_joins_and_explores(
    cpu_engines: list[local_engine.LocalEngine], tmp_path: Path, tiny_model_dir: Path
) -> None:
    status_port, ray_port, sync_port = free_port(), free_port(), free_port()
    config = write_config(tmp_path, cpu_engines, steps=2, port=status_port)
    body = yaml.safe_load(config.read_text())
    body["sync"] = {"method": "gloo", "style": "fixed", "interval": 1, "timeoutSeconds": 600}  # waits after step 1
    config.write_text(yaml.safe_dump(body))
    env = {**os.environ, "EXPLORER_SYNC_ADDRESS": f"127.0.0.1:{sync_port}"}
    argv = [sys.executable, "-m", "explorer", "coordinator", "--config", str(config), "--status-host", "127.0.0.1",
            "--bind-host", "127.0.0.1", "--sync-port", str(sync_port), "--ray-head-port", str(ray_port),
            "--node-ip", HEAD_IP]  # fmt: skip
    log = tmp_path / "coordinator.log"
    with log.open("wb") as out:
        coordinator = subprocess.Popen(argv, cwd=paths.repo_root(), env=env, stdout=out, stderr=subprocess.STDOUT)
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: _report(status_port), timeout=180,
                 what=lambda: f"the coordinator's status API; its log:\n{log.read_text()[-3000:]}")  # fmt: skip
        base = f"http://127.0.0.1:{status_port}"
        assert httpx.get(f"{base}/healthz").status_code == 200  # probes need no token
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert httpx.get(f"{base}/status", headers=headers).status_code == 401

        # A worker without the job token (a pod of the job running someone's code, say) is refused by the head.
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-job-token")
        intruder_env = {**os.environ, **pod_env(), "RAY_AUTH_TOKEN_PATH": str(wrong)}
        intruder = subprocess.run(worker_command(ray_port), env=intruder_env, capture_output=True, text=True,
                                  timeout=180, check=False)  # fmt: skip
        assert intruder.returncode != 0, intruder.stdout[-2000:]
        assert (_report(status_port) or {}).get("rayNodes") == 1

        worker_env = {**os.environ, **pod_env()}  # what the worker pod's env sets, its token path made local
        worker_log = tmp_path / "worker.log"
        with worker_log.open("wb") as worker_out:
            worker = subprocess.Popen(worker_command(ray_port), env=worker_env, stdout=worker_out,
                                      stderr=subprocess.STDOUT)  # fmt: skip

        def two_nodes() -> dict[str, Any] | None:
            report = _report(status_port)
            return report if report and report.get("rayNodes") == 2 else None

        def logs() -> str:
            return f"coordinator log:\n{log.read_text()[-3000:]}\nworker log:\n{worker_log.read_text()[-3000:]}"

        joined = "the CPU worker joined the coordinator's Ray head"
        report = wait_for(two_nodes, timeout=180, what=lambda: f"{joined}; {logs()}")
        assert report["phase"] == "Running"
        wait_for(lambda: "waiting for the trainer" in (_report(status_port) or {}).get("message", ""), timeout=180,
                 what="step 1 done and the explorer waiting for a push")  # fmt: skip
        assert sink.ExperienceSink(tmp_path / "out").committed_steps() == {1}
        check_prometheus_metrics(base, step_experiences=len(sink.ExperienceSink(tmp_path / "out").read_step(1)))
        # A trainer reaches the coordinator's sync API at the advertised address and releases step 2.
        with TrainerClient(f"127.0.0.1:{sync_port}") as trainer:
            assert trainer.push(original_state(tiny_model_dir)).engines_in_sync == 2
        assert coordinator.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for proc in (coordinator, worker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    assert sink.ExperienceSink(tmp_path / "out").committed_steps() == {1, 2}
