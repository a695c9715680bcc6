"""GitOps files: the Argo CD health check run by a real Lua runtime against job statuses, and the Flux/Argo
examples pointing at the chart that is actually here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeplane import paths

GITOPS = paths.repo_root() / "examples" / "gitops"
CHART = paths.repo_root() / "helm" / "explorer-operator"


def argocd_health(job: dict[str, Any]) -> dict[str, str]:
    """Run the shipped Lua script as Argo CD does: ``obj`` is the resource, the script returns ``hs``."""
    from lupa import LuaRuntime

    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(job, recursive=True)
    result = lua.execute((GITOPS / "argocd-health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def job(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "explorer.rft.dev/v1alpha1", "kind": "ExplorerJob",
                            "metadata": {"name": "j", "generation": generation}, "spec": {}}  # fmt: skip
    if status is not None:
        body["status"] = status
    return body


def cond(type_: str, status: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": "R", "message": message}


@pytest.mark.parametrize(
    ("status", "generation", "expected"),
    [
        (None, 1, ("Progressing", "waiting for the operator to report")),
        ({"phase": "Running", "observedGeneration": 1, "conditions": [cond("Ready", "True")]}, 2,
         ("Progressing", "the operator has not yet acted on generation 2")),
        ({"phase": "Initializing", "observedGeneration": 1,
          "conditions": [cond("Ready", "False", "1/2 engines ready"), cond("Degraded", "False")]}, 1,
         ("Progressing", "1/2 engines ready")),
        ({"phase": "Running", "observedGeneration": 1, "step": 7, "totalSteps": 100, "policyVersion": 3,
          "conditions": [cond("Ready", "True"), cond("Degraded", "False")]}, 1,
         ("Healthy", "exploring: step 7/100, policy version 3")),
        ({"phase": "Running", "observedGeneration": 1,
          "conditions": [cond("Ready", "False"), cond("Degraded", "True", "engine-1 crashed (exit 137)")]}, 1,
         ("Degraded", "engine-1 crashed (exit 137)")),
        ({"phase": "Failed", "observedGeneration": 1,
          "conditions": [cond("Failed", "True", "sync.checkpointPath is required")]}, 1,
         ("Degraded", "sync.checkpointPath is required")),
        ({"phase": "Suspended", "observedGeneration": 1, "conditions": [cond("Suspended", "True")]}, 1,
         ("Suspended", "suspended: every pod removed")),
        ({"phase": "Succeeded", "observedGeneration": 1, "conditions": []}, 1, ("Healthy", "explored every step")),
    ],
)  # fmt: skip
def test_argocd_health_check_maps_phase_and_conditions(
    status: dict[str, Any] | None, generation: int, expected: tuple[str, str]
) -> None:
    health = argocd_health(job(status, generation))
    assert (health["status"], health["message"]) == expected


def chart_version() -> str:
    version: str = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    return version


def test_flux_helmrelease_points_at_this_chart_and_version() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((GITOPS / "flux-helmrelease.yaml").read_text())}
    chart = docs["HelmRelease"]["spec"]["chart"]["spec"]
    assert (paths.repo_root() / chart["chart"]).resolve() == CHART
    assert chart["version"] == chart_version()
    assert chart["sourceRef"]["name"] == docs["GitRepository"]["metadata"]["name"]


def test_argocd_application_points_at_this_chart() -> None:
    app = yaml.safe_load((GITOPS / "argocd-application.yaml").read_text())
    assert (paths.repo_root() / app["spec"]["source"]["path"]).resolve() == CHART
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]


def values_of(path: Path) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(path.read_text()))
    for doc in docs:
        if doc["kind"] == "HelmRelease":
            values: dict[str, Any] = doc["spec"]["values"]
            return values
        if doc["kind"] == "Application":
            values = doc["spec"]["source"]["helm"]["valuesObject"]
            return values
    raise AssertionError(f"no values in {path}")


@pytest.mark.parametrize("example", ["flux-helmrelease.yaml", "argocd-application.yaml"])
def test_example_values_pass_the_chart_schema(example: str, tmp_path: Path) -> None:
    from tests.cluster.test_helm_chart import render

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(values_of(GITOPS / example)))
    docs = render("--values", str(values))
    assert any(d["kind"] == "Deployment" for d in docs)
