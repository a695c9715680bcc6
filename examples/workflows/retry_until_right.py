"""A custom agentic workflow to copy: the model answers, hears whether it was right, and tries again.

Run it with ``workflow: {name: custom, importPath: "examples.workflows.retry_until_right:RetryUntilRight",
args: {maxAttempts: 3}}``. Each run is one conversation through an ``AgentClient`` (the OpenAI SDK's call and
types); its turns become one experience whose action mask covers only the model's own tokens.
"""

from __future__ import annotations

from typing import Any

from explorer import agent, config, workflows
from explorer.experience import Experience
from explorer.inference import InferenceModel


class RetryUntilRight:
    def __init__(self, spec: config.WorkflowSpec):
        self.spec = spec
        self.max_attempts = int(spec.args.get("maxAttempts", 3))

    async def run(
        self, task: workflows.Task, model: InferenceModel, repeat_times: int, run_id_base: int
    ) -> list[Experience]:
        experiences = []
        for run_id in range(run_id_base, run_id_base + repeat_times):
            experiences += await self.run_once(task, model, run_id)
        return experiences

    async def run_once(self, task: workflows.Task, model: InferenceModel, run_id: int) -> list[Experience]:
        client = agent.AgentClient(model, workflows.request_defaults(self.spec, run_id))
        reward = workflows.task_reward(task, self.spec)
        messages: list[dict[str, Any]] = workflows.opening(task, self.spec)
        score, attempts = 0.0, 0
        while True:
            response = await client.chat.completions.create(messages=messages)
            answer = response.choices[0].message.content or ""
            score, attempts = reward(answer), attempts + 1
            if score > 0 or attempts == self.max_attempts:
                break
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "That is not right. Try again."}]  # fmt: skip
        # Fewer attempts, more reward: a right first answer scores 1.0, a right third one 1/3.
        return agent.conversation_experiences(client.turns, score / attempts, task_id=task.task_id, run_id=run_id,
                                              info={"attempts": attempts})  # fmt: skip
