"""Every job the API server admits builds into objects it accepts (issue #12: `my.job` and 52-character names were
admitted, then failed to reconcile forever). The validators are the API server's own rules, from
k8s.io/apimachinery/pkg/util/validation; the CEL rules are evaluated as the API server would (cel-python, RE2)."""

from __future__ import annotations

import re
from typing import Any

import celpy

from explorer_operator import admission, builders, crdgen, models, validation
from kubeplane import paths

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
BUDGET = admission.budget()
NAMESPACE = "n" * 63  # the longest namespace: engine URLs and the sync address must still be DNS names


def dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and re.fullmatch(rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*", value) is not None


def dns1123_label(value: str) -> bool:
    return len(value) <= 63 and re.fullmatch(DNS1123_LABEL, value) is not None


def dns1035_label(value: str) -> bool:
    return len(value) <= 63 and re.fullmatch(DNS1035_LABEL, value) is not None


def label_value(value: str) -> bool:
    return len(value) <= 63 and re.fullmatch(LABEL_VALUE, value) is not None


def label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    qualified = len(name) <= 63 and re.fullmatch(QUALIFIED_NAME, name) is not None
    return qualified and (not prefix or dns1123_subdomain(prefix))


def dns_name(host: str) -> bool:
    return len(host) <= 253 and all(dns1123_label(part) for part in host.split("."))


def group_names(count: int, length: int) -> list[str]:
    return [f"g{i}".ljust(length, "x") for i in range(count)]


def longest_spec(job_len: int, group_len: int) -> tuple[builders.JobRef, models.ExplorerJobSpec]:
    """A job of the given name length with the most auxiliary groups, every name as long as allowed."""
    aux = [{"name": name, "model": {"path": "/m"}} for name in group_names(8, group_len)]
    spec = models.ExplorerJobSpec.model_validate({
        "model": {"path": "/m"}, "taskset": {"path": "/t"}, "engines": {"replicas": 2},
        "coordinator": {"cpuWorkers": 2}, "auxiliaryModels": aux,
    })  # fmt: skip
    return builders.JobRef(name="j" * job_len, namespace=NAMESPACE, uid="uid"), spec


def _spec(overrides: dict[str, Any]) -> models.ExplorerJobSpec:
    body: dict[str, Any] = {"model": {"path": "/m"}, "taskset": {"path": "/t"}, **overrides}
    for aux in body.get("auxiliaryModels", []):
        aux.setdefault("model", {"path": "/m"})
    return models.ExplorerJobSpec.model_validate(body)


def every_child(job: builders.JobRef, spec: models.ExplorerJobSpec) -> list[dict[str, Any]]:
    """Every builder's output, pods at the largest indices the schema allows (and the small ones, digit by digit)."""
    pods = [*builders.build_desired_pods(job, spec).values(), builders.build_worker_pod(job, spec, 1023)]
    for group in builders.engine_groups(spec):
        pods += [builders.build_engine_pod(job, spec, group, i) for i in (9, 10, 999, 1000, 4095)]
    return [*builders.build_static_children(job, spec), *pods]


def name_errors(child: dict[str, Any]) -> list[str]:
    """What the API server would refuse about this object's names and labels."""
    meta, kind, spec = child["metadata"], child["kind"], child.get("spec", {})
    errors = [] if dns1123_subdomain(meta["name"]) else [f"{kind} name {meta['name']!r}"]
    if kind == "Service" and not dns1035_label(meta["name"]):
        errors.append(f"Service name {meta['name']!r} (DNS-1035 label)")
    for key, value in meta["labels"].items():
        if not (label_key(key) and label_value(value)):
            errors.append(f"{kind} {meta['name']} label {key}={value!r}")
    for key in ("hostname", "subdomain"):
        if key in spec and not dns1123_label(spec[key]):
            errors.append(f"Pod {meta['name']} {key} {spec[key]!r}")
    ports = [p.get("endPort", p["port"]) for rule in spec.get("ingress", []) for p in rule.get("ports", [])]
    errors += [f"{kind} {meta['name']} port {p}" for p in ports if not 1 <= p <= 65535]
    return errors


def test_every_child_of_the_longest_allowed_names_is_a_valid_object() -> None:
    """The longest job name, and 8 groups at the longest group name its budget leaves, at engine index 4095."""
    longest_group = admission.MAX_GROUP_NAME
    for job_len, group_len in ((BUDGET.job_name, BUDGET.job_and_group - BUDGET.job_name),
                               (BUDGET.job_and_group - longest_group, longest_group)):  # fmt: skip
        job, spec = longest_spec(job_len, group_len)
        assert validation.job_problems(job.name, spec) == []
        children = every_child(job, spec)
        assert [e for child in children for e in name_errors(child)] == []
        keys = [(c["kind"], c["metadata"]["name"]) for c in children]
        assert len(keys) == len(set(keys))
        urls = [builders.engine_url(job, g, 4095) for g in builders.engine_groups(spec)]
        hosts = [u.removeprefix("http://").rpartition(":")[0] for u in urls]
        assert all(dns_name(h) for h in [*hosts, builders.sync_address(job, spec).rpartition(":")[0]])


def test_one_character_more_would_break_a_child_so_the_budget_refuses_nothing_that_works() -> None:
    job, spec = longest_spec(BUDGET.job_name + 1, 1)
    assert any(name_errors(child) for child in every_child(job, spec))
    job, spec = longest_spec(BUDGET.job_and_group - admission.MAX_GROUP_NAME + 1, admission.MAX_GROUP_NAME)
    assert any(name_errors(child) for child in every_child(job, spec))
    assert BUDGET.job_binding == ("<name>-coordinator", "<name>-engine-4095")


def test_reserved_group_names_are_those_whose_children_would_collide_with_the_jobs_own() -> None:
    for name in [*BUDGET.reserved_groups, "judge"]:
        job, spec = builders.JobRef("rl", "ns", "uid"), admission.probe_spec([name])
        pods = [builders.build_coordinator_pod(job, spec), builders.build_worker_pod(job, spec, 0)]
        pods += [builders.build_engine_pod(job, spec, g, 0) for g in builders.engine_groups(spec)]
        keys = [(c["kind"], c["metadata"]["name"]) for c in [*builders.build_static_children(job, spec), *pods]]
        assert (len(keys) != len(set(keys))) == (name != "judge"), name
    assert set(BUDGET.reserved_groups) == {"coordinator", "engine", "engines", "rollout", "sync", "worker"}


def test_ports_at_the_edges_the_rules_allow_give_distinct_ports_in_range() -> None:
    for sync_port, api_port in ((65535, 8080), (6380, 6378), (6378, 6380), (29500, 29501), (29500, 29499)):
        spec = _spec({"sync": {"port": sync_port}, "coordinator": {"apiPort": api_port}})
        assert admission.problems("rl", spec) == [], (sync_port, api_port)
        job = builders.JobRef("rl", "ns", "uid")
        for service in builders.build_services(job, spec):
            numbers = [p["port"] for p in service["spec"]["ports"]]
            assert len(numbers) == len(set(numbers))
        container = builders.build_coordinator_pod(job, spec)["spec"]["containers"][0]
        opened = [p["containerPort"] for p in container["ports"]]
        assert len(opened) == len(set(opened)) and max(opened) <= 65535
        assert not [e for c in builders.build_network_policies(job, spec) for e in name_errors(c)]


CASES: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "valid": ("rl", {}, []),
    "dotted name": ("my.job", {}, ["metadata.name must be a DNS-1035 label"]),
    "leading digit": ("1job", {}, ["metadata.name must be a DNS-1035 label"]),
    "longest name": ("a" * BUDGET.job_name, {}, []),
    "name too long": ("a" * (BUDGET.job_name + 1), {}, ["metadata.name must be at most"]),
    "longest group": ("a" * (BUDGET.job_and_group - 20), {"auxiliaryModels": [{"name": "b" * 20}]}, []),
    "group too long": ("a" * (BUDGET.job_and_group - 19), {"auxiliaryModels": [{"name": "b" * 20}]},
                       ["metadata.name and each spec.auxiliaryModels[].name must together be at most"]),
    "reserved group": ("rl", {"auxiliaryModels": [{"name": "sync"}]}, ["spec.auxiliaryModels[].name must not be"]),
    "duplicate group": ("rl", {"auxiliaryModels": [{"name": "judge"}, {"name": "judge"}]},
                        ["spec.auxiliaryModels[].name must be unique"]),
    "api on ray": ("rl", {"coordinator": {"apiPort": 6379}}, ["spec.coordinator.apiPort must not be 6379"]),
    "api is sync": ("rl", {"coordinator": {"apiPort": 29500}}, ["spec.coordinator.apiPort and spec.sync.port must"]),
    "sync on ray": ("rl", {"sync": {"port": 6379}}, ["spec.sync.port must not be 6379"]),
    "judge alone": ("rl", {"workflow": {"name": "judge"}}, ["spec.workflow.name judge scores with an auxiliary"]),
    "judge and group": ("rl", {"workflow": {"name": "judge"}, "auxiliaryModels": [{"name": "judge"}]}, []),
}  # fmt: skip


def _cel_failures(rules: list[dict[str, str]], activation: dict[str, Any]) -> list[str]:
    env = celpy.Environment()
    self_value = celpy.json_to_cel(activation)
    return [r["message"] for r in rules if not env.program(env.compile(r["rule"])).evaluate({"self": self_value})]


def test_the_crds_cel_rules_and_the_operators_checks_refuse_the_same_jobs_with_the_same_messages() -> None:
    schema = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    root_rules = schema["x-kubernetes-validations"]
    spec_rules = schema["properties"]["spec"]["x-kubernetes-validations"]
    for case, (name, overrides, expected) in CASES.items():
        spec = _spec(overrides)
        wire = spec.to_wire()  # what the API server holds after defaulting
        obj = {"apiVersion": models.API_VERSION, "kind": models.KIND, "metadata": {"name": name}, "spec": wire}
        refused = _cel_failures(root_rules, obj) + _cel_failures(spec_rules, wire)
        assert refused == admission.problems(name, spec), case
        assert len(refused) == len(expected), (case, refused)
        assert all(m.startswith(e) for m, e in zip(refused, expected, strict=True)), (case, refused)
        assert all(p in validation.job_problems(name, spec) for p in refused)


def test_the_docs_state_the_measured_limits() -> None:
    text = (paths.repo_root() / "docs" / "operator.md").read_text()
    assert f"at most **{BUDGET.job_name}** characters" in text
    assert f"at most **{BUDGET.job_and_group}** characters" in text
    assert ", ".join(f"`{n}`" for n in BUDGET.reserved_groups[:-1]) + f" or `{BUDGET.reserved_groups[-1]}`" in text


def test_the_api_server_refuses_an_over_rollout_that_waits_for_more_tasks_than_a_step_has() -> None:
    """The explore section's own validator refuses it in Python; the CRD must refuse it before it is stored."""
    schema = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec_rules = schema["properties"]["spec"]["x-kubernetes-validations"]
    wire = _spec({}).to_wire()
    wire["explore"] = {**wire["explore"], "batchSize": 4, "overRollout": {"minTasks": 5, "waitSeconds": 0}}
    wire["sync"] = {**wire["sync"], "style": "trainer_driven"}
    [too_many] = _cel_failures(spec_rules, wire)
    assert too_many.startswith("spec.explore.overRollout.minTasks must not exceed spec.explore.batchSize")
    wire["explore"]["overRollout"]["minTasks"] = 4
    assert _cel_failures(spec_rules, wire) == []
    wire["sync"]["style"] = "fixed"  # as Trinity-RFT: over-rollout would commit stragglers of an older policy
    [fixed] = _cel_failures(spec_rules, wire)
    assert fixed.startswith("spec.explore.overRollout needs spec.sync.style trainer_driven or async")
