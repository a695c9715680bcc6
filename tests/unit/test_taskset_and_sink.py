"""Taskset parsing (bad rows named by file and line) and the exactly-once experience sink."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from explorer import config, rewards, sink, taskset
from explorer.experience import Experience


def spec(path: Path, **extra: str) -> config.TasksetSpec:
    return config.TasksetSpec.model_validate({"path": str(path), **extra})


def test_bad_rows_are_reported_with_file_and_line_and_the_rest_loads(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"question": broken}\n\n[1, 2]\n{"answer": "3"}\n'
                    '{"question": "2+2?", "answer": "4"}\n')  # fmt: skip
    tasks, errors = taskset.load_taskset(spec(path))
    assert [t.prompt for t in tasks] == ["1+1?", "2+2?"] and [t.task_id for t in tasks] == [0, 1]
    assert [e.line for e in errors] == [2, 4, 5]
    assert errors[0].message.startswith("not valid JSON")
    assert errors[1].message == "expected a JSON object, got list"
    assert errors[2].message == "missing the prompt field 'question' (taskset.promptKey)"
    assert str(errors[0]).startswith(f"{path}:2: not valid JSON")


def test_missing_or_empty_tasksets_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no file at .*nope\.jsonl"):
        taskset.load_taskset(spec(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"q": 1}\n')
    with pytest.raises(ValueError, match="no usable rows"):
        taskset.load_taskset(spec(empty))


def test_parquet_tasksets_load(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "3+4?", "answer": "7"}]), tmp_path / "t.parquet")
    tasks, errors = taskset.load_taskset(spec(tmp_path / "t.parquet"))
    assert (tasks[0].prompt, tasks[0].reference, errors) == ("3+4?", "7", [])


def experiences(n: int) -> list[Experience]:
    return [Experience(tokens=[1, 2, 3], prompt_length=1, logprobs=[-0.5, -0.1], reward=1.0, task_id=i, run_id=0,
                       info={"k": i}) for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_step_is_committed_exactly_once_and_reads_back(tmp_path: Path, fmt: str) -> None:
    out = sink.ExperienceSink(tmp_path, fmt)
    assert out.commit(1, experiences(3), policy_version=0) is True
    assert out.commit(1, experiences(5)) is False  # a restarted coordinator cannot write the step twice
    assert out.read_step(1) == experiences(3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["steps"]["1"]["experiences"] == 3 and manifest["steps"]["1"]["policyVersion"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def record_durability(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (of a directory, or of a file named by its final name) and rename, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync", "<dir>"))
        else:  # a temporary ".{name}.{random}" beside its final name
            events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name[1:].rsplit(".", 1)[0]))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_commit_is_durable_file_fsynced_before_the_rename_and_the_directory_after(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #13: Parquet steps were never fsynced, and no rename was followed by an fsync of the directory."""
    events = record_durability(monkeypatch)
    sink.ExperienceSink(tmp_path, fmt).commit(1, experiences(2))
    name = f"step-00000001.{fmt}"
    assert events == [("fsync", name), ("replace", name), ("fsync", "<dir>"),
                      ("fsync", "manifest.json"), ("replace", "manifest.json"), ("fsync", "<dir>")]  # fmt: skip


def test_a_step_committed_short_names_its_missing_tasks_in_the_manifest(tmp_path: Path) -> None:
    out = sink.ExperienceSink(tmp_path, "parquet")
    out.commit(1, experiences(2))
    out.commit(2, experiences(1), missing_tasks=[4, 2])
    steps = out.manifest()["steps"]
    assert steps["1"]["missingTasks"] == [] and steps["2"]["missingTasks"] == [2, 4]
    assert out.commit(3, [], missing_tasks=[0]) and out.read_step(3) == []  # every task missing: an empty step


def test_math_reward_checks_the_final_answer() -> None:
    assert rewards.math_reward("so the answer is 42", "42") == 1.0
    assert rewards.math_reward("\\boxed{3/4}", "0.75") == 1.0
    assert rewards.math_reward("it is 41", "#### 42") == 0.0
    assert rewards.math_reward("no number here", "1") == 0.0
