"""The Helm chart on the real local plane: lint and schema, template snapshots, upgrade of the CRD, and the
operator running with the chart's ServiceAccount token (enough to reconcile a job, refused what it does not need).

The chart is installed on a plane of its own: its CRD is the chart's, and no session operator competes for jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from explorer_operator import builders, models
from explorer_operator.local import running_operator
from kubeplane import cluster, paths
from tests.cluster.test_operator import job_manifest
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
CHART = paths.repo_root() / "helm" / "explorer-operator"
SNAPSHOTS = Path(__file__).parent / "snapshots"
RELEASE, NAMESPACE = "eo", "explorer-system"
CRD = f"{models.PLURAL}.{models.GROUP}"
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "namespaced": ["--set", "rbac.scope=namespace", "--set", "rbac.watchNamespaces={team-a,team-b}"],
    "monitoring": [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=kps",
    ],
    "minimal": ["--set", "crds.install=false", "--set", "replicaCount=1", "--set", "metrics.enabled=false"],
}


def helm_binary() -> str:
    """The helm the plane's build made (cached; built if missing)."""
    from kubeplane import build

    helm = next(c for c in build.COMPONENTS if "helm" in c.binaries)
    return str(build.ensure_built((helm,), log=False)[helm.name].directory / "helm")


def run(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def render(*values: str) -> list[dict[str, Any]]:
    out = run([helm_binary(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_chart_lints_and_its_schema_refuses_bad_values() -> None:
    for values in VARIANTS.values():
        run([helm_binary(), "lint", "--strict", str(CHART), *values])
    bad = run([helm_binary(), "template", RELEASE, str(CHART), "--set", "rbac.scope=everything"], check=False)
    assert bad.returncode != 0 and "rbac/scope" in bad.stderr and "'cluster', 'namespace'" in bad.stderr
    typo = run([helm_binary(), "template", RELEASE, str(CHART), "--set", "replicas=3"], check=False)
    assert typo.returncode != 0 and "replicas" in typo.stderr  # unknown keys are errors, not silently ignored


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_chart_matches_its_snapshot(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    # The CRD is generated from the models and checked by its own drift test; keep snapshots readable.
    text = yaml.safe_dump_all([d for d in docs if d["kind"] != "CustomResourceDefinition"], sort_keys=True)
    snapshot = SNAPSHOTS / f"helm-{variant}.yaml"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        snapshot.write_text(text)
    assert snapshot.read_text() == text, f"chart output changed: review, then UPDATE_SNAPSHOTS=1 pytest {__file__}"


def test_rendered_chart_is_least_privilege_and_restricted() -> None:
    default = render()
    (crd,) = by_kind(default, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (deployment,) = by_kind(default, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2 and pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    assert "--all-namespaces" in container["args"]
    (role,) = by_kind(default, "ClusterRole")
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert not {r for _, r in granted} & {"nodes", "customresourcedefinitions", "*"}
    # Secrets: only the jobs' own credentials are made and rotated; none is ever updated wholesale or deleted.
    secret_verbs = {v for rule in role["rules"] if "secrets" in rule["resources"] for v in rule["verbs"]}
    assert secret_verbs == {"get", "list", "watch", "create", "patch"}
    assert ("explorer.rft.dev", "explorerjobs") in granted and ("networking.k8s.io", "networkpolicies") in granted
    assert by_kind(default, "PodDisruptionBudget")
    (policy,) = by_kind(default, "NetworkPolicy")
    assert sorted(p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]) == [8080, 9090]

    namespaced = render(*VARIANTS["namespaced"])
    assert not by_kind(namespaced, "ClusterRole") and not by_kind(namespaced, "ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(namespaced, "Role")}
    assert {("team-a", "eo-explorer-operator"), ("team-b", "eo-explorer-operator")} <= roles
    args = by_kind(namespaced, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args

    assert by_kind(render(*VARIANTS["monitoring"]), "ServiceMonitor")
    minimal = render(*VARIANTS["minimal"])
    assert not by_kind(minimal, "CustomResourceDefinition") and not by_kind(minimal, "PodDisruptionBudget")


@pytest.fixture(scope="module")
def chart_plane() -> Iterator[cluster.LocalCluster]:
    with cluster.LocalCluster(cluster.ClusterConfig(nodes=2)) as local:
        yield local


def previous_chart(tmp_path: Path) -> Path:
    """The chart as its previous release shipped it: version 0.0.9, a CRD without ``sync.generationDuringSync``."""
    old = tmp_path / "explorer-operator"
    shutil.copytree(CHART, old)
    chart = yaml.safe_load((old / "Chart.yaml").read_text())
    (old / "Chart.yaml").write_text(yaml.safe_dump({**chart, "version": "0.0.9"}))
    crd_file = old / "templates" / "crd.yaml"
    lines = crd_file.read_text().splitlines(keepends=True)
    header, body, footer = lines[:2], "".join(lines[2:-1]), lines[-1:]
    crd = yaml.safe_load(body)
    sync = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["sync"]
    del sync["properties"]["generationDuringSync"]
    sync["default"].pop("generationDuringSync", None)
    crd_file.write_text("".join(header) + yaml.safe_dump(crd, sort_keys=False) + "".join(footer))
    return old


def sync_properties(env: dict[str, str]) -> set[str]:
    crd = json.loads(run(["kubectl", "get", "crd", CRD, "-o", "json"], env).stdout)
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["sync"]
    return set(props["properties"])


def test_helm_upgrade_from_the_previous_chart_updates_the_crd(
    chart_plane: cluster.LocalCluster, tmp_path: Path
) -> None:
    env = chart_plane.env()
    install = [helm_binary(), "install", RELEASE, str(previous_chart(tmp_path)), "--namespace", NAMESPACE,
               "--create-namespace", "--wait", "--timeout", "120s"]  # fmt: skip
    run(install, env)
    assert "generationDuringSync" not in sync_properties(env)
    run([helm_binary(), "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--wait", "--timeout", "120s"], env)
    assert "generationDuringSync" in sync_properties(env)
    history = json.loads(run([helm_binary(), "history", RELEASE, "-n", NAMESPACE, "-o", "json"], env).stdout)
    assert [(h["revision"], h["chart"]) for h in history] == [(1, "explorer-operator-0.0.9"),
                                                              (2, "explorer-operator-0.1.0")]  # fmt: skip
    deployment = json.loads(run(["kubectl", "get", "deploy", f"{RELEASE}-explorer-operator", "-n", NAMESPACE,
                                 "-o", "json"], env).stdout)  # fmt: skip
    assert deployment["status"].get("readyReplicas") == 2


def sa_kubeconfig(local: cluster.LocalCluster, token: str, path: Path) -> Path:
    config = yaml.safe_load(local.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path.write_text(yaml.safe_dump(config))
    return path


def test_operator_with_the_charts_token_reconciles_a_job_and_is_refused_the_rest(
    chart_plane: cluster.LocalCluster, tmp_path: Path
) -> None:
    env = chart_plane.env()
    if run(["helm", "status", RELEASE, "-n", NAMESPACE], env, check=False).returncode != 0:
        run([helm_binary(), "install", RELEASE, str(CHART), "-n", NAMESPACE, "--create-namespace"], env)
    token = run(["kubectl", "create", "token", f"{RELEASE}-explorer-operator", "-n", NAMESPACE, "--duration", "1h"],
                env).stdout.strip()  # fmt: skip
    kubeconfig = sa_kubeconfig(chart_plane, token, tmp_path / "operator.kubeconfig")
    deployment = json.loads(run(["kubectl", "get", "deploy", f"{RELEASE}-explorer-operator", "-n", NAMESPACE, "-o",
                                 "json"], env).stdout)  # fmt: skip
    # The Deployment's own arguments (scope, lease), with health and metrics moved to free loopback ports.
    args = [a.replace("$(POD_NAMESPACE)", NAMESPACE) for a in
            deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            if not a.startswith(("--liveness", "--metrics-port", "--log-format"))]  # fmt: skip
    api = chart_plane.api_client()
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": "team"}})
    core.create_namespaced_secret("team", {"metadata": {"name": "hf-token"}, "stringData": {"token": "x"}})
    log = tmp_path / "operator.log"
    with running_operator(chart_plane, log, scope=args, kubeconfig=kubeconfig) as operator:
        operator.wait_live()
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object(models.GROUP, models.VERSION, "team", models.PLURAL,
                                               job_manifest("rbac-proof"))  # fmt: skip

        def running() -> dict[str, Any] | None:
            job = custom.get_namespaced_custom_object(models.GROUP, models.VERSION, "team", models.PLURAL, "rbac-proof")
            status = job.get("status", {})
            return job if status.get("phase") == "Running" and status.get("engines", {}).get("ready") == 2 else None

        job = wait_for(running, timeout=120, what="the job Running with 2 ready engines, reconciled by the SA")
        assert job["status"]["sync"]["address"] == f"rbac-proof-sync.team.svc:{job['spec']['sync']['port']}"
        selector = f"{builders.JOB_LABEL}=rbac-proof"
        policies = client.NetworkingV1Api(api).list_namespaced_network_policy("team", label_selector=selector)
        assert len(policies.items) == 3
        # Suspending exercises deletes and the operator's own Events (both part of what its Role must allow).
        custom.patch_namespaced_custom_object(models.GROUP, models.VERSION, "team", models.PLURAL, "rbac-proof",
                                              {"spec": {"suspend": True}})  # fmt: skip

        def suspended_event() -> list[dict[str, Any]]:
            out = run(["kubectl", "get", "events.events.k8s.io", "-n", "team", "-o", "json"], env).stdout
            return [e for e in json.loads(out)["items"] if e.get("reason") == "Suspended"
                    and e.get("regarding", {}).get("name") == "rbac-proof"]  # fmt: skip

        wait_for(suspended_event, timeout=60, what="the operator's Suspended event")
        wait_for(lambda: not core.list_namespaced_pod("team", label_selector=selector).items, timeout=60,
                 what="the job's pods deleted")  # fmt: skip
    text = log.read_text()
    assert "403" not in text and "Forbidden" not in text, text[-3000:]

    # ... and nothing more: the same token is refused what the operator never needs.
    sa_env = {**env, "KUBECONFIG": str(kubeconfig)}
    for argv in (
        # Secrets: it makes and rotates the jobs' credentials, so it may read Secrets (docs/security.md), but it
        # never deletes one.
        ["delete", "secret", "hf-token", "-n", "team"],
        ["get", "nodes"],
        ["delete", "crd", CRD, "--dry-run=server"],
        ["create", "namespace", "intruder"],
        ["patch", "ej", "rbac-proof", "-n", "team", "--type=merge", "-p", '{"spec":{"suspend":true}}'],
    ):
        refused = run(["kubectl", *argv], sa_env, check=False)
        assert refused.returncode != 0 and "Forbidden" in refused.stderr, (argv, refused.stderr)


def test_namespaced_mode_grants_nothing_outside_its_namespaces(chart_plane: cluster.LocalCluster) -> None:
    env = chart_plane.env()
    run([helm_binary(), "install", "scoped", str(CHART), "-n", "scoped-ops", "--create-namespace",
         "--set", "crds.install=false", "--set", "rbac.scope=namespace", "--set", "rbac.watchNamespaces={team}"],
        env)  # fmt: skip
    who = "system:serviceaccount:scoped-ops:scoped-explorer-operator"

    def can(*argv: str) -> bool:
        return run(["kubectl", "auth", "can-i", *argv, "--as", who], env, check=False).stdout.strip() == "yes"

    assert can("patch", "pods", "-n", "team") and can(
        "patch", "explorerjobs.explorer.rft.dev", "--subresource=status", "-n", "team"
    )
    assert not can("list", "pods", "-n", "default") and not can("list", "explorerjobs.explorer.rft.dev", "-A")
    assert can("update", "leases.coordination.k8s.io", "-n", "scoped-ops")
    # The jobs' credentials: Secrets in the watched namespaces only, never deleted; none elsewhere.
    assert can("create", "secrets", "-n", "team") and not can("delete", "secrets", "-n", "team")
    assert not can("get", "secrets", "-n", "default") and not can("list", "secrets", "-A")


def test_uninstall_keeps_the_crd_and_the_jobs(chart_plane: cluster.LocalCluster) -> None:
    env = chart_plane.env()
    if run(["helm", "status", RELEASE, "-n", NAMESPACE], env, check=False).returncode != 0:
        run([helm_binary(), "install", RELEASE, str(CHART), "-n", NAMESPACE, "--create-namespace"], env)
    custom = client.CustomObjectsApi(chart_plane.api_client())
    run(["kubectl", "create", "namespace", "keepers"], env)
    custom.create_namespaced_custom_object(models.GROUP, models.VERSION, "keepers", models.PLURAL,
                                           job_manifest("survivor"))  # fmt: skip
    run([helm_binary(), "uninstall", RELEASE, "-n", NAMESPACE, "--wait"], env)
    assert run(["kubectl", "get", "crd", CRD], env).returncode == 0
    assert custom.get_namespaced_custom_object(models.GROUP, models.VERSION, "keepers", models.PLURAL, "survivor")
