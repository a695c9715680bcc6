"""The credentials a test presents as a trainer or as one of the job's own processes (the run's, tests/conftest.py)."""

from __future__ import annotations

from explorer import credentials


def trainer_headers() -> dict[str, str]:
    return credentials.bearer(credentials.trainer_tokens()[0])


def job_headers() -> dict[str, str]:
    return credentials.job_headers()
