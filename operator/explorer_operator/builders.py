"""Pure builders: an ExplorerJob's spec in, whole Kubernetes manifests out. No I/O, clocks or randomness.

Every child carries owner references, the labels the operator watches by, and a template-hash annotation: the
reconciler compares hashes, so an unchanged world costs no write at all.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any

import yaml

from explorer import config as explorer_config
from explorer import credentials, engine_args, termination
from explorer_operator import models

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR_NAME = "explorer-operator"
JOB_LABEL = f"{models.GROUP}/job"
ROLE_LABEL = f"{models.GROUP}/role"
GROUP_LABEL = f"{models.GROUP}/engine-group"
INDEX_LABEL = f"{models.GROUP}/engine-index"
HASH_ANNOTATION = f"{models.GROUP}/template-hash"
ROLLOUT_GROUP = "rollout"
CONFIG_FILE = "explorer.yaml"
CONFIG_DIR = "/etc/explorer"
CONFIG_VOLUME = "config"  # the coordinator's volume for the job's ConfigMap
TERMINATION_LOG = "/dev/termination-log"
STORAGE_VOLUME = "explorer-storage"  # the coordinator's claim (spec.storage)
STORAGE_DIR = "/var/lib/explorer"
DEFAULT_EXPERIENCES_PATH: str = explorer_config.ExperienceSpec.model_fields["path"].default
SHM_VOLUME = "dshm"  # the engines' memory-backed /dev/shm
TMP_VOLUME = "tmp"  # every child's writable /tmp (HOME too): caches of vLLM, torch and Ray land there
TMP_DIR = "/tmp"  # noqa: S108 - an emptyDir mount point, private to the pod
SHM_DIR = "/dev/shm"  # noqa: S108 - likewise
CREDENTIALS_VOLUME = "credentials"  # the job's Secret, mounted at credentials.MOUNT_DIR
# A new value here (any string) makes the operator mint a new trainer token; the old one stays valid as
# trainer-token-previous until the next rotation.
ROTATE_ANNOTATION = f"{models.GROUP}/rotate-trainer-token"
ROTATED_FOR_ANNOTATION = f"{models.GROUP}/rotated-for"
RUN_AS = 1000  # the runtime images' user; set explicitly so images that default to root run unprivileged too
RAY_PORT = 6379
GPU = "nvidia.com/gpu"
# Sized for loading large checkpoints: up to 30 min to come up, then /health every 10 s.
STARTUP_PROBE_SECONDS = 1800
PROBE_PERIOD = 10


@dataclasses.dataclass(frozen=True)
class JobRef:
    """The identity of the ExplorerJob being built for."""

    name: str
    namespace: str
    uid: str


@dataclasses.dataclass(frozen=True)
class EngineGroup:
    """One engine group (the rollout model, or an auxiliary model) as laid out by the operator."""

    name: str
    model: explorer_config.ModelSpec
    pods: models.EngineGroupSpec

    def pod_name(self, job: JobRef, index: int) -> str:
        stem = "engine" if self.name == ROLLOUT_GROUP else self.name
        return f"{job.name}-{stem}-{index}"

    def service_name(self, job: JobRef) -> str:
        return f"{job.name}-engines" if self.name == ROLLOUT_GROUP else f"{job.name}-{self.name}"


def engine_groups(spec: models.ExplorerJobSpec) -> list[EngineGroup]:
    groups = [EngineGroup(ROLLOUT_GROUP, spec.model, spec.engines)]
    groups += [EngineGroup(aux.name, aux.model, aux) for aux in spec.auxiliary_models]
    return groups


def labels(job: JobRef, role: str, **extra: str) -> dict[str, str]:
    return {
        MANAGED_BY: OPERATOR_NAME,
        "app.kubernetes.io/name": "explorer",
        "app.kubernetes.io/instance": job.name,
        JOB_LABEL: job.name,
        ROLE_LABEL: role,
        **extra,
    }


def engine_selector(job: JobRef) -> str:
    return f"{JOB_LABEL}={job.name},{ROLE_LABEL}=engine,{GROUP_LABEL}={ROLLOUT_GROUP}"


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": models.API_VERSION,
        "kind": models.KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: JobRef, name: str, role: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": labels(job, role, **extra_labels),
        "ownerReferences": [owner_reference(job)],
    }


def restricted(pod_spec: dict[str, Any], read_only_root: bool) -> dict[str, Any]:
    """Make a child pod pass Pod Security "restricted": non-root, no privilege escalation, no capabilities, the
    runtime's default seccomp profile, no API token, and a writable /tmp (with HOME there) so that the root
    filesystem can be read-only where the workload writes nowhere else."""
    pod_spec["automountServiceAccountToken"] = False
    pod_spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                                   "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    pod_spec["volumes"] = [*pod_spec.get("volumes", []), {"name": TMP_VOLUME, "emptyDir": {}}]
    for container in pod_spec["containers"]:
        container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                        "readOnlyRootFilesystem": read_only_root}  # fmt: skip
        container["volumeMounts"] = [*container.get("volumeMounts", []), {"name": TMP_VOLUME, "mountPath": TMP_DIR}]
        container["env"] = [{"name": "HOME", "value": TMP_DIR}, *container.get("env", [])]  # first: the user's wins
    return pod_spec


def template_hash(obj: dict[str, Any]) -> str:
    """A stable hash of a manifest, ignoring its own hash annotation."""
    clean = json.loads(json.dumps(obj))
    clean.get("metadata", {}).get("annotations", {}).pop(HASH_ANNOTATION, None)
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


def with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = template_hash(obj)
    return obj


def sync_address(job: JobRef, spec: models.ExplorerJobSpec) -> str:
    """The one exact rendezvous address string every side uses."""
    return f"{job.name}-sync.{job.namespace}.svc:{spec.sync.port}"


def engine_url(job: JobRef, group: EngineGroup, index: int) -> str:
    host = f"{group.pod_name(job, index)}.{group.service_name(job)}.{job.namespace}.svc"
    return f"http://{host}:{group.pods.port}"


def build_explorer_config(job: JobRef, spec: models.ExplorerJobSpec) -> explorer_config.ExplorerConfig:
    """The runtime configuration rendered from the spec (engines at their stable DNS names)."""

    def group_config(group: EngineGroup, rank_base: int) -> explorer_config.EngineGroupConfig:
        tp = group.model.tensor_parallel_size
        endpoints = [
            explorer_config.EngineEndpoint(
                index=i, url=engine_url(job, group, i), rank_offset=rank_base + i * tp, world_size=tp
            )
            for i in range(group.pods.replicas)
        ]
        return explorer_config.EngineGroupConfig(name=group.name, model=group.model, engines=endpoints)

    rollout, *auxiliary = engine_groups(spec)
    return explorer_config.ExplorerConfig(
        job=job.name,
        namespace=job.namespace,
        rollout=group_config(rollout, 1),
        auxiliary=[group_config(g, 1) for g in auxiliary],
        scheduler=spec.scheduler,
        taskset=spec.taskset,
        workflow=spec.workflow,
        explore=spec.explore,
        sync=spec.sync,
        experiences=spec.experiences.model_copy(update={"path": experiences_path(spec)}),
        status_port=spec.coordinator.api_port,
    )


def experiences_path(spec: models.ExplorerJobSpec) -> str:
    """Where the coordinator keeps the experience log and resume state: on the job's storage unless the user chose
    another path."""
    if spec.storage is not None and spec.experiences.path == DEFAULT_EXPERIENCES_PATH:
        return f"{STORAGE_DIR}/experiences"
    return spec.experiences.path


def claim_name(job: JobRef, spec: models.ExplorerJobSpec) -> str | None:
    """The claim the coordinator mounts: the user's, or the one the operator makes (None: no storage)."""
    if spec.storage is None:
        return None
    return spec.storage.existing_claim or f"{job.name}-data"


def build_claim(job: JobRef, spec: models.ExplorerJobSpec) -> dict[str, Any] | None:
    """The job's PersistentVolumeClaim from ``storage.claimTemplate``. Owned by the job (and so garbage-collected
    with it) only under ``whenDeleted: Delete``; a retained claim carries the labels alone, like a StatefulSet's."""
    if spec.storage is None or spec.storage.claim_template is None:
        return None
    template = spec.storage.claim_template
    claim_spec: dict[str, Any] = {
        "accessModes": list(template.access_modes),
        "resources": {"requests": {"storage": template.size}},
    }
    if template.storage_class_name is not None:
        claim_spec["storageClassName"] = template.storage_class_name
    if template.volume_name is not None:
        claim_spec["volumeName"] = template.volume_name
    metadata = _metadata(job, f"{job.name}-data", "storage")
    if spec.storage.retention_policy.when_deleted == "Retain":
        del metadata["ownerReferences"]
    return with_hash({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": claim_spec})


def credentials_name(job: JobRef) -> str:
    return f"{job.name}-credentials"


def build_credentials(job: JobRef, tokens: dict[str, str], rotated_for: str | None = None) -> dict[str, Any]:
    """The job's Secret (``explorer/credentials.py``): ``tokens`` by key, made once (never re-applied with new
    values: the executor creates it, or rotates it under a resourceVersion precondition)."""
    metadata = _metadata(job, credentials_name(job), "credentials")
    if rotated_for is not None:
        metadata["annotations"] = {ROTATED_FOR_ANNOTATION: rotated_for}
    data = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(tokens.items())}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata, "data": data}


def secret_token(secret: dict[str, Any] | None, key: str) -> str | None:
    """One token of the job's Secret as observed (None: no Secret, or no such key)."""
    value = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value else None


def _mount_credentials(job: JobRef, pod_spec: dict[str, Any], keys: tuple[str, ...] | None = None) -> None:
    """The job's Secret (``keys``: only these) at ``credentials.MOUNT_DIR``, readable by the pod's group only."""
    source: dict[str, Any] = {"secretName": credentials_name(job), "defaultMode": 0o440}
    if keys is not None:
        source["items"] = [{"key": k, "path": k} for k in keys]
    pod_spec["volumes"] = [*pod_spec.get("volumes", []), {"name": CREDENTIALS_VOLUME, "secret": source}]
    for container in pod_spec["containers"]:
        mount = {"name": CREDENTIALS_VOLUME, "mountPath": credentials.MOUNT_DIR, "readOnly": True}
        container["volumeMounts"] = [*container.get("volumeMounts", []), mount]
        container["env"] = [*container.get("env", []), {"name": credentials.DIR_ENV, "value": credentials.MOUNT_DIR}]


def ray_token_env() -> list[dict[str, str]]:
    """Ray's token auth with the job token (the coordinator sets the same for its head itself)."""
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN_PATH", "value": f"{credentials.MOUNT_DIR}/{credentials.JOB_TOKEN}"}]  # fmt: skip


def build_config_map(job: JobRef, spec: models.ExplorerJobSpec) -> dict[str, Any]:
    rendered = yaml.safe_dump(build_explorer_config(job, spec).to_wire(), sort_keys=False)
    return with_hash(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(job, f"{job.name}-config", "config"),
            "data": {CONFIG_FILE: rendered},
        }
    )


def _service(
    job: JobRef, name: str, role: str, selector: dict[str, str], ports: list[dict[str, Any]], headless: bool
) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": selector, "ports": ports}
    if headless:
        spec.update(clusterIP="None", publishNotReadyAddresses=True)
    return with_hash({"apiVersion": "v1", "kind": "Service", "metadata": _metadata(job, name, role), "spec": spec})


def build_services(job: JobRef, spec: models.ExplorerJobSpec) -> list[dict[str, Any]]:
    """Sync rendezvous (headless), coordinator API, and one headless Service per engine group."""
    coordinator = {JOB_LABEL: job.name, ROLE_LABEL: "coordinator"}
    api_port = {"name": "api", "port": spec.coordinator.api_port, "targetPort": "api"}
    ray_port = {"name": "ray", "port": RAY_PORT, "targetPort": "ray"}
    services = [
        _service(job, f"{job.name}-sync", "sync", coordinator,
                 [{"name": "sync", "port": spec.sync.port, "targetPort": "sync"}], headless=True),
        _service(job, f"{job.name}-coordinator", "coordinator-api", coordinator, [api_port, ray_port], headless=False),
    ]  # fmt: skip
    for group in engine_groups(spec):
        selector = {JOB_LABEL: job.name, ROLE_LABEL: "engine", GROUP_LABEL: group.name}
        ports = [{"name": "http", "port": group.pods.port, "targetPort": "http"}]
        services.append(_service(job, group.service_name(job), "engines", selector, ports, headless=True))
    return services


def _gpu_resources(resources: dict[str, Any], gpus: int) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(resources))
    for kind in ("limits", "requests"):
        out.setdefault(kind, {})[GPU] = str(gpus)
    return out


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def build_engine_pod(job: JobRef, spec: models.ExplorerJobSpec, group: EngineGroup, index: int) -> dict[str, Any]:
    """One vLLM engine pod: GPUs = tensor-parallel size, probes sized for model loading, sync rank in env."""
    tp = group.model.tensor_parallel_size
    name = group.pod_name(job, index)
    args = engine_args.EngineArgs(
        model=group.model.path,
        served_model_name=group.model.served_name,
        host="0.0.0.0",  # inside the pod; the NetworkPolicy limits who reaches it
        port=group.pods.port,
        dtype=group.model.dtype,
        max_model_len=group.model.max_model_len,
        tensor_parallel_size=tp,
        weight_sync=spec.sync.method if group.name == ROLLOUT_GROUP else None,
        extra_args=tuple(group.model.extra_args),
    )
    rank_offset = 1 + index * tp if group.name == ROLLOUT_GROUP else 0
    env = [
        {"name": "EXPLORER_JOB", "value": job.name},
        {"name": "EXPLORER_ENGINE_GROUP", "value": group.name},
        {"name": "EXPLORER_ENGINE_INDEX", "value": str(index)},
        {"name": "EXPLORER_SYNC_ADDRESS", "value": sync_address(job, spec)},
        {"name": "EXPLORER_SYNC_RANK_OFFSET", "value": str(rank_offset)},
        # The weight-transfer routes exist only in vLLM's dev mode; they need the job token (explorer/http_auth.py),
        # and the NetworkPolicy keeps all but the job's own pods off the port.
        *({"name": k, "value": v} for k, v in engine_args.engine_env(args).items()),
        *group.pods.env,
    ]
    container: dict[str, Any] = {
        "name": "engine",
        "image": group.pods.image,
        "command": ["python3", "-m", engine_args.VLLM_SERVER_MODULE],
        "args": engine_args.build_vllm_serve_args(args),
        "ports": [{"name": "http", "containerPort": group.pods.port}],
        "env": env,
        "resources": _gpu_resources(group.pods.resources, tp) if group.pods.device == "gpu" else group.pods.resources,
        "startupProbe": _probe("/health", "http", PROBE_PERIOD, STARTUP_PROBE_SECONDS // PROBE_PERIOD),
        "readinessProbe": _probe("/health", "http", 5, 3),
        "livenessProbe": _probe("/health", "http", PROBE_PERIOD, 6),
        "terminationMessagePolicy": "FallbackToLogsOnError",  # a crash's log tail reaches the job's events
        "volumeMounts": [*group.pods.volume_mounts, {"name": SHM_VOLUME, "mountPath": SHM_DIR}],
    }
    if group.pods.image_pull_policy:
        container["imagePullPolicy"] = group.pods.image_pull_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator replaces failed engines within the job's restart budget
        "hostname": name,
        "subdomain": group.service_name(job),
        "enableServiceLinks": False,
        "containers": [container],
        "nodeSelector": group.pods.node_selector,
        "tolerations": group.pods.tolerations,
        # A container's default /dev/shm is 64 MiB: vLLM's engine core (and NCCL with TP > 1) needs more.
        "volumes": [*group.pods.volumes, {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}],
    }
    if group.pods.affinity:
        pod_spec["affinity"] = group.pods.affinity
    if group.pods.priority_class_name:
        pod_spec["priorityClassName"] = group.pods.priority_class_name
    metadata = _metadata(job, name, "engine", **{GROUP_LABEL: group.name, INDEX_LABEL: str(index)})
    _mount_credentials(job, pod_spec, keys=(credentials.JOB_TOKEN,))  # checked on every route but /health
    restricted(pod_spec, read_only_root=True)
    return with_hash({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec})


def build_coordinator_pod(job: JobRef, spec: models.ExplorerJobSpec) -> dict[str, Any]:
    """The coordinator: Ray head + explorer driver, hosting the status API and the sync rendezvous."""
    config_name = f"{job.name}-config"
    container: dict[str, Any] = {
        "name": "coordinator",
        "image": spec.coordinator.image or spec.engines.image,
        "command": ["python3", "-m", "explorer", "coordinator", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "ports": [
            {"name": "api", "containerPort": spec.coordinator.api_port},
            {"name": "sync", "containerPort": spec.sync.port},
            {"name": "ray", "containerPort": RAY_PORT},
        ],
        "env": [
            {"name": "EXPLORER_JOB", "value": job.name},
            {"name": "EXPLORER_SYNC_ADDRESS", "value": sync_address(job, spec)},
            {"name": termination.PATH_ENV, "value": TERMINATION_LOG},
        ],
        # The final report outlives the process there (explorer/termination.py); a crash leaves its log tail.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": spec.coordinator.resources,
        "readinessProbe": _probe("/healthz", "api", 5, 3),
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}],
    }
    # The configuration is mounted, not baked in: scaling engines updates the file in place without changing this
    # pod's template, so the coordinator (and its progress) survives a scale; it follows the file's engine list
    # while running (explorer/membership.py).
    metadata = _metadata(job, f"{job.name}-coordinator", "coordinator")
    pod_spec = _cpu_pod_spec(spec, container)
    own_volumes = [{"name": CONFIG_VOLUME, "configMap": {"name": config_name}}]
    claim = claim_name(job, spec)
    if claim is not None:
        own_volumes.append({"name": STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": claim}})
        container["volumeMounts"].append({"name": STORAGE_VOLUME, "mountPath": STORAGE_DIR})
    pod_spec["volumes"] = [*own_volumes, *pod_spec.get("volumes", [])]
    _mount_credentials(job, pod_spec)
    # Without storage the experience log and resume state default to a path on the root filesystem
    # (/data/experiences), which must then stay writable.
    restricted(pod_spec, read_only_root=claim is not None)
    return with_hash({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec})


def _cpu_pod_spec(spec: models.ExplorerJobSpec, container: dict[str, Any]) -> dict[str, Any]:
    """Pod settings shared by the coordinator and its CPU workers (placed where the coordinator spec says, with the
    user's volumes: workflows on the workers read the same data). Empty volume lists are left out, so pods built
    before the volumes field existed keep their template hash."""
    if spec.coordinator.volume_mounts:
        container["volumeMounts"] = [*container.get("volumeMounts", []), *spec.coordinator.volume_mounts]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator replaces failed pods within the job's restart budget
        "enableServiceLinks": False,
        "containers": [container],
        "nodeSelector": spec.coordinator.node_selector,
        "tolerations": spec.coordinator.tolerations,
    }
    if spec.coordinator.volumes:
        pod_spec["volumes"] = list(spec.coordinator.volumes)
    return pod_spec


def build_worker_pod(job: JobRef, spec: models.ExplorerJobSpec, index: int) -> dict[str, Any]:
    """A CPU-only Ray worker joining the coordinator's Ray head, for heavy workflows (runners spread onto it)."""
    container = {
        "name": "worker",
        "image": spec.coordinator.image or spec.engines.image,
        "command": ["ray", "start", "--block", f"--address={job.name}-coordinator.{job.namespace}.svc:{RAY_PORT}"],
        # The coordinator's Ray head requires the job token.
        "env": ray_token_env(),
        "resources": spec.coordinator.resources,
    }
    pod_spec = _cpu_pod_spec(spec, container)
    _mount_credentials(job, pod_spec, keys=(credentials.JOB_TOKEN,))
    restricted(pod_spec, read_only_root=True)
    metadata = _metadata(job, f"{job.name}-worker-{index}", "worker", **{INDEX_LABEL: str(index)})
    return with_hash({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec})


def build_desired_pods(job: JobRef, spec: models.ExplorerJobSpec) -> dict[str, dict[str, Any]]:
    """Every pod the job should have, by name (the coordinator first)."""
    pods = {f"{job.name}-coordinator": build_coordinator_pod(job, spec)}
    for index in range(spec.coordinator.cpu_workers):
        pods[f"{job.name}-worker-{index}"] = build_worker_pod(job, spec, index)
    for group in engine_groups(spec):
        for index in range(group.pods.replicas):
            pod = build_engine_pod(job, spec, group, index)
            pods[pod["metadata"]["name"]] = pod
    return pods


TRAINER_LABEL = f"{models.GROUP}/trainer-for"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": OPERATOR_NAME}


def _ports_except(excluded: set[int]) -> list[dict[str, Any]]:
    """TCP port ranges covering 1-65535 minus ``excluded`` (NetworkPolicy has no "all but" rule)."""
    ranges, start = [], 1
    for port in sorted(excluded):
        if port > start:
            ranges.append({"protocol": "TCP", "port": start, "endPort": port - 1})
        start = port + 1
    if start <= 65535:
        ranges.append({"protocol": "TCP", "port": start, "endPort": 65535})
    return ranges


def build_network_policies(job: JobRef, spec: models.ExplorerJobSpec) -> list[dict[str, Any]]:
    """Who may reach the job's pods: its own pods; trainers labelled ``trainer-for=<job>`` in the job's namespace (or
    those ``sync.trainerNamespaces`` names) on the coordinator's sync ports and on the rollout engines'
    group-transfer ports, never on the engines' HTTP port (vLLM dev mode opens control routes there); the operator
    on the coordinator's status port."""
    own = {"podSelector": {"matchLabels": {JOB_LABEL: job.name}}}
    trainers = [
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}},
         "podSelector": {"matchLabels": {TRAINER_LABEL: job.name}}}
        for namespace in spec.sync.trainer_namespaces or [job.namespace]
    ]  # fmt: skip
    operator_pods = {"namespaceSelector": {}, "podSelector": {"matchLabels": OPERATOR_POD_LABELS}}
    sync_ports = [{"protocol": "TCP", "port": spec.sync.port}]  # gloo groups form over the sync API: no store ports

    def policy(name: str, selector: dict[str, str], ingress: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"], "ingress": ingress}
        return with_hash({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                          "metadata": _metadata(job, name, "network-policy"), "spec": body})  # fmt: skip

    return [
        policy(f"{job.name}-isolation", {JOB_LABEL: job.name}, [{"from": [own]}]),
        policy(f"{job.name}-sync", {JOB_LABEL: job.name, ROLE_LABEL: "coordinator"}, [
            {"from": trainers, "ports": sync_ports},
            {"from": [operator_pods], "ports": [{"protocol": "TCP", "port": spec.coordinator.api_port}]},
        ]),
        policy(f"{job.name}-engine-transfer", {JOB_LABEL: job.name, ROLE_LABEL: "engine", GROUP_LABEL: ROLLOUT_GROUP},
               [{"from": trainers, "ports": _ports_except({spec.engines.port})}]),
    ]  # fmt: skip


def build_static_children(job: JobRef, spec: models.ExplorerJobSpec) -> list[dict[str, Any]]:
    """The ConfigMap, Services, NetworkPolicies and the storage claim (everything but pods)."""
    claim = build_claim(job, spec)
    return [build_config_map(job, spec), *build_services(job, spec), *build_network_policies(job, spec),
            *([claim] if claim else [])]  # fmt: skip
