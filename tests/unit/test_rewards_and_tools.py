"""Rewards (issue #13 item 3: nested ``\\boxed{}`` and fractions), the registry, the calculator tool and the agent's
conversation-to-experience logic on hand-made turns (pure; the real-engine proof is tests/runtime/test_agentic.py)."""

from __future__ import annotations

import asyncio
import typing
from types import SimpleNamespace

import pyarrow as pa
import pytest

from explorer import agent, calculator, config, experience_wire, rewards, taskset
from explorer.experience import Experience


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("\\boxed{\\frac{1}{4}}", "\\frac{3}{4}", 0.0),  # was 1.0: both fell back to their last number, 4
        ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),  # was 0.0: the brace-less pattern missed the nested value
        ("\\boxed{\\dfrac{-3}{6}}", "-0.5", 1.0),
        ("so \\boxed{50\\%}", "0.5", 1.0),
        ("first \\boxed{1} then \\boxed{2}", "2", 1.0),
        ("the answer is 42", "#### 42", 1.0),
        ("it is 41", "#### 42", 0.0),
        ("\\boxed{x + 1}", "\\boxed{x+1}", 1.0),
        ("\\boxed{3/4}", "0.75", 1.0),
        ("no number here", "1", 0.0),
        ("\\boxed{unbalanced", "1", 0.0),
    ],
)
def test_math_reward(response: str, reference: str, expected: float) -> None:
    assert rewards.math_reward(response, reference) == expected


def test_the_registry_matches_the_spec_and_binds_arguments() -> None:
    assert set(typing.get_args(config.RewardName)) == set(rewards.REWARDS)
    assert rewards.resolve("exact_match", {"ignore_case": True})(" Paris ", "paris") == 1.0
    assert rewards.resolve("exact_match")("Paris", "paris") == 0.0
    assert rewards.resolve("format", {"pattern": "^<answer>"})("<answer>3", "") == 1.0
    assert rewards.resolve("math_and_format")("\\boxed{3}", "3") == pytest.approx(1.1)
    with pytest.raises(ValueError, match="known rewards: exact_match, format, math, math_and_format"):
        rewards.resolve("bleu")


def test_a_row_names_its_own_reward_and_a_wrong_name_is_reported_with_its_line(tmp_path: typing.Any) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "q", "answer": "a", "reward": "exact_match"}\n{"question": "q", "reward": "bleu"}\n')
    tasks, errors = taskset.load_taskset(config.TasksetSpec(path=str(path)))
    assert [t.reward for t in tasks] == ["exact_match"]
    assert errors[0].line == 2 and "'bleu'" in errors[0].message and "rewardKey" in errors[0].message


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("2+3", "5"),
        ("7 * (6 - 1)", "35"),
        ("1/3 + 1/6", "1/2"),
        ("0.1 + 0.2", "3/10"),
        ("-2**3", "-8"),
        ("7 // 2", "3"),
    ],
)
def test_calculator_evaluates_exactly(expression: str, result: str) -> None:
    assert calculator.evaluate(expression) == result


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ('{"expression": "9**9**9"}', "exponents must be integers of at most 64"),
        ('{"expression": "10**64 * 10**64"}', "too large"),
        ('{"expression": "__import__(\'os\')"}', "unsupported syntax: Call"),
        ('{"expression": "1/0"}', "division by zero"),
        ('{"expression": "(("}', "not an arithmetic expression"),
        ('{"expr": "1"}', "arguments must be JSON"),
        ("not json", "arguments must be JSON"),
    ],
)
def test_calculator_answers_bad_model_output_with_an_error_message(arguments: str, error: str) -> None:
    result = calculator.call(SimpleNamespace(name="calculator", arguments=arguments))
    assert result.startswith("error: ") and error in result
    assert "unknown tool 'shell'" in calculator.call(SimpleNamespace(name="shell", arguments="{}"))


def turn(call: int, prompt: list[int], response: list[int], finish: str = "stop") -> agent.Turn:
    logprobs = [-0.1 * (i + 1) for i in range(len(response))]
    return agent.Turn(call, 0, [], prompt, response, logprobs, {"content": f"r{call}"}, finish)


def test_a_prefix_consistent_conversation_merges_into_one_experience_masking_what_is_not_sampled() -> None:
    turns = [turn(0, [1, 2], [10, 11]), turn(1, [1, 2, 10, 11, 5, 6], [12]), turn(2, [1, 2, 10, 11, 5, 6, 12, 7], [13])]
    [merged] = agent.conversation_experiences(turns, 0.5, task_id=3, run_id=9)
    assert merged.tokens == [1, 2, 10, 11, 5, 6, 12, 7, 13] and merged.prompt_length == 2
    assert merged.action_mask == [True, True, False, False, True, False, True]
    assert merged.logprobs == [-0.1, -0.2, 0.0, 0.0, -0.1, 0.0, -0.1]
    assert merged.token_mask() == [False, False, True, True, False, False, True, False, True]
    assert merged.info == {"turns": 3, "turn": [0, 2], "finish_reason": "stop", "truncated": False}
    assert (merged.reward, merged.task_id, merged.run_id, merged.response_text) == (0.5, 3, 9, "r2")


def test_a_history_the_template_re_renders_splits_where_it_breaks_and_says_so() -> None:
    turns = [turn(0, [1, 2], [10, 11]), turn(1, [1, 2, 10, 99, 5], [12], "length"),
             turn(2, [1, 2, 10, 99, 5, 12, 7], [13])]  # fmt: skip
    first, second = agent.conversation_experiences(turns, 1.0, task_id=0, run_id=0)
    assert first.tokens == [1, 2, 10, 11] and first.action_mask == [True, True]
    assert second.tokens == [1, 2, 10, 99, 5, 12, 7, 13] and second.prompt_length == 5
    assert second.action_mask == [True, False, True] and second.info["turn"] == [1, 2]
    assert "turns [1]" in first.info["split"] and first.info["truncated"] and second.info["truncated"]
    per_turn = agent.conversation_experiences(turns, 1.0, task_id=0, run_id=0, mode="per_turn")
    assert [e.tokens for e in per_turn] == [t.prompt_token_ids + t.token_ids for t in turns]
    assert all(e.action_mask is None and "split" not in e.info for e in per_turn)


def test_the_stream_carries_the_action_mask_and_gives_it_back() -> None:
    merged = Experience(tokens=[1, 2, 3, 4, 5], prompt_length=2, logprobs=[-1.0, 0.0, -1.0], reward=1.0,
                        action_mask=[True, False, True])  # fmt: skip
    plain = Experience(tokens=[1, 2, 3], prompt_length=1, logprobs=[-1.0, -1.0], reward=0.0)
    info = experience_wire.BatchInfo(consumer="c", start=experience_wire.Position(), end=experience_wire.Position(),
                                     experiences=2)  # fmt: skip
    batch = experience_wire.decode(experience_wire.encode([(1, 0, merged), (1, 1, plain)], info))
    assert batch.table.column("mask").to_pylist() == [[False, False, True, False, True], [False, True, True]]
    assert isinstance(batch.table, pa.Table)
    assert [e.action_mask for e in batch.experiences] == [[True, False, True], None]


def test_the_agent_client_refuses_what_it_owns() -> None:
    client = agent.AgentClient(typing.cast(typing.Any, None))
    for bad in ({"stream": True}, {"logprobs": False}, {"extra_body": {"return_token_ids": False}}):
        with pytest.raises(ValueError, match="agent client"):
            asyncio.run(client.chat.completions.create(messages=[], **bad))
    assert client.turns == [] and client.calls == []
