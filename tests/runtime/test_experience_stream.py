"""The trainer's experience stream on real parts: the explorer on real Ray runner actors with zero-latency workflows (no
engine is called), the coordinator's sync API on loopback and the real ``TrainerClient`` over HTTP.

Every experience reaches the trainer exactly once across a trainer restart without an ack and a SIGKILLed
coordinator; stale policy versions are skipped; back-pressure holds the explorer at its limit and the status report
says so; a read that cannot be served says how far the explorer is; consumed retention deletes acknowledged steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from explorer import config, sink
from explorer import explorer as explorer_mod
from explorer.experience_wire import ExperienceBatch
from explorer.weight_sync.rendezvous import SyncCoordinator
from explorer.weight_sync.trainer import (
    ExperiencesExhaustedError,
    ExperienceTimeoutError,
    SyncRefusedError,
    TrainerClient,
)
from kubeplane import paths
from tests.auth import job_headers
from tests.conftest import free_port
from tests.runtime.sync_support import LoopThread
from tests.waiting import wait_for

WORKFLOWS = "tests.runtime.instant_workflows"
PER_STEP = 4  # batchSize 2 x repeatTimes 2
Id = tuple[int, int, int]  # (step, task, run)


def job_config(tmp_path: Path, steps: int, sync_port: int, **experiences: Any) -> dict[str, Any]:
    rows = [json.dumps({"question": f"q{i}", "answer": "1"}) for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    return {
        "job": "stream", "namespace": "local",
        "rollout": {"name": "rollout", "model": {"path": "tiny", "servedName": "tiny"},  # never dialled
                    "engines": [{"index": 0, "url": "http://127.0.0.1:9", "rankOffset": 1, "worldSize": 1}]},
        "taskset": {"path": str(tmp_path / "train.jsonl")},
        "workflow": {"name": "custom", "importPath": f"{WORKFLOWS}:InstantWorkflow"},
        "explore": {"batchSize": 2, "repeatTimes": 2, "totalSteps": steps},
        "scheduler": {"runnersPerEngine": 2, "maxRetryTimes": 0, "taskTimeoutSeconds": 30},
        "sync": {"method": "gloo", "style": "trainer_driven", "port": sync_port, "timeoutSeconds": 20},
        "experiences": {"path": str(tmp_path / "out"), "format": "parquet", "drainTimeoutSeconds": 120,
                        **experiences},
    }  # fmt: skip


def ids(batch: ExperienceBatch) -> list[Id]:
    return [(int(e.batch_id), e.task_id, e.run_id) for e in batch.experiences]


def every_id(steps: int) -> list[Id]:
    return [(s, t, r) for s in range(1, steps + 1) for t in range(2) for r in range(2)]


def report(port: int) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = httpx.get(f"http://127.0.0.1:{port}/status", timeout=2, headers=job_headers())
        data: dict[str, Any] = response.raise_for_status().json()
        return data
    return None


def held(port: int, reason: str) -> dict[str, Any] | None:
    got = report(port)
    return got if got and got.get("waitingFor") == reason else None


def consume_to_the_end(client: TrainerClient, size: int, **read: Any) -> list[Id]:
    """Read and acknowledge until the explorer is done and nothing remains."""
    seen: list[Id] = []
    while True:
        batch = client.experiences(size, timeout=180, **read)
        seen += ids(batch)
        client.ack(batch)
        if batch.finished:
            return seen


class Served:
    """``serve_and_explore`` on a loop of its own, as the coordinator runs it."""

    def __init__(self, explorer: explorer_mod.Explorer, status_port: int, **kwargs: Any):
        self.loop = LoopThread()

        async def start() -> asyncio.Task[str]:
            return asyncio.create_task(explorer_mod.serve_and_explore(explorer, "127.0.0.1", status_port, **kwargs))

        self.task = self.loop.run(start())

    def result(self, timeout: float) -> str:
        async def outcome() -> str:
            return await asyncio.shield(self.task)

        return self.loop.run(outcome(), timeout)

    def stop(self) -> None:
        """Cancel it if it still runs (a failed test), wait until it has shut down, close the loop."""
        self.loop.loop.call_soon_threadsafe(self.task.cancel)
        self.loop.run(asyncio.wait([self.task]), timeout=120)
        self.loop.close()


@contextlib.contextmanager
def serving(explorer: explorer_mod.Explorer, status_port: int, **kwargs: Any) -> Iterator[Served]:
    served = Served(explorer, status_port, **kwargs)
    try:
        yield served
    finally:
        served.stop()


def wait_or_show(observe: Any, log: Path, timeout: float, what: str) -> Any:
    """``wait_for``, failing with the tail of the coordinator's log."""
    try:
        return wait_for(observe, timeout=timeout, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}\ncoordinator log:\n{log.read_text()[-3000:]}") from None


def coordinated(body: dict[str, Any]) -> explorer_mod.Explorer:
    cfg = config.ExplorerConfig.model_validate(body)
    sync = SyncCoordinator(cfg, advertised_host="127.0.0.1", bind_host="127.0.0.1", api_port=cfg.sync.port)
    return explorer_mod.Explorer(cfg, sync=sync)


def test_every_experience_reaches_the_trainer_once_across_a_trainer_restart_and_a_killed_coordinator(
    tmp_path: Path,
) -> None:
    status_port, sync_port = free_port(), free_port()
    body = job_config(tmp_path, 6, sync_port, consumers=["learner"], maxUnconsumedSteps=2)
    (tmp_path / "explorer.yaml").write_text(yaml.safe_dump(body))
    argv = [sys.executable, "-m", "explorer", "run", "--config", str(tmp_path / "explorer.yaml"), "--status-port",
            str(status_port), "--sync-port", str(sync_port)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(paths.repo_root()),
                                                                     os.environ.get("PYTHONPATH")]))}  # fmt: skip
    log = tmp_path / "coordinator.log"
    address = f"127.0.0.1:{sync_port}"
    out = sink.ExperienceSink(tmp_path / "out")

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            return subprocess.Popen(argv, cwd=paths.repo_root(), env=env, stdout=handle, stderr=subprocess.STDOUT)

    hold = "consumer 'learner' to acknowledge experiences (2 unconsumed steps, limit 2)"
    first = start()
    try:
        wait_or_show(lambda: held(status_port, hold), log, 240, "the explorer held at 2 steps")
        assert out.committed_steps() == {1, 2}
        trainer = TrainerClient(address, consumer="learner")
        delivered = ids(b1 := trainer.experiences(3, timeout=60))
        trainer.ack(b1)
        unacknowledged = ids(trainer.experiences(3, timeout=60))
        trainer.close()  # the trainer goes away without acknowledging its second batch

        trainer = TrainerClient(address, consumer="learner")  # restarted: a new trainer id, the same consumer
        again = trainer.experiences(3, timeout=60)
        assert ids(again) == unacknowledged, "the unacknowledged batch was not delivered again"
        delivered += ids(again)
        trainer.ack(again)
        wait_or_show(lambda: out.committed_steps() == {1, 2, 3} and held(status_port, hold), log, 120,
                     "step 3 committed and the explorer held again")  # fmt: skip
        first.send_signal(signal.SIGKILL)  # no chance to clean up
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    cursors = json.loads((tmp_path / "out" / "consumers.json").read_text())
    assert cursors == {"consumers": {"learner": {"step": 2, "offset": 2}}}

    second = start()
    try:
        wait_or_show(lambda: _state(trainer), log, 240, "the restarted coordinator's experience API")
        delivered += consume_to_the_end(trainer, 3)
        assert second.wait(timeout=120) == 0, log.read_text()[-3000:]  # drained: all acknowledged, so it exits
    finally:
        if second.poll() is None:
            second.kill()
        trainer.close()
    assert sorted(delivered) == every_id(6) and len(delivered) == len(set(delivered)), delivered
    assert out.committed_steps() == set(range(1, 7))


def _state(client: TrainerClient) -> Any:
    with contextlib.suppress(httpx.HTTPError):
        return client.experience_state()
    return None


@pytest.mark.usefixtures("ray_cluster")
def test_back_pressure_holds_the_explorer_at_the_limit_and_reads_say_what_they_wait_for(tmp_path: Path) -> None:
    status_port, sync_port = free_port(), free_port()
    explorer = coordinated(job_config(tmp_path, 4, sync_port, consumers=["auditor", "trainer"], maxUnconsumedSteps=2))
    out = sink.ExperienceSink(tmp_path / "out")
    by = {name: f"consumer {name!r} to acknowledge experiences (2 unconsumed steps, limit 2)"
          for name in ("auditor", "trainer")}  # fmt: skip
    with (
        serving(explorer, status_port) as run,
        TrainerClient(f"127.0.0.1:{sync_port}", consumer="trainer") as trainer,
        TrainerClient(f"127.0.0.1:{sync_port}", consumer="auditor") as auditor,
    ):
        status = wait_for(lambda: held(status_port, by["auditor"]), timeout=180, what="the explorer held at 2 steps")
        assert out.committed_steps() == {1, 2} and status["step"] == 2 and status["phase"] == "Running"
        assert "back-pressure: waiting for consumer 'auditor'" in status["message"]
        auditor.ack(first := auditor.experiences(2 * PER_STEP, timeout=60))
        assert sorted(ids(first)) == every_id(2)
        # Still held, now by the trainer: the auditor has read everything there is and waits in vain.
        wait_for(lambda: held(status_port, by["trainer"]), timeout=30, what="the hold to pass to the trainer")
        assert trainer.experience_state().waiting_for == by["trainer"]
        with pytest.raises(ExperienceTimeoutError) as timed_out:
            auditor.experiences(4, timeout=1)
        assert str(timed_out.value) == (
            "timed out after 1 s waiting for 4 experiences for consumer 'auditor': 0 available; the explorer has "
            f"committed step 2 of 4 and is waiting for {by['trainer']}")  # fmt: skip
        # The trainer itself asks for more than the limit lets the explorer commit: refused at once, not timed out.
        with pytest.raises(SyncRefusedError, match=r"explorer holds at 2 unconsumed steps") as refused:
            trainer.experiences(3 * PER_STEP, timeout=600)
        assert refused.value.status == 409
        trainer.ack(step_1 := trainer.experiences(PER_STEP, timeout=60))  # step 1 consumed: room for one more
        assert sorted(ids(step_1)) == every_id(1)
        wait_for(lambda: out.committed_steps() == {1, 2, 3} and held(status_port, by["trainer"]), timeout=120,
                 what="step 3 committed and the explorer held again")  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each waits on the other's acks: both at once
            rest = {name: pool.submit(consume_to_the_end, client, 3)
                    for name, client in (("auditor", auditor), ("trainer", trainer))}  # fmt: skip
            seen = {"auditor": ids(first) + rest["auditor"].result(300),
                    "trainer": ids(step_1) + rest["trainer"].result(300)}  # fmt: skip
        for name, delivered in seen.items():
            assert sorted(delivered) == every_id(4) and len(set(delivered)) == len(delivered), name
        assert run.result(timeout=120) == "explored 4 steps; 16 experiences written this run"
    final = explorer.current_report()
    assert final.phase == "Succeeded" and final.waiting_for is None


@pytest.mark.usefixtures("ray_cluster")
def test_stale_policy_versions_are_skipped_and_the_end_is_reported(tmp_path: Path) -> None:
    """Without a sync coordinator (an in-process trainer's sync hook sets the versions) the stream is served alone."""
    status_port, stream_port = free_port(), free_port()
    cfg = config.ExplorerConfig.model_validate(job_config(tmp_path, 4, free_port(), consumers=["trainer"]))

    async def push(step: int) -> int:  # the seed's in-process sync: the policy after step s is version s
        return step

    explorer = explorer_mod.Explorer(cfg, sync_hook=push)
    with (
        serving(explorer, status_port, experience_port=stream_port) as run,
        TrainerClient(f"127.0.0.1:{stream_port}") as trainer,
    ):
        fresh = trainer.experiences(PER_STEP, timeout=180, min_policy_version=2)
        assert sorted(ids(fresh)) == every_id(3)[2 * PER_STEP :] and fresh.skipped == 2 * PER_STEP
        assert fresh.table["policy_version"].to_pylist() == [2] * PER_STEP
        assert fresh.table["mask"].to_pylist() == [[False, False, True, True]] * PER_STEP
        trainer.ack(fresh)
        last = trainer.experiences(100, timeout=180, min_policy_version=2)  # fewer: the explorer is done
        assert last.finished and sorted(ids(last)) == every_id(4)[3 * PER_STEP :] and last.skipped == 0
        trainer.ack(last)
        with pytest.raises(ExperiencesExhaustedError, match="finished all 4 steps"):
            trainer.experiences(1, timeout=60)
        assert run.result(timeout=120) == "explored 4 steps; 16 experiences written this run"
    versions = {step: {e.policy_version for e in sink.ExperienceSink(tmp_path / "out").read_step(step)}
                for step in range(1, 5)}  # fmt: skip
    assert versions == {1: {None}, 2: {1}, 3: {2}, 4: {3}}


@pytest.mark.usefixtures("ray_cluster")
def test_consumed_retention_deletes_step_files_every_consumer_acknowledged(tmp_path: Path) -> None:
    status_port, sync_port = free_port(), free_port()
    body = job_config(tmp_path, 3, sync_port, consumers=["a", "b"], retention="consumed")
    explorer = coordinated(body)
    directory = tmp_path / "out"
    out = sink.ExperienceSink(directory)

    def files() -> list[str]:
        return sorted(p.name for p in directory.glob("step-*"))

    with (
        serving(explorer, status_port) as run,
        TrainerClient(f"127.0.0.1:{sync_port}", consumer="a") as a,
        TrainerClient(f"127.0.0.1:{sync_port}", consumer="b") as b,
    ):
        assert (a.ack(a.experiences(2 * PER_STEP, timeout=180))).step == 3
        wait_for(lambda: out.committed_steps() == {1, 2, 3}, timeout=120, what="every step committed")
        assert files() == [f"step-0000000{s}.parquet" for s in (1, 2, 3)]  # b has read nothing: nothing goes
        b.ack(b.experiences(PER_STEP + 2, timeout=60))
        assert files() == ["step-00000002.parquet", "step-00000003.parquet"]
        assert out.manifest()["steps"]["1"]["removed"] is True and out.committed_steps() == {1, 2, 3}
        consume_to_the_end(a, PER_STEP)
        consume_to_the_end(b, PER_STEP)
        assert files() == []
        assert run.result(timeout=120) == "explored 3 steps; 12 experiences written this run"
    # The manifest still lists every step: a restarted explorer resumes after them and writes nothing again.
    resumed = explorer_mod.Explorer(config.ExplorerConfig.model_validate(body))
    assert asyncio.run(resumed.explore()) == "explored 3 steps; 0 experiences written this run"
    assert all(entry["removed"] for entry in out.manifest()["steps"].values())
