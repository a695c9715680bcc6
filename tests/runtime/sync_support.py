"""Helpers for the weight-sync tests: a coordinator on a background event loop, and HF-vs-engine logprob checks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch

from explorer import config as explorer_config
from explorer import credentials
from explorer.weight_sync.rendezvous import SyncCoordinator

T = TypeVar("T")
PROMPTS = ["What is 2 plus 3?", "The quick brown fox", "Compute 7 times 6"]


class LoopThread:
    """An asyncio loop in a thread, so blocking trainer code can run in the test's own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def sync_config(
    urls: list[str], model_dir: Path, tmp: Path, api_port: int, **sync: Any
) -> explorer_config.ExplorerConfig:
    return explorer_config.ExplorerConfig.model_validate({
        "job": "sync-test", "namespace": "local",
        "rollout": {"name": "rollout", "model": {"path": str(model_dir), "servedName": "tiny", "dtype": "float32"},
                    "engines": [{"index": i, "url": u, "rankOffset": 1 + i, "worldSize": 1}
                                for i, u in enumerate(urls)]},
        "taskset": {"path": "builtin:arithmetic"},
        "sync": {"method": "gloo", "port": api_port, "timeoutSeconds": 20, "bucketBytes": 1 << 16, **sync},
        "experiences": {"path": str(tmp / "experiences"), "format": "jsonl"},
    })  # fmt: skip


def start_coordinator(loop: LoopThread, config: explorer_config.ExplorerConfig, **kwargs: Any) -> SyncCoordinator:
    """A started coordinator on loopback; ``kwargs`` go to ``SyncCoordinator`` (``state_dir``, ``lease_seconds``)."""

    async def make() -> SyncCoordinator:
        coordinator = SyncCoordinator(config, advertised_host="127.0.0.1", bind_host="127.0.0.1",
                                      api_port=config.sync.port, **kwargs)  # fmt: skip
        await coordinator.start()
        return coordinator

    return loop.run(make())


def engine_logprobs(
    url: str, prompts: list[str] = PROMPTS, max_tokens: int = 8, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Greedy completions with token ids and logprobs from one engine (``headers``: default, this run's job token)."""
    response = httpx.post(f"{url}/v1/completions", json={
        "model": "tiny", "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 0,
        "return_token_ids": True, "seed": 0,
    }, timeout=120, headers=headers or credentials.job_headers())  # fmt: skip
    response.raise_for_status()
    return sorted(response.json()["choices"], key=lambda c: c["index"])


def max_logprob_error(choices: list[dict[str, Any]], model_dir: Path, state: Mapping[str, torch.Tensor]) -> float:
    """Largest |engine logprob - HF teacher-forced logprob| with ``state`` loaded into the HF model (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(dict(state))
    model.eval()
    worst = 0.0
    for choice in choices:
        prompt_ids, output_ids = choice["prompt_token_ids"], choice["token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + output_ids])).logits[0, len(prompt_ids) - 1 : -1]
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(output_ids)[:, None])[:, 0]
        worst = max(worst, float((expected - torch.tensor(choice["logprobs"]["token_logprobs"])).abs().max()))
    return worst


def perturbed_state(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """The tiny model's state dict with every tensor redrawn from N(0, 0.2): visibly different outputs."""
    from safetensors.torch import load_file

    original = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=generator) * 0.2 for name, t in sorted(original.items())}


def original_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(sorted(load_file(str(model_dir / "model.safetensors")).items()))
