"""The engine-side staging buffers (pure bookkeeping; vLLM's apply is replaced by a recorder for this unit test):
a push never receives into the buffers backing what the engine serves, and aborted pushes give theirs back."""

from __future__ import annotations

from typing import Any

import pytest
import torch

engine_ext = pytest.importorskip("explorer.weight_sync.engine_ext")


def receive(staging: Any, sizes: list[int], fill: int) -> list[torch.Tensor]:
    staging.start()
    buffers = [staging.buffer(n) for n in sizes]
    for buffer in buffers:
        buffer.fill_(fill)
        staging.staged.append((f"t{fill}-{buffer.numel()}", buffer))
    return buffers


def test_pushes_reuse_free_generations_and_never_the_served_one(monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[list[tuple[str, torch.Tensor]]] = []
    monkeypatch.setattr(engine_ext, "apply_weights", lambda model, config, weights: applied.append(weights))
    staging = engine_ext.Staging()
    sizes = [8, 4]
    staging.prefault(sizes)
    prefaulted = {id(t) for generation in staging._free for t in generation}

    first = receive(staging, sizes, fill=1)
    assert {id(t) for t in first} <= prefaulted  # pre-touched memory, no fresh allocation
    staging.finish(None, None)
    served = {id(t) for t in staging.served.values()}

    for fill in (2, 3, 4):
        incoming = receive(staging, sizes, fill=fill)
        assert not {id(t) for t in incoming} & served, "a push writes into the buffers the engine serves"
        assert all(bool((t == fill - 1).all()) for t in staging.served.values())  # served stays intact meanwhile
        staging.finish(None, None)
        served = {id(t) for t in staging.served.values()}
    assert len(applied) == 4

    # An aborted push (start again before finish) hands its buffers back; the served ones stay untouched.
    aborted = receive(staging, sizes, fill=9)
    staging.start()
    again = [staging.buffer(n) for n in sizes]
    assert [id(t) for t in again] == [id(t) for t in aborted]  # the aborted generation is reused, not leaked
    assert not {id(t) for t in again} & served
    assert all(bool((t == 4).all()) for t in staging.served.values())
