"""Tasksets from JSONL or Parquet files: rows become ``Task``s; a bad row is reported with file and line, not fatal.

The built-in ``arithmetic`` taskset (``builtin:arithmetic``) makes simple addition problems in memory for the
embedded default and the tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import typing
from pathlib import Path
from typing import Any

from explorer import config
from explorer.workflows import Task

log = logging.getLogger(__name__)
BUILTIN_ARITHMETIC = config.BUILTIN_TASKSETS[0]


@dataclasses.dataclass(frozen=True)
class RowError:
    """A row that could not become a task: where it is and what to fix."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _task(row: Any, spec: config.TasksetSpec, task_id: int, is_eval: bool) -> Task:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    messages = row.get("messages")
    if spec.prompt_key not in row and not messages:
        raise ValueError(f"missing the prompt field {spec.prompt_key!r} (taskset.promptKey)")
    reward = row.get(spec.reward_key)
    if reward is not None and reward not in typing.get_args(config.RewardName):
        known = ", ".join(typing.get_args(config.RewardName))
        raise ValueError(f"field {spec.reward_key!r} (taskset.rewardKey) names reward {reward!r}; known: {known}")
    return Task(
        task_id=task_id,
        prompt=str(row.get(spec.prompt_key, "")),
        reference=str(row.get(spec.response_key, "")),
        messages=tuple(messages or ()),
        raw=row,
        is_eval=is_eval,
        reward=reward,
    )


def _arithmetic(count: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"question": f"What is {a} plus {b}?", "answer": str(a + b)})
    return rows


def _rows(spec: config.TasksetSpec) -> list[tuple[int, Any]]:
    """(line number, parsed row or an exception) for every row of the file."""
    if spec.path == BUILTIN_ARITHMETIC:
        return list(enumerate(_arithmetic(), start=1))
    path = Path(spec.path)
    fmt = spec.format or ("parquet" if path.suffix == ".parquet" else "jsonl")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows: list[tuple[int, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                rows.append((number, ValueError(f"not valid JSON ({err.msg} at column {err.colno})")))
    return rows


def load_taskset(spec: config.TasksetSpec, is_eval: bool = False) -> tuple[list[Task], list[RowError]]:
    """Every valid task of the taskset, and an error for every row that is not one."""
    if spec.path != BUILTIN_ARITHMETIC and not Path(spec.path).is_file():
        raise FileNotFoundError(f"taskset {spec.name!r}: no file at {spec.path} (check taskset.path and the volume)")
    tasks: list[Task] = []
    errors: list[RowError] = []
    for number, row in _rows(spec):
        try:
            if isinstance(row, Exception):
                raise row
            tasks.append(_task(row, spec, len(tasks), is_eval))
        except ValueError as err:
            errors.append(RowError(spec.path, number, str(err)))
    for error in errors:
        log.warning("skipping taskset row %s", error)
    if not tasks:
        raise ValueError(f"taskset {spec.name!r} at {spec.path} has no usable rows: {'; '.join(map(str, errors[:3]))}")
    return tasks, errors
