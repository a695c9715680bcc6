"""Real vLLM on CPU: 16 prompts on the tiny local model, with token ids and logprobs that match HF."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from explorer import local_engine
from tests.auth import job_headers

pytestmark = pytest.mark.vllm


def test_cpu_engine_generates_sixteen_prompts_with_logprobs_matching_hf(
    cpu_engine: local_engine.LocalEngine, tiny_model_dir: Path
) -> None:
    prompts = [f"What is {i} plus {i + 1}?" for i in range(16)]
    response = httpx.post(
        f"{cpu_engine.base_url}/v1/completions",
        json={
            "model": "tiny",
            "prompt": prompts,
            "max_tokens": 12,
            "logprobs": 0,
            "return_token_ids": True,
            "temperature": 1.0,
            "seed": 0,
        },
        timeout=300,
        headers=job_headers(),  # the engine admits only the job's own token (explorer/http_auth.py)
    )
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 16
    for choice in choices:
        assert len(choice["token_ids"]) == len(choice["logprobs"]["token_logprobs"]) > 0
        assert choice["prompt_token_ids"]

    # Teacher-forced forward pass of the same weights in fp32: the engine's logprobs must agree.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    worst = 0.0
    for choice in choices[:4]:
        prompt_ids, output_ids = choice["prompt_token_ids"], choice["token_ids"]
        ids = torch.tensor([prompt_ids + output_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(output_ids)[:, None])[:, 0]
        got = torch.tensor(choice["logprobs"]["token_logprobs"])
        worst = max(worst, float((expected - got).abs().max()))
    assert worst < 1e-4, f"vLLM logprobs differ from HF by {worst}"
