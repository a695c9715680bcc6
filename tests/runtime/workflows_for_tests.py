"""Custom workflows used by the runtime tests (loaded by import path inside real Ray runner actors).

Each still calls the real engine; the extra behaviour (sleeping, dying once) is driven by the task's own fields and
marker files, so a test can observe what happened inside the runner process.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from explorer import config
from explorer.experience import Experience
from explorer.inference import InferenceModel
from explorer.workflows import MathWorkflow, Task


class SleepyWorkflow(MathWorkflow):
    """Sleeps ``task.raw['sleep']`` seconds first; writes ``task.raw['marker']`` if it ever finishes sleeping. A
    straggler once: ``task.raw['sleep_once']`` seconds on the first attempt only (``raw['once_marker']`` remembers)."""

    def __init__(self, spec: config.WorkflowSpec):
        super().__init__(spec)

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        once = task.raw.get("once_marker")
        if once and not Path(once).exists():
            Path(once).write_text("first attempt")
            await asyncio.sleep(float(task.raw["sleep_once"]))
        await asyncio.sleep(float(task.raw.get("sleep", 0)))
        marker = task.raw.get("marker")
        if marker:
            Path(marker).write_text("finished")
        return await super().run(task, model, repeat_times, run_id_base)


class DieOnceWorkflow(MathWorkflow):
    """Kills its own runner process the first time it sees a task (a marker file remembers), then behaves."""

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        marker = Path(task.raw["marker"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(17)
        return await super().run(task, model, repeat_times, run_id_base)
