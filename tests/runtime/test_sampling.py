"""Sampling control on a real CPU vLLM engine: the spec's parameters reach vLLM, and the recorded logprobs are those
of the distribution actually sampled (checked against a teacher-forced Hugging Face pass of the same weights)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from explorer import config, inference, local_engine, workflows
from explorer.experience import Experience

pytestmark = pytest.mark.vllm
TEMPERATURE = 0.7
TOLERANCE = 1e-4  # fp32 on CPU


def teacher_forced(model_dir: Path, experience: Experience, temperature: float, top_k: int | None) -> torch.Tensor:
    """Logprobs of the experience's response tokens under the HF model at ``temperature`` (and top-k)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, start = experience.tokens, experience.prompt_length
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, start - 1 : -1] / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens[start:])[:, None])[:, 0]


def run_math(
    engine: local_engine.LocalEngine, spec: config.WorkflowSpec, repeat: int = 4, prompt: str = "What is 2 plus 3?"
) -> list[Experience]:
    async def go() -> list[Experience]:
        pool = inference.EnginePool([inference.OpenAIEngine(engine.base_url, "tiny")])
        try:
            task = workflows.Task(task_id=0, prompt=prompt, reference="5")
            return await workflows.build_workflow(spec).run(task, pool, repeat, run_id_base=0)
        finally:
            await pool.close()

    return asyncio.run(go())


def test_recorded_logprobs_are_the_sampled_distributions_at_temperature_and_top_k(
    cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path
) -> None:
    spec = config.WorkflowSpec(temperature=TEMPERATURE, top_k=5, max_tokens=12, seed=7, system_prompt="Be brief.")
    experiences = run_math(cpu_engines[0], spec)
    checked = 0
    for experience in experiences:
        recorded = torch.tensor(experience.logprobs)
        assert len(recorded) == len(experience.tokens) - experience.prompt_length > 0
        expected = teacher_forced(tiny_model_dir, experience, TEMPERATURE, top_k=5)
        assert float((recorded - expected).abs().max()) < TOLERANCE, (recorded, expected)
        raw = teacher_forced(tiny_model_dir, experience, 1.0, top_k=None)
        checked += int(float((recorded - raw).abs().max()) > 0.05)  # what vLLM's default (raw) mode would record
    assert checked == len(experiences), "the raw distribution must differ visibly, or this test proves nothing"


def test_the_math_workflow_applies_the_chat_template_and_the_seed_repeats_a_run(
    cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    spec = config.WorkflowSpec(temperature=1.0, max_tokens=8, seed=11, system_prompt="Answer with a number.")
    first, again = run_math(cpu_engines[0], spec), run_math(cpu_engines[0], spec)
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": "What is 2 plus 3?"}]  # fmt: skip
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else list(templated)
    assert first[0].tokens[: first[0].prompt_length] == list(templated)
    assert [e.tokens for e in first] == [e.tokens for e in again], "same seed, same weights: the same samples"
    raw = run_math(cpu_engines[0], spec.model_copy(update={"chat_template": False}))
    assert raw[0].prompt_length < first[0].prompt_length, "chatTemplate: false sends the bare prompt"


def test_stop_strings_min_tokens_and_prompt_truncation_reach_vllm(
    cpu_engines: list[local_engine.LocalEngine],
) -> None:
    engine = cpu_engines[0]
    spec = config.WorkflowSpec(temperature=1.0, max_tokens=16, min_tokens=16, seed=3, max_prompt_tokens=20,
                               chat_template=False)  # fmt: skip
    for experience in run_math(engine, spec, repeat=2, prompt=" ".join(["seven"] * 100)):
        assert experience.prompt_length == 20, "maxPromptTokens keeps the prompt's last 20 tokens"
        assert len(experience.tokens) - experience.prompt_length == 16, "minTokens: no early end"

    free = config.WorkflowSpec(temperature=1.0, max_tokens=16, seed=5, chat_template=False)
    text = run_math(engine, free, repeat=1)[0].response_text
    stop = text.strip()[2:4]
    assert len(stop) == 2, f"the tiny model's sample {text!r} is too short to cut"
    stopped = run_math(engine, free.model_copy(update={"stop": [stop]}), repeat=1)[0].response_text
    assert stopped == text[: text.index(stop)], (text, stop, stopped)

    with pytest.raises(ValueError, match="minTokens"):
        config.WorkflowSpec(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="unknown sampling parameters"):
        inference.sampling_params({"logprobs": 5})
