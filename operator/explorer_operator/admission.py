"""Admission rules: a job the builders could not turn into valid Kubernetes objects is refused by the API server.

The limits are measured on the builders' own output at the largest indices the schema allows, never typed in: a new
child or a longer suffix moves them, and the CRD drift test then asks for a regeneration. Each rule exists twice,
as CEL for the CRD and as a Python predicate for the operator (a job stored before a rule existed still fails with
``InvalidSpec`` naming the field); a unit test evaluates both on the same objects.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any, Literal, cast

import annotated_types
from pydantic import BaseModel

from explorer_operator import builders, models

DNS_LABEL_MAX = 63  # Service names (DNS-1035), pod hostnames and subdomains (DNS-1123 labels), label values
DNS_SUBDOMAIN_MAX = 253  # every other object name
DNS1035_LABEL = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
PORT_MAX = 65535


def _bound(model: type[BaseModel], field: str) -> int:
    """The upper bound the schema puts on a field: ``le`` for a number, ``max_length`` for a string."""
    for meta in model.model_fields[field].metadata:
        if isinstance(meta, annotated_types.Le):
            return cast(int, meta.le)
        if isinstance(meta, annotated_types.MaxLen):
            return meta.max_length
    raise LookupError(f"{model.__name__}.{field} has no upper bound")


MAX_ENGINE_INDEX = _bound(models.EngineGroupSpec, "replicas") - 1
MAX_WORKER_INDEX = _bound(models.CoordinatorSpec, "cpu_workers") - 1
MAX_GROUP_NAME = _bound(models.AuxiliaryEngineGroupSpec, "name")


def probe_spec(groups: list[str]) -> models.ExplorerJobSpec:
    """The smallest valid spec, with an auxiliary group per name."""
    aux = [{"name": g, "model": {"path": "/m"}} for g in groups]
    return models.ExplorerJobSpec.model_validate({"model": {"path": "/m"}, "taskset": {"path": "/t"},
                                                  "auxiliaryModels": aux})  # fmt: skip


def build_probe_children(job: builders.JobRef, spec: models.ExplorerJobSpec) -> list[dict[str, Any]]:
    """Every kind of child the builders make, with each kind of pod at the smallest and the largest index."""
    pods = [builders.build_coordinator_pod(job, spec)]
    pods += [builders.build_worker_pod(job, spec, i) for i in (0, MAX_WORKER_INDEX)]
    for group in builders.engine_groups(spec):
        pods += [builders.build_engine_pod(job, spec, group, i) for i in (0, MAX_ENGINE_INDEX)]
    return [*builders.build_static_children(job, spec), *pods]


def label_limited(obj: dict[str, Any]) -> list[str]:
    """The strings of one child that must fit in a DNS label: label values, Service names, hostname, subdomain."""
    names = list(obj["metadata"]["labels"].values())
    if obj["kind"] == "Service":
        names.append(obj["metadata"]["name"])
    if obj["kind"] == "Pod":
        names += [obj["spec"][key] for key in ("hostname", "subdomain") if key in obj["spec"]]
    return names


def _probe_job(name: str) -> builders.JobRef:
    return builders.JobRef(name=name, namespace="ns", uid="uid")


def _too_long(job_name: str, groups: list[str]) -> list[str]:
    """The names of the children of this job that break their length limit."""
    children = build_probe_children(_probe_job(job_name), probe_spec(groups))
    long_labels = [n for c in children for n in label_limited(c) if len(n) > DNS_LABEL_MAX]
    return long_labels + [c["metadata"]["name"] for c in children if len(c["metadata"]["name"]) > DNS_SUBDOMAIN_MAX]


@dataclasses.dataclass(frozen=True)
class Budget:
    """Name limits measured on the builders' output."""

    job_name: int  # the longest job name whose children all have valid names
    job_binding: tuple[str, ...]  # the children that overflow one character later, as '<name>-suffix'
    job_and_group: int  # the largest len(job name) + len(group name) that fits, for every group name length
    reserved_groups: tuple[str, ...]  # group names whose children would take a name the job's own children have


def _collides(group: str) -> bool:
    """Whether a group of this name gives two children of one kind the same name."""
    children = build_probe_children(_probe_job("j"), probe_spec([group]))
    keys = [(c["kind"], c["metadata"]["name"]) for c in children]
    return len(keys) != len(set(keys))


def _longest_job_name() -> int:
    """Binary search: the longest job name (no groups) whose children all fit."""
    fits, too_long = 1, DNS_SUBDOMAIN_MAX + 1
    while too_long - fits > 1:
        mid = (fits + too_long) // 2
        fits, too_long = (fits, mid) if _too_long("a" * mid, []) else (mid, too_long)
    return fits


def _longest_total(job_max: int) -> int:
    """The largest T such that every job name of at most ``job_max`` with a group name, both at most T together,
    fits: for each group length, the longest job name that fits, where that is shorter than ``job_max``."""
    total = job_max + MAX_GROUP_NAME
    for group_len in range(1, MAX_GROUP_NAME + 1):
        job_len = min(job_max, total - group_len)
        while job_len > 0 and _too_long("a" * job_len, ["b" * group_len]):
            job_len -= 1
        if job_len < job_max:
            total = min(total, job_len + group_len)
    return total


@functools.cache
def budget() -> Budget:
    """Measure the limits (a few dozen builder calls, once per process)."""
    job_max = _longest_job_name()
    binding = tuple(sorted({"<name>" + n[job_max + 1 :] for n in _too_long("a" * (job_max + 1), [])}))
    own = build_probe_children(_probe_job("j"), probe_spec([]))  # a group's children are named '<job>-<group>[-i]'
    stems = {re.sub(r"-\d+$", "", c["metadata"]["name"].removeprefix("j-")) for c in own} | {builders.ROLLOUT_GROUP}
    candidates = (s for s in stems if re.fullmatch(DNS1035_LABEL, s) and len(s) <= MAX_GROUP_NAME)
    reserved = tuple(sorted(s for s in candidates if _collides(s)))
    return Budget(job_max, binding, _longest_total(job_max), reserved)


Check = Callable[[str, models.ExplorerJobSpec], bool]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One admission rule: CEL at ``scope`` in the CRD (``self`` is the object or its spec), and the same in Python."""

    scope: Literal["root", "spec"]
    cel: str
    message: str
    holds: Check

    def validation(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message}


def _name_rules(b: Budget) -> list[Rule]:
    job, children = "self.metadata.name", " and ".join(b.job_binding)
    groups_fit = f"self.spec.auxiliaryModels.all(g, size({job}) + size(g.name) <= {b.job_and_group})"
    return [
        Rule("root", f"{job}.matches('{DNS1035_LABEL}')",
             "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and "
             "ending with a letter or digit (no '.'), because the job's Services are named after it",
             lambda name, _: re.fullmatch(DNS1035_LABEL, name) is not None),
        Rule("root", f"size({job}) <= {b.job_name}",
             f"metadata.name must be at most {b.job_name} characters: the job's children {children} must fit in "
             f"{DNS_LABEL_MAX} (Service names, pod hostnames); choose a shorter name",
             lambda name, _: len(name) <= b.job_name),
        Rule("root", groups_fit,
             f"metadata.name and each spec.auxiliaryModels[].name must together be at most {b.job_and_group} "
             f"characters: a group's pods are named <name>-<group>-{MAX_ENGINE_INDEX} and must fit in "
             f"{DNS_LABEL_MAX} (pod hostnames); shorten the group name or the job name",
             lambda name, s: all(len(name) + len(g.name) <= b.job_and_group for g in s.auxiliary_models)),
        Rule("spec", f"self.auxiliaryModels.all(g, !(g.name in {list(b.reserved_groups)}))",
             f"spec.auxiliaryModels[].name must not be one of {', '.join(b.reserved_groups)}: the job's own Services "
             "and pods take those names; choose another group name",
             lambda _, s: not {g.name for g in s.auxiliary_models} & set(b.reserved_groups)),
        Rule("spec", "self.auxiliaryModels.all(g, self.auxiliaryModels.exists_one(h, h.name == g.name))",
             "spec.auxiliaryModels[].name must be unique: each group gets a Service and pods named after it",
             lambda _, s: len({g.name for g in s.auxiliary_models}) == len(s.auxiliary_models)),
    ]  # fmt: skip


def _port_rules() -> list[Rule]:
    """The coordinator pod serves Ray, its status API and the sync API (groups form over it: no store ports)."""
    ray, api, sync = builders.RAY_PORT, "self.coordinator.apiPort", "self.sync.port"
    return [
        Rule("spec", f"{api} != {ray}",
             f"spec.coordinator.apiPort must not be {ray}: the coordinator Service also carries Ray on {ray}; "
             "choose another port",
             lambda _, s: s.coordinator.api_port != ray),
        Rule("spec", f"{sync} != {ray}",
             f"spec.sync.port must not be {ray}: the coordinator pod serves Ray on {ray}; choose another port",
             lambda _, s: s.sync.port != ray),
        Rule("spec", f"{api} != {sync}",
             "spec.coordinator.apiPort and spec.sync.port must differ: the coordinator pod serves both",
             lambda _, s: s.coordinator.api_port != s.sync.port),
    ]  # fmt: skip


def _workflow_rules() -> list[Rule]:
    """Workflows that need more than the rollout group."""
    return [
        Rule("spec", "!has(self.workflow) || self.workflow.name != 'judge' || "
                     "(has(self.auxiliaryModels) && size(self.auxiliaryModels) > 0)",
             "spec.workflow.name judge scores with an auxiliary engine group: add one to spec.auxiliaryModels "
             "(and name it in spec.workflow.args.judgeModel if there are several)",
             lambda _, s: s.workflow.name != "judge" or bool(s.auxiliary_models)),
        Rule("spec", "!has(self.explore) || !has(self.explore.overRollout) || "
                     "self.explore.overRollout.minTasks <= self.explore.batchSize",
             "spec.explore.overRollout.minTasks must not exceed spec.explore.batchSize: a step has only that many "
             "tasks to wait for",
             lambda _, s: s.explore.over_rollout is None or s.explore.over_rollout.min_tasks <= s.explore.batch_size),
        Rule("spec", "!has(self.explore) || !has(self.explore.overRollout) || "
                     "(has(self.sync) && self.sync.style != 'fixed')",
             "spec.explore.overRollout needs spec.sync.style trainer_driven or async: with fixed, every step is "
             "trained on the policy it was explored with, and a straggler committed later would break that",
             lambda _, s: s.explore.over_rollout is None or s.sync.style != "fixed"),
    ]  # fmt: skip


@functools.cache
def rules() -> tuple[Rule, ...]:
    """Every admission rule, names first."""
    return (*_name_rules(budget()), *_port_rules(), *_workflow_rules())


def problems(job_name: str, spec: models.ExplorerJobSpec) -> list[str]:
    """The messages of the rules this job breaks (what the API server would have refused)."""
    return [rule.message for rule in rules() if not rule.holds(job_name, spec)]


def crd_validations(scope: Literal["root", "spec"]) -> list[dict[str, str]]:
    """The ``x-kubernetes-validations`` entries for the CRD root or its spec."""
    return [rule.validation() for rule in rules() if rule.scope == scope]
