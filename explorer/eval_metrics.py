"""Eval figures of one eval set at one step, from its experiences: mean@n, best@n and pass@k, as RL papers report.

Each task of an eval set runs ``n`` times (the set's ``repeatTimes``). ``mean@n`` is the mean reward over every run,
``best@n`` the mean over tasks of each task's best run, ``pass@k`` the unbiased estimate of the chance that at least
one of ``k`` runs drawn from a task's ``n`` passes (reward at least the set's ``passThreshold``), averaged over tasks
(Chen et al. 2021: ``1 - C(n - c, k) / C(n, k)`` with ``c`` passing runs). A task with fewer runs than ``k`` counts
with the runs it has.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from explorer.experience import Experience


def pass_at_k(runs: int, passed: int, k: int) -> float:
    """The unbiased pass@k of one task with ``passed`` of ``runs`` runs passing."""
    if runs <= 0:
        return 0.0
    k = min(k, runs)
    if runs - passed < k:
        return 1.0
    return 1.0 - math.comb(runs - passed, k) / math.comb(runs, k)


def summarize(
    experiences: Iterable[Experience], repeat_times: int, pass_threshold: float, missing: Sequence[int] = ()
) -> dict[str, float]:
    """The eval set's figures (keys ``mean@n``, ``best@n``, ``pass@1``, ``pass@n`` with ``n`` = ``repeat_times``,
    plus ``tasks``, ``runs`` and ``missingTasks``)."""
    by_task: dict[int, dict[int, float]] = defaultdict(dict)
    for exp in experiences:  # a multi-turn run may return several experiences: the run's reward is its best one
        runs = by_task[exp.task_id]
        runs[exp.run_id] = max(runs.get(exp.run_id, -math.inf), exp.reward)
    rewards = [list(runs.values()) for runs in by_task.values()]
    n = repeat_times
    figures = {"tasks": float(len(rewards)), "runs": float(sum(len(r) for r in rewards)),
               "missingTasks": float(len(missing))}  # fmt: skip
    if not rewards:
        return figures | {f"mean@{n}": 0.0, f"best@{n}": 0.0, "pass@1": 0.0, f"pass@{n}": 0.0}
    every = [reward for task in rewards for reward in task]
    figures[f"mean@{n}"] = sum(every) / len(every)
    figures[f"best@{n}"] = sum(max(task) for task in rewards) / len(rewards)
    for k in dict.fromkeys((1, n)):
        passing = [pass_at_k(len(task), sum(r >= pass_threshold for r in task), k) for task in rewards]
        figures[f"pass@{k}"] = sum(passing) / len(passing)
    return figures
