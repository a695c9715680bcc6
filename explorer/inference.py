"""Inference models: the ``InferenceModel`` interface and its implementation over vLLM's OpenAI-compatible API.

``EnginePool`` spreads requests over several engines and moves a request to another engine when one stops answering
(an engine killed mid-batch costs a retry, not the task). Under the scheduler the engine is chosen job-wide
(``engine_load``) and passed in: ``EnginePool.routed(order)`` is one task's view that tries that order first and
records the engines that failed. On its own a pool picks by its own least outstanding requests, rotating ties. A
cancelled request (a timed-out attempt) closes its HTTP connection, which makes vLLM abort the generation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import httpx

from explorer import credentials, engine_load


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
        self,
        prompt: str,
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> list[Completion]: ...

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> list[Completion]: ...

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """One OpenAI chat-completions request as given (the model name filled in); the response as JSON. What the
        agent client (``explorer.agent``) is built on."""
        ...

    async def close(self) -> None: ...


RETRY_DOWN_AFTER = engine_load.RETRY_DOWN_AFTER


class EngineUnavailableError(RuntimeError):
    """No engine of the pool answered."""


SAMPLING_PARAMS = frozenset({"top_p", "top_k", "min_p", "stop", "min_tokens", "repetition_penalty", "presence_penalty",
                             "frequency_penalty", "truncate_prompt_tokens", "ignore_eos"})  # fmt: skip


def sampling_params(sampling: Mapping[str, Any] | None) -> dict[str, Any]:
    """``sampling`` checked against the vLLM parameters a workflow may set (never the ones this client owns: the
    model, the prompt, ``n``, logprobs and token ids)."""
    unknown = sorted(set(sampling or {}) - SAMPLING_PARAMS)
    if unknown:
        raise ValueError(f"unknown sampling parameters {unknown}; allowed: {sorted(SAMPLING_PARAMS)}")
    return dict(sampling or {})


def completion_from_choice(choice: Mapping[str, Any], prompt_ids: list[int]) -> Completion:
    """One choice of a completions or chat-completions response (``prompt_ids``: the response's, if it has them)."""
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

    def __init__(
        self, base_url: str, model: str, timeout: float = 3600.0, transport: httpx.AsyncBaseTransport | None = None
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.outstanding = 0
        self.failed_at = -math.inf  # monotonic time of the last transport failure
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=5.0), transport=transport, headers=credentials.job_headers()
        )

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.outstanding += 1
        try:
            response = await self._http.post(f"{self.base_url}{path}", json=body)
            if 400 <= response.status_code < 500:  # the engine says what is wrong with the request: keep its words
                message = f"{response.status_code} from {response.url}: {response.text[:1000]}"
                raise httpx.HTTPStatusError(message, request=response.request, response=response)
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data
        finally:
            self.outstanding -= 1

    async def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        body = {"model": self.model, "prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": temperature,
                "logprobs": 0, "return_token_ids": True, "seed": seed, **sampling_params(sampling)}  # fmt: skip
        data = await self._post("/v1/completions", body)
        return [completion_from_choice(c, []) for c in sorted(data["choices"], key=lambda c: c["index"])]

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        body = {"model": self.model, "messages": list(messages), "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "logprobs": True, "return_token_ids": True, "seed": seed,
                **sampling_params(sampling)}  # fmt: skip
        data = await self._post("/v1/chat/completions", body)
        prompt_ids = data.get("prompt_token_ids") or []
        return [completion_from_choice(c, prompt_ids) for c in sorted(data["choices"], key=lambda c: c["index"])]

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._post("/v1/chat/completions", {**body, "model": self.model})

    async def close(self) -> None:
        await self._http.aclose()


class EnginePool:
    """Several engines serving one model: the scheduler's engine order or least outstanding, failover on errors."""

    def __init__(self, engines: Sequence[OpenAIEngine], first: int = 0):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = list(engines)
        self._next = first % len(self.engines)  # where ties start when the pool chooses by itself
        self._retired: list[OpenAIEngine] = []  # engines a membership change removed (``set_urls``)

    @classmethod
    def from_urls(
        cls, urls: Sequence[str], model: str, first: int = 0, transport: httpx.AsyncBaseTransport | None = None
    ) -> EnginePool:
        return cls([OpenAIEngine(url, model, transport=transport) for url in urls], first)

    def set_urls(self, urls: Sequence[str], transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Follow the group's membership (scale up or down): engines whose index and URL stay are kept (with their
        clients and counts), the others are made or dropped. A dropped engine's client is closed with the pool, since
        a request in flight may still use it."""
        if not urls:
            raise ValueError("an engine pool needs at least one engine")
        kept = [e for e, url in zip(self.engines, urls, strict=False) if e.base_url == url.rstrip("/")]
        model = self.engines[0].model
        self._retired.extend(self.engines[len(kept) :])
        self.engines = kept + [OpenAIEngine(url, model, transport=transport) for url in urls[len(kept) :]]
        self._next %= len(self.engines)

    def routed(self, order: Sequence[int] = ()) -> RoutedPool:
        """One task's view: its requests try ``order`` (indices into ``engines``) and only those engines (the
        scheduler leaves out engines at another policy version); empty: the pool's choice, every engine."""
        return RoutedPool(self, order)

    def down(self) -> list[bool]:
        """Engines with a transport failure in the last ``RETRY_DOWN_AFTER`` seconds (in this process)."""
        now = time.monotonic()
        return [now - e.failed_at < RETRY_DOWN_AFTER for e in self.engines]

    def order(self, preferred: Sequence[int] = (), exclusive: bool = False) -> list[int]:
        """Engines to try: ``preferred`` first (down ones last), the rest after unless ``exclusive``; else least
        outstanding here."""
        down = self.down()
        if not preferred:
            order = engine_load.build_order([e.outstanding for e in self.engines], down, self._next)
            self._next = (order[0] + 1) % len(self.engines)
            return order
        known = list(dict.fromkeys(i for i in preferred if 0 <= i < len(self.engines)))
        rest = [] if exclusive else [i for i in range(len(self.engines)) if i not in known]
        return sorted(known + rest, key=lambda i: down[i])  # stable: the caller's order among healthy engines

    async def call(
        self,
        order: Sequence[int],
        failed: set[int],
        method: str,
        *args: Any,
        answered: list[int] | None = None,
        timings: list[tuple[int, float]] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``method`` on the first engine of ``self.order(order)`` that answers; those that failed go in ``failed``,
        the one that answered in ``answered``, with its latency in ``timings``."""
        errors = []
        for index in self.order(order, exclusive=bool(order)):
            engine = self.engines[index]
            started = time.monotonic()
            try:
                result = await getattr(engine, method)(*args, **kwargs)
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                if isinstance(err, httpx.HTTPStatusError) and err.response.status_code < 500:
                    raise  # the request itself is wrong: another engine would say the same
                engine.failed_at = time.monotonic()
                failed.add(index)
                errors.append(f"{engine.base_url}: {err!r}")
                continue
            if answered is not None:
                answered.append(index)
            if timings is not None:
                timings.append((index, time.monotonic() - started))
            return result
        raise EngineUnavailableError("no engine answered: " + "; ".join(errors))

    async def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        return await self.routed().generate(prompt, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                            sampling=sampling)  # fmt: skip

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        return await self.routed().chat(messages, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                        sampling=sampling)  # fmt: skip

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.routed().chat_completion(body)

    async def close(self) -> None:
        for engine in self.engines + self._retired:
            await engine.close()


class RoutedPool:
    """An ``EnginePool`` as one task sees it: the scheduler's engine order, the engines that failed it and those
    that answered it (in order of the calls)."""

    def __init__(self, pool: EnginePool, order: Sequence[int]):
        self.pool = pool
        self.order = tuple(order)
        self.failed: set[int] = set()
        self.answered: list[int] = []
        self.timings: list[tuple[int, float]] = []  # (engine, seconds) of every answered request

    async def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        result: list[Completion] = await self.pool.call(
            self.order,
            self.failed,
            "generate",
            prompt,
            answered=self.answered,
            timings=self.timings,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            sampling=sampling,
        )
        return result

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        result: list[Completion] = await self.pool.call(
            self.order,
            self.failed,
            "chat",
            messages,
            answered=self.answered,
            timings=self.timings,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            sampling=sampling,
        )
        return result

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.pool.call(
            self.order, self.failed, "chat_completion", body, answered=self.answered, timings=self.timings
        )
        return result

    async def close(self) -> None:
        return None  # the pool belongs to its runner, which closes it
