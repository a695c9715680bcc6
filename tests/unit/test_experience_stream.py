"""The experience stream over a real sink on disk (no Ray, no explorer): cursors, redelivery, skipping, blocking reads,
the end of the stream, retention, back-pressure, the Arrow batch, and the HTTP routes with the real client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from explorer import config, experience_stream, sink
from explorer import experience_wire as wire
from explorer.experience import Experience
from explorer.experience_stream import ExperienceStream, StreamError
from explorer.status_api import serve_app
from explorer.weight_sync import api
from explorer.weight_sync.trainer import ExperiencesExhaustedError, ExperienceTimeoutError, TrainerClient
from tests.auth import trainer_headers
from tests.conftest import free_port


def experiences(step: int, n: int, version: int | None = None) -> list[Experience]:
    return [Experience(tokens=[7, 8, 9, step], prompt_length=2, logprobs=[-0.5, -0.25], reward=float(i),
                       batch_id=str(step), task_id=i, run_id=0, policy_version=version,
                       policy_versions=[] if version is None else [version], info={"i": i})
            for i in range(n)]  # fmt: skip


def make_stream(directory: Path, total: int = 4, **spec: Any) -> ExperienceStream:
    out = sink.ExperienceSink(directory, "jsonl")
    return ExperienceStream(out, config.ExperienceSpec.model_validate({"path": str(directory), **spec}), total)


def commit(stream: ExperienceStream, step: int, n: int, version: int | None = None) -> None:
    assert stream.sink.commit(step, experiences(step, n, version), version)
    stream.notify()


async def read(
    stream: ExperienceStream, consumer: str, n: int, timeout: float = 0, min_version: int | None = None
) -> wire.ExperienceBatch:
    request = wire.ReadRequest(consumer=consumer, max_experiences=n, timeout_seconds=timeout,
                               min_policy_version=min_version)  # fmt: skip
    data, info = await stream.read(request)
    batch = wire.decode(data)
    assert batch.info == info
    return batch


def positions(batch: wire.ExperienceBatch) -> list[tuple[int, int]]:
    return list(zip(batch.table["step"].to_pylist(), batch.table["index"].to_pylist(), strict=True))


def at(step: int, offset: int = 0) -> wire.Position:
    return wire.Position(step=step, offset=offset)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_a_read_starts_at_the_acknowledged_cursor_so_an_unacknowledged_batch_comes_again(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    commit(stream, 1, 3)
    commit(stream, 2, 3)

    async def scenario() -> None:
        first = await read(stream, "trainer", 4)
        assert positions(first) == [(1, 0), (1, 1), (1, 2), (2, 0)]
        assert (first.info.start, first.cursor, first.finished) == (at(0), at(2, 1), False)
        again = await read(stream, "trainer", 4)  # a restarted trainer, nothing acknowledged
        assert positions(again) == positions(first)
        assert (await stream.ack("trainer", first.cursor)).cursor == at(2, 1)
        rest = await read(stream, "trainer", 2)
        assert positions(rest) == [(2, 1), (2, 2)] and rest.cursor == at(3)  # past the end of step 2

    run(scenario)


def test_cursors_are_durable_and_an_older_or_impossible_ack_is_handled(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    commit(stream, 1, 3)

    async def scenario() -> None:
        await stream.ack("trainer", at(1, 2))
        restarted = make_stream(tmp_path)
        assert restarted.cursors == {"trainer": at(1, 2)}
        assert json.loads((tmp_path / experience_stream.CURSORS).read_text()) == {
            "consumers": {"trainer": {"step": 1, "offset": 2}}}  # fmt: skip
        assert (await restarted.ack("trainer", at(1, 1))).cursor == at(1, 2)  # an old batch acknowledged again
        for beyond in (at(1, 4), at(3), at(2, 1)):
            with pytest.raises(StreamError, match="not a committed position") as refused:
                await restarted.ack("trainer", beyond)
            assert refused.value.status == 409
        assert (await restarted.ack("trainer", at(1, 3))).cursor == at(2)  # the end of step 1: the next step

    run(scenario)


def test_a_read_waits_for_the_next_commit_and_its_timeout_names_the_progress(tmp_path: Path) -> None:
    stream = make_stream(tmp_path, total=5)
    commit(stream, 1, 3)

    async def scenario() -> None:
        waiting = asyncio.create_task(read(stream, "trainer", 5, timeout=60))
        await asyncio.to_thread(stream.sink.commit, 2, experiences(2, 3), None)  # as the explorer commits
        stream.notify()
        batch = await asyncio.wait_for(waiting, 30)
        assert positions(batch) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
        with pytest.raises(StreamError) as timed_out:
            await read(stream, "trainer", 10, timeout=0.2)
        assert timed_out.value.status == 504
        assert str(timed_out.value) == ("timed out after 0.2 s waiting for 10 experiences for consumer 'trainer': "
                                        "6 available; the explorer has committed step 2 of 5")  # fmt: skip

    run(scenario)


def test_stale_steps_are_skipped_counted_and_acknowledged_at_once_when_they_lead(tmp_path: Path) -> None:
    stream = make_stream(tmp_path, total=4)
    commit(stream, 1, 2)  # before the first sync: no version
    commit(stream, 2, 2, version=1)
    commit(stream, 3, 2, version=2)

    async def scenario() -> None:
        batch = await read(stream, "trainer", 2, min_version=2)
        assert positions(batch) == [(3, 0), (3, 1)] and batch.skipped == 4
        assert {e.policy_version for e in batch.experiences} == {2}
        assert stream.cursors["trainer"] == at(3)  # the stale steps are acknowledged without an ack
        with pytest.raises(StreamError) as timed_out:
            await read(stream, "trainer", 1, min_version=3)
        assert str(timed_out.value).endswith("'trainer': 0 available (2 more skipped as older than the minimum policy "
                                             "version); the explorer has committed step 3 of 4")  # fmt: skip
        assert stream.cursors["trainer"] == at(4)
        commit(stream, 4, 2, version=3)
        mixed = await read(stream, "other", 10, min_version=2)  # stale steps before the first delivered one
        assert (positions(mixed), mixed.skipped, mixed.finished) == ([(3, 0), (3, 1), (4, 0), (4, 1)], 4, True)

    run(scenario)


def test_a_waiting_read_counts_every_stale_experience_it_passed_and_starts_where_it_began(tmp_path: Path) -> None:
    """The count was lost: each wake-up's scan started after the stale steps the previous one had acknowledged."""
    stream = make_stream(tmp_path, total=10)
    commit(stream, 1, 2)

    async def scenario() -> None:
        async def cursor_at(position: wire.Position) -> None:
            while True:
                change = stream.next_change
                if stream.cursors.get("trainer") == position:
                    return
                await asyncio.wait_for(change.wait(), 30)

        waiting = asyncio.create_task(read(stream, "trainer", 1, timeout=60, min_version=2))
        await cursor_at(at(2))  # its first look acknowledged step 1
        commit(stream, 2, 3, version=1)
        await cursor_at(at(3))  # its second, step 2: it waited in between
        commit(stream, 3, 1, version=2)
        batch = await asyncio.wait_for(waiting, 30)
        assert (positions(batch), batch.skipped, batch.info.start) == ([(3, 0)], 5, at(0))

    run(scenario)


def test_the_last_experiences_come_with_finished_and_then_reads_are_refused(tmp_path: Path) -> None:
    stream = make_stream(tmp_path, total=2)
    commit(stream, 1, 2)
    commit(stream, 2, 2)

    async def scenario() -> None:
        assert (await read(stream, "trainer", 2)).finished is False
        last = await read(stream, "trainer", 10, timeout=60)  # returns at once: nothing more will come
        assert positions(last) == [(1, 0), (1, 1), (2, 0), (2, 1)] and last.finished
        exactly = await read(stream, "trainer", 4)
        assert exactly.finished  # a full batch that ends the stream says so too
        await stream.ack("trainer", last.cursor)
        with pytest.raises(StreamError, match="finished all 2 steps and consumer 'trainer' has consumed every") as end:
            await read(stream, "trainer", 1, timeout=60)
        assert end.value.status == 410

    run(scenario)


def test_empty_steps_are_passed_over(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    commit(stream, 1, 2)
    commit(stream, 2, 0)  # every task of the step failed
    commit(stream, 3, 1)

    async def scenario() -> None:
        batch = await read(stream, "trainer", 2)
        assert batch.cursor == at(3)
        await stream.ack("trainer", batch.cursor)
        assert (await stream.state()).consumers["trainer"].unconsumed_steps == 1

    run(scenario)


def test_consumed_retention_deletes_only_steps_every_consumer_acknowledged(tmp_path: Path) -> None:
    stream = make_stream(tmp_path, retention="consumed", consumers=["a", "b"])
    for step in (1, 2, 3):
        commit(stream, step, 2)

    async def scenario() -> None:
        assert (await stream.ack("a", (await read(stream, "a", 4)).cursor)).removed_steps == []  # b has read nothing
        assert (await stream.ack("b", (await read(stream, "b", 3)).cursor)).removed_steps == [1]
        out = stream.sink
        assert not (tmp_path / "step-00000001.jsonl").exists() and (tmp_path / "step-00000002.jsonl").exists()
        assert out.manifest()["steps"]["1"]["removed"] is True and out.committed_steps() == {1, 2, 3}
        with pytest.raises(FileNotFoundError, match="step 1 was removed after every consumer acknowledged it"):
            out.read_step(1)
        assert positions(await read(stream, "b", 1)) == [(2, 1)]
        with pytest.raises(StreamError, match=r"unknown consumer 'c': this job's experiences.consumers are"):
            await read(stream, "c", 1)
        assert (await stream.ack("a", at(4))).removed_steps == []  # b is still in step 2
        assert (await stream.ack("b", at(4))).removed_steps == [2, 3]

    run(scenario)
    assert list(tmp_path.glob("step-*")) == []


def test_keep_retention_deletes_nothing(tmp_path: Path) -> None:
    stream = make_stream(tmp_path)
    commit(stream, 1, 2)

    async def scenario() -> None:
        assert (await stream.ack("trainer", at(2))).removed_steps == []
        assert (tmp_path / "step-00000001.jsonl").exists()

    run(scenario)


def test_back_pressure_counts_the_slowest_consumer_and_the_steps_in_flight(tmp_path: Path) -> None:
    stream = make_stream(tmp_path, total=10, maxUnconsumedSteps=2)
    commit(stream, 1, 2)
    commit(stream, 2, 2)

    async def scenario() -> None:
        assert await stream.hold_reason() is None  # no consumer yet: nobody to wait for
        await read(stream, "fast", 4)
        await stream.ack("fast", at(3))
        await read(stream, "slow", 1)
        assert await stream.hold_reason() == "consumer 'slow' to acknowledge experiences (2 unconsumed steps, limit 2)"
        await stream.ack("slow", at(2))
        assert await stream.hold_reason() is None and await stream.hold_reason(in_flight=1) is not None
        commit(stream, 3, 2)
        holds: list[str | None] = []
        held = asyncio.Event()
        waiting = asyncio.create_task(stream.wait_for_room(lambda r: (holds.append(r), held.set())))
        await asyncio.wait_for(held.wait(), 10)
        assert not waiting.done() and stream.holding == holds[0]
        # The hold waits on this consumer: a read for more than it can get fails at once instead of timing out.
        with pytest.raises(StreamError, match=r"explorer holds at 2 unconsumed steps \(experiences.maxUnconsumedSteps"):
            await read(stream, "slow", 5, timeout=600)
        with pytest.raises(StreamError, match="waiting for consumer 'slow'"):  # not the fast one's fault: it waits
            await read(stream, "fast", 5, timeout=0.1)
        await stream.ack("slow", at(3))
        await asyncio.wait_for(waiting, 10)
        assert holds == ["consumer 'slow' to acknowledge experiences (2 unconsumed steps, limit 2)", None]
        assert stream.holding is None

    run(scenario)


def test_the_arrow_batch_carries_every_field_and_a_response_mask(tmp_path: Path) -> None:
    rows = [(5, i, e) for i, e in enumerate(experiences(5, 2, version=3))]
    info = wire.BatchInfo(consumer="t", start=at(5), end=at(6), experiences=2, committed_step=5, total_steps=9)
    batch = wire.decode(wire.encode(rows, info))
    assert batch.info == info and len(batch) == 2
    assert batch.experiences == [e for _, _, e in rows]
    assert batch.table["mask"].to_pylist() == [[False, False, True, True]] * 2
    assert str(batch.table.schema.field("tokens").type) == "list<item: int32>"
    assert str(batch.table.schema.field("logprobs").type) == "list<item: float>"
    nameless = wire.decode(wire.encode([(1, 0, experiences(1, 1)[0])], info)).table["policy_version"].to_pylist()
    assert nameless == [None]


def test_requests_and_the_config_are_validated() -> None:
    with pytest.raises(ValidationError, match="consumer"):
        wire.ReadRequest.model_validate({"consumer": "has space", "maxExperiences": 1})
    with pytest.raises(ValidationError, match="maxExperiences"):
        wire.ReadRequest.model_validate({"consumer": "t", "maxExperiences": 0})
    spec = config.ExperienceSpec()
    assert (spec.retention, spec.max_unconsumed_steps, spec.consumers, spec.drain_timeout_seconds) == (
        "keep", None, [], 600)  # fmt: skip
    with pytest.raises(ValidationError, match="retention"):
        config.ExperienceSpec.model_validate({"retention": "never"})
    with pytest.raises(ValidationError, match="maxUnconsumedSteps"):
        config.ExperienceSpec.model_validate({"maxUnconsumedSteps": 0})


def test_the_routes_answer_arrow_batches_and_json_errors_to_the_real_client(tmp_path: Path) -> None:
    stream = make_stream(tmp_path, total=3)
    commit(stream, 1, 3)
    port = free_port()

    async def scenario() -> None:
        import httpx

        runner = await serve_app(api.build_app(None, lambda: stream), "127.0.0.1", port)
        client = TrainerClient(f"127.0.0.1:{port}")
        try:
            batch = await asyncio.to_thread(client.experiences, 2)
            assert positions(batch) == [(1, 0), (1, 1)] and batch.cursor == at(1, 2)
            again = await asyncio.to_thread(client.experiences, 1, ack_previous=True)  # acks the first batch
            assert positions(again) == [(1, 2)]
            assert stream.cursors["trainer"] == at(1, 2)
            with pytest.raises(ExperienceTimeoutError, match=r"1 available; the explorer has committed step 1 of 3"):
                await asyncio.to_thread(client.experiences, 2, 0.1)
            assert await asyncio.to_thread(client.ack, at(2)) == at(2)
            state = await asyncio.to_thread(client.experience_state)
            assert (state.committed_step, state.consumers["trainer"].unconsumed_steps) == (1, 0)
            commit(stream, 2, 1)
            commit(stream, 3, 1)
            assert (await asyncio.to_thread(client.experiences, 5)).finished
            await asyncio.to_thread(client.ack, at(4))
            with pytest.raises(ExperiencesExhaustedError):
                await asyncio.to_thread(client.experiences, 1)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=trainer_headers()) as http:
                bad = await http.post("/v1/experiences/read", content=b"{nope")
                assert bad.status_code == 400 and bad.json()["error"].startswith("invalid request body")
                assert (await http.get("/v1/sync")).status_code == 404  # no sync coordinator here
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as anonymous:
                for token in (None, "wrong"):
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    refused = await anonymous.post("/v1/experiences/read", json={"consumer": "thief"}, headers=headers)
                    assert refused.status_code == 401 and "trainer-token" in refused.json()["error"]
        finally:
            await asyncio.to_thread(client.close)
            await runner.cleanup()
        runner = await serve_app(api.build_app(None), "127.0.0.1", port)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=trainer_headers()) as http:
                none = await http.get("/v1/experiences")
                assert none.status_code == 503 and "no experiences to serve" in none.json()["error"]
        finally:
            await runner.cleanup()

    run(scenario)
