"""Tasks and workflows: what one task is, and how its runs turn into rewarded experiences.

Built in: ``math`` (single turn, final-answer reward), ``chat`` (the task's messages, the reply is rewarded),
``tool_use`` (a multi-turn agent with a calculator tool, ``explorer.agent``) and ``judge`` (an auxiliary model scores
the reply). ``custom`` loads ``module:Class`` from ``workflow.importPath``: ``Class(spec)`` or, when its constructor
takes it, ``Class(spec, auxiliary_models=...)`` (the job's auxiliary groups by name, in spec order); it implements
``run``. Rewards come from ``explorer.rewards`` (``workflow.reward``, or a row's own under ``taskset.rewardKey``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from explorer import agent, calculator, config, rewards
from explorer.experience import Experience
from explorer.inference import Completion, InferenceModel


@dataclasses.dataclass(frozen=True)
class Task:
    """One row of a taskset; ``reward``: the row's own reward name (``taskset.rewardKey``), if it has one."""

    task_id: int
    prompt: str
    reference: str = ""
    messages: tuple[dict[str, str], ...] = ()
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)
    is_eval: bool = False
    reward: str | None = None


class Workflow(Protocol):
    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]: ...


AuxiliaryModels = Mapping[str, InferenceModel]


def _experiences(
    task: Task, completions: list[Completion], reward: Callable[[str], float], run_id_base: int
) -> list[Experience]:
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


def request_defaults(spec: config.WorkflowSpec, run_id: int) -> dict[str, Any]:
    """``spec``'s sampling as chat-completions request fields (an ``AgentClient``'s defaults) for run ``run_id``."""
    params = sampled(spec, run_id)
    return {**{k: v for k, v in params.items() if k != "sampling"}, **params["sampling"]}


def with_system(messages: list[dict[str, str]], spec: config.WorkflowSpec) -> list[dict[str, str]]:
    """``spec.systemPrompt`` first, unless the conversation already opens with a system message."""
    if spec.system_prompt is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": spec.system_prompt}, *messages]


def task_reward(task: Task, spec: config.WorkflowSpec) -> Callable[[str], float]:
    """The reward of ``task``'s responses: the row's own, else ``workflow.reward``, against its reference."""
    score = rewards.resolve(task.reward or spec.reward, spec.reward_args if task.reward is None else None)
    return lambda response: score(response, task.reference)


def opening(task: Task, spec: config.WorkflowSpec) -> list[dict[str, str]]:
    """The conversation a task starts with: its messages, or its prompt as one user turn; ``systemPrompt`` first."""
    return with_system(list(task.messages) or [{"role": "user", "content": task.prompt}], spec)


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
        return _experiences(task, completions, task_reward(task, self.spec), run_id_base)


class ChatWorkflow:
    """The task's conversation (or its prompt as one user turn); the assistant's reply is rewarded."""

    def __init__(self, spec: config.WorkflowSpec):
        self.spec = spec

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        completions = await model.chat(opening(task, self.spec), n=repeat_times, **sampled(self.spec, run_id_base))
        return _experiences(task, completions, task_reward(task, self.spec), run_id_base)


@dataclasses.dataclass(frozen=True)
class ToolUseArgs:
    """``workflow.args`` of ``tool_use``."""

    max_turns: int = 4
    tool_choice: str = "auto"  # "auto", "required", "none", or a tool's name (forced)
    forced_tool_turns: int = 0  # the first N turns must call the calculator (then tool_choice applies)
    experience_mode: agent.ExperienceMode = "merged"

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> ToolUseArgs:
        names = {"maxTurns": "max_turns", "toolChoice": "tool_choice", "forcedToolTurns": "forced_tool_turns",
                 "experienceMode": "experience_mode"}  # fmt: skip
        unknown = sorted(set(args) - set(names))
        if unknown:
            raise ValueError(f"workflow.args: unknown tool_use arguments {unknown}; known: {sorted(names)}")
        parsed = cls(**{names[k]: v for k, v in args.items()})
        if not isinstance(parsed.max_turns, int) or parsed.max_turns < 1:
            raise ValueError(f"workflow.args.maxTurns must be a positive integer, got {parsed.max_turns!r}")
        if parsed.experience_mode not in ("merged", "per_turn"):
            raise ValueError(f"workflow.args.experienceMode must be merged or per_turn, got {parsed.experience_mode!r}")
        return parsed


class ToolUseWorkflow:
    """A multi-turn agent: the model may call ``calculator(expression)`` (OpenAI tools), sees each result as a tool
    message, and answers; the final answer is rewarded. Each run is its own conversation through an
    ``AgentClient``; its turns become one experience with an action mask (``experienceMode: merged``) or one per
    turn. A conversation that reaches ``maxTurns`` while still calling tools is flagged ``truncated``.

    ``toolChoice: auto`` (and ``required``) needs the engines to parse tool calls: ``model.extraArgs:
    [--enable-auto-tool-choice, --tool-call-parser, <the model's parser>]``.
    """

    def __init__(self, spec: config.WorkflowSpec):
        self.spec = spec
        self.args = ToolUseArgs.parse(spec.args)

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        runs = [self.converse(task, model, run_id_base + i) for i in range(repeat_times)]
        return [experience for _, run in await asyncio.gather(*runs) for experience in run]

    def _tool_choice(self, turn: int) -> Any:
        if turn < self.args.forced_tool_turns:
            return calculator.FORCED
        if self.args.tool_choice in ("auto", "required", "none"):
            return self.args.tool_choice
        return {"type": "function", "function": {"name": self.args.tool_choice}}

    async def converse(
        self, task: Task, model: InferenceModel, run_id: int
    ) -> tuple[agent.AgentClient, list[Experience]]:
        """One run: the conversation (its client keeps the recorded turns) and its experiences."""
        client = agent.AgentClient(model, request_defaults(self.spec, run_id))
        messages: list[dict[str, Any]] = opening(task, self.spec)
        answer, tool_calls = "", 0
        for turn in range(self.args.max_turns):
            response = await client.chat.completions.create(
                messages=messages, tools=[calculator.TOOL], tool_choice=self._tool_choice(turn)
            )
            reply = response.choices[0].message
            calls = reply.tool_calls or []
            messages.append({"role": "assistant", "content": reply.content,
                             **({"tool_calls": [c.model_dump() for c in calls]} if calls else {})})  # fmt: skip
            if not calls:
                answer = reply.content or ""
                break
            for call in calls:
                tool_calls += 1
                result = calculator.call(getattr(call, "function", None))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        truncated = not answer and bool(messages[-1].get("role") == "tool")
        reward = task_reward(task, self.spec)(answer)
        experiences = agent.conversation_experiences(client.turns, reward, task_id=task.task_id, run_id=run_id,
                                                     mode=self.args.experience_mode, truncated=truncated,
                                                     info={"tool_calls": tool_calls})  # fmt: skip
        return client, experiences


JUDGE_PROMPT = (
    "Rate the answer to the question from 0 (wrong) to {scale} (fully correct).\n"
    "Question: {question}\nReference: {reference}\nAnswer: {answer}\nScore:"
)


class JudgeWorkflow:
    """The policy answers (``repeat_times`` samples of one chat request); a judge, an auxiliary engine group
    (``workflow.args.judgeModel``, default the first), scores each answer with an integer from 0 to ``scale``
    (constrained to those choices, so it always parses); the reward is score / scale.

    ``workflow.args``: ``judgeModel``, ``scale`` (10), ``prompt`` (format fields: question, reference, answer,
    scale), ``judgeTemperature`` (0).
    """

    def __init__(self, spec: config.WorkflowSpec, auxiliary_models: AuxiliaryModels):
        self.spec = spec
        args = dict(spec.args)
        known = {"judgeModel", "scale", "prompt", "judgeTemperature"}
        if set(args) - known:
            unknown = sorted(set(args) - known)
            raise ValueError(f"workflow.args: unknown judge arguments {unknown}; known: {sorted(known)}")
        if not auxiliary_models:
            raise ValueError("the judge workflow needs an auxiliary engine group (spec.auxiliaryModels) to score with")
        name = args.get("judgeModel", next(iter(auxiliary_models)))
        if name not in auxiliary_models:
            raise ValueError(f"workflow.args.judgeModel {name!r} is not an auxiliary group; groups: "
                             f"{', '.join(auxiliary_models)}")  # fmt: skip
        self.judge_name, self.judge = name, auxiliary_models[name]
        self.scale = int(args.get("scale", 10))
        if not 1 <= self.scale <= 100:
            raise ValueError(f"workflow.args.scale must be between 1 and 100, got {self.scale}")
        self.prompt = str(args.get("prompt", JUDGE_PROMPT))
        self.temperature = float(args.get("judgeTemperature", 0.0))

    async def score(self, task: Task, answer: str) -> int:
        """The judge's score of ``answer`` (one request to the judge group)."""
        question = task.prompt or json.dumps(list(task.messages))
        content = self.prompt.format(question=question, reference=task.reference, answer=answer, scale=self.scale)
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": self.temperature,
                "structured_outputs": {"choice": [str(i) for i in range(self.scale + 1)]}}  # fmt: skip
        data = await self.judge.chat_completion(body)
        text = str(data["choices"][0]["message"].get("content") or "").strip()
        if not text.isdigit() or int(text) > self.scale:
            raise ValueError(f"judge {self.judge_name!r} answered {text!r}, not a score from 0 to {self.scale}")
        return int(text)

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        completions = await model.chat(opening(task, self.spec), n=repeat_times, **sampled(self.spec, run_id_base))
        scores = await asyncio.gather(*(self.score(task, c.text) for c in completions))
        experiences = _experiences(task, completions, lambda _: 0.0, run_id_base)
        for experience, score in zip(experiences, scores, strict=True):
            experience.reward = score / self.scale
            experience.info.update({"judge": self.judge_name, "judge_score": score})
        return experiences


def build_workflow(spec: config.WorkflowSpec, auxiliary_models: AuxiliaryModels | None = None) -> Workflow:
    """The workflow ``spec`` names; ``auxiliary_models``: the job's auxiliary groups by name, in spec order."""
    auxiliary = dict(auxiliary_models or {})
    builtin: dict[str, Callable[[], Workflow]] = {
        "math": lambda: MathWorkflow(spec),
        "chat": lambda: ChatWorkflow(spec),
        "tool_use": lambda: ToolUseWorkflow(spec),
        "judge": lambda: JudgeWorkflow(spec, auxiliary),
    }
    if spec.name in builtin:
        return builtin[spec.name]()
    if not spec.import_path or ":" not in spec.import_path:
        raise ValueError(f"workflow.importPath must be 'module:Class' for a custom workflow, got {spec.import_path!r}")
    module_name, class_name = spec.import_path.split(":", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    takes_auxiliary = "auxiliary_models" in inspect.signature(cls).parameters
    workflow: Workflow = cls(spec, auxiliary_models=auxiliary) if takes_auxiliary else cls(spec)
    return workflow
