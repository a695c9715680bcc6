"""How the workflow spec's sampling fields become vLLM request parameters (pure; on vLLM: runtime/test_sampling)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from explorer import config, inference, workflows


def test_defaults_send_nothing_extra_and_every_set_field_reaches_its_vllm_name() -> None:
    assert config.WorkflowSpec().sampling() == {}
    spec = config.WorkflowSpec.model_validate({
        "topP": 0.9, "topK": 20, "minP": 0.05, "stop": ["</answer>"], "minTokens": 2, "repetitionPenalty": 1.1,
        "presencePenalty": 0.5, "frequencyPenalty": -0.5, "maxPromptTokens": 512, "seed": 100,
    })  # fmt: skip
    assert spec.sampling() == {
        "top_p": 0.9, "top_k": 20, "min_p": 0.05, "stop": ["</answer>"], "min_tokens": 2, "repetition_penalty": 1.1,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "truncate_prompt_tokens": 512,
    }  # fmt: skip
    assert inference.sampling_params(spec.sampling()) == spec.sampling()
    assert workflows.sampled(spec, run_id_base=16)["seed"] == 116, "each run batch its own reproducible seed"
    assert workflows.sampled(config.WorkflowSpec(), 16)["seed"] is None


@pytest.mark.parametrize("field,value", [("topP", 0), ("topK", 0), ("minP", 1.5), ("stop", [""]),
                                         ("repetitionPenalty", 0), ("maxPromptTokens", 0)])  # fmt: skip
def test_out_of_range_sampling_fields_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        config.WorkflowSpec.model_validate({field: value})


def test_the_system_prompt_opens_a_conversation_unless_it_has_one() -> None:
    spec = config.WorkflowSpec(system_prompt="Be brief.")
    user = [{"role": "user", "content": "2+3?"}]
    assert workflows.with_system(user, spec) == [{"role": "system", "content": "Be brief."}, *user]
    own = [{"role": "system", "content": "Mine."}, *user]
    assert workflows.with_system(own, spec) == own
    assert workflows.with_system(user, config.WorkflowSpec()) == user
