"""The workflow runner (a Ray actor in the scheduler): runs one task's runs and returns its experiences.

Seed API: ``WorkflowRunner(config, model, auxiliary_models=None, runner_id=None)`` and
``run_task(task, repeat_times=1, run_id_base=0) -> (Status, list[Experience])``. Differences: ``model`` may be an
engine group's config (URLs), from which the actor builds its own ``EnginePool`` — HTTP clients do not travel
between processes; ``run_task`` also takes the scheduler's ``engine_order`` for the task and reports the engines
that failed it in ``Status.failed_engines``. A run is complete when at least one experience carries its run id (a
step-wise agent returns one per turn), and ``Status.metric`` holds means over runs (each run's own mean first).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Mapping, Sequence

from explorer import config, inference, workflows
from explorer.experience import Experience


@dataclasses.dataclass
class Status:
    """The outcome of running a task: ``ok`` when every run completed; ``metric``: means over its runs."""

    ok: bool
    metric: dict[str, float]
    message: str | None = None
    failed_engines: tuple[int, ...] = ()  # rollout engines (indices) that failed a request of this attempt
    served_by: tuple[int, ...] = ()  # rollout engines that answered this attempt's requests, distinct, in order
    requests: tuple[tuple[int, float], ...] = ()  # (rollout engine, seconds) of each answered request


ModelRef = inference.InferenceModel | config.EngineGroupConfig


def mean_over_runs(parts: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Each metric's mean over runs; ``parts`` are (metrics, runs they stand for). A part without a metric does not
    count for it (a failed sub-task has no reward)."""
    keys = sorted({key for metric, _ in parts for key in metric})
    means: dict[str, float] = {}
    for key in keys:
        weighed = [(metric[key], runs) for metric, runs in parts if key in metric]
        total = sum(runs for _, runs in weighed)
        means[key] = sum(value * runs for value, runs in weighed) / total if total else 0.0
    return means


def compute_runs(
    experiences: Sequence[Experience], repeat_times: int, run_id_base: int
) -> tuple[list[int], dict[str, float]]:
    """The run ids of ``run_id_base .. run_id_base + repeat_times - 1`` without an experience, and the metrics as
    means over runs: each run's own mean first, however many experiences (turns) it produced."""
    by_run: dict[int, list[Experience]] = {}
    for exp in experiences:
        by_run.setdefault(exp.run_id, []).append(exp)
    missing = [run for run in range(run_id_base, run_id_base + repeat_times) if run not in by_run]
    per_run = [
        ({"reward_mean": sum(e.reward for e in exps) / len(exps),
          "response_length_mean": sum(e.response_length for e in exps) / len(exps),
          "experiences_per_run": float(len(exps))}, 1)
        for exps in by_run.values()
    ]  # fmt: skip
    return missing, mean_over_runs(per_run)


def _model(ref: ModelRef, first: int) -> inference.InferenceModel:
    """``first``: where this runner's own tie-breaks start, so runners without the scheduler's order still spread."""
    if isinstance(ref, config.EngineGroupConfig):
        return inference.EnginePool.from_urls([e.url for e in ref.engines], ref.model.served_name, first)
    return ref


def _names(refs: Sequence[ModelRef]) -> list[str]:
    """The auxiliary groups' names (an in-process model has none: ``auxiliary-<i>``)."""
    return [r.name if isinstance(r, config.EngineGroupConfig) else f"auxiliary-{i}" for i, r in enumerate(refs)]


def _failed(model: inference.InferenceModel) -> tuple[int, ...]:
    return tuple(sorted(model.failed)) if isinstance(model, inference.RoutedPool) else ()


def _served_by(model: inference.InferenceModel) -> tuple[int, ...]:
    return tuple(dict.fromkeys(model.answered)) if isinstance(model, inference.RoutedPool) else ()


def _requests(model: inference.InferenceModel) -> tuple[tuple[int, float], ...]:
    return tuple(model.timings) if isinstance(model, inference.RoutedPool) else ()


class WorkflowRunner:
    """Holds the inference clients and the workflow; one task at a time per call (calls may overlap)."""

    def __init__(
        self,
        config: config.ExplorerConfig,
        model: ModelRef,
        auxiliary_models: Sequence[ModelRef] | None = None,
        runner_id: int | None = None,
    ):
        self.config = config
        self.runner_id = runner_id
        self.model = _model(model, runner_id or 0)
        self.auxiliary_models = [_model(m, runner_id or 0) for m in auxiliary_models or []]
        self.workflow = workflows.build_workflow(
            config.workflow, dict(zip(_names(auxiliary_models or []), self.auxiliary_models, strict=True))
        )

    async def run_task(
        self, task: workflows.Task, repeat_times: int = 1, run_id_base: int = 0, engine_order: Sequence[int] = ()
    ) -> tuple[Status, list[Experience]]:
        """``engine_order``: the scheduler's choice of rollout engine for this task, first to last."""
        started = time.monotonic()
        model = self.model.routed(engine_order) if isinstance(self.model, inference.EnginePool) else self.model
        try:
            experiences = await self.workflow.run(task, model, repeat_times, run_id_base)
        except Exception as err:  # any workflow failure is the task's outcome, never the runner's death
            message = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
            metric = {"run_seconds": time.monotonic() - started}
            return Status(False, metric, message, _failed(model), _served_by(model), _requests(model)), []
        missing, metric = compute_runs(experiences, repeat_times, run_id_base)
        metric["run_seconds"] = time.monotonic() - started
        done = repeat_times - len(missing)
        incomplete = f"{done}/{repeat_times} runs completed (no experience for run ids {missing})"
        status = Status(
            not missing, metric, incomplete if missing else None, _failed(model), _served_by(model), _requests(model)
        )
        return status, experiences

    def set_rollout_engines(self, urls: list[str]) -> int:
        """The rollout group's engines after a scale (``EnginePool.set_urls``); returns how many there are now."""
        if isinstance(self.model, inference.EnginePool):
            self.model.set_urls(urls)
        return len(urls)

    def ping(self) -> int | None:
        return self.runner_id

    async def close(self) -> None:
        for model in [self.model, *self.auxiliary_models]:
            await model.close()
