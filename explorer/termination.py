"""The coordinator's last report, kept by the kubelet as the container's termination message after the process exits.

The status API dies with the coordinator, so a poll can miss the final steps, the last push and how it ended. The
kubelet keeps up to 4096 bytes of ``terminationMessagePath`` in ``containerStatuses[].state.terminated.message``;
the operator reads the report from there (``read``). With ``terminationMessagePolicy: FallbackToLogsOnError`` a
coordinator that died before writing leaves its log tail there instead, which ``read`` returns as ``None``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ValidationError

from explorer.status_api import CoordinatorReport

PATH_ENV = "EXPLORER_TERMINATION_LOG"  # set by the operator on the coordinator container
LIMIT_BYTES = 4096  # the kubelet truncates a longer message


def encode(report: CoordinatorReport) -> str:
    """The report as compact JSON within the kubelet's limit: the per-engine list goes first, then the message."""
    text = _dump(report)
    if len(text.encode()) <= LIMIT_BYTES:
        return text
    report = report.model_copy(update={"engines": []})
    text = _dump(report)
    if len(text.encode()) <= LIMIT_BYTES:
        return text
    # The message is the only other free-length field: keep its longest head that fits (escapes make JSON longer).
    low, high = 0, len(report.message)
    while low < high:
        mid = (low + high + 1) // 2
        if len(_dump(report.model_copy(update={"message": report.message[:mid]})).encode()) <= LIMIT_BYTES:
            low = mid
        else:
            high = mid - 1
    return _dump(report.model_copy(update={"message": report.message[:low]}))


def _dump(report: CoordinatorReport) -> str:
    return report.model_dump_json(by_alias=True, exclude_none=True)


def write(report: CoordinatorReport, path: Path | None = None) -> bool:
    """Write the report where ``EXPLORER_TERMINATION_LOG`` says (nothing outside a pod); False when not written."""
    target = path or (Path(os.environ[PATH_ENV]) if os.environ.get(PATH_ENV) else None)
    if target is None:
        return False
    try:
        target.write_text(encode(report))
    except OSError:
        return False
    return True


def read(message: str | None) -> CoordinatorReport | None:
    """The report in a termination message; None when it holds something else (a log tail) or nothing."""
    if not message or not message.lstrip().startswith("{"):
        return None
    try:
        return CoordinatorReport.model_validate(json.loads(message))
    except (ValueError, ValidationError):
        return None
