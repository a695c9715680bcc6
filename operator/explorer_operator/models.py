"""The ExplorerJob API (v1alpha1): pydantic spec and status, the single source of the CRD in ``crds/``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from explorer.config import (
    ExperienceSpec,
    ExploreSpec,
    ModelSpec,
    SchedulerSpec,
    SyncSpec,
    TasksetSpec,
    WireModel,
    WorkflowSpec,
)
from explorer.status_api import EvalResult  # the status mirrors what the coordinator reports

GROUP = "explorer.rft.dev"
VERSION = "v1alpha1"
KIND = "ExplorerJob"
PLURAL = "explorerjobs"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes core types we pass through untouched (validated by the API server when the pod is created).
K8sObject = dict[str, Any]


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


class EngineGroupSpec(WireModel):
    """Pods that run vLLM engines for one model."""

    replicas: int = Field(default=1, ge=0, le=4096, description="Number of engines (scale subresource).")
    image: str = Field(default="ghcr.io/rft-explorer/runtime:0.1.0", min_length=1, description="Engine image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(default=None)
    device: Literal["gpu", "cpu"] = Field(
        default="gpu",
        description="gpu: each engine requests tensorParallelSize nvidia.com/gpu; cpu: vLLM's CPU backend, no GPU "
        "request (size the pod with resources).",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the engine's OpenAI-compatible API.")
    resources: K8sObject = Field(
        default_factory=dict, description="Container resources; nvidia.com/gpu is set from tensorParallelSize."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[K8sObject] = Field(default_factory=list)
    affinity: K8sObject | None = Field(default=None)
    priority_class_name: str | None = Field(default=None)
    env: list[K8sObject] = Field(default_factory=list, description="Extra container environment.")
    volumes: list[K8sObject] = Field(default_factory=list, description="Pod volumes, e.g. a model cache.")
    volume_mounts: list[K8sObject] = Field(default_factory=list, description="Container volume mounts.")


class AuxiliaryEngineGroupSpec(EngineGroupSpec):
    """An extra engine group, e.g. a judge model (the seed's auxiliary_models)."""

    name: str = Field(
        min_length=1,
        max_length=20,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="Group name (a DNS-1035 label): its Service is <job>-<name>, its pods <job>-<name>-<index>.",
    )
    model: ModelSpec


class CoordinatorSpec(WireModel):
    """The coordinator pod (Ray head + explorer driver, CPU only) and optional CPU workers."""

    image: str | None = Field(default=None, description="Defaults to the engine image.")
    resources: K8sObject = Field(
        default_factory=lambda: {"requests": {"cpu": "2", "memory": "8Gi"}}, description="Coordinator resources."
    )
    api_port: int = Field(default=8080, ge=1, le=65535, description="Port of the coordinator's status API.")
    cpu_workers: int = Field(default=0, ge=0, le=1024, description="Extra Ray worker pods for heavy workflows.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[K8sObject] = Field(default_factory=list)
    volumes: list[K8sObject] = Field(
        default_factory=list, description="Pod volumes of the coordinator and CPU workers, e.g. a taskset on a PVC."
    )
    volume_mounts: list[K8sObject] = Field(
        default_factory=list, description="Container volume mounts of the coordinator and CPU workers."
    )


QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


AccessMode = Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]


class ClaimTemplateSpec(WireModel):
    """The PersistentVolumeClaim the operator creates for the job, named <job>-data."""

    size: str = Field(default="10Gi", pattern=QUANTITY, description="Requested storage, e.g. 10Gi.")
    storage_class_name: str | None = Field(default=None, description="StorageClass; unset: the cluster's default.")
    access_modes: list[AccessMode] = Field(
        default_factory=lambda: list[AccessMode](["ReadWriteOnce"]), min_length=1, description="Access modes."
    )
    volume_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, description="Bind to this PersistentVolume (statically provisioned)."
    )


class StorageRetentionSpec(WireModel):
    """What happens to a claim the operator created (StatefulSet's persistentVolumeClaimRetentionPolicy)."""

    when_deleted: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description="Retain: the claim outlives the job, and a job created again under the same name resumes on it; "
        "Delete: it is garbage-collected with the job.",
    )


class StorageSpec(WireModel):
    """Durable storage of the coordinator: the experience log, its manifest and the resume state live there, so a
    replaced coordinator resumes at the last committed step and a trainer can read the step files."""

    claim_template: ClaimTemplateSpec | None = Field(
        default=None,
        description="A claim the operator creates and owns.",
        json_schema_extra=_cel("self == oldSelf", "storage.claimTemplate is immutable: create a new job to change it"),
    )
    existing_claim: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        description="A claim that already exists in the job's namespace (never modified or deleted).",
        json_schema_extra=_cel("self == oldSelf", "storage.existingClaim is immutable: create a new job to change it"),
    )
    retention_policy: StorageRetentionSpec = Field(default_factory=StorageRetentionSpec)

    @model_validator(mode="after")
    def _exactly_one_claim(self) -> StorageSpec:
        if (self.claim_template is None) == (self.existing_claim is None):
            raise ValueError("storage needs exactly one of claimTemplate and existingClaim")
        return self


class RestartPolicySpec(WireModel):
    """Bounded, backed-off replacement of failed pods."""

    max_restarts: int = Field(default=5, ge=0, le=1000, description="Pod replacements before the job fails.")
    backoff_seconds: float = Field(default=10, ge=0, le=3600, description="First backoff; doubles per restart.")
    max_backoff_seconds: float = Field(default=300, ge=0, le=86400, description="Backoff ceiling.")


OnCompletion = Literal["DeleteEngines", "KeepAll", "DeleteAll"]


class ExplorerJobSpec(WireModel):
    """A rollout cluster: vLLM engines, a coordinator, a weight-sync rendezvous, and what to explore."""

    model: ModelSpec
    engines: EngineGroupSpec = Field(default_factory=EngineGroupSpec)
    auxiliary_models: list[AuxiliaryEngineGroupSpec] = Field(default_factory=list, max_length=8)
    coordinator: CoordinatorSpec = Field(default_factory=CoordinatorSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    taskset: TasksetSpec
    workflow: WorkflowSpec = Field(
        default_factory=WorkflowSpec,
        json_schema_extra=_cel(
            "self.name != 'custom' || has(self.importPath)", "workflow.importPath is required when name is custom"
        ),
    )
    explore: ExploreSpec = Field(
        default_factory=ExploreSpec,
        json_schema_extra=_cel(
            "self.evalInterval <= self.totalSteps", "explore.evalInterval must not exceed explore.totalSteps"
        ),
    )
    sync: SyncSpec = Field(
        default_factory=SyncSpec,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.method != 'checkpoint' || has(self.checkpointPath)",
                    "message": "sync.checkpointPath is required when sync.method is checkpoint",
                },
                {
                    "rule": "self.style != 'async' || has(self.maxPolicyLag)",
                    "message": "sync.maxPolicyLag is required when sync.style is async",
                },
            ]
        },
    )
    experiences: ExperienceSpec = Field(default_factory=ExperienceSpec)
    suspend: bool = Field(default=False, description="Remove every pod but keep the job; false brings them back.")
    restart_policy: RestartPolicySpec = Field(default_factory=RestartPolicySpec)
    startup_deadline_seconds: int = Field(
        default=1800, ge=10, description="Fail the job if it is not Ready this long after (re)starting."
    )
    on_completion: OnCompletion = Field(default="DeleteEngines", description="What to remove when the job succeeds.")
    storage: StorageSpec | None = Field(
        default=None,
        description="Durable storage mounted at /var/lib/explorer in the coordinator; experiences.path defaults to "
        "its experiences/ directory. Unset: the log lives wherever experiences.path points.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.claimTemplate) != has(self.existingClaim)",
                    "message": "storage needs exactly one of claimTemplate and existingClaim",
                },
                {
                    "rule": "has(self.claimTemplate) == has(oldSelf.claimTemplate)",
                    "message": "storage cannot switch between claimTemplate and existingClaim: the job's data is on "
                    "the claim it has",
                },
            ]
        },
    )


Phase = Literal["Pending", "Initializing", "Running", "Succeeded", "Failed", "Suspended"]
ConditionType = Literal["Ready", "Progressing", "Degraded", "Synced", "Suspended", "Failed"]


class Condition(WireModel):
    """A Kubernetes API-convention condition."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class EngineCounts(WireModel):
    """Engine pods desired, ready (probes pass) and in the sync group at the current version."""

    desired: int = 0
    current: int = 0
    ready: int = 0
    in_sync: int = 0
    selector: str = ""


class LastSync(WireModel):
    time: str | None = None
    duration_seconds: float | None = None
    bytes: int | None = None


class SyncStatus(WireModel):
    address: str = Field(description="host:port of the weight-sync rendezvous (the headless sync Service).")
    credentials_secret: str | None = Field(
        default=None,
        description="The job's Secret; a trainer presents its key trainer-token as a bearer token on the sync API.",
    )


class PendingRestart(WireModel):
    """A failed pod waiting out its backoff before it is recreated."""

    pod: str
    not_before: str
    reason: str = ""


class ExplorerJobStatus(WireModel):
    phase: Phase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    engines: EngineCounts = Field(default_factory=EngineCounts)
    step: int = 0
    total_steps: int = 0
    policy_version: int | None = None
    last_sync: LastSync | None = None
    sync: SyncStatus | None = None
    start_time: str | None = None
    ready_time: str | None = None
    completion_time: str | None = None
    restarts: int = 0
    pending_restarts: list[PendingRestart] = Field(default_factory=list)
    eval: dict[str, EvalResult] = Field(default_factory=dict, description="Latest evaluation of each eval set.")
