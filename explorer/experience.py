"""One experience: the tokens a policy produced for a task run, their logprobs, the reward, and provenance."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Experience:
    """Token ids are prompt then response; ``logprobs`` cover the response tokens only.

    ``action_mask`` (response tokens, when set) marks the tokens the policy sampled: a multi-turn conversation merged
    into one experience also holds tool results and chat-template text between its assistant turns, which a policy
    loss must not count (their ``logprobs`` are 0.0). Unset: every response token is the policy's.

    ``policy_version`` is the version its step started on; ``policy_versions`` every version the engines served
    while the step ran (more than one only when a sync landed mid-step, i.e. styles ``async``/``trainer_driven``).
    """

    tokens: list[int]
    prompt_length: int
    logprobs: list[float]
    reward: float
    batch_id: str = ""
    task_id: int = 0
    run_id: int = 0
    policy_version: int | None = None
    policy_versions: list[int] = dataclasses.field(default_factory=list)
    response_text: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    action_mask: list[bool] | None = None

    @property
    def response_length(self) -> int:
        return len(self.tokens) - self.prompt_length

    def token_mask(self) -> list[bool]:
        """One flag per token: True for the policy's own (what a policy loss counts), False for the prompt."""
        response = self.action_mask if self.action_mask is not None else [True] * self.response_length
        return [False] * self.prompt_length + list(response)

    @property
    def group_id(self) -> str:
        """The GRPO group key: every run of one task in one batch."""
        return f"{self.batch_id}/{self.task_id}"

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Experience:
        return cls(**record)
