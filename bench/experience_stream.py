"""Benchmark of the trainer's experience stream against reading the same step files from disk, in one run.

A real ``ExperienceSink`` (Parquet, fsync'd commits) and ``ExperienceStream`` served on the real sync API (bearer
token, Arrow IPC) on loopback; a real ``TrainerClient`` reads and acknowledges. Steps of ``--per-step`` experiences,
each ``--prompt`` + ``--response`` tokens with logprobs (1k tokens: a typical RL response). Printed side by side:

1. Throughput: every step committed first, then drained — experiences/s and MB/s through the stream, and through
   ``sink.read_step`` of the same files (what a trainer mounting the job volume would do: the baseline).
2. Latency from commit to delivery, per step: the trainer waits in ``experiences()``, the explorer commits a step
   (``commit`` returns, then the stream is notified, as the explorer does); delivery is when the client holds the
   decoded batch. Beside it: a trainer polling the manifest file every ``--poll-ms`` and reading the new step file.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from explorer import config, credentials, local_engine, status_api
from explorer import sink as sink_mod
from explorer.experience import Experience
from explorer.experience_stream import ExperienceStream
from explorer.weight_sync import api
from explorer.weight_sync.trainer import TrainerClient

T = TypeVar("T")


def make_step(step: int, count: int, prompt: int, response: int) -> list[Experience]:
    def one(i: int) -> Experience:
        return Experience(tokens=[(step * 7 + i + t) % 32000 for t in range(prompt + response)], prompt_length=prompt,
                          logprobs=[-0.5 - (t % 7) / 10 for t in range(response)], reward=float(i % 2),
                          task_id=i // 4, run_id=i, batch_id=str(step), policy_version=1,
                          info={"finish_reason": "length"})  # fmt: skip

    return [one(i) for i in range(count)]


class Served:
    """The stream of ``sink`` on the sync API, on a loop in a thread (as in the coordinator)."""

    def __init__(self, sink: sink_mod.ExperienceSink, total_steps: int):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        spec = config.ExperienceSpec(path=str(sink.directory), format="parquet")
        self.stream = self.call(lambda: _make_stream(sink, spec, total_steps))
        self.port = local_engine.free_port()
        app = api.build_app(None, lambda: self.stream)
        self.runner = self.call(lambda: status_api.serve_app(app, "127.0.0.1", self.port))

    def call(self, make: Callable[[], Any]) -> Any:
        async def run() -> Any:
            result = make()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(300)

    def notify(self) -> None:
        self.loop.call_soon_threadsafe(self.stream.notify)

    def close(self) -> None:
        self.call(self.runner.cleanup)
        self.loop.call_soon_threadsafe(self.loop.stop)


async def _make_stream(sink: sink_mod.ExperienceSink, spec: config.ExperienceSpec, steps: int) -> ExperienceStream:
    return ExperienceStream(sink, spec, steps)  # its asyncio primitives belong to the serving loop


def throughput(args: argparse.Namespace, work: Path) -> None:
    sink = sink_mod.ExperienceSink(work / "throughput", "parquet")
    for step in range(1, args.steps + 1):
        sink.commit(step, make_step(step, args.per_step, args.prompt, args.response), policy_version=1)
    size = sum(p.stat().st_size for p in sink.directory.glob("step-*.parquet"))
    total = args.steps * args.per_step

    started = time.monotonic()
    read = sum(len(sink.read_step(step)) for step in range(1, args.steps + 1))
    disk = time.monotonic() - started
    assert read == total

    served = Served(sink, args.steps)
    try:
        with TrainerClient(f"127.0.0.1:{served.port}", consumer="bench") as trainer:
            started, got = time.monotonic(), 0
            while got < total:
                batch = trainer.experiences(args.per_step, timeout=60)
                got += batch.table.num_rows
                trainer.ack(batch)
            stream = time.monotonic() - started
    finally:
        served.close()
    assert got == total, (got, total)
    print(f"{total} experiences in {args.steps} steps ({size / 1e6:.1f} MB of Parquet):")
    print(f"  read the step files from disk : {total / disk:9.0f} experiences/s  {size / disk / 1e6:7.1f} MB/s "
          "(baseline)")  # fmt: skip
    print(f"  experience stream (read + ack): {total / stream:9.0f} experiences/s  {size / stream / 1e6:7.1f} MB/s  "
          f"= {disk / stream:.2f}x the disk read")  # fmt: skip


def pause(step: int) -> float:
    """When step ``step`` is committed after the reader starts waiting: the same spread for both readers, and not in
    phase with the poll interval (a fixed delay would flatter or punish polling)."""
    return random.Random(step).uniform(0.2, 0.9)


def stream_latency(args: argparse.Namespace, work: Path) -> list[float]:
    sink = sink_mod.ExperienceSink(work / "latency-stream", "parquet")
    served = Served(sink, args.latency_steps)
    delays: list[float] = []
    try:
        with TrainerClient(f"127.0.0.1:{served.port}", consumer="bench") as trainer:
            for step in range(1, args.latency_steps + 1):
                committed: list[float] = []

                def commit(step: int = step, committed: list[float] = committed) -> None:
                    time.sleep(pause(step))  # the trainer is waiting in experiences() by now
                    sink.commit(step, make_step(step, args.per_step, args.prompt, args.response), policy_version=1)
                    committed.append(time.monotonic())
                    served.notify()

                producer = threading.Thread(target=commit)
                producer.start()
                batch = trainer.experiences(args.per_step, timeout=60)
                delivered = time.monotonic()
                producer.join()
                assert batch.table.num_rows == args.per_step
                delays.append(delivered - committed[0])
                trainer.ack(batch)
    finally:
        served.close()
    return delays


def polling_latency(args: argparse.Namespace, work: Path) -> list[float]:
    sink = sink_mod.ExperienceSink(work / "latency-poll", "parquet")
    delays: list[float] = []
    for step in range(1, args.latency_steps + 1):
        committed: list[float] = []

        def commit(step: int = step, committed: list[float] = committed) -> None:
            time.sleep(pause(step))
            sink.commit(step, make_step(step, args.per_step, args.prompt, args.response), policy_version=1)
            committed.append(time.monotonic())

        producer = threading.Thread(target=commit)
        producer.start()
        while str(step) not in sink.manifest()["steps"]:
            time.sleep(args.poll_ms / 1000)
        rows = sink.read_step(step)
        delivered = time.monotonic()
        producer.join()
        assert len(rows) == args.per_step
        delays.append(delivered - committed[0])
    return delays


def describe(delays: list[float]) -> str:
    ordered = sorted(delays)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"p50 {statistics.median(ordered) * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms  max {ordered[-1] * 1000:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--latency-steps", type=int, default=10)
    parser.add_argument("--per-step", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=768)
    parser.add_argument("--poll-ms", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    credentials.ensure_local(work / "credentials")  # the stream needs the trainer token, as in a pod
    throughput(args, work)
    stream = stream_latency(args, work)
    polled = polling_latency(args, work)
    print(f"commit -> delivery, {args.per_step} experiences per step, {args.latency_steps} steps:")
    print(f"  trainer polls the manifest every {args.poll_ms} ms: {describe(polled)} (baseline)")
    print(f"  experience stream (blocking read) : {describe(stream)}")


if __name__ == "__main__":
    main()
