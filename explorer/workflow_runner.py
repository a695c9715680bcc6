"""The workflow runner (a Ray actor in the scheduler): runs one task's runs and returns its experiences.

Seed API: ``WorkflowRunner(config, model, auxiliary_models=None, runner_id=None)`` and
``run_task(task, repeat_times=1, run_id_base=0) -> (Status, list[Experience])``. Differences: ``model`` may be an
engine group's config (URLs), from which the actor builds its own ``EnginePool`` — HTTP clients do not travel
between processes; ``run_task`` also takes the scheduler's ``engine_order`` for the task and reports the engines
that failed it in ``Status.failed_engines``.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Sequence

from explorer import config, inference, workflows
from explorer.experience import Experience


@dataclasses.dataclass
class Status:
    """The outcome of running a task: ``ok`` when every run completed."""

    ok: bool
    metric: dict[str, float]
    message: str | None = None
    failed_engines: tuple[int, ...] = ()  # rollout engines (indices) that failed a request of this attempt


ModelRef = inference.InferenceModel | config.EngineGroupConfig


def _model(ref: ModelRef, first: int) -> inference.InferenceModel:
    """``first``: where this runner's own tie-breaks start, so runners without the scheduler's order still spread."""
    if isinstance(ref, config.EngineGroupConfig):
        return inference.EnginePool.from_urls([e.url for e in ref.engines], ref.model.served_name, first)
    return ref


def _failed(model: inference.InferenceModel) -> tuple[int, ...]:
    return tuple(sorted(model.failed)) if isinstance(model, inference.RoutedPool) else ()


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
        self.workflow = workflows.build_workflow(config.workflow)

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
            return Status(False, {"run_seconds": time.monotonic() - started}, message, _failed(model)), []
        rewards = [e.reward for e in experiences]
        metric = {
            "run_seconds": time.monotonic() - started,
            "reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
            "response_length_mean": (sum(e.response_length for e in experiences) / len(experiences))
            if experiences
            else 0.0,
        }
        ok = len(experiences) == repeat_times
        incomplete = None if ok else f"{len(experiences)}/{repeat_times} runs completed"
        return Status(ok, metric, incomplete, _failed(model)), experiences

    def ping(self) -> int | None:
        return self.runner_id

    async def close(self) -> None:
        for model in [self.model, *self.auxiliary_models]:
            await model.close()
