"""Inference models: the ``InferenceModel`` interface and its implementation over vLLM's OpenAI-compatible API.

``EnginePool`` spreads requests over several engines by least outstanding requests and moves a request to another
engine when one stops answering (an engine killed mid-batch costs a retry, not the task). A cancelled request (a
timed-out attempt) closes its HTTP connection, which makes vLLM abort the generation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

import httpx


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled response with its token ids and per-token logprobs."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None


class InferenceModel(Protocol):
    """What workflows call. ``n`` samples share one prompt (vLLM shares its prefill)."""

    async def generate(
        self, prompt: str, *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0, seed: int | None = None
    ) -> list[Completion]: ...

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]: ...

    async def close(self) -> None: ...


RETRY_DOWN_AFTER = 10.0


class EngineUnavailableError(RuntimeError):
    """No engine of the pool answered."""


def _completion(choice: dict[str, Any], prompt_ids: list[int]) -> Completion:
    logprobs = choice.get("logprobs") or {}
    values = logprobs.get("token_logprobs")
    if values is None:  # chat format: {"content": [{"logprob": ...}, ...]}
        values = [item["logprob"] for item in logprobs.get("content") or []]
    return Completion(
        prompt_token_ids=list(choice.get("prompt_token_ids") or prompt_ids),
        token_ids=list(choice.get("token_ids") or []),
        logprobs=[float(v) for v in values],
        text=choice.get("text") or (choice.get("message") or {}).get("content") or "",
        finish_reason=choice.get("finish_reason"),
    )


class OpenAIEngine:
    """One ``vllm serve`` engine, reached over HTTP."""

    def __init__(self, base_url: str, model: str, timeout: float = 3600.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.outstanding = 0
        self.failed_at = -math.inf  # monotonic time of the last transport failure
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0))

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.outstanding += 1
        try:
            response = await self._http.post(f"{self.base_url}{path}", json=body)
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data
        finally:
            self.outstanding -= 1

    async def generate(
        self, prompt: str, *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0, seed: int | None = None
    ) -> list[Completion]:
        body = {"model": self.model, "prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": temperature,
                "logprobs": 0, "return_token_ids": True, "seed": seed}  # fmt: skip
        data = await self._post("/v1/completions", body)
        return [_completion(c, []) for c in sorted(data["choices"], key=lambda c: c["index"])]

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]:
        body = {"model": self.model, "messages": list(messages), "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "logprobs": True, "return_token_ids": True, "seed": seed}  # fmt: skip
        data = await self._post("/v1/chat/completions", body)
        prompt_ids = data.get("prompt_token_ids") or []
        return [_completion(c, prompt_ids) for c in sorted(data["choices"], key=lambda c: c["index"])]

    async def close(self) -> None:
        await self._http.aclose()


class EnginePool:
    """Several engines serving one model: least-outstanding dispatch, failover on connection errors."""

    def __init__(self, engines: Sequence[OpenAIEngine]):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = list(engines)

    @classmethod
    def from_urls(cls, urls: Sequence[str], model: str) -> EnginePool:
        return cls([OpenAIEngine(url, model) for url in urls])

    def _by_load(self) -> list[OpenAIEngine]:
        """Healthy engines first (no transport failure in the last ``RETRY_DOWN_AFTER`` s), then least loaded."""
        now = time.monotonic()
        return sorted(self.engines, key=lambda e: (now - e.failed_at < RETRY_DOWN_AFTER, e.outstanding))

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> list[Completion]:
        errors = []
        for engine in self._by_load():
            try:
                result: list[Completion] = await getattr(engine, method)(*args, **kwargs)
                return result
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                if isinstance(err, httpx.HTTPStatusError) and err.response.status_code < 500:
                    raise  # the request itself is wrong: another engine would say the same
                engine.failed_at = time.monotonic()
                errors.append(f"{engine.base_url}: {err!r}")
        raise EngineUnavailableError("no engine answered: " + "; ".join(errors))

    async def generate(
        self, prompt: str, *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0, seed: int | None = None
    ) -> list[Completion]:
        return await self._call("generate", prompt, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed)

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[Completion]:
        return await self._call("chat", messages, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed)

    async def close(self) -> None:
        for engine in self.engines:
            await engine.close()
