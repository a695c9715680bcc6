"""Agentic workflows on the real CPU engines (issue #13 item 3): the recording OpenAI-compatible client, multi-turn tool
use with the calculator, action masks over exactly the sampled tokens, and a judge on the auxiliary group (counted
from each engine's own /metrics)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from explorer import agent, calculator, config, engine_metrics, inference, local_engine, scheduler, workflows
from explorer.experience import Experience
from explorer.workflow_runner import WorkflowRunner
from explorer.workflows import Task

from .test_scheduler import explorer_config

pytestmark = pytest.mark.vllm


def pool_of(engine: local_engine.LocalEngine) -> inference.EnginePool:
    return inference.EnginePool([inference.OpenAIEngine(engine.base_url, "tiny")])


def sampled_tokens(experience: Experience) -> list[int]:
    return [t for t, m in zip(experience.tokens, experience.token_mask(), strict=True) if m]


def test_tool_use_runs_the_calculator_between_turns_and_masks_exactly_the_sampled_tokens(
    cpu_engines: list[local_engine.LocalEngine],
) -> None:
    spec = config.WorkflowSpec.model_validate({
        "name": "tool_use", "maxTokens": 48, "seed": 3, "reward": "math",
        "args": {"maxTurns": 3, "forcedToolTurns": 2, "toolChoice": "none"},
    })  # fmt: skip
    workflow = workflows.build_workflow(spec)
    assert isinstance(workflow, workflows.ToolUseWorkflow)
    task = Task(task_id=4, prompt="What is 2 plus 3?", reference="5")

    async def go() -> list[tuple[agent.AgentClient, list[Experience]]]:
        pool = pool_of(cpu_engines[0])
        try:
            return list(await asyncio.gather(*(workflow.converse(task, pool.routed(), run) for run in (0, 1))))
        finally:
            await pool.close()

    for run_id, (client, experiences) in enumerate(asyncio.run(go())):
        turns = client.turns
        assert len(turns) == 3 and len(client.calls) == 3
        for forced, following in itertools.pairwise(turns):
            [call] = forced.message["tool_calls"]
            assert call["function"]["name"] == calculator.NAME
            tool_message = following.messages[-1]  # the calculator's answer is what the model sees next
            assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == call["id"]
            assert tool_message["content"] == calculator.call(inference_function(call))
        assert "tool_calls" not in turns[2].message  # toolChoice none: the last turn answers in text
        # Every turn is in exactly one experience; what each experience marks as the policy's is exactly what the
        # engine sampled in its turns (token ids and logprobs), everything else carries logprob 0.0.
        covered = [i for e in experiences for i in range(e.info["turn"][0], e.info["turn"][1] + 1)]
        assert covered == [0, 1, 2]
        for experience in experiences:
            first, last = experience.info["turn"]
            own = turns[first : last + 1]
            assert experience.tokens == own[-1].prompt_token_ids + own[-1].token_ids
            assert sampled_tokens(experience) == [t for turn in own for t in turn.token_ids]
            mask = experience.action_mask or [True] * experience.response_length
            assert [lp for lp, m in zip(experience.logprobs, mask, strict=True) if m] == [
                lp for turn in own for lp in turn.logprobs
            ]
            assert all(lp == 0.0 for lp, m in zip(experience.logprobs, mask, strict=True) if not m)
            assert experience.run_id == run_id and experience.task_id == 4 and experience.info["tool_calls"] == 2
            assert experience.info["turns"] == 3 and experience.reward in (0.0, 1.0)


def test_the_documented_custom_agentic_workflow_runs_on_the_engines(
    cpu_engines: list[local_engine.LocalEngine],
) -> None:
    """examples/workflows/retry_until_right.py, loaded by importPath as a job would, through a WorkflowRunner."""
    cfg = explorer_config(
        cpu_engines,
        workflow={
            "name": "custom",
            "maxTokens": 8,
            "seed": 5,
            "args": {"maxAttempts": 3},
            "importPath": "examples.workflows.retry_until_right:RetryUntilRight",
        },
    )
    task = Task(task_id=1, prompt="What is 2 plus 3?", reference="5")

    async def go() -> tuple[Any, list[Experience]]:
        runner = WorkflowRunner(cfg, cfg.rollout)
        try:
            return await runner.run_task(task, repeat_times=2, run_id_base=0)
        finally:
            await runner.close()

    status, experiences = asyncio.run(go())
    assert status.ok, status.message
    assert {e.run_id for e in experiences} == {0, 1}
    for experience in experiences:
        attempts = experience.info["attempts"]
        assert 1 <= attempts <= 3 and experience.info["turns"] == attempts
        assert experience.reward == (1.0 / attempts if experience.reward else 0.0)
        assert len(experience.logprobs) == experience.response_length
        assert len(sampled_tokens(experience)) > 0


def inference_function(call: dict[str, Any]) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(**call["function"])


def test_a_conversation_the_template_keeps_merges_into_one_experience_over_real_tokens(
    cpu_engines: list[local_engine.LocalEngine],
) -> None:
    """Replies constrained to one-token choices keep the tiny template prefix-consistent: the three turns become one
    experience equal to the last call's context, tool results between the turns masked out."""

    async def go() -> agent.AgentClient:
        pool = pool_of(cpu_engines[1])
        client = agent.AgentClient(pool.routed(), {"max_tokens": 4, "seed": 11, "temperature": 1.0})
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Pick a digit."}]
        try:
            for result in ("5", "12", "ok"):
                response = await client.chat.completions.create(
                    messages=messages, extra_body={"structured_outputs": {"choice": ["7", "8", "9"]}}
                )
                reply = response.choices[0].message.content
                assert reply in ("7", "8", "9")
                messages += [{"role": "assistant", "content": reply}, {"role": "tool", "content": result}]
        finally:
            await pool.close()
        return client

    client = asyncio.run(go())
    [merged] = agent.conversation_experiences(client.turns, 1.0, task_id=0, run_id=0)
    last = client.turns[-1]
    assert "split" not in merged.info and merged.info["turn"] == [0, 2]
    assert merged.tokens == last.prompt_token_ids + last.token_ids
    assert merged.prompt_length == len(client.turns[0].prompt_token_ids)
    assert sampled_tokens(merged) == [t for turn in client.turns for t in turn.token_ids]
    assert merged.action_mask is not None and merged.action_mask.count(False) > 0  # the tool turns in between
    per_turn = agent.conversation_experiences(client.turns, 1.0, task_id=0, run_id=0, mode="per_turn")
    assert [e.tokens for e in per_turn] == [t.prompt_token_ids + t.token_ids for t in client.turns]


@pytest.mark.usefixtures("ray_cluster")
def test_the_judge_workflow_scores_with_the_auxiliary_group(cpu_engines: list[local_engine.LocalEngine]) -> None:
    """Rollout on engine 0, judge on engine 1, through the scheduler's Ray runners: every answer gets exactly one
    judge request on engine 1, and its reward is the judge's score."""
    rollout, judge = cpu_engines
    cfg = explorer_config(
        [rollout],
        workflow={"name": "judge", "maxTokens": 8, "args": {"judgeModel": "judge", "scale": 4}},
        explore={"repeatTimes": 2},
        auxiliary=[{"name": "judge", "model": {"path": "tiny", "servedName": "tiny"},
                    "engines": [{"index": 0, "url": judge.base_url, "rankOffset": 1, "worldSize": 1}]}],
    )  # fmt: skip
    before = [engine_metrics.fetch_requests_served(e.base_url) for e in cpu_engines]

    async def scenario() -> tuple[list[Any], list[Experience]]:
        sched = scheduler.Scheduler(cfg, cfg.rollout, cfg.auxiliary)
        await sched.start()
        try:
            sched.schedule([Task(task_id=i, prompt=f"What is {i} plus 1?", reference=str(i + 1)) for i in range(3)],
                           batch_id=1)  # fmt: skip
            return await sched.get_results(1)
        finally:
            await sched.stop()

    statuses, experiences = asyncio.run(scenario())
    after = [engine_metrics.fetch_requests_served(e.base_url) for e in cpu_engines]
    assert len(statuses) == 3 and all(s.ok for s in statuses), [s.message for s in statuses]
    assert len(experiences) == 6
    for experience in experiences:
        assert experience.info["judge"] == "judge" and experience.info["judge_score"] in range(5)
        assert experience.reward == experience.info["judge_score"] / 4
    assert after[1] - before[1] == 6  # one judge request per answer, all on the auxiliary engine
    assert after[0] - before[0] >= 3  # the answers came from the rollout engine


def test_the_judge_workflow_without_an_auxiliary_group_says_what_to_add() -> None:
    spec = config.WorkflowSpec(name="judge")
    with pytest.raises(ValueError, match="needs an auxiliary engine group"):
        workflows.build_workflow(spec)
    with pytest.raises(ValueError, match="judgeModel 'other' is not an auxiliary group; groups: judge"):
        workflows.build_workflow(spec.model_copy(update={"args": {"judgeModel": "other"}}),
                                 {"judge": pool_of_unused()})  # fmt: skip


def pool_of_unused() -> inference.InferenceModel:
    return inference.EnginePool([inference.OpenAIEngine("http://127.0.0.1:9", "tiny")])
