"""The rollout runtime: turns tasks into experiences against vLLM engines."""
