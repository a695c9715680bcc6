"""Zero-latency workflows for the runtime tests of scheduling semantics, loaded by import path inside real Ray runner
actors: they make their completions up instead of calling an engine, so only Ray and the scheduler are measured.

Behaviour comes from the task's fields (``sleep``, ``turns``) and from marker files a test can read back.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from explorer import config
from explorer.experience import Experience
from explorer.inference import InferenceModel
from explorer.workflows import Task


class InstantWorkflow:
    """Sleeps ``task.raw['sleep']`` seconds, then returns ``task.raw['turns']`` experiences (default 1) per run, as a
    step-wise agent returns one per turn; the engine is never called."""

    def __init__(self, spec: config.WorkflowSpec):
        self.spec = spec

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        await asyncio.sleep(float(task.raw.get("sleep", 0)))
        return [
            Experience(tokens=[1, 2, 3, 4], prompt_length=2, logprobs=[-0.1, -0.2], reward=1.0, task_id=task.task_id,
                       run_id=run, info={"turn": turn})
            for run in range(run_id_base, run_id_base + repeat_times)
            for turn in range(int(task.raw.get("turns", 1)))
        ]  # fmt: skip


def _first_time(marker: Path) -> bool:
    """Creates ``marker``; True if it did not exist yet."""
    if marker.exists():
        return False
    marker.write_text(str(os.getpid()))
    return True


class ReplacementFailsOnceWorkflow(InstantWorkflow):
    """Kills its runner process at the first task; the replacement process then fails once in its constructor (as a
    runner whose restart fails), and the next one works. Markers live in ``workflow.args['markers']``."""

    def __init__(self, spec: config.WorkflowSpec):
        super().__init__(spec)
        self.markers = Path(spec.args["markers"])
        if (self.markers / "died").exists() and _first_time(self.markers / "refused"):
            raise RuntimeError("this replacement runner process cannot start")

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        if _first_time(self.markers / "died"):
            os._exit(17)
        return await super().run(task, model, repeat_times, run_id_base)
