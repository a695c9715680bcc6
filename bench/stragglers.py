"""Benchmark of straggler handling (issue #13 item 6): the explorer's step loop with one slow task per step.

Each step has ``--tasks`` tasks of ``--task-seconds``; one of them is a straggler whose *first* attempt takes
``--straggle-seconds`` (an engine hiccup: a retry is quick). Three runs, side by side in one process:

- baseline: every step waits for all its tasks;
- ``scheduler.dynamicTimeout``: the straggler's first attempt is cut at factor x p95 and retried;
- ``explore.overRollout``: a step commits after ``tasks - 1`` and the straggler lands in a later step.

Printed per run: wall time, step-commit interval (mean and max), experiences committed and whether every task of every
step was committed exactly once (it must be). The runners are in-process sleeps (``SleepRunner``, a benchmark-only
stand-in for Ray actors and engines): only the step loop's waiting is measured, not generation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from explorer import config, scheduler, sink
from explorer import explorer as explorer_mod
from explorer.experience import Experience
from explorer.workflow_runner import Status


class SleepRunner:
    """Benchmark-only runner: a task sleeps ``raw['seconds']``; a straggler ``raw['straggle']`` on its first attempt."""

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        raw = task.task.raw
        seconds = float(raw["straggle"]) if raw.get("straggle") and task.attempts == 0 else float(raw["seconds"])
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.sleep(seconds), timeout)
        except TimeoutError:
            return Status(False, {}, f"attempt timed out after {timeout:g}s"), []
        experiences = [
            Experience(tokens=[1, 2], prompt_length=1, logprobs=[0.0], reward=1.0, task_id=task.task.task_id,
                       run_id=task.run_id_base + i)
            for i in range(task.repeat_times)
        ]  # fmt: skip
        return Status(True, {"run_seconds": time.monotonic() - started}), experiences

    async def restart(self) -> None:
        return None

    async def close(self) -> None:
        return None


def make_config(directory: Path, args: argparse.Namespace, **overrides: Any) -> config.ExplorerConfig:
    rows = [
        {
            "question": f"q{i}",
            "answer": "1",
            "seconds": args.task_seconds,
            "straggle": args.straggle_seconds if i % args.tasks == 0 else 0,
        }
        for i in range(args.tasks * args.steps)
    ]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body: dict[str, Any] = {
        "job": "bench", "namespace": "local", "taskset": {"path": str(directory / "train.jsonl")},
        "rollout": {"name": "r", "model": {"path": "/m"},
                    "engines": [{"index": 0, "url": "http://127.0.0.1:9", "rankOffset": 1, "worldSize": 1}]},
        "workflow": {"name": "custom", "importPath": "unused:Unused"},
        "explore": {"batchSize": args.tasks, "repeatTimes": 1, "totalSteps": args.steps},
        "scheduler": {"runnersPerEngine": args.runners, "maxRetryTimes": 2, "taskTimeoutSeconds": 60},
        "experiences": {"path": str(directory / "out"), "format": "jsonl"},
    }  # fmt: skip
    for key, value in overrides.items():
        body[key] = {**body[key], **value}
    return config.ExplorerConfig.model_validate(body)


def run(cfg: config.ExplorerConfig) -> dict[str, Any]:
    real = scheduler.Scheduler

    def in_process(c: config.ExplorerConfig, rollout: Any, aux: Any = None, **kwargs: Any) -> scheduler.Scheduler:
        return real(c, rollout, aux, backend_factory=lambda _: SleepRunner(), **kwargs)

    scheduler.Scheduler = in_process  # type: ignore[assignment,misc]
    try:
        explorer = explorer_mod.Explorer(cfg)
        commits: list[float] = []
        explorer.on_step = lambda step, _: commits.append(time.monotonic())
        started = time.monotonic()
        asyncio.run(explorer.explore())
        wall = time.monotonic() - started
    finally:
        scheduler.Scheduler = real  # type: ignore[misc]
    out = sink.ExperienceSink(Path(cfg.experiences.path))
    pairs = [(e.batch_id, e.task_id) for step in sorted(out.committed_steps()) for e in out.read_step(step)]
    expected = {(str(b), t) for b in range(1, cfg.explore.total_steps + 1) for t in range(cfg.explore.batch_size)}
    intervals = [b - a for a, b in zip([started, *commits], commits, strict=False)]
    return {"wall": wall, "mean": statistics.mean(intervals), "max": max(intervals), "experiences": len(pairs),
            "exactly_once": len(pairs) == len(expected) and set(pairs) == expected}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--runners", type=int, default=8)
    parser.add_argument("--task-seconds", type=float, default=0.1)
    parser.add_argument("--straggle-seconds", type=float, default=3.0)
    args = parser.parse_args()
    variants = {
        "wait for all (baseline)": {},
        "dynamicTimeout (3 x p95)": {"scheduler": {"dynamicTimeout": {"minSamples": 8, "factor": 3,
                                                                      "minSeconds": 0.2}}},
        f"overRollout (minTasks {args.tasks - 1})": {"explore": {"overRollout": {"minTasks": args.tasks - 1}}},
    }  # fmt: skip
    print(f"{args.steps} steps x {args.tasks} tasks of {args.task_seconds}s, {args.runners} runners, one straggler "
          f"per step ({args.straggle_seconds}s on its first attempt)")  # fmt: skip
    print(
        f"{'variant':<28} {'wall s':>8} {'step mean s':>12} {'step max s':>11} {'experiences':>12} {'exactly once':>13}"
    )
    failed = False
    for name, overrides in variants.items():
        with tempfile.TemporaryDirectory() as directory:
            figures = run(make_config(Path(directory), args, **overrides))
        failed |= not figures["exactly_once"]
        print(f"{name:<28} {figures['wall']:>8.2f} {figures['mean']:>12.2f} {figures['max']:>11.2f} "
              f"{figures['experiences']:>12} {figures['exactly_once']!s:>13}")  # fmt: skip
    if failed:
        raise SystemExit("a variant lost or duplicated a task")


if __name__ == "__main__":
    main()
