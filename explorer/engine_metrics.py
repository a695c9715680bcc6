"""Requests an engine has served, read from its own Prometheus ``/metrics`` (what benchmarks and tests count by).

Counting at the engine, not in our clients, is what shows whether the job's requests really reach every engine.
"""

from __future__ import annotations

import httpx

from explorer import credentials

# vLLM's counter of finished requests (one sample per finish reason); the exposition adds the ``_total`` suffix.
REQUESTS_METRIC = "vllm:request_success_total"


def compute_requests_served(exposition: str, metric: str = REQUESTS_METRIC) -> float:
    """The sum of every sample of ``metric`` in a Prometheus text exposition (0 when it is absent)."""
    total = 0.0
    for line in exposition.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name != metric:
            continue
        rest = line[line.rindex("}") + 1 :] if "{" in line else line[len(name) :]
        total += float(rest.split()[0])  # "value [timestamp]"
    return total


def fetch_requests_served(base_url: str, timeout: float = 10.0) -> float:
    """Requests the engine at ``base_url`` has finished since it started."""
    response = httpx.get(f"{base_url.rstrip('/')}/metrics", timeout=timeout, headers=credentials.job_headers())
    response.raise_for_status()
    return compute_requests_served(response.text)


def compute_shares(counts: list[float]) -> list[float]:
    """Each engine's share of the requests (all 0 when there were none)."""
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]
