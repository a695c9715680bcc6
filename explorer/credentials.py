"""The job's credentials: where each process finds them, and the bearer-token check every listening socket makes.

A job has two tokens, both in the Secret the operator makes (``<job>-credentials``) and mounted at
``EXPLORER_CREDENTIALS_DIR``, one file per key:

- ``job-token`` — the job's own pods: the engines' HTTP (every route but ``/health``), the Ray head, the status API.
- ``trainer-token`` — trainers: the sync API and the experience stream. ``trainer-token-previous``, when present, is
  still accepted, so a rotation does not cut off a trainer that has not re-read its token yet.

A trainer names its token by ``EXPLORER_SYNC_TOKEN`` (the value) or ``EXPLORER_SYNC_TOKEN_FILE`` (a path). Files are
re-read on every check (a rotated Secret reaches a mounted volume in place). Comparisons are in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

DIR_ENV = "EXPLORER_CREDENTIALS_DIR"
MOUNT_DIR = "/var/run/explorer/credentials"  # where the operator mounts the job's Secret in its pods
# Key names and variable names, not secrets:
JOB_TOKEN = "job-token"  # noqa: S105
TRAINER_TOKEN = "trainer-token"  # noqa: S105
PREVIOUS_TRAINER_TOKEN = "trainer-token-previous"  # noqa: S105
CLIENT_TOKEN_ENV = "EXPLORER_SYNC_TOKEN"  # noqa: S105
CLIENT_TOKEN_FILE_ENV = "EXPLORER_SYNC_TOKEN_FILE"  # noqa: S105


class MissingCredentialError(RuntimeError):
    """No credential where one is required: the message says which variable or file to provide."""


def mint() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _read(path: Path) -> str | None:
    """The token in ``path`` (stripped), read afresh on every call (two small files per request cost microseconds,
    and a rotation is seen at once); None when there is none."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    return value or None


def directory() -> Path:
    found = os.environ.get(DIR_ENV)
    if not found:
        raise MissingCredentialError(
            f"{DIR_ENV} is not set: point it at the job's credentials (the operator mounts the job's Secret at "
            f"{MOUNT_DIR}; a local run makes its own with `credentials.make_local`)"
        )
    return Path(found)


def key(name: str) -> str | None:
    return _read(directory() / name)


def job_token() -> str:
    token = key(JOB_TOKEN)
    if token is None:
        raise MissingCredentialError(f"no {JOB_TOKEN} in {directory()} ({DIR_ENV})")
    return token


def trainer_tokens() -> list[str]:
    """The tokens a trainer may present now: the current one, and the previous one during a rotation."""
    tokens = [t for t in (key(TRAINER_TOKEN), key(PREVIOUS_TRAINER_TOKEN)) if t]
    if not tokens:
        raise MissingCredentialError(f"no {TRAINER_TOKEN} in {directory()} ({DIR_ENV})")
    return tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def job_headers() -> dict[str, str]:
    """Headers of a request from one of the job's own processes (to an engine, the status API)."""
    return bearer(job_token())


def client_token() -> str | None:
    """The trainer's token from its environment (``EXPLORER_SYNC_TOKEN`` or ``EXPLORER_SYNC_TOKEN_FILE``)."""
    value = os.environ.get(CLIENT_TOKEN_ENV)
    if value:
        return value.strip()
    path = os.environ.get(CLIENT_TOKEN_FILE_ENV)
    return _read(Path(path)) if path else None


def presented(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None: no bearer token)."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def matches(authorization: str | None, accepted: Iterable[str]) -> bool:
    """Whether the header carries one of ``accepted``; every candidate is compared, each in constant time (digests
    of equal length, so the token's length leaks nothing either)."""
    token = presented(authorization)
    if token is None:
        return False
    digest = hashlib.sha256(token.encode()).digest()
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(digest, hashlib.sha256(candidate.encode()).digest())
    return found


def make_local(target: Path) -> Path:
    """Fresh tokens for a local run (no operator) in ``target``, readable by this user only; points this process
    and its children (engines, Ray workers, and a trainer unless one is named already) at them. Returns the
    directory."""
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (JOB_TOKEN, TRAINER_TOKEN):
        path = target / name
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(mint())
    os.environ[DIR_ENV] = str(target)
    if not (os.environ.get(CLIENT_TOKEN_ENV) or os.environ.get(CLIENT_TOKEN_FILE_ENV)):
        os.environ[CLIENT_TOKEN_FILE_ENV] = str(target / TRAINER_TOKEN)
    return target


def ensure_local(target: Path) -> Path | None:
    """``make_local(target)`` unless ``EXPLORER_CREDENTIALS_DIR`` names credentials already; the directory made, or
    None."""
    return None if os.environ.get(DIR_ENV) else make_local(target)
