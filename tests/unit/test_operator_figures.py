"""The pure parts of bench/operator_vs_kuberay.py: audit-log counts by user agent, /proc parsing, the table."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "operator_figures.py"
    spec = importlib.util.spec_from_file_location("operator_figures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


figs = _load()


def event(audit_id: str, agent: str, verb: str, stage: str = "ResponseComplete") -> dict[str, str]:
    return {"auditID": audit_id, "userAgent": agent, "verb": verb, "stage": stage}


def test_requests_counted_once_per_audit_id_by_agent_prefix() -> None:
    events = [
        event("1", "kuberay-operator/v1.5.0", "watch", "ResponseStarted"),
        event("1", "kuberay-operator/v1.5.0", "watch"),  # the same watch, when it ended
        event("2", "kuberay-operator/v1.5.0", "create"),
        event("3", "kuberay-operator/v1.5.0", "patch"),
        event("4", "kopf/1.45.0", "patch"),
        event("5", "explorer-operator/0.1.0 (host-1)", "list"),
        event("6", "kube-scheduler/v1.36.1", "create"),
        {"userAgent": "kopf/1.45.0", "verb": "delete"},  # no audit ID: counts on its own
    ]
    assert figs.count_requests(events, ("kuberay-operator",)) == figs.Requests(total=3, writes=2)
    assert figs.count_requests(events, ("explorer-operator", "kopf")) == figs.Requests(total=3, writes=2)
    assert figs.count_requests(events, ("nobody",)) == figs.Requests()


def test_top_requests_by_verb_and_resource() -> None:
    events = [
        {"auditID": "1", "userAgent": "kopf/1", "verb": "patch", "objectRef": {"resource": "explorerjobs",
                                                                                "subresource": "status"}},
        {"auditID": "2", "userAgent": "kopf/1", "verb": "patch", "objectRef": {"resource": "explorerjobs",
                                                                                "subresource": "status"}},
        {"auditID": "2", "userAgent": "kopf/1", "verb": "patch", "objectRef": {"resource": "explorerjobs",
                                                                                "subresource": "status"}},
        {"auditID": "3", "userAgent": "kopf/1", "verb": "get", "requestURI": "/version"},
        {"auditID": "4", "userAgent": "kubectl", "verb": "get", "objectRef": {"resource": "pods"}},
    ]  # fmt: skip
    assert figs.top_requests(events, ("kopf",)) == ["patch explorerjobs/status 2", "get /version 1"]
    assert figs.top_requests(events, ("kopf",), n=1) == ["patch explorerjobs/status 2"]
    assert figs.top_requests(events, ("kopf",), writes=True) == ["patch explorerjobs/status 2"]


def test_cpu_seconds_from_proc_stat_even_with_parentheses_in_the_name() -> None:
    fields = ["S", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "250", "50", "0", "0"]
    stat = "1234 (we (ird) name) " + " ".join(fields) + "\n"
    assert figs.cpu_seconds(stat, 100) == pytest.approx(3.0)


def test_status_fields_in_kib() -> None:
    status = "Name:\tkuberay-operator\nVmPeak:\t 2000000 kB\nVmHWM:\t   81234 kB\nVmRSS:\t   70000 kB\n"
    assert figs.status_kib(status, "VmHWM") == 81234
    assert figs.status_kib(status, "VmRSS") == 70000
    assert figs.status_kib(status, "VmSwap") == 0


def test_percentiles_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert figs.pct(values, 0.5) == 51.0
    assert figs.pct(values, 0.95) == 95.0
    assert figs.pct(list(reversed(values)), 1.0) == 100.0
    assert math.isnan(figs.pct([], 0.5))


def test_table_cells_ratio_and_markdown() -> None:
    rows = [
        figs.Row("burst p50", "s", 2.0, 4.0, 1.0),
        figs.Row("API requests", "", 1200, 600),
        figs.Row("steady CPU", "s", 0.5, 0.0),
        figs.Row("orphans", "", 0, 0, None),
    ]
    assert figs.cells(rows[0]) == ("burst p50", "2.00 s", "4.00 s", "0.50x", "1.00 s")
    assert figs.cells(rows[1])[1:4] == ("1200", "600", "2.00x")
    assert figs.cells(rows[2])[3] == "—"  # no ratio against zero
    assert figs.cells(rows[3])[4] == "—"
    markdown = figs.markdown_table(rows).splitlines()
    assert markdown[0].startswith("| figure | ours | KubeRay |")
    assert markdown[1] == "|---|---:|---:|---:|---:|"
    assert len(markdown) == 2 + len(rows)
    text = figs.text_table(rows).splitlines()
    assert len({len(line) for line in text}) == 1  # aligned
