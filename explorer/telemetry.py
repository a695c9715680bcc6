"""The coordinator's Prometheus metrics, served at ``/metrics`` on the status port (the job token, as ``/status``).

The scheduler records every attempt and every finished task; the explorer records steps and eval figures. Each
``Telemetry`` has its own registry (several explorers in one process, as in tests, do not share counters).
Latency percentiles come from the histograms (``histogram_quantile`` in PromQL).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from explorer.experience import Experience

REWARD_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 5.0)
LENGTH_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def batch_kind(batch_id: object) -> tuple[str, str]:
    """``("eval", <set>)`` for an eval batch (``"<step>/<set>"``), else ``("rollout", "")``."""
    if isinstance(batch_id, str) and "/" in batch_id:
        return "eval", batch_id.split("/", 1)[1]
    return "rollout", ""


class Telemetry:
    """Rollout and eval figures, per engine and per task; ``kind`` is ``rollout`` or ``eval``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks = Counter("explorer_tasks", "Tasks finished, by outcome.", ["kind", "outcome"], registry=r)
        self.retries = Counter("explorer_task_retries", "Task attempts retried.", ["kind"], registry=r)
        self.attempt_seconds = Histogram("explorer_task_attempt_seconds", "Wall time of one task attempt.", ["kind"],
                                         buckets=SECONDS_BUCKETS, registry=r)  # fmt: skip
        self.attempt_timeout = Gauge("explorer_task_attempt_timeout_seconds", "The limit a first attempt gets now "
                                     "(scheduler.dynamicTimeout).", ["kind"], registry=r)  # fmt: skip
        self.experiences = Counter("explorer_experiences", "Experiences produced.", ["kind"], registry=r)
        self.reward = Histogram("explorer_reward", "Reward of each experience (eval: per eval set).",
                                ["kind", "eval_set"], buckets=REWARD_BUCKETS, registry=r)  # fmt: skip
        self.response_tokens = Histogram("explorer_response_length_tokens", "Response tokens of each experience.",
                                         ["kind"], buckets=LENGTH_BUCKETS, registry=r)  # fmt: skip
        self.engine_requests = Counter("explorer_engine_requests", "Requests an engine answered.", ["engine"],
                                       registry=r)  # fmt: skip
        self.engine_failures = Counter("explorer_engine_request_failures", "Attempts in which an engine failed a "
                                       "request (transport error or 5xx).", ["engine"], registry=r)  # fmt: skip
        self.engine_seconds = Histogram("explorer_engine_request_seconds", "Latency of answered requests.",
                                        ["engine"], buckets=SECONDS_BUCKETS, registry=r)  # fmt: skip
        self.step = Gauge("explorer_step", "The last committed explore step.", registry=r)
        self.policy_version = Gauge("explorer_policy_version", "Policy version the engines in sync serve.",
                                    registry=r)  # fmt: skip
        self.experiences_per_second = Gauge("explorer_experiences_per_second", "Throughput of the last step.",
                                            registry=r)  # fmt: skip
        self.eval = Gauge("explorer_eval", "Latest figures of each eval set (mean@n, best@n, pass@k…).",
                          ["eval_set", "metric"], registry=r)  # fmt: skip

    def attempt(self, kind: str, seconds: float | None, requests: Sequence[tuple[int, float]],
                failed_engines: Sequence[int], retried: bool) -> None:  # fmt: skip
        """One attempt of a sub-task: its wall time, each request's engine and latency, the engines that failed."""
        if seconds is not None:
            self.attempt_seconds.labels(kind).observe(seconds)
        for engine, latency in requests:
            self.engine_requests.labels(str(engine)).inc()
            self.engine_seconds.labels(str(engine)).observe(latency)
        for engine in failed_engines:
            self.engine_failures.labels(str(engine)).inc()
        if retried:
            self.retries.labels(kind).inc()

    def task(self, kind: str, eval_set: str, ok: bool, experiences: Sequence[Experience]) -> None:
        """A finished task (every sub-task in): its outcome and its experiences' rewards and lengths."""
        self.tasks.labels(kind, "ok" if ok else "failed").inc()
        self.experiences.labels(kind).inc(len(experiences))
        for experience in experiences:
            self.reward.labels(kind, eval_set).observe(experience.reward)
            self.response_tokens.labels(kind).observe(experience.response_length)

    def committed(self, step: int, policy_version: int | None, experiences_per_second: float | None) -> None:
        self.step.set(step)
        if policy_version is not None:
            self.policy_version.set(policy_version)
        if experiences_per_second is not None:
            self.experiences_per_second.set(experiences_per_second)

    def evaluated(self, eval_set: str, figures: Mapping[str, float]) -> None:
        for metric, value in figures.items():
            self.eval.labels(eval_set, metric).set(value)

    def exposition(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
