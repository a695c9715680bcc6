"""The explorer's configuration: one pydantic model shared by the runtime and the operator.

The operator embeds these sections in the ``ExplorerJob`` spec (the CRD schema is generated from them) and renders
an ``ExplorerConfig`` into the job's ConfigMap; the runtime in the coordinator pod reads that file back with the
same model. Field names are camelCase on the wire (Kubernetes style) and snake_case in Python.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """Base for every config/spec section: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data


Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class ModelSpec(WireModel):
    """The model an engine group serves."""

    path: str = Field(min_length=1, description="Model directory or URI on a volume the engines mount.")
    served_name: str = Field(
        default="policy", min_length=1, max_length=63, description="Name the engines serve the model under."
    )
    dtype: Dtype = Field(default="bfloat16", description="Weights and activation dtype.")
    max_model_len: int | None = Field(default=None, ge=16, le=1_048_576, description="Context length limit.")
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="GPUs per engine; each engine pod requests this many nvidia.com/gpu."
    )
    extra_args: list[str] = Field(default_factory=list, description="Extra `vllm serve` arguments, passed as given.")


class DynamicTimeoutSpec(WireModel):
    """A first attempt's limit: ``factor`` times the ``percentile`` of recent successful attempts."""

    percentile: float = Field(default=0.95, gt=0, le=1, description="Percentile of recent attempt durations.")
    factor: float = Field(default=3.0, ge=1, le=100, description="Multiple of that percentile a first attempt gets.")
    min_seconds: float = Field(default=30.0, gt=0, description="Never less than this.")
    min_samples: int = Field(default=20, ge=1, le=10_000, description="Successful attempts seen before it applies.")
    window: int = Field(default=256, ge=1, le=100_000, description="Recent attempts the percentile is taken over.")

    @model_validator(mode="after")
    def _window_holds_the_samples(self) -> DynamicTimeoutSpec:
        if self.min_samples > self.window:
            raise ValueError(f"minSamples ({self.min_samples}) must not exceed window ({self.window})")
        return self


class SchedulerSpec(WireModel):
    """How rollout tasks are dispatched to runners."""

    runners_per_engine: int = Field(default=8, ge=1, le=1024, description="Workflow runners bound to each engine.")
    max_retry_times: int = Field(default=2, ge=0, le=100, description="Retries of a failed or timed-out task.")
    task_timeout_seconds: float = Field(default=900, gt=0, description="Timeout of one attempt of one task.")
    dynamic_timeout: DynamicTimeoutSpec | None = Field(
        default=None,
        description="Cut stragglers early: a task's first attempt gets factor times the observed latency percentile "
        "(within minSeconds..taskTimeoutSeconds), retries the full taskTimeoutSeconds. Unset: taskTimeoutSeconds.",
    )
    max_repeat_times_per_runner: int | None = Field(
        default=None, ge=1, description="Split a task's repeats into chunks of at most this many per runner."
    )
    runner_processes: int | None = Field(
        default=None, ge=1, description="Ray actor processes the runners share (default: one per runner)."
    )


# Tasksets the runtime makes in memory (explorer.taskset), named in place of a path.
BUILTIN_TASKSETS = ("builtin:arithmetic",)


RewardName = Literal["math", "exact_match", "format", "math_and_format"]  # explorer.rewards.REWARDS


class TasksetSpec(WireModel):
    """A taskset file on a mounted volume."""

    name: str = Field(default="train", min_length=1, max_length=63, description="Name used in metrics.")
    path: str = Field(
        min_length=1,
        description="Absolute path of a JSONL or Parquet file (or directory) in the pod, or a built-in taskset "
        "(builtin:arithmetic).",
    )
    format: Literal["jsonl", "parquet"] | None = Field(default=None, description="File format; inferred if unset.")
    prompt_key: str = Field(default="question", description="Field holding the prompt.")
    response_key: str = Field(default="answer", description="Field holding the reference answer.")
    reward_key: str = Field(
        default="reward", description="Field naming a row's own reward (one of workflow.reward's values), if any."
    )


class EvalTasksetSpec(TasksetSpec):
    """An eval set: a taskset run ``repeatTimes`` times per task every ``explore.evalInterval`` steps."""

    name: str = Field(default="eval", min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Name of the eval set in status.eval, the manifest and metrics.")  # fmt: skip
    repeat_times: int = Field(default=1, ge=1, le=1024, description="Runs per task: the n of mean@n, best@n, pass@n.")
    pass_threshold: float = Field(default=1.0, description="A run passes (pass@k) when its reward is at least this.")


class WorkflowSpec(WireModel):
    """The workflow each task runs and how it is rewarded."""

    name: Literal["math", "chat", "tool_use", "judge", "custom"] = Field(
        default="math",
        description="Built-in workflow (math, chat, tool_use: multi-turn with a calculator tool, judge: an auxiliary "
        "model scores the reply), or custom.",
    )
    import_path: str | None = Field(
        default=None, description="`module:Class` of a custom workflow (required when name is custom)."
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Workflow arguments.")
    reward: RewardName = Field(
        default="math", description="Reward of the math, chat and tool_use workflows (a row may name its own)."
    )
    reward_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the reward.")
    temperature: float = Field(default=1.0, ge=0, le=10, description="Sampling temperature.")
    max_tokens: int = Field(default=1024, ge=1, description="Maximum generated tokens per response.")
    top_p: float = Field(
        default=1.0, gt=0, le=1, description="Nucleus sampling: smallest set of tokens with this mass."
    )
    top_k: int | None = Field(default=None, ge=1, description="Sample among the k most likely tokens (unset: all).")
    min_p: float = Field(default=0.0, ge=0, le=1, description="Drop tokens below this fraction of the top one's p.")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, max_length=16, description="Strings that end a response (not included in it)."
    )
    min_tokens: int = Field(default=0, ge=0, description="Tokens generated before EOS or a stop string may end it.")
    repetition_penalty: float = Field(default=1.0, gt=0, le=10, description="> 1 discourages repeated tokens.")
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, description="OpenAI presence penalty.")
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, description="OpenAI frequency penalty.")
    seed: int | None = Field(
        default=None,
        ge=0,
        description="Base sampling seed (a run batch gets seed + its first run id); unset: random.",
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Longer prompts keep their last N tokens (vLLM truncate_prompt_tokens)."
    )
    system_prompt: str | None = Field(default=None, description="System message the math and chat workflows prepend.")
    chat_template: bool = Field(
        default=True,
        description="math: apply the model's chat template (a user turn); false sends the raw prompt as a completion.",
    )

    @model_validator(mode="after")
    def _min_within_max(self) -> WorkflowSpec:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"minTokens ({self.min_tokens}) must not exceed maxTokens ({self.max_tokens})")
        return self

    def sampling(self) -> dict[str, Any]:
        """The vLLM request parameters besides n, max_tokens, temperature and seed (defaults left out)."""
        params: dict[str, Any] = {"top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                                  "stop": self.stop or None, "min_tokens": self.min_tokens,
                                  "repetition_penalty": self.repetition_penalty,
                                  "presence_penalty": self.presence_penalty,
                                  "frequency_penalty": self.frequency_penalty,
                                  "truncate_prompt_tokens": self.max_prompt_tokens}  # fmt: skip
        defaults = {"top_p": 1.0, "min_p": 0.0, "min_tokens": 0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0}  # fmt: skip
        return {k: v for k, v in params.items() if v is not None and defaults.get(k, object()) != v}

    def seed_for(self, run_id_base: int) -> int | None:
        return None if self.seed is None else self.seed + run_id_base


StepTimeoutPolicy = Literal["commit", "wait"]


class OverRolloutSpec(WireModel):
    """Commit a step once ``minTasks`` of its tasks are done (after ``waitSeconds`` more for the rest); its stragglers
    keep running and are committed with a later step (Trinity-RFT's over_rollout)."""

    min_tasks: int = Field(ge=1, description="Tasks of a step that must be done before it is committed.")
    wait_seconds: float = Field(default=0, ge=0, le=3600, description="Then wait this long for the others.")


class ExploreSpec(WireModel):
    """The explore schedule (the seed's buffer/explorer settings)."""

    batch_size: int = Field(default=32, ge=1, description="Tasks per step.")
    repeat_times: int = Field(default=8, ge=1, le=1024, description="Samples per task.")
    total_steps: int = Field(default=100, ge=1, description="Steps to explore before the job succeeds.")
    eval_interval: int = Field(default=0, ge=0, description="Evaluate every N steps (0: never).")
    eval_tasksets: list[EvalTasksetSpec] = Field(default_factory=list, max_length=32,
                                                 description="Eval sets, each with its own repeat count.")  # fmt: skip
    eval_on_start: bool = Field(default=False, description="Also evaluate before the first step (reported as step 0).")
    on_step_timeout: StepTimeoutPolicy = Field(
        default="commit",
        description="When a step's wait (taskTimeoutSeconds x (maxRetryTimes + 1)) expires: commit the tasks that "
        "finished and record the missing ones (the step's manifest entry, the status report's missingTasks), or "
        "wait for every task (each attempt is still bounded by taskTimeoutSeconds).",
    )
    over_rollout: OverRolloutSpec | None = Field(
        default=None,
        description="Do not wait for a step's stragglers: commit after minTasks, commit the rest with a later step "
        "(their experiences keep their batch id and the policy versions they ran on). The last step waits for all.",
    )

    @model_validator(mode="after")
    def _min_tasks_within_batch(self) -> ExploreSpec:
        if self.over_rollout is not None and self.over_rollout.min_tasks > self.batch_size:
            raise ValueError(f"overRollout.minTasks ({self.over_rollout.min_tasks}) must not exceed batchSize "
                             f"({self.batch_size})")  # fmt: skip
        return self


SyncMethod = Literal["nccl", "gloo", "checkpoint"]
SyncStyle = Literal["fixed", "trainer_driven", "async"]


class SyncSpec(WireModel):
    """How and when the trainer's weights reach the engines."""

    method: SyncMethod = Field(default="nccl", description="nccl on GPUs, gloo on CPU, or checkpoint reload.")
    style: SyncStyle = Field(default="fixed", description="When syncs happen (see docs).")
    interval: int = Field(default=1, ge=1, description="Sync every N explore steps.")
    offset: int = Field(default=0, ge=0, description="Steps the explorer may run ahead before the first sync.")
    max_policy_lag: int | None = Field(default=None, ge=1, description="Required for style async.")
    port: int = Field(default=29500, ge=1024, le=65535, description="Rendezvous port on the sync Service.")
    timeout_seconds: float = Field(default=120, gt=0, le=3600, description="Timeout of every blocking sync step.")
    checkpoint_path: str | None = Field(default=None, description="Shared directory for method checkpoint.")
    bucket_bytes: int = Field(
        default=256 << 20, ge=1 << 16, le=8 << 30, description="Packed chunk size of a broadcast push."
    )
    trainer_namespaces: list[Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]] = Field(
        default_factory=list,
        max_length=32,
        description="Namespaces whose pods labelled explorer.rft.dev/trainer-for=<job> the job's NetworkPolicy admits "
        "to the sync and group-transfer ports; empty: the job's own namespace only. (They still need the trainer "
        "token.)",
    )
    trainer_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="fixed/async styles: how long the explorer waits at a sync boundary for the trainer's push before "
        "it reports the trainer overdue (Degraded/TrainerOverdue) and takes onTrainerTimeout; unset: wait forever.",
    )
    on_trainer_timeout: Literal["Wait", "Fail"] = Field(
        default="Wait",
        description="Past trainerTimeoutSeconds: keep waiting (the job stays Degraded until a push arrives), or fail "
        "the job (Failed/TrainerTimeout, no restart: a new coordinator would only wait again).",
    )
    catch_up: bool = Field(
        default=True,
        description="Bring an engine that does not serve the job's policy version (restarted, added, or one whose "
        "apply failed) to it from a peer engine's copy at once (gloo and checkpoint methods); false, or NCCL (engines "
        "keep no copy): it stays out of the rotation until the trainer's next push.",
    )
    generation_during_sync: Literal["keep", "wait", "abort"] = Field(
        default="keep",
        description="While weights swap: keep in-flight requests (they finish on the new weights), wait for them "
        "to finish on the old ones, or abort them.",
    )


CONSUMER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"  # a trainer's stable name for its stream cursor
MAX_CONSUMERS = 16


class ExperienceSpec(WireModel):
    """Where experiences are written for the trainer."""

    path: str = Field(default="/data/experiences", min_length=1, description="Directory on a shared volume.")
    format: Literal["jsonl", "parquet"] = Field(default="parquet", description="File format of each step.")
    consumers: list[Annotated[str, Field(pattern=CONSUMER_PATTERN)]] = Field(
        default_factory=list,
        max_length=MAX_CONSUMERS,
        description="Trainers reading the experience stream, by consumer name: each counts for retention and "
        "back-pressure from the start, and no other name may read. Empty: a consumer registers on its first call.",
    )
    retention: Literal["keep", "consumed"] = Field(
        default="keep",
        description="keep every step file, or delete one once every consumer has acknowledged all of it (its "
        "manifest entry stays, marked removed).",
    )
    max_unconsumed_steps: int | None = Field(
        default=None,
        ge=1,
        description="Back-pressure: start no step while this many committed steps are unacknowledged by the slowest "
        "consumer (none registered: no limit; unset: never wait).",
    )
    drain_timeout_seconds: float = Field(
        default=600,
        ge=0,
        description="After the last step, keep serving the stream until every consumer has acknowledged every "
        "experience, for at most this long (no consumer: exit at once).",
    )


class EngineEndpoint(WireModel):
    """One engine the runtime talks to."""

    index: int = Field(ge=0)
    url: str
    rank_offset: int = Field(ge=1, description="First rank of this engine in the sync group (trainer is 0).")
    world_size: int = Field(ge=1, description="Ranks this engine contributes (its tensor-parallel size).")


class EngineGroupConfig(WireModel):
    """An engine group as the runtime sees it: the model and the engines' addresses."""

    name: str
    model: ModelSpec
    engines: list[EngineEndpoint]


class ExplorerConfig(WireModel):
    """Everything the coordinator's runtime needs; rendered by the operator into the job's ConfigMap."""

    job: str
    namespace: str
    rollout: EngineGroupConfig
    auxiliary: list[EngineGroupConfig] = Field(default_factory=list)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    taskset: TasksetSpec
    workflow: WorkflowSpec = Field(default_factory=WorkflowSpec)
    explore: ExploreSpec = Field(default_factory=ExploreSpec)
    sync: SyncSpec = Field(default_factory=SyncSpec)
    experiences: ExperienceSpec = Field(default_factory=ExperienceSpec)
    status_port: int = Field(default=8080, ge=1, le=65535)

    @model_validator(mode="after")
    def _judge_has_a_group(self) -> ExplorerConfig:
        if self.workflow.name == "judge" and not self.auxiliary:
            raise ValueError("workflow judge scores with an auxiliary engine group: configure one (auxiliary)")
        return self

    @model_validator(mode="after")
    def _sync_world(self) -> ExplorerConfig:
        expected = 1
        for engine in self.rollout.engines:
            if engine.rank_offset != expected:
                raise ValueError(f"engine {engine.index} has rank offset {engine.rank_offset}, expected {expected}")
            expected += engine.world_size
        return self
