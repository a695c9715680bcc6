"""Tasks and workflows: what one task is, and how its runs turn into rewarded experiences.

Built in: ``math`` (single turn, final-answer reward) and ``chat`` (multi-turn: the task's messages, the reply is
rewarded). ``custom`` loads ``module:Class`` from ``workflow.importPath``; a custom workflow implements ``run``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Protocol

from explorer import config, rewards
from explorer.experience import Experience
from explorer.inference import Completion, InferenceModel


@dataclasses.dataclass(frozen=True)
class Task:
    """One row of a taskset."""

    task_id: int
    prompt: str
    reference: str = ""
    messages: tuple[dict[str, str], ...] = ()
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)
    is_eval: bool = False


class Workflow(Protocol):
    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]: ...


def _experiences(task: Task, completions: list[Completion], reward: Any, run_id_base: int) -> list[Experience]:
    return [
        Experience(
            tokens=c.prompt_token_ids + c.token_ids,
            prompt_length=len(c.prompt_token_ids),
            logprobs=c.logprobs,
            reward=float(reward(c.text)),
            task_id=task.task_id,
            run_id=run_id_base + i,
            response_text=c.text,
            info={"finish_reason": c.finish_reason},
        )
        for i, c in enumerate(completions)
    ]


def sampled(spec: config.WorkflowSpec, run_id_base: int) -> dict[str, Any]:
    """The sampling keywords of ``InferenceModel.generate``/``chat`` for one run batch of ``spec``."""
    return {"max_tokens": spec.max_tokens, "temperature": spec.temperature, "seed": spec.seed_for(run_id_base),
            "sampling": spec.sampling()}  # fmt: skip


def with_system(messages: list[dict[str, str]], spec: config.WorkflowSpec) -> list[dict[str, str]]:
    """``spec.systemPrompt`` first, unless the conversation already opens with a system message."""
    if spec.system_prompt is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": spec.system_prompt}, *messages]


class MathWorkflow:
    """One prompt, ``repeat_times`` samples in one request, reward 1 for the right final answer. The prompt goes
    through the model's chat template as a user turn (after ``systemPrompt``), or raw with ``chatTemplate: false``."""

    def __init__(self, spec: config.WorkflowSpec):
        self.spec = spec

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        if self.spec.chat_template:
            completions = await model.chat(with_system([{"role": "user", "content": task.prompt}], self.spec),
                                           n=repeat_times, **sampled(self.spec, run_id_base))  # fmt: skip
        else:
            completions = await model.generate(task.prompt, n=repeat_times, **sampled(self.spec, run_id_base))
        return _experiences(task, completions, lambda text: rewards.math_reward(text, task.reference), run_id_base)


class ChatWorkflow:
    """The task's conversation (or its prompt as one user turn); the assistant's reply is rewarded."""

    def __init__(self, spec: config.WorkflowSpec):
        self.spec = spec

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        messages = with_system(list(task.messages) or [{"role": "user", "content": task.prompt}], self.spec)
        completions = await model.chat(messages, n=repeat_times, **sampled(self.spec, run_id_base))
        return _experiences(task, completions, lambda text: rewards.math_reward(text, task.reference), run_id_base)


def build_workflow(spec: config.WorkflowSpec) -> Workflow:
    if spec.name == "math":
        return MathWorkflow(spec)
    if spec.name == "chat":
        return ChatWorkflow(spec)
    if not spec.import_path or ":" not in spec.import_path:
        raise ValueError(f"workflow.importPath must be 'module:Class' for a custom workflow, got {spec.import_path!r}")
    module_name, class_name = spec.import_path.split(":", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    workflow: Workflow = cls(spec)
    return workflow
