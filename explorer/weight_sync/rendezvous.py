"""The coordinator's side of weight sync: hosts the group store, serves the trainer's control API, drives engines.

A trainer reaches this API at the job's ``status.sync.address``. ``POST /v1/sync/group`` validates the state-dict
metadata against every engine, opens a **fresh store** for this group incarnation (a new port, so no stale keys),
and has every engine join at its rank; the trainer joins as rank 0 with the returned address string, which is the
one string every side uses. ``POST /v1/sync/push`` starts a push: engines receive the whole state dict into a side
buffer, and only when every engine has all of it does the coordinator apply it (pause → finish → reset prefix cache
→ resume). If any engine fails to receive (the trainer died, a timeout), every engine drops its buffer and keeps
serving the previous version, and the group must be formed again. Only this coordinator talks to the engines'
dev-mode routes (the NetworkPolicy keeps everyone else out).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import torch
from aiohttp import web
from pydantic import ValidationError
from torch._C._distributed_c10d import TCPStore

from explorer import config as explorer_config
from explorer import status_api
from explorer.weight_sync import protocol

log = logging.getLogger(__name__)
STORE_PORT_WINDOW = 8  # store ports cycle through sync.port+1 .. sync.port+8 in a pod (the NetworkPolicy opens them)


class SyncError(Exception):
    """A refused or failed sync step; ``status`` is the HTTP status the trainer gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EngineDriver:
    """One engine's weight-transfer routes (vLLM dev mode) and our ``ext_*`` worker methods."""

    def __init__(self, endpoint: explorer_config.EngineEndpoint, http: httpx.AsyncClient):
        self.endpoint = endpoint
        self.http = http

    @property
    def index(self) -> int:
        return self.endpoint.index

    async def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        response = await self.http.post(f"{self.endpoint.url}{path}", json=body, timeout=timeout)
        if response.status_code != 200:
            raise SyncError(502, f"engine {self.index} {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json() if response.content else None

    async def rpc(self, method: str, *args: str, timeout: float = 30.0) -> Any:
        """First worker's result of an ``ext_*`` method (every worker runs it)."""
        body = await self.post("/collective_rpc", {"method": method, "args": list(args), "timeout": timeout}, timeout)
        return body["results"][0]

    async def weight_version(self) -> str | None:
        response = await self.http.get(f"{self.endpoint.url}/weight_info", timeout=10.0)
        response.raise_for_status()
        version: str | None = response.json().get("weight_version")
        return version


@dataclasses.dataclass
class Group:
    incarnation: str
    store: Any
    port: int
    joins: list[asyncio.Task[Any]]
    ready: bool = False
    broken: str | None = None


class SyncCoordinator:
    """Owns the sync group, the policy version and the trainer-facing API of one job."""

    def __init__(
        self,
        config: explorer_config.ExplorerConfig,
        *,
        advertised_host: str,
        bind_host: str,
        api_port: int,
        store_port_base: int | None = None,
    ):
        self.config = config
        self.advertised_host = advertised_host
        self.bind_host = bind_host
        self.api_port = api_port
        self.store_port_base = store_port_base
        self.http = httpx.AsyncClient()
        self.engines = [EngineDriver(e, self.http) for e in config.rollout.engines]
        self.group: Group | None = None
        self.version: int | None = None
        self.engines_in_sync: int | None = None
        self.syncs = 0
        self.last_sync_time: str | None = None
        self.last_sync_duration: float | None = None
        self.last_sync_bytes: int | None = None
        self.last_error: str | None = None
        self.on_version: Callable[[int], None] | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._pushes: dict[int, asyncio.Task[protocol.PushResult]] = {}
        self._store_turn = 0
        self._runner: web.AppRunner | None = None

    @property
    def spec(self) -> explorer_config.SyncSpec:
        return self.config.sync

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the API; adopt the version the engines already serve (a restarted coordinator resumes it)."""
        versions = await asyncio.gather(*(e.weight_version() for e in self.engines), return_exceptions=True)
        known = {v for v in versions if isinstance(v, str) and v.isdigit()}
        if len(known) == 1:
            self.version = int(known.pop())
            self.engines_in_sync = sum(1 for v in versions if v == str(self.version))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/v1/sync", self._h_state)
        app.router.add_post("/v1/sync/group", self._h_group)
        app.router.add_post("/v1/sync/group/{incarnation}/joined", self._h_joined)
        app.router.add_post("/v1/sync/push", self._h_push)
        app.router.add_post("/v1/sync/push/{version}/result", self._h_result)
        app.router.add_post("/v1/sync/checkpoint", self._h_checkpoint)
        self._runner = await status_api.serve_app(app, self.bind_host, self.api_port)

    async def stop(self) -> None:
        for task in self._pushes.values():
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._close_group()
        await self.http.aclose()

    # ---- group ---------------------------------------------------------------------------------------------

    def _open_store(self) -> tuple[Any, int]:
        """A fresh TCPStore (master) on a socket we bind ourselves: the chosen interface only, no port race."""
        if self.store_port_base is None:
            port = 0
        else:
            port = self.store_port_base + 1 + self._store_turn % STORE_PORT_WINDOW
            self._store_turn += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.bind_host, port))
        sock.listen(128)
        port = sock.getsockname()[1]
        fd = sock.detach()
        store = TCPStore(
            self.advertised_host, port, None, True, timedelta(seconds=self.spec.timeout_seconds),
            wait_for_workers=False, master_listen_fd=fd,
        )  # fmt: skip
        return store, port

    async def _close_group(self) -> None:
        group, self.group = self.group, None
        if group is None:
            return
        for task in group.joins:
            task.cancel()
        await asyncio.gather(*group.joins, return_exceptions=True)
        shutdowns = (e.post("/shutdown_weight_transfer_engine") for e in self.engines)
        await asyncio.gather(*shutdowns, return_exceptions=True)
        del group.store

    async def _validate(self, metas: list[protocol.TensorMeta]) -> None:
        payload = json.dumps([m.to_wire() for m in metas])
        results = await asyncio.gather(*(e.rpc("ext_validate", payload, timeout=60) for e in self.engines))
        for engine, problems in zip(self.engines, results, strict=True):
            if problems:
                raise SyncError(422, f"engine {engine.index} refuses the state dict: " + "; ".join(problems[:5]))

    def _group_info(self, group: Group) -> protocol.GroupInfo:
        dtype = self.config.rollout.model.dtype
        return protocol.GroupInfo(
            incarnation=group.incarnation, method=self.spec.method, master_address=self.advertised_host,
            master_port=group.port, world_size=protocol.rank_layout([e.endpoint.world_size for e in self.engines])[1],
            bucket_bytes=self.spec.bucket_bytes, timeout_seconds=self.spec.timeout_seconds,
            dtype=None if dtype == "auto" else dtype, checkpoint_path=self.spec.checkpoint_path,
        )  # fmt: skip

    async def open_group(self, request: protocol.GroupRequest) -> protocol.GroupInfo:
        """Validate the metadata, open a fresh store and have every engine join it (the trainer joins as rank 0)."""
        async with self._lock:
            await self._validate(request.tensors)
            await self._close_group()
            incarnation = uuid.uuid4().hex[:12]
            store, port = self._open_store()
            group = Group(incarnation, store, port, joins=[])
            self.group = group
            if self.spec.method == "checkpoint":
                group.ready = True  # engines read the shared volume; no process group to form
                return self._group_info(group)
            slots, world = protocol.rank_layout([e.endpoint.world_size for e in self.engines])
            wire = protocol.on_wire(request.tensors, self._group_info(group).dtype)
            chunk_bytes = protocol.chunk_bytes(wire, self.spec.bucket_bytes)
            for engine, slot in zip(self.engines, slots, strict=True):
                init = {
                    "master_address": self.advertised_host,
                    "master_port": port,
                    "rank_offset": slot.rank_offset,
                    "world_size": world,
                    "incarnation": incarnation,
                    "timeout_seconds": self.spec.timeout_seconds,
                }
                if self.spec.method == "gloo":
                    init["bucket_bytes"] = self.spec.bucket_bytes
                    init["chunk_bytes"] = chunk_bytes
                else:
                    init.update(packed=True, packed_buffer_size_bytes=self.spec.bucket_bytes)
                body = {"init_info": init}
                group.joins.append(
                    asyncio.create_task(
                        engine.post("/init_weight_transfer_engine", body, timeout=self.spec.timeout_seconds + 30)
                    )
                )
            return self._group_info(group)

    async def group_joined(self, incarnation: str) -> None:
        """Wait for every engine's join (the trainer has joined by now); the group is then ready for pushes."""
        group = self._current(incarnation, need_ready=False)
        results = await asyncio.gather(*group.joins, return_exceptions=True)
        failures = [f"engine {e.index}: {r}" for e, r in zip(self.engines, results, strict=True)
                    if isinstance(r, BaseException)]  # fmt: skip
        if failures:
            group.broken = "; ".join(failures)
            raise SyncError(502, f"engines failed to join the sync group: {group.broken}")
        group.ready = True

    def _current(self, incarnation: str, need_ready: bool = True) -> Group:
        group = self.group
        if group is None or group.incarnation != incarnation:
            raise SyncError(409, "the sync group was re-formed or closed; form a new group (POST /v1/sync/group)")
        if group.broken:
            raise SyncError(409, f"the sync group is broken ({group.broken}); form a new group")
        if need_ready and not group.ready:
            raise SyncError(409, "the sync group has not finished joining")
        return group

    # ---- push ----------------------------------------------------------------------------------------------

    def _next_version(self, requested: int | None) -> int:
        current = self.version or 0
        version = requested if requested is not None else current + 1
        if version <= current:
            raise SyncError(409, f"version {version} is not newer than the served version {current}")
        return version

    async def _check_members(self, group: Group) -> None:
        """An engine that restarted (or was added) is not in the group: the trainer must form it again."""
        states = await asyncio.gather(*(e.rpc("ext_sync_state") for e in self.engines), return_exceptions=True)
        strays = [e.index for e, s in zip(self.engines, states, strict=True)
                  if isinstance(s, BaseException) or s.get("incarnation") != group.incarnation]  # fmt: skip
        if strays:
            group.broken = f"engines {strays} are not members of this group (restarted or added)"
            raise SyncError(409, f"{group.broken}; form a new group")

    async def push(self, request: protocol.PushRequest) -> int:
        """Start a broadcast push: engines begin receiving in the background; the trainer broadcasts next."""
        async with self._lock:
            group = self._current(request.incarnation)
            if request.checkpoint_dir is not None or self.spec.method == "checkpoint":
                raise SyncError(400, "this job syncs by checkpoint: POST /v1/sync/checkpoint")
            if any(not t.done() for t in self._pushes.values()):
                raise SyncError(409, "a push is still in progress")
            version = self._next_version(request.version)
            await self._check_members(group)
            await self._validate(request.tensors)
            try:
                await asyncio.gather(*(e.post("/start_weight_update") for e in self.engines))
            except SyncError as err:
                await self._abort(group, str(err))
                raise
            task = asyncio.create_task(self._receive_and_apply(group, version, request.tensors))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are recorded in last_error
            self._pushes = {version: task}
            return version

    async def _abort(self, group: Group, reason: str) -> None:
        await asyncio.gather(*(e.rpc("ext_abort_update") for e in self.engines), return_exceptions=True)
        group.broken = reason
        self.last_error = reason
        log.warning("weight push aborted, engines keep version %s: %s", self.version, reason)

    async def _receive_and_apply(
        self, group: Group, version: int, metas: list[protocol.TensorMeta]
    ) -> protocol.PushResult:
        started = time.monotonic()
        info = {"names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
                "shapes": [m.shape for m in metas]}  # fmt: skip
        timeout = self.spec.timeout_seconds + 30
        received = await asyncio.gather(
            *(e.post("/update_weights", {"update_info": info}, timeout=timeout) for e in self.engines),
            return_exceptions=True,
        )
        failures = [f"engine {e.index}: {r}" for e, r in zip(self.engines, received, strict=True)
                    if isinstance(r, BaseException)]  # fmt: skip
        if failures:
            await self._abort(group, "receive failed: " + "; ".join(failures))
            raise SyncError(502, f"push of version {version} failed, engines keep version {self.version}: "
                                 + "; ".join(failures))  # fmt: skip
        receive_seconds = time.monotonic() - started
        applied = await self._apply(lambda e: e.post("/finish_weight_update", {"weight_version": str(version)},
                                                     timeout=timeout))  # fmt: skip
        return await self._record(version, applied, sum(m.nbytes for m in metas), started, receive_seconds)

    async def _apply(self, finish: Callable[[EngineDriver], Awaitable[Any]]) -> list[bool]:
        """Swap weights on every engine while generation is paused (in-flight requests kept or drained per config)."""
        mode = self.spec.generation_during_sync

        async def one(engine: EngineDriver) -> bool:
            await engine.post(f"/pause?mode={mode}", timeout=self.spec.timeout_seconds)
            try:
                await finish(engine)
                await engine.post("/reset_prefix_cache")
                return True
            except (SyncError, httpx.HTTPError) as err:
                log.error("engine %s failed to apply the new weights: %s", engine.index, err)
                return False
            finally:
                await engine.post("/resume")

        results = await asyncio.gather(*(one(e) for e in self.engines), return_exceptions=True)
        return [r is True for r in results]

    async def _record(
        self, version: int, applied: list[bool], nbytes: int, started: float, receive_seconds: float
    ) -> protocol.PushResult:
        seconds = time.monotonic() - started
        in_sync = sum(applied)
        if in_sync == 0:
            raise SyncError(502, f"no engine applied version {version}; they keep version {self.version}")
        self.version, self.engines_in_sync, self.syncs = version, in_sync, self.syncs + 1
        self.last_sync_time = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.last_sync_duration, self.last_sync_bytes, self.last_error = seconds, nbytes, None
        if in_sync < len(applied):
            self.last_error = f"engines {[i for i, ok in enumerate(applied) if not ok]} did not apply version {version}"
        async with self._changed:
            self._changed.notify_all()
        if self.on_version:
            self.on_version(version)
        return protocol.PushResult(version=version, engines_in_sync=in_sync, engines=len(applied), bytes=nbytes,
                                   seconds=seconds, apply_seconds=seconds - receive_seconds)  # fmt: skip

    async def push_result(self, version: int) -> protocol.PushResult:
        task = self._pushes.get(version)
        if task is None:
            raise SyncError(404, f"no push of version {version} in progress")
        return await asyncio.shield(task)

    async def push_checkpoint(self, request: protocol.PushRequest) -> protocol.PushResult:
        """The checkpoint method: every engine validates and reads the directory, then applies it."""
        async with self._lock:
            self._current(request.incarnation)
            if request.checkpoint_dir is None:
                raise SyncError(400, "checkpointDir is required")
            version = self._next_version(request.version)
            started = time.monotonic()
            directory = request.checkpoint_dir

            async def finish(engine: EngineDriver) -> None:
                await engine.rpc("ext_load_checkpoint", directory, timeout=self.spec.timeout_seconds)
                await engine.post("/update_weight_version", {"new_version": str(version)})

            applied = await self._apply(finish)
            size = await asyncio.to_thread(lambda: sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")))
            return await self._record(version, applied, size, started, 0.0)

    # ---- explorer side ---------------------------------------------------------------------------------------

    async def wait_for_syncs(self, count: int) -> None:
        """Block until at least ``count`` pushes have been applied since this coordinator started."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.syncs >= count)

    async def get_weight(self, name: str, engine: int = 0) -> torch.Tensor:
        body = await self.engines[engine].rpc("ext_get_weight", name, timeout=120)
        if not isinstance(body, dict):
            raise SyncError(404, f"engine {engine}: {body}")
        raw = bytearray(base64.b64decode(body["data"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(protocol.DTYPES[body["dtype"]]).reshape(body["shape"])

    def state(self) -> protocol.SyncState:
        group = self.group
        return protocol.SyncState(
            incarnation=group.incarnation if group else None, group_ready=bool(group and group.ready and
                                                                               not group.broken),
            version=self.version, engines=len(self.engines), engines_in_sync=self.engines_in_sync or 0,
            last_error=self.last_error,
        )  # fmt: skip

    # ---- HTTP ----------------------------------------------------------------------------------------------

    @staticmethod
    async def _respond(make: Callable[[], Awaitable[Any]]) -> web.Response:
        """Run one API call; refusals and bad bodies become JSON errors the trainer client raises verbatim."""
        try:
            result = await make()
        except SyncError as err:
            return web.json_response({"error": str(err)}, status=err.status)
        except ValidationError as err:
            return web.json_response({"error": str(err)}, status=400)
        if result is None:
            return web.json_response({})
        if isinstance(result, int):
            return web.json_response({"version": result})
        return web.json_response(result.to_wire())

    async def _h_state(self, _: web.Request) -> web.Response:
        return web.json_response(self.state().to_wire())

    async def _h_group(self, request: web.Request) -> web.Response:
        body = await request.json()
        return await self._respond(lambda: self.open_group(protocol.GroupRequest.model_validate(body)))

    async def _h_joined(self, request: web.Request) -> web.Response:
        return await self._respond(lambda: self.group_joined(request.match_info["incarnation"]))

    async def _h_push(self, request: web.Request) -> web.Response:
        body = await request.json()
        return await self._respond(lambda: self.push(protocol.PushRequest.model_validate(body)))

    async def _h_result(self, request: web.Request) -> web.Response:
        return await self._respond(lambda: self.push_result(int(request.match_info["version"])))

    async def _h_checkpoint(self, request: web.Request) -> web.Response:
        body = await request.json()
        return await self._respond(lambda: self.push_checkpoint(protocol.PushRequest.model_validate(body)))
