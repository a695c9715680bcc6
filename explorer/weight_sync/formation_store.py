"""The key-value store a gloo sync group forms over: kept by the coordinator, reached through its authenticated API.

A torch ``TCPStore`` authenticates nobody: whoever reaches its port can plant any rank's address before the real one
(and so receive or send the group's tensors), and on NCCL jobs vLLM unpickles what the store holds. The gloo group
of a push is therefore formed over this store instead. Each rank writes one key, ``<device>/<rank>``, holding gloo's
own address record (no pickle anywhere); rank 0 is written only by a caller presenting the trainer token, every
other rank only by the job's engines (job token), each key once. A catch-up group (``rendezvous``: a peer engine
sends its weights to one that restarted) has a one-time token for its rank 0 instead of the trainer's. The store
lives only while the group forms: the coordinator closes it as soon as every engine has joined. NCCL groups need no
store at all (the trainer mints the NCCL unique id and hands it over the same API, ``rendezvous``).

``FormationKeys`` is the coordinator's side; ``HttpStore`` is a ``torch.distributed.Store`` that gloo drives in the
engine workers and in the trainer, and ``gloo_group`` forms one rank's group over it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from datetime import timedelta
from typing import Any

import httpx
import torch
from torch._C._distributed_c10d import Store

ROUTE = "/v1/sync/store/{incarnation}"
TRAINER, ENGINE, SOURCE = "trainer", "engine", "source"  # SOURCE: the peer engine that sends in a catch-up group
MAX_VALUE_BYTES = 64 << 10  # gloo's address record of one rank is ~170 bytes
POLL_SECONDS = 20.0  # the longest one GET waits on the coordinator before the client asks again
KEY = re.compile(r"(\d{1,4})/(\d{1,6})")  # gloo's key: device index / rank


class StoreRefusedError(Exception):
    """A store request the coordinator refuses; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class FormationKeys:
    """The keys of one group while it forms, and who may write which."""

    world_size: int
    source_token: str | None = None  # a catch-up group: rank 0 is the peer engine holding this one-time token
    values: dict[str, bytes] = dataclasses.field(default_factory=dict)
    closed: str | None = None
    changed: asyncio.Condition = dataclasses.field(default_factory=asyncio.Condition)

    def check_write(self, key: str, size: int, role: str) -> None:
        """Refuse a write unless ``role`` owns the rank ``key`` names and the key is new."""
        if self.closed:
            raise StoreRefusedError(409, f"the sync group's store is closed ({self.closed})")
        match = KEY.fullmatch(key)
        if match is None:
            raise StoreRefusedError(400, f"store key {key[:80]!r} is not '<device>/<rank>' (only gloo's rendezvous "
                                    "keys are kept here)")  # fmt: skip
        rank = int(match.group(2))
        if rank >= self.world_size:
            raise StoreRefusedError(400, f"store key {key!r} names rank {rank}; the group has {self.world_size} ranks")
        owner = ENGINE if rank else SOURCE if self.source_token else TRAINER
        if role != owner:
            raise StoreRefusedError(403, f"rank {rank}'s key is written by the {owner} only (the {role} token was "
                                    "presented)")  # fmt: skip
        if size > MAX_VALUE_BYTES:
            raise StoreRefusedError(413, f"store value of {size} bytes is over the {MAX_VALUE_BYTES}-byte limit")
        if key in self.values:
            raise StoreRefusedError(409, f"store key {key!r} is already set for this group (each rank joins once)")

    async def put(self, key: str, value: bytes, role: str) -> None:
        self.check_write(key, len(value), role)
        async with self.changed:
            self.values[key] = value
            self.changed.notify_all()

    async def get(self, key: str, wait_seconds: float) -> bytes | None:
        """The value of ``key``, waiting up to ``wait_seconds`` for it to be written (None: not yet)."""

        def ready() -> bool:
            return key in self.values or bool(self.closed)

        async with self.changed:
            if not ready():
                try:
                    await asyncio.wait_for(self.changed.wait_for(ready), wait_seconds)
                except TimeoutError:
                    return None
        if key not in self.values:
            raise StoreRefusedError(409, f"the sync group's store is closed ({self.closed})")
        return self.values[key]

    async def close(self, why: str) -> None:
        async with self.changed:
            self.closed, self.values = why, {}
            self.changed.notify_all()


class HttpStore(Store):
    """A ``torch.distributed.Store`` over the coordinator's store route of one group incarnation.

    Only what gloo's rendezvous calls is implemented (set, get, wait, check); torch refuses any other call as not
    implemented, so nothing is silently emulated.
    """

    def __init__(self, base_url: str, incarnation: str, token: str, timeout: float):
        super().__init__()
        self.url = base_url.rstrip("/") + ROUTE.format(incarnation=incarnation)
        self.wait_seconds = timeout
        self.http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=POLL_SECONDS + 30)

    def _refused(self, response: httpx.Response, key: str) -> RuntimeError:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        return RuntimeError(f"sync store at {self.url} refused {key!r}: HTTP {response.status_code}: {message}")

    def set(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        response = self.http.put(self.url, params={"key": key}, content=data)
        if response.status_code != 200:
            raise self._refused(response, key)

    def _fetch(self, key: str, deadline: float) -> bytes:
        while True:
            wait = max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))
            response = self.http.get(self.url, params={"key": key, "wait": f"{wait:.1f}"})
            if response.status_code == 200:
                return response.content
            if response.status_code != 404:
                raise self._refused(response, key)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sync store key {key!r} was not written within {self.wait_seconds:.0f} s "
                                   "(a rank of the group never joined)")  # fmt: skip

    def get(self, key: str) -> bytes:
        return self._fetch(key, time.monotonic() + self.wait_seconds)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        seconds = self.wait_seconds if timeout is None else timeout.total_seconds()
        deadline = time.monotonic() + seconds
        for key in keys:
            self._fetch(key, deadline)

    def check(self, keys: list[str]) -> bool:
        for key in keys:
            response = self.http.get(self.url, params={"key": key, "wait": "0"})
            if response.status_code == 404:
                return False
            if response.status_code != 200:
                raise self._refused(response, key)
        return True

    def set_timeout(self, timeout: timedelta) -> None:
        self.wait_seconds = timeout.total_seconds()


@dataclasses.dataclass
class GlooMember:
    """One rank's gloo group and the store it formed over (kept alive with it: gloo holds the store, and a Python
    store's methods vanish with its Python object)."""

    group: Any
    store: HttpStore

    def shutdown(self) -> None:
        self.group.shutdown()
        self.store.http.close()


def gloo_group(base_url: str, incarnation: str, token: str, rank: int, world_size: int, timeout: float) -> GlooMember:
    """Join rank ``rank`` of incarnation ``incarnation``'s gloo group through the coordinator at ``base_url``.

    Built from torch alone, as vLLM's stateless groups are (no global process group), so a trainer needs no vLLM
    and does not spend the formation timeout importing it."""
    from torch._C._distributed_c10d import ProcessGroup
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    store = HttpStore(base_url, incarnation, token, timeout)
    group = ProcessGroup(store, rank, world_size)
    backend = ProcessGroupGloo(store, rank, world_size, timeout=timedelta(seconds=timeout))
    backend._set_sequence_number_for_group()
    group._set_default_backend(ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, backend)
    return GlooMember(group, store)
