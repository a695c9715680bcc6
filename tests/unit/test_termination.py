"""The coordinator's final report as a termination message: within the kubelet's 4 KiB, read back by the operator,
and used for the job's final status when the status API is gone with the process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from explorer import status_api, termination
from explorer_operator import builders, models, planner
from explorer_operator.world import final_report
from tests.unit.test_operator_pure import JOB, NOW, spec, world


def final(step: int, version: int | None) -> status_api.CoordinatorReport:
    return status_api.CoordinatorReport(phase="Succeeded", step=step, total_steps=4, policy_version=version,
                                        engines_in_sync=3, experiences=32)  # fmt: skip


def test_a_report_too_long_for_the_kubelet_loses_the_engine_list_then_message_bytes_never_the_counts(
    tmp_path: Path,
) -> None:
    engines = [status_api.EngineState(index=i, url=f"http://engine-{i}.example:8000", healthy=True) for i in range(99)]
    report = final(4, 2).model_copy(update={"engines": engines, "message": 'é"\\' * 3000})
    text = termination.encode(report)
    assert len(text.encode()) <= termination.LIMIT_BYTES
    back = termination.read(text)
    assert back is not None and (back.step, back.policy_version, back.experiences) == (4, 2, 32)
    assert back.engines == [] and back.message and report.message.startswith(back.message)
    small = final(4, 2)
    assert termination.read(termination.encode(small)) == small  # fits: kept whole
    assert termination.write(small, tmp_path / "termination-log")
    assert termination.read((tmp_path / "termination-log").read_text()) == small


def test_a_log_tail_or_nothing_is_no_report() -> None:
    assert termination.read(None) is None and termination.read("") is None
    assert termination.read("Traceback (most recent call last):\n  ...") is None
    assert termination.read('{"phase": "Exploded"}') is None


def test_coordinator_container_writes_there_and_keeps_its_log_tail_on_a_crash() -> None:
    container = builders.build_coordinator_pod(JOB, spec())["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[termination.PATH_ENV] == container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_a_coordinator_that_exited_gets_its_last_step_and_version_into_the_job_status() -> None:
    s = spec(explore={"totalSteps": 4})
    observed = world(s)
    coordinator = f"{JOB.name}-coordinator"
    pod = dict(observed.pods[coordinator])
    pod["status"] = {"phase": "Succeeded", "containerStatuses": [
        {"name": "coordinator", "state": {"terminated": {"exitCode": 0, "message": termination.encode(final(4, 2))}}}
    ]}  # fmt: skip
    report = final_report(pod["status"])
    assert report is not None
    ended = dataclasses.replace(observed, pods={**observed.pods, coordinator: pod}, report=report)
    # The last poll saw step 1 and no version; the termination message has the truth.
    before = models.ExplorerJobStatus(phase="Running", step=1)
    status = models.ExplorerJobStatus.model_validate(planner.plan(JOB, 1, s, before, ended, NOW).status)
    assert (status.phase, status.step, status.policy_version) == ("Succeeded", 4, 2)
    synced = {c.type: (c.status, c.reason) for c in status.conditions}["Synced"]
    assert synced == ("True", "InSync") and status.engines.in_sync == 3

    # Later passes: the engines are gone and nobody is left to report; the job's last word on sync stays.
    gone = dataclasses.replace(observed, pods={coordinator: pod}, report=None)
    later = models.ExplorerJobStatus.model_validate(planner.plan(JOB, 1, s, status, gone, NOW).status)
    assert {c.type: (c.status, c.reason) for c in later.conditions}["Synced"] == ("True", "InSync")
    assert (later.phase, later.step, later.policy_version, later.engines.in_sync) == ("Succeeded", 4, 2, 3)


def test_a_crashed_pods_log_tail_and_a_failed_coordinators_message_name_the_error() -> None:
    def ended(message: str) -> dict[str, object]:
        terminated = {"reason": "Error", "exitCode": 1, "message": message}
        return {
            "status": {
                "phase": "Failed",
                "containerStatuses": [{"name": "engine", "state": {"terminated": terminated}}],
            }
        }

    log_tail = "INFO loading\n" * 50 + "Traceback (most recent call last):\n  File x\nValueError: no model at /models/m"
    why = planner.pod_failure(ended(log_tail))
    assert why.startswith("Error (exit 1): ") and why.endswith("ValueError: no model at /models/m")
    assert "INFO loading | INFO loading | INFO loading" not in why  # the tail, not the whole log
    failed = status_api.CoordinatorReport(phase="Failed", step=3, message="RuntimeError('taskset /data/t.jsonl gone')")
    assert planner.pod_failure(ended(termination.encode(failed))).endswith("RuntimeError('taskset /data/t.jsonl gone')")
    assert planner.pod_failure(ended("")) == "Error (exit 1)"
