"""The agent client handed to workflows: OpenAI-compatible chat completions that record every call's tokens.

``AgentClient(model).chat.completions.create(messages=..., tools=..., tool_choice=..., n=...)`` takes the OpenAI
SDK's arguments and returns its ``ChatCompletion`` type, so agent code written against ``openai.AsyncOpenAI`` runs
unchanged; requests go through the task's engine routing and failover. Every choice of every call is kept in
``client.turns`` with the prompt's and the response's token ids and the sampled tokens' logprobs, as the engine
produced them (vLLM's ``return_token_ids``): nothing is re-tokenized. ``conversation_experiences`` turns one
conversation's turns into experiences: merged into one with an action mask over the assistant turns where each turn's
prompt extends the previous turn's prompt and response token for token, or one per turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from explorer.experience import Experience
from explorer.inference import InferenceModel, completion_from_choice

if TYPE_CHECKING:  # openai's types cost ~34 MiB per process: only agent workflows import them (each runner is one)
    from openai.types.chat import ChatCompletion

ExperienceMode = Literal["merged", "per_turn"]
OWNED = frozenset({"model", "stream", "logprobs", "return_token_ids"})  # this client sets them


@dataclasses.dataclass(frozen=True)
class Turn:
    """One choice of one recorded call: what the engine saw and what it sampled."""

    call: int  # the call's index in the client
    choice: int
    messages: list[dict[str, Any]]
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # one per token id
    message: dict[str, Any]  # the assistant reply as returned (content, tool_calls)
    finish_reason: str | None

    @property
    def truncated(self) -> bool:
        """The response hit ``max_tokens`` (or the context) instead of ending."""
        return self.finish_reason == "length"

    def extended_by(self, later: Turn) -> bool:
        """``later``'s prompt starts with this turn's prompt and response, token for token."""
        sequence = self.prompt_token_ids + self.token_ids
        return later.prompt_token_ids[: len(sequence)] == sequence


def _turns(call: int, messages: list[dict[str, Any]], data: Mapping[str, Any]) -> list[Turn]:
    prompt = list(data.get("prompt_token_ids") or [])
    turns = []
    for choice in sorted(data["choices"], key=lambda c: c["index"]):
        c = completion_from_choice(choice, prompt)
        if len(c.logprobs) != len(c.token_ids):
            raise ValueError(f"the engine returned {len(c.token_ids)} token ids but {len(c.logprobs)} logprobs")
        message = {k: v for k, v in (choice.get("message") or {}).items() if v is not None and v != []}
        turns.append(Turn(call, choice["index"], messages, c.prompt_token_ids, c.token_ids, c.logprobs, message,
                          c.finish_reason))  # fmt: skip
    return turns


class _Completions:
    def __init__(self, client: AgentClient):
        self._client = client

    async def create(self, *, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> ChatCompletion:
        """``openai.AsyncOpenAI().chat.completions.create``'s arguments (``extra_body`` merged into the request);
        ``model`` is ignored (the group serves one), streaming is not offered."""
        kwargs.pop("model", None)
        extra = dict(kwargs.pop("extra_body", None) or {})
        if kwargs.get("stream"):
            raise ValueError("the agent client does not stream: it records whole responses")
        owned = sorted((set(kwargs) | set(extra)) & (OWNED - {"model"}))
        if owned:
            raise ValueError(f"{owned} are set by the agent client (it records token ids and logprobs)")
        body = {**self._client.defaults, **kwargs, **extra, "messages": [dict(m) for m in messages],
                "logprobs": True, "return_token_ids": True}  # fmt: skip
        body = {k: v for k, v in body.items() if v is not None}
        from openai.types.chat import ChatCompletion

        data = await self._client.model.chat_completion(body)
        self._client.turns.extend(_turns(len(self._client.calls), body["messages"], data))
        self._client.calls.append(data)
        return ChatCompletion.model_validate(data)


class _Chat:
    def __init__(self, client: AgentClient):
        self.completions = _Completions(client)


class AgentClient:
    """OpenAI-compatible chat completions over one task's engines, recording every call.

    ``defaults``: request fields every call starts from (a workflow's sampling: ``max_tokens``, ``temperature``,
    ``seed``, ``top_p``…); a call's own arguments override them.
    """

    def __init__(self, model: InferenceModel, defaults: Mapping[str, Any] | None = None):
        self.model = model
        self.defaults = dict(defaults or {})
        self.chat = _Chat(self)
        self.turns: list[Turn] = []
        self.calls: list[dict[str, Any]] = []  # the raw responses, in call order


def chains(turns: Sequence[Turn]) -> list[list[Turn]]:
    """``turns`` cut where a turn's prompt does not extend the previous turn's prompt and response."""
    segments: list[list[Turn]] = []
    for turn in turns:
        if segments and segments[-1][-1].extended_by(turn):
            segments[-1].append(turn)
        else:
            segments.append([turn])
    return segments


def merged_experience(chain: Sequence[Turn], reward: float, task_id: int, run_id: int) -> Experience:
    """One experience for a chain of turns: the first prompt, then every turn's response with what the next prompt
    added in between (tool results, template text) masked out and given logprob 0.0."""
    tokens = list(chain[0].prompt_token_ids)
    mask: list[bool] = []
    logprobs: list[float] = []
    for turn in chain:
        between = turn.prompt_token_ids[len(tokens) :]
        tokens += between + turn.token_ids
        mask += [False] * len(between) + [True] * len(turn.token_ids)
        logprobs += [0.0] * len(between) + turn.logprobs
    return Experience(
        tokens=tokens,
        prompt_length=len(chain[0].prompt_token_ids),
        logprobs=logprobs,
        reward=reward,
        task_id=task_id,
        run_id=run_id,
        response_text=str(chain[-1].message.get("content") or ""),
        action_mask=mask,
    )


def turn_experience(turn: Turn, reward: float, task_id: int, run_id: int) -> Experience:
    return Experience(
        tokens=turn.prompt_token_ids + turn.token_ids,
        prompt_length=len(turn.prompt_token_ids),
        logprobs=list(turn.logprobs),
        reward=reward,
        task_id=task_id,
        run_id=run_id,
        response_text=str(turn.message.get("content") or ""),
    )


def conversation_experiences(
    turns: Sequence[Turn],
    reward: float,
    *,
    task_id: int,
    run_id: int,
    mode: ExperienceMode = "merged",
    truncated: bool = False,
    info: Mapping[str, Any] | None = None,
) -> list[Experience]:
    """The experiences of one conversation (its turns in order, one choice each), all rewarded ``reward``.

    ``merged``: one experience per unbroken chain (one in all when the chat template keeps the history's tokens as
    sampled); where it breaks, ``info["split"]`` says at which turns. ``per_turn``: one per turn. Every experience's
    ``info`` holds ``turns``, its ``turn`` range, the last ``finish_reason`` and ``truncated``: a response cut at
    ``max_tokens`` or ``truncated=True`` (the workflow stopped the conversation, e.g. at its turn limit).
    """
    if not turns:
        raise ValueError("a conversation needs at least one recorded turn")
    if mode not in ("merged", "per_turn"):
        raise ValueError(f"experience mode must be 'merged' or 'per_turn', got {mode!r}")
    groups = chains(turns) if mode == "merged" else [[turn] for turn in turns]
    cut = truncated or any(turn.truncated for turn in turns)
    breaks = [sum(len(g) for g in groups[:i]) for i in range(1, len(groups))] if mode == "merged" else []
    experiences, first = [], 0
    for group in groups:
        if mode == "merged":
            experience = merged_experience(group, reward, task_id, run_id)
        else:
            experience = turn_experience(group[0], reward, task_id, run_id)
        experience.info = {**(info or {}), "turns": len(turns), "turn": [first, first + len(group) - 1],
                           "finish_reason": group[-1].finish_reason, "truncated": cut}  # fmt: skip
        if breaks:
            experience.info["split"] = (f"turns {breaks} do not extend the previous turn's tokens (the chat template "
                                        "re-renders the history): one experience per unbroken chain")  # fmt: skip
        experiences.append(experience)
        first += len(group)
    return experiences
