"""The trainer's experience stream: committed steps served in commit order, per-consumer cursors kept durably.

A position is ``(step, offset)``: experience ``offset`` of committed step ``step``. Each consumer (a trainer's
stable name, not its per-process trainer id) has one cursor, the first experience it has not acknowledged, written
durably to ``consumers.json`` beside the manifest before an ack is answered. A read always starts at the
acknowledged cursor and moves nothing: reading again without an ack (a restarted trainer) returns the same
experiences; a batch ends at ``BatchInfo.end``, which the consumer acknowledges once it has used the batch. Steps
whose policy version is older than the read's ``min_policy_version`` (or that have none) are skipped and counted;
those before the first delivered experience are acknowledged at once (so back-pressure cannot wait on them), the
others with the batch. A read blocks until enough experiences arrive; when the explorer has committed its last
step it returns what remains (``finished``), and refuses when nothing does. Retention ``consumed`` deletes a step
file once every consumer's cursor is past it. Back-pressure: the explorer starts no step while the slowest
consumer has ``maxUnconsumedSteps`` committed steps (counting steps in flight) unacknowledged.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from explorer import config as explorer_config
from explorer import experience_wire as wire
from explorer import sink as sink_mod
from explorer.experience import Experience

log = logging.getLogger(__name__)
CURSORS = "consumers.json"
CACHED_STEPS = 8
Row = tuple[int, int, Experience]


class StreamError(Exception):
    """A read or ack the stream refuses; ``status`` is the HTTP status the trainer gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class StepEntry:
    step: int
    experiences: int
    policy_version: int | None = None
    removed: bool = False

    @property
    def readable(self) -> int:
        return 0 if self.removed else self.experiences


class View:
    """The committed steps as one manifest lists them, in order."""

    def __init__(self, entries: Sequence[StepEntry]):
        self.entries = sorted(entries, key=lambda e: e.step)
        self.steps = [e.step for e in self.entries]
        self.by_step = {e.step: e for e in self.entries}

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> View:
        return cls([StepEntry(int(step), e["experiences"], e.get("policyVersion"), bool(e.get("removed")))
                    for step, e in manifest["steps"].items()])  # fmt: skip

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0

    def after(self, step: int) -> list[StepEntry]:
        """Entries from ``step`` on."""
        return self.entries[bisect.bisect_left(self.steps, step) :]

    def normalize(self, pos: wire.Position) -> wire.Position:
        """The same place, moved past steps it has read to the end of (and past empty or removed ones)."""
        step, offset = pos.step, pos.offset
        for entry in self.after(pos.step):
            if entry.step > step:
                step, offset = entry.step, 0
            if offset < entry.readable:
                break
            step, offset = entry.step + 1, 0
        return wire.Position(step=step, offset=offset)

    def check(self, pos: wire.Position) -> None:
        """Refuse a position that is not one this stream has committed."""
        entry = self.by_step.get(pos.step)
        valid = pos.offset <= entry.experiences if entry else pos.offset == 0 and pos.step <= self.last_step + 1
        if not valid:
            raise StreamError(409, f"cursor {pos} is not a committed position (the explorer has committed step "
                                   f"{self.last_step})")  # fmt: skip

    def unconsumed(self, pos: wire.Position) -> tuple[int, int]:
        """Committed steps and experiences at or after ``pos``."""
        start = self.normalize(pos)
        entries = [e for e in self.after(start.step) if not e.removed]
        done = start.offset if start.step in self.by_step else 0
        return len(entries), sum(e.readable for e in entries) - done


@dataclasses.dataclass
class Scan:
    rows: list[Row]
    end: wire.Position
    skipped: int
    stale_until: wire.Position  # everything before it is stale (or read): acknowledged by the read itself
    skipped_before: int = 0  # how many of ``skipped`` lie before ``stale_until``


def scan(
    view: View, start: wire.Position, limit: int, min_version: int | None, load: Callable[[int], list[Experience]]
) -> Scan:
    """Up to ``limit`` experiences from ``start`` in commit order, steps older than ``min_version`` skipped."""
    pos = view.normalize(start)
    rows: list[Row] = []
    skipped, end, stale_until, skipped_before = 0, pos, pos, 0
    for entry in view.after(pos.step):
        first = pos.offset if entry.step == pos.step else 0
        stale = min_version is not None and (entry.policy_version is None or entry.policy_version < min_version)
        if stale or entry.readable <= first:
            skipped += entry.readable - first if stale else 0
            end = wire.Position(step=entry.step + 1)
            if not rows:
                stale_until, skipped_before = end, skipped
            continue
        take = load(entry.step)[first : first + limit - len(rows)]
        rows += [(entry.step, first + i, exp) for i, exp in enumerate(take)]
        end = wire.Position(step=entry.step, offset=first + len(take))
        if len(rows) >= limit:
            break
    return Scan(rows, view.normalize(end), skipped, view.normalize(stale_until), skipped_before)


def load_cursors(directory: Path) -> dict[str, wire.Position]:
    path = directory / CURSORS
    try:
        data = json.loads(path.read_text())
        return {name: wire.Position.model_validate(c) for name, c in data["consumers"].items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({err}); fix or remove it (consumers then start over)") from None


class ExperienceStream:
    """Serves the sink's committed steps to consumers (coordinator side; every method runs on one event loop)."""

    def __init__(self, sink: sink_mod.ExperienceSink, spec: explorer_config.ExperienceSpec, total_steps: int):
        self.sink = sink
        self.spec = spec
        self.total_steps = total_steps
        self.cursors = load_cursors(sink.directory)
        if spec.consumers:  # declared: exactly these count, from the start
            self.cursors = {name: self.cursors.get(name, wire.Position()) for name in spec.consumers}
        self.holding: str | None = None  # why the explorer is waiting for room, while it is
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._cache: collections.OrderedDict[int, list[Experience]] = collections.OrderedDict()

    # ---- signals -------------------------------------------------------------------------------------------

    @property
    def next_change(self) -> asyncio.Event:
        """Set at the next ``notify``: take it before looking, then wait on it (no change slips in between)."""
        return self._changed

    def notify(self) -> None:
        """Something changed (a commit, an ack, the explorer's hold): every waiter looks again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_change(self, changed: asyncio.Event, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    # ---- reading -------------------------------------------------------------------------------------------

    async def view(self) -> View:
        return View.of(await asyncio.to_thread(self.sink.manifest))

    def _load(self, step: int) -> list[Experience]:
        if step not in self._cache:
            self._cache[step] = self.sink.read_step(step)
            while len(self._cache) > CACHED_STEPS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(step)
        return self._cache[step]

    def finished(self, view: View) -> bool:
        return view.last_step >= self.total_steps

    def _progress(self, view: View) -> str:
        text = f"the explorer has committed step {view.last_step} of {self.total_steps}"
        return text + (f" and is waiting for {self.holding}" if self.holding else "")

    async def _consumer(self, name: str) -> wire.Position:
        """The consumer's cursor; a new name registers (at the start) unless the job declares its consumers."""
        if name in self.cursors:
            return self.cursors[name]
        if self.spec.consumers:
            raise StreamError(403, f"unknown consumer {name!r}: this job's experiences.consumers are "
                                   f"{self.spec.consumers}")  # fmt: skip
        if len(self.cursors) >= explorer_config.MAX_CONSUMERS:
            raise StreamError(409, f"already {len(self.cursors)} consumers {sorted(self.cursors)}: no more register")
        log.info("experience consumer %r registered", name)
        await self._save(name, wire.Position())
        return self.cursors[name]

    async def _save(self, name: str, cursor: wire.Position) -> None:
        self.cursors[name] = cursor
        body = json.dumps({"consumers": {n: c.to_wire() for n, c in sorted(self.cursors.items())}}, indent=1)
        await asyncio.to_thread(sink_mod.write_durably, self.sink.directory / CURSORS, body.encode())

    async def read(self, request: wire.ReadRequest) -> tuple[bytes, wire.BatchInfo]:
        """The next batch for ``request.consumer`` as Arrow IPC bytes, waiting up to its timeout."""
        if request.ack is not None:
            await self.ack(request.consumer, request.ack)
        deadline = asyncio.get_running_loop().time() + request.timeout_seconds
        limit = request.max_experiences
        began: wire.Position | None = None
        skipped_earlier = 0  # stale experiences this read acknowledged while it waited
        while True:
            changed = self._changed
            async with self._lock:
                start = await self._consumer(request.consumer)
                began = began or start
                view = await self.view()
                found = await asyncio.to_thread(scan, view, start, limit, request.min_policy_version, self._load)
                if found.stale_until.key > view.normalize(start).key:
                    await self._save(request.consumer, found.stale_until)
                    self.notify()  # the explorer may have room now
            found.skipped += skipped_earlier
            skipped_earlier += found.skipped_before
            done = self.finished(view)
            if len(found.rows) >= limit or (done and found.rows):
                info = wire.BatchInfo(consumer=request.consumer, start=began, end=found.end,
                                      experiences=len(found.rows), skipped=found.skipped,
                                      finished=done and view.unconsumed(found.end)[0] == 0,
                                      committed_step=view.last_step, total_steps=self.total_steps)  # fmt: skip
                return await asyncio.to_thread(wire.encode, found.rows, info), info
            self._refuse_unservable(request, view, found)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise StreamError(504, f"timed out after {request.timeout_seconds:g} s waiting for {limit} "
                                       f"experiences for consumer {request.consumer!r}: "
                                       f"{self._available(found)}; {self._progress(view)}")  # fmt: skip
            await self._wait_change(changed, remaining)

    @staticmethod
    def _available(found: Scan) -> str:
        skipped = f" ({found.skipped} more skipped as older than the minimum policy version)" if found.skipped else ""
        return f"{len(found.rows)} available{skipped}"

    def _refuse_unservable(self, request: wire.ReadRequest, view: View, found: Scan) -> None:
        """A read no wait can satisfy: nothing remains, or the explorer holds until this consumer acknowledges."""
        name = request.consumer
        if self.finished(view):
            unskipped = " it did not skip" if found.skipped else ""
            raise StreamError(410, f"the explorer finished all {self.total_steps} steps and consumer {name!r} has "
                                   f"consumed every experience{unskipped}")  # fmt: skip
        limit = self.spec.max_unconsumed_steps
        behind = view.unconsumed(self.cursors[name])[0]
        if self.holding is not None and limit is not None and behind >= limit:
            raise StreamError(409, f"consumer {name!r} asks for {request.max_experiences} experiences but "
                                   f"{self._available(found)}, and the explorer holds at {behind} unconsumed steps "
                                   f"(experiences.maxUnconsumedSteps {limit}) until it acknowledges some: ask for "
                                   "fewer, or raise the limit")  # fmt: skip

    # ---- acknowledging -------------------------------------------------------------------------------------

    async def ack(self, name: str, cursor: wire.Position) -> wire.AckResult:
        """Everything before ``cursor`` is consumed (an older cursor changes nothing); retention may then delete."""
        async with self._lock:
            current = await self._consumer(name)
            view = await self.view()
            view.check(cursor)
            moved = view.normalize(cursor if cursor.key > current.key else current)
            if moved.key != current.key:
                await self._save(name, moved)
            removed = await self._retain(view)
        self.notify()
        return wire.AckResult(consumer=name, cursor=moved, removed_steps=removed)

    async def _retain(self, view: View) -> list[int]:
        if self.spec.retention != "consumed" or not self.cursors:
            return []
        floor = min(view.normalize(c).step for c in self.cursors.values())
        removable = [e.step for e in view.entries if not e.removed and e.step < floor]
        for step in removable:
            await asyncio.to_thread(self.sink.remove_step, step)
            self._cache.pop(step, None)
        if removable:
            log.info("retention: removed steps %s, acknowledged by every consumer", removable)
        return removable

    # ---- the explorer's side -------------------------------------------------------------------------------

    async def hold_reason(self, in_flight: int = 0) -> str | None:
        """Why the explorer may not start another step with ``in_flight`` steps still uncommitted (None: it may)."""
        limit = self.spec.max_unconsumed_steps
        if limit is None or not self.cursors:
            return None
        view = await self.view()
        behind, name = max(((view.unconsumed(c)[0], n) for n, c in sorted(self.cursors.items())), key=lambda b: b[0])
        if behind + in_flight < limit:
            return None
        return f"consumer {name!r} to acknowledge experiences ({behind} unconsumed steps, limit {limit})"

    async def wait_for_room(self, on_hold: Callable[[str | None], None]) -> None:
        """Block while the slowest consumer is at the limit; ``on_hold`` hears why (and None when the hold ends)."""
        try:
            while True:
                changed = self._changed  # taken before looking: a change meanwhile wakes the wait below
                reason = await self.hold_reason()
                if reason is None:
                    return
                if reason != self.holding:
                    log.info("back-pressure: waiting for %s", reason)
                    self.holding = reason
                    on_hold(reason)
                    self.notify()  # reads that only this hold keeps waiting are refused now
                await self._wait_change(changed, None)
        finally:
            if self.holding is not None:
                self.holding = None
                on_hold(None)

    async def behind(self) -> dict[str, int]:
        """Unconsumed experiences (or empty steps) of each consumer that has not read to the end."""
        view = await self.view()
        return {n: view.unconsumed(c)[1] for n, c in self.cursors.items() if view.unconsumed(c)[0]}

    async def drain(self, timeout: float, on_wait: Callable[[str], None]) -> dict[str, int]:
        """After the last step: wait up to ``timeout`` until every consumer has read to the end; who has not."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            changed = self._changed
            left = await self.behind()
            remaining = deadline - asyncio.get_running_loop().time()
            if not left or remaining <= 0:
                return left
            counts = ", ".join(f"{n!r}: {k}" for n, k in sorted(left.items()))
            on_wait(f"consumers to acknowledge the last experiences ({counts})")
            await self._wait_change(changed, remaining)

    async def state(self) -> wire.StreamState:
        view = await self.view()
        consumers = {}
        for name, cursor in sorted(self.cursors.items()):
            steps, experiences = view.unconsumed(cursor)
            consumers[name] = wire.ConsumerState(cursor=view.normalize(cursor), unconsumed_steps=steps,
                                                 unconsumed_experiences=experiences)  # fmt: skip
        return wire.StreamState(committed_step=view.last_step, total_steps=self.total_steps,
                                finished=self.finished(view), retention=self.spec.retention,
                                max_unconsumed_steps=self.spec.max_unconsumed_steps, waiting_for=self.holding,
                                consumers=consumers)  # fmt: skip
