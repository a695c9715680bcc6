"""The coordinator's status API: what the explorer reports about its progress, served over HTTP.

The operator polls ``GET /status`` on the coordinator pod and mirrors it into the ExplorerJob's status; the wire
format is ``CoordinatorReport``, shared by both sides. ``GET /healthz`` answers the pod's probes unauthenticated;
``/status`` needs the job token (the operator reads it from the job's Secret) or the trainer token, and so does
``GET /metrics``, the coordinator's Prometheus metrics (``explorer.telemetry``), when the server has them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

from aiohttp import web
from pydantic import ConfigDict, Field

from explorer import credentials, http_auth
from explorer.config import WireModel

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ReportPhase = Literal["Starting", "Running", "Succeeded", "Failed"]


class ReportModel(WireModel):
    """A part of the report: fields it does not know are ignored, so an operator older than its coordinator still
    reads the report (a config, by contrast, refuses them)."""

    model_config = ConfigDict(extra="ignore")  # merged with WireModel's (camelCase aliases)


class EngineState(ReportModel):
    """One rollout engine as the coordinator last saw it."""

    index: int
    url: str
    healthy: bool
    policy_version: str | None = Field(default=None, description="The weight version the engine reports serving.")
    in_rotation: bool | None = Field(
        default=None, description="Whether runners dispatch to it (only engines at the job's policy version do)."
    )


class EvalResult(ReportModel):
    """The latest evaluation of one eval set, figures from explorer/eval_metrics.py."""

    step: int = Field(ge=0, description="The explore step after which it ran (0: before the first, evalOnStart).")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="mean@n, best@n, pass@1, pass@n (n: the set's repeatTimes), tasks, runs, missingTasks.",
    )


class CoordinatorReport(ReportModel):
    """The explorer's own account of its progress and of the weight-sync group."""

    phase: ReportPhase = "Starting"
    step: int = Field(default=0, ge=0)
    total_steps: int = Field(default=0, ge=0)
    policy_version: int | None = Field(default=None, description="Version every engine in sync now serves.")
    engines_in_sync: int | None = Field(default=None, ge=0, description="Engines at policy_version; None: unknown.")
    last_sync_time: str | None = None
    last_sync_duration_seconds: float | None = None
    last_sync_bytes: int | None = None
    engines: list[EngineState] = Field(default_factory=list, description="Health and version of each engine.")
    ray_nodes: int | None = Field(default=None, ge=0, description="Alive Ray nodes: the coordinator + CPU workers.")
    experiences: int = Field(default=0, ge=0, description="Experiences committed by this coordinator run.")
    failed_tasks: int = Field(default=0, ge=0, description="Tasks that failed after every retry, this run.")
    missing_tasks: int = Field(
        default=0, ge=0, description="Tasks left out of committed steps because the step's wait expired, this run."
    )
    carried_tasks: int = Field(
        default=0, ge=0, description="Tasks of committed steps still running (explore.overRollout), for a later step."
    )
    experiences_per_second: float | None = Field(default=None, description="Throughput of the last step.")
    waiting_for: str | None = Field(
        default=None, description="What the explorer waits for before it goes on (back-pressure, the final drain)."
    )
    trainer_overdue: bool = Field(
        default=False, description="Waiting at a sync boundary past sync.trainerTimeoutSeconds for the trainer's push."
    )
    failure_reason: str | None = Field(
        default=None, description="Why the explorer failed, when that is final (TrainerTimeout): not worth a restart."
    )
    eval: dict[str, EvalResult] = Field(default_factory=dict, description="Latest evaluation of each eval set.")
    message: str = ""


async def serve_app(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving ``app`` on ``host:port``; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class StatusServer:
    """Serves the current ``report`` (replace it to publish progress) on ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        report: CoordinatorReport | None = None,
        accepted: http_auth.Accepted | None = None,
        metrics: Callable[[], bytes] | None = None,
    ):
        """``accepted``: the tokens ``/status`` admits (default: the job token and the trainer tokens); ``metrics``:
        the Prometheus exposition ``/metrics`` serves."""
        self.host = host
        self.port = port
        self.report = report or CoordinatorReport()
        self.accepted = accepted or self._job_and_trainer_tokens
        self.metrics = metrics
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _: web.Request) -> web.Response:
        assert self.metrics is not None
        body = await asyncio.to_thread(self.metrics)
        return web.Response(body=body, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.report.to_wire())

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    @staticmethod
    def _job_and_trainer_tokens() -> list[str]:
        return [credentials.job_token(), *credentials.trainer_tokens()]

    async def start(self) -> None:
        guard = http_auth.aiohttp_guard(self.accepted, f"{credentials.JOB_TOKEN} (or {credentials.TRAINER_TOKEN})",
                                        open_paths={"/healthz"})  # fmt: skip
        app = web.Application(middlewares=[guard])
        app.router.add_get("/status", self._status)
        app.router.add_get("/healthz", self._healthz)
        if self.metrics is not None:
            app.router.add_get("/metrics", self._metrics)
        self._runner = await serve_app(app, self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()
