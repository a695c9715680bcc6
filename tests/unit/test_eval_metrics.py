"""Eval figures (pure arithmetic): mean@n, best@n and the unbiased pass@k."""

from __future__ import annotations

import math

import pytest

from explorer.eval_metrics import pass_at_k, summarize
from explorer.experience import Experience


def exp(task: int, run: int, reward: float) -> Experience:
    return Experience(tokens=[1, 2], prompt_length=1, logprobs=[-0.1], reward=reward, task_id=task, run_id=run)


def test_pass_at_k_is_the_unbiased_estimate() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(2, 1, 4) == 1.0, "fewer runs than k: the runs it has"


def test_mean_best_and_pass_over_tasks_and_runs() -> None:
    runs = [exp(0, 0, 1.0), exp(0, 1, 0.0), exp(0, 2, 0.0), exp(0, 3, 0.0),  # one of four passes
            exp(1, 0, 0.0), exp(1, 1, 0.0), exp(1, 2, 0.0), exp(1, 3, 0.0)]  # fmt: skip
    figures = summarize(runs, repeat_times=4, pass_threshold=1.0, missing=[7])
    assert figures["mean@4"] == pytest.approx(1 / 8)
    assert figures["best@4"] == pytest.approx(0.5)
    assert figures["pass@1"] == pytest.approx(0.125) and figures["pass@4"] == pytest.approx(0.5)
    assert (figures["tasks"], figures["runs"], figures["missingTasks"]) == (2, 8, 1)


def test_a_run_with_several_experiences_counts_once_with_its_best_reward() -> None:
    figures = summarize([exp(0, 0, 0.2), exp(0, 0, 1.0)], repeat_times=1, pass_threshold=1.0)
    assert figures["runs"] == 1 and figures["mean@1"] == 1.0 and figures["pass@1"] == 1.0
    assert set(figures) == {"tasks", "runs", "missingTasks", "mean@1", "best@1", "pass@1"}


def test_no_experiences_gives_zeros_not_an_error() -> None:
    assert summarize([], repeat_times=2, pass_threshold=1.0, missing=[1, 2])["missingTasks"] == 2
