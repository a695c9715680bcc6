"""Pure helpers of bench/operator_vs_kuberay.py: audit-log request counts by user agent, /proc figures, the table.

Nothing here talks to a cluster, so tests/unit/test_operator_figures.py checks it on canned text.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


@dataclasses.dataclass(frozen=True)
class Requests:
    """API requests one client made: all of them, and the writes among them."""

    total: int = 0
    writes: int = 0


def count_requests(events: Iterable[Mapping[str, Any]], agent_prefixes: Sequence[str]) -> Requests:
    """Requests (distinct audit IDs) whose user agent starts with one of ``agent_prefixes``.

    A watch or other long request is logged twice (ResponseStarted, then ResponseComplete) under one audit ID: it
    counts once. Events without an audit ID count each.
    """
    prefixes = tuple(agent_prefixes)
    seen: set[str] = set()
    total = writes = 0
    for event in events:
        if not str(event.get("userAgent", "")).startswith(prefixes):
            continue
        audit_id = event.get("auditID")
        if audit_id:
            if audit_id in seen:
                continue
            seen.add(str(audit_id))
        total += 1
        writes += event.get("verb") in WRITE_VERBS
    return Requests(total, writes)


def top_requests(events: Iterable[Mapping[str, Any]], agent_prefixes: Sequence[str], n: int = 5,
                 writes: bool = False) -> list[str]:  # fmt: skip
    """The ``n`` commonest ``verb resource[/subresource]`` of those requests (or of their writes), with counts."""
    prefixes = tuple(agent_prefixes)
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    for event in events:
        audit_id = str(event.get("auditID", ""))
        if not str(event.get("userAgent", "")).startswith(prefixes) or (audit_id and audit_id in seen):
            continue
        if writes and event.get("verb") not in WRITE_VERBS:
            continue
        seen.add(audit_id)
        ref = event.get("objectRef") or {}
        resource = "/".join(filter(None, (ref.get("resource"), ref.get("subresource")))) or event.get("requestURI", "")
        counts[f"{event.get('verb')} {resource}"] += 1
    return [f"{key} {count}" for key, count in counts.most_common(n)]


def cpu_seconds(stat: str, ticks_per_second: int) -> float:
    """User + system CPU seconds from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself: fields are counted
    from the last ``)``. utime and stime are fields 14 and 15.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field n is rest[n - 3].
    return (int(rest[11]) + int(rest[12])) / ticks_per_second


def status_kib(status: str, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmHWM: peak RSS, VmRSS: current RSS) in KiB; 0 when absent."""
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    return 0


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by nearest rank of sorted ``values`` (as bench/operator_scale.py takes it); nan if none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


Cell = float | int | None


@dataclasses.dataclass(frozen=True)
class Row:
    """One figure for ours, KubeRay and the direct-creation baseline (None: not measured / not applicable)."""

    name: str
    unit: str
    ours: Cell
    kuberay: Cell
    direct: Cell = None


def fmt(value: Cell, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, int):
        text = str(value)
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def ratio(ours: Cell, kuberay: Cell) -> str:
    """ours / KubeRay as ``0.52x``; ``—`` when either is missing or KubeRay's is zero."""
    if ours is None or kuberay is None or kuberay == 0 or math.isnan(ours) or math.isnan(kuberay):
        return "—"
    return f"{ours / kuberay:.2f}x"


HEADER = ("figure", "ours", "KubeRay", "ours / KubeRay", "pods created directly")


def cells(row: Row) -> tuple[str, str, str, str, str]:
    return (row.name, fmt(row.ours, row.unit), fmt(row.kuberay, row.unit), ratio(row.ours, row.kuberay),
            fmt(row.direct, row.unit))  # fmt: skip


def text_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table."""
    table = [HEADER, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
             for line in table]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub markdown table (figures right-aligned), ready for docs/."""
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)
