"""The coordinator's side of weight sync: serves the trainer's control API, forms the group, drives engines.

A trainer reaches this API (routes: ``api``) at the job's ``status.sync.address``. ``POST /v1/sync/group`` validates
the state-dict metadata against every engine and starts a new group incarnation. A gloo group forms over the
incarnation's formation store on this same API (``formation_store``: authenticated, each rank's key written only by
its owner, closed once formed); the engines join at their ranks at once and the trainer joins as rank 0. An NCCL
group forms over the unique id the trainer mints and posts (``/v1/sync/group/<incarnation>/nccl``): no store, so
nothing that any side deserialises comes from an unauthenticated peer.

``POST /v1/sync/push`` starts a push: engines receive the whole state dict into a side buffer, and only when every
engine has all of it does the coordinator apply it (pause → finish → reset prefix cache → resume). If any engine
fails to receive (the trainer died, a timeout), every engine drops its buffer and keeps serving the previous
version, and the group must be formed again. Only this coordinator talks to the engines' dev-mode routes (they
need the job token).

One trainer owns the group at a time (``lease``), versions only increase, also across restarts (``versions``),
checkpoint directories stay under ``sync.checkpointPath`` (``checkpoint_dir``), and a bad body is a 400 or 413 with
a message, never a 500. The same API serves the explorer's committed experiences (``/v1/experiences``, from
``experience_stream``) once an explorer sets ``experiences``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from aiohttp import web

from explorer import config as explorer_config
from explorer import credentials, experience_stream, status_api
from explorer.weight_sync import api, checkpoint_dir, formation_store, lease, protocol, versions

log = logging.getLogger(__name__)
IN_PROCESS = "in-process caller"  # the trainer name of calls made from Python (Explorer.setup_weight_sync_group)


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
            raise api.SyncError(502, f"engine {self.index} {path}: HTTP {response.status_code}: {response.text[:300]}")
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
    world_size: int
    joins: list[asyncio.Task[Any]]
    keys: formation_store.FormationKeys | None = None  # gloo: the store it forms over, closed once formed
    init_infos: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # nccl: sent with the trainer's id
    dtype: str | None = None
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
        state_dir: Path | None = None,
        lease_seconds: float | None = None,
    ):
        """``state_dir`` keeps the version ledger (default: the experiences directory, beside the explorer's resume
        state); ``lease_seconds`` is how long a silent trainer keeps the group (default: ``sync.timeoutSeconds``)."""
        self.config = config
        self.advertised_host = advertised_host
        self.bind_host = bind_host
        self.api_port = api_port
        self.http = httpx.AsyncClient(headers=credentials.job_headers())
        self.engines = [EngineDriver(e, self.http) for e in config.rollout.engines]
        self.group: Group | None = None
        self.catch_up_group: Group | None = None  # a peer engine sending its weights to engines that must catch up
        self.catch_ups = 0  # engines brought to the job's version from a peer (no trainer push needed)
        self.catching_up = False
        self.scales = 0  # membership changes followed (``set_engines``)
        self.version: int | None = None
        self.engine_versions: list[str | None] = [None] * len(self.engines)  # what each engine serves, as last known
        self.syncs = 0  # pushes applied over the job's life: recorded with the versions, read back at start
        self.last_sync_time: str | None = None
        self.last_sync_duration: float | None = None
        self.last_sync_bytes: int | None = None
        self.last_error: str | None = None
        self.on_version: Callable[[int], None] | None = None
        self.experiences: experience_stream.ExperienceStream | None = None  # served on this API (the explorer's)
        self.state_dir = state_dir or Path(config.experiences.path)
        self.lease = lease.Lease(config.sync.timeout_seconds if lease_seconds is None else lease_seconds)
        self.newest_version = 0  # the newest version applied or found on disk: no push gets one at or below it
        self._ledger_warned = False
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._pushes: dict[int, asyncio.Task[protocol.PushResult]] = {}
        self._runner: web.AppRunner | None = None

    @property
    def spec(self) -> explorer_config.SyncSpec:
        return self.config.sync

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the API; adopt the newest version the engines already serve (a restarted coordinator resumes it;
        an engine behind it is out of the rotation until it catches up) and the newest one recorded in the state
        directory (no push gets one at or below it)."""
        served = await asyncio.gather(*(e.weight_version() for e in self.engines), return_exceptions=True)
        self.engine_versions = [v if isinstance(v, str) else None for v in served]
        known = [int(v) for v in served if isinstance(v, str) and v.isdigit()]
        if known:  # versions only increase: the newest is the last push applied; engines behind it catch up
            self.version = max(known)
        try:
            self.newest_version = max(self.version or 0, await self._recorded_version())
            self.syncs = await asyncio.to_thread(versions.load_pushes, self.state_dir)
        except api.SyncError as err:  # exploring goes on; every push is refused with this message until it is fixed
            log.error("%s", err)
        self._runner = await status_api.serve_app(api.build_app(self, lambda: self.experiences), self.bind_host,
                                                  self.api_port)  # fmt: skip

    async def stop(self) -> None:
        for task in self._pushes.values():
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._close_group()
        await self.http.aclose()

    # ---- group ---------------------------------------------------------------------------------------------

    def api_url(self) -> str:
        """The sync API as engines reach it (the advertised host, the port actually bound)."""
        port = self.api_port
        if self._runner is not None and self._runner.addresses:
            port = self._runner.addresses[0][1]
        return f"http://{self.advertised_host}:{port}"

    def _forming(self, incarnation: str) -> Group | None:
        for group in (self.group, self.catch_up_group):
            if group is not None and group.incarnation == incarnation:
                return group
        return None

    def source_token(self, incarnation: str) -> str | None:
        """The one-time token of a catch-up group's sending peer (None: not a catch-up group)."""
        group = self._forming(incarnation)
        return group.keys.source_token if group is not None and group.keys is not None else None

    def formation_keys(self, incarnation: str) -> formation_store.FormationKeys:
        """The store of the group now forming as ``incarnation`` (``formation_store``)."""
        group = self._forming(incarnation)
        if group is None:
            raise api.SyncError(409, "no sync group is forming under this incarnation")
        if group.keys is None:
            raise api.SyncError(409, f"the {self.spec.method} method forms its group without a store")
        return group.keys

    async def _close_group(self) -> None:
        group, self.group = self.group, None
        await _dismantle(group, self.engines, "the group was closed")

    async def _validate(self, metas: list[protocol.TensorMeta]) -> None:
        unknown = [f"tensor {m.name!r} has unsupported dtype {m.dtype!r}" for m in metas
                   if m.dtype not in protocol.DTYPES]  # fmt: skip
        if unknown:  # refused here: buffer sizes are computed from dtypes before any engine sees them
            raise api.SyncError(422, "; ".join(unknown[:5]))
        payload = json.dumps([m.to_wire() for m in metas])
        results = await asyncio.gather(*(e.rpc("ext_validate", payload, timeout=60) for e in self.engines))
        for engine, problems in zip(self.engines, results, strict=True):
            if problems:
                raise api.SyncError(422, f"engine {engine.index} refuses the state dict: " + "; ".join(problems[:5]))

    async def _served_dtype(self) -> str | None:
        """The dtype the engines serve (``auto`` resolved, as vLLM chose it): trainers cast floating tensors to it."""
        dtypes = set(await asyncio.gather(*(e.rpc("ext_model_dtype") for e in self.engines)))
        if len(dtypes) > 1:
            raise api.SyncError(502, f"the engines serve different dtypes {sorted(dtypes)}; restart them with one")
        if dtypes:
            return str(dtypes.pop())
        dtype = self.config.rollout.model.dtype
        return None if dtype == "auto" else dtype

    def _group_info(self, group: Group) -> protocol.GroupInfo:
        return protocol.GroupInfo(
            incarnation=group.incarnation, method=self.spec.method, world_size=group.world_size,
            bucket_bytes=self.spec.bucket_bytes, timeout_seconds=self.spec.timeout_seconds, dtype=group.dtype,
            checkpoint_path=self.spec.checkpoint_path,
        )  # fmt: skip

    @property
    def engines_in_sync(self) -> int | None:
        """Engines serving the job's version, as last known (pushes, catch-ups and the explorer's engine probe keep
        ``engine_versions``); None before the job has a version."""
        if self.version is None:
            return None
        return sum(1 for served in self.engine_versions if served == str(self.version))

    @property
    def pushing(self) -> bool:
        """Whether some engine's weights may be changing now (a trainer's push, or a catch-up)."""
        return self._push_in_progress() or self.catching_up

    @property
    def changes(self) -> int:
        """How many times what the engines serve, or which engines there are, has changed (pushes, catch-ups,
        scales): a probe of the engines taken across a change says nothing about the rotation."""
        return self.syncs + self.catch_ups + self.scales

    def _push_in_progress(self) -> bool:
        return any(not t.done() for t in self._pushes.values())

    def _hold(self, trainer: str, claim: bool = True) -> None:
        """Refuse ``trainer`` while another one owns the group; otherwise (``claim``) (re)start its lease."""
        now, busy = time.monotonic(), self._push_in_progress()
        try:
            if claim:
                self.lease.claim(trainer, now, busy)
            else:
                self.lease.check(trainer, now, busy)
        except lease.GroupHeldError as err:
            raise api.SyncError(409, str(err)) from None

    async def open_group(self, request: protocol.GroupRequest, trainer: str = IN_PROCESS) -> protocol.GroupInfo:
        """Validate the metadata, open a fresh store and have every engine join it (the trainer joins as rank 0).

        The group's metadata is what the trainer holds; it is checked as it will be sent, floats cast to the
        served dtype (the trainer casts them), and each push's metadata must then match exactly.
        """
        async with self._lock:
            self._hold(trainer, claim=False)  # a second trainer never gets to tear down the owner's group
            dtype = await self._served_dtype()
            wire = protocol.on_wire(request.tensors, dtype)
            await self._validate(wire)
            await self._close_group()
            incarnation = uuid.uuid4().hex[:12]
            slots, world = protocol.rank_layout([e.endpoint.world_size for e in self.engines])
            group = Group(incarnation, world, joins=[], dtype=dtype)
            self.group = group
            self._hold(trainer)
            if self.spec.method == "checkpoint":
                group.ready = True  # engines read the shared volume; no process group to form
                return self._group_info(group)
            gloo_chunks = protocol.chunk_bytes(wire, self.spec.bucket_bytes) if self.spec.method == "gloo" else None
            for slot in slots:
                init = self._init_info(slot, world, incarnation, gloo_chunks)
                if gloo_chunks is None:
                    init.update(packed=True, packed_buffer_size_bytes=self.spec.bucket_bytes)
                group.init_infos.append(init)
            if self.spec.method == "gloo":
                group.keys = formation_store.FormationKeys(world)
                self._start_joins(group)
            return self._group_info(group)

    def _init_info(
        self, slot: protocol.RankSlot, world: int, incarnation: str, gloo_chunks: list[int] | None = None
    ) -> dict[str, Any]:
        """One engine's ``init_info``; with ``gloo_chunks`` (the chunk sizes it will receive) a gloo group formed
        over this API's store."""
        init: dict[str, Any] = {"rank_offset": slot.rank_offset, "world_size": world, "incarnation": incarnation,
                                "timeout_seconds": self.spec.timeout_seconds}  # fmt: skip
        if gloo_chunks is not None:
            init.update(store_url=self.api_url(), bucket_bytes=self.spec.bucket_bytes, chunk_bytes=gloo_chunks)
        return init

    def _start_joins(self, group: Group, engines: list[EngineDriver] | None = None) -> None:
        """Every engine (of ``engines``) joins at its rank (each blocks in vLLM until the whole group has formed)."""
        for engine, init in zip(self.engines if engines is None else engines, group.init_infos, strict=True):
            body = {"init_info": init}
            group.joins.append(asyncio.create_task(
                engine.post("/init_weight_transfer_engine", body, timeout=self.spec.timeout_seconds + 30)))  # fmt: skip

    async def start_nccl(self, incarnation: str, request: protocol.NcclIdRequest, trainer: str = IN_PROCESS) -> None:
        """The trainer's NCCL unique id: engines join with it (no store, nothing any side deserialises) while the
        trainer enters ``ncclCommInitRank`` as rank 0."""
        self._hold(trainer)
        async with self._lock:
            group = self._current(incarnation, need_ready=False)
            if self.spec.method != "nccl":
                raise api.SyncError(409, f"this job syncs by {self.spec.method}; an NCCL unique id has no use")
            if group.joins:
                raise api.SyncError(409, "this group already has its NCCL unique id; form a new group to use another")
            for init in group.init_infos:
                init["nccl_unique_id_b64"] = request.nccl_unique_id_b64
            self._start_joins(group)

    async def group_joined(self, incarnation: str, trainer: str = IN_PROCESS) -> None:
        """Wait for every engine's join (the trainer has joined by now); the group is then ready for pushes."""
        self._hold(trainer)
        group = self._current(incarnation, need_ready=False)
        if not group.joins and self.spec.method == "nccl":
            raise api.SyncError(409, "no engine has been asked to join yet: post the NCCL unique id first "
                                     f"(POST /v1/sync/group/{incarnation}/nccl)")  # fmt: skip
        results = await asyncio.gather(*group.joins, return_exceptions=True)
        failures = [f"engine {e.index}: {r}" for e, r in zip(self.engines, results, strict=True)
                    if isinstance(r, BaseException)]  # fmt: skip
        if failures:
            group.broken = "; ".join(failures)
            raise api.SyncError(502, f"engines failed to join the sync group: {group.broken}")
        group.ready = True
        if group.keys is not None:
            await group.keys.close("the group has formed")
        self.lease.renew(trainer, time.monotonic())  # joining may take a while: the lease runs from its end

    async def leave(self, trainer: str = IN_PROCESS) -> None:
        """``trainer`` is done: its lease ends and its group takes no more pushes (the next trainer forms its own)."""
        if self.lease.release(trainer) and self.group is not None and not self.group.broken:
            self.group.broken = f"its trainer {trainer!r} left"

    def _current(self, incarnation: str, need_ready: bool = True) -> Group:
        group = self.group
        if group is None or group.incarnation != incarnation:
            raise api.SyncError(409, "the sync group was re-formed or closed; form a new group (POST /v1/sync/group)")
        if group.broken:
            raise api.SyncError(409, f"the sync group is broken ({group.broken}); form a new group")
        if need_ready and not group.ready:
            raise api.SyncError(409, "the sync group has not finished joining")
        return group

    # ---- push ----------------------------------------------------------------------------------------------

    async def _recorded_version(self) -> int:
        try:
            return await asyncio.to_thread(versions.load_version, self.state_dir)
        except ValueError as err:
            raise api.SyncError(500, str(err)) from None
        except OSError as err:
            self._warn_ledger(err)
            return 0

    async def _next_version(self, requested: int | None) -> int:
        """Newer than every version served, applied or recorded on disk (read again: another coordinator of this
        job, e.g. one of the other method or an overlapping restart, may have recorded a newer one)."""
        self.newest_version = max(self.newest_version, await self._recorded_version(), self.version or 0)
        try:
            return versions.next_version(self.newest_version, requested)
        except versions.VersionConflictError as err:
            raise api.SyncError(409, str(err)) from None

    async def _save_version(self, version: int, pushes: int) -> None:
        self.newest_version = max(self.newest_version, version)
        try:
            await asyncio.to_thread(versions.save_version, self.state_dir, self.newest_version, pushes)
        except OSError as err:
            self._warn_ledger(err)

    def _warn_ledger(self, err: OSError) -> None:
        # Versions still increase while this coordinator runs; only a restart could then reuse one.
        if not self._ledger_warned:
            log.warning("cannot use the version ledger in %s (%s): versions survive no restart", self.state_dir, err)
            self._ledger_warned = True

    async def _check_members(self, group: Group) -> None:
        """An engine that restarted (or was added) is not in the group: the trainer must form it again."""
        states = await asyncio.gather(*(e.rpc("ext_sync_state") for e in self.engines), return_exceptions=True)
        strays = [e.index for e, s in zip(self.engines, states, strict=True)
                  if isinstance(s, BaseException) or s.get("incarnation") != group.incarnation]  # fmt: skip
        if strays:
            group.broken = f"engines {strays} are not members of this group (restarted or added)"
            raise api.SyncError(409, f"{group.broken}; form a new group")

    async def push(self, request: protocol.PushRequest, trainer: str = IN_PROCESS) -> int:
        """Start a broadcast push: engines begin receiving in the background; the trainer broadcasts next."""
        async with self._lock:
            self._hold(trainer)
            group = self._current(request.incarnation)
            if request.checkpoint_dir is not None or self.spec.method == "checkpoint":
                raise api.SyncError(400, "this job syncs by checkpoint: POST /v1/sync/checkpoint")
            if self._push_in_progress():
                raise api.SyncError(409, "a push is still in progress")
            version = await self._next_version(request.version)
            await self._check_members(group)
            await self._validate(request.tensors)
            try:
                await asyncio.gather(*(e.post("/start_weight_update") for e in self.engines))
            except api.SyncError as err:
                await self._abort(group, str(err))
                raise
            task = asyncio.create_task(self._receive_and_apply(group, version, request.tensors))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are recorded in last_error
            self._pushes = {version: task}
            return version

    async def _abort(self, group: Group, reason: str) -> None:
        await asyncio.gather(*(e.rpc("ext_abort_update") for e in self.engines), return_exceptions=True)
        self.lease.release()  # its trainer most likely died: the next one need not wait for the lease to lapse
        group.broken = reason
        self.last_error = reason
        log.warning("weight push aborted, engines keep version %s: %s", self.version, reason)

    async def _receive_and_apply(
        self, group: Group, version: int, metas: list[protocol.TensorMeta]
    ) -> protocol.PushResult:
        started = time.monotonic()
        info = _update_info(metas)
        timeout = self.spec.timeout_seconds + 30
        received = await asyncio.gather(
            *(e.post("/update_weights", {"update_info": info}, timeout=timeout) for e in self.engines),
            return_exceptions=True,
        )
        failures = [f"engine {e.index}: {r}" for e, r in zip(self.engines, received, strict=True)
                    if isinstance(r, BaseException)]  # fmt: skip
        if failures:
            await self._abort(group, "receive failed: " + "; ".join(failures))
            raise api.SyncError(502, f"push of version {version} failed, engines keep version {self.version}: "
                                 + "; ".join(failures))  # fmt: skip
        receive_seconds = time.monotonic() - started
        applied = await self._apply(lambda e: e.post("/finish_weight_update", {"weight_version": str(version)},
                                                     timeout=timeout))  # fmt: skip
        return await self._record(version, applied, sum(m.nbytes for m in metas), started, receive_seconds)

    async def _apply(
        self, finish: Callable[[EngineDriver], Awaitable[Any]], engines: list[EngineDriver] | None = None
    ) -> list[bool]:
        """Swap weights on every engine (of ``engines``) while generation is paused (in-flight requests kept or
        drained per config)."""
        mode = self.spec.generation_during_sync

        async def one(engine: EngineDriver) -> bool:
            try:
                await engine.post(f"/pause?mode={mode}", timeout=self.spec.timeout_seconds)
                await finish(engine)
                await engine.post("/reset_prefix_cache")
                return True
            except (api.SyncError, httpx.HTTPError) as err:
                log.error("engine %s failed to apply the new weights: %s", engine.index, err)
                return False
            finally:
                # Always, also when the pause itself timed out here: the engine may have paused after we gave up.
                await self._resume(engine)

        results = await asyncio.gather(*(one(e) for e in (self.engines if engines is None else engines)),
                                       return_exceptions=True)  # fmt: skip
        return [r is True for r in results]

    async def _resume(self, engine: EngineDriver) -> None:
        for attempt in range(3):
            try:
                await engine.post("/resume", timeout=self.spec.timeout_seconds)
                return
            except (api.SyncError, httpx.HTTPError) as err:
                log.error("engine %s did not resume (attempt %d of 3): %s", engine.index, attempt + 1, err)
                self.last_error = f"engine {engine.index} did not resume after a weight update: {err}"
                await asyncio.sleep(1.0)

    async def _record(
        self, version: int, applied: list[bool], nbytes: int, started: float, receive_seconds: float
    ) -> protocol.PushResult:
        seconds = time.monotonic() - started
        in_sync = sum(applied)
        if in_sync == 0:
            raise api.SyncError(502, f"no engine applied version {version}; they keep version {self.version}")
        await self._save_version(version, self.syncs + 1)
        self.version, self.syncs = version, self.syncs + 1
        for index, ok in enumerate(applied):
            if ok:
                self.engine_versions[index] = str(version)
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

    async def push_result(self, version: int, trainer: str = IN_PROCESS) -> protocol.PushResult:
        self._hold(trainer, claim=False)
        task = self._pushes.get(version)
        if task is None:
            raise api.SyncError(404, f"no push of version {version} in progress")
        result = await asyncio.shield(task)
        self.lease.renew(trainer, time.monotonic())  # the lease runs from the end of the push, not its start
        return result

    def _checkpoint_dir(self, directory: str | None) -> tuple[Path, str]:
        """The resolved directory and the root it must stay in (``sync.checkpointPath``)."""
        root = self.spec.checkpoint_path
        if root is None:
            raise api.SyncError(400, "this job has no sync.checkpointPath: checkpoint pushes are off")
        if directory is None:
            raise api.SyncError(400, "checkpointDir is required")
        try:
            return checkpoint_dir.confine(directory, root), root
        except checkpoint_dir.CheckpointDirError as err:
            raise api.SyncError(422, str(err)) from None

    async def push_checkpoint(self, request: protocol.PushRequest, trainer: str = IN_PROCESS) -> protocol.PushResult:
        """The checkpoint method: every engine validates and reads the directory, then applies it."""
        async with self._lock:
            self._hold(trainer)
            self._current(request.incarnation)
            resolved, root = await asyncio.to_thread(self._checkpoint_dir, request.checkpoint_dir)
            if self._push_in_progress():
                raise api.SyncError(409, "a push is still in progress")
            version = await self._next_version(request.version)
            started = time.monotonic()

            async def finish(engine: EngineDriver) -> None:
                await engine.rpc("ext_load_checkpoint", str(resolved), root, timeout=self.spec.timeout_seconds)
                await engine.post("/update_weight_version", {"new_version": str(version)})

            applied = await self._apply(finish)
            size = await asyncio.to_thread(lambda: sum(p.stat().st_size for p in resolved.glob("*.safetensors")))
            return await self._record(version, applied, size, started, 0.0)

    # ---- membership ----------------------------------------------------------------------------------------

    async def set_engines(self, endpoints: list[explorer_config.EngineEndpoint]) -> None:
        """Follow a scale of the rollout group, between pushes (a push or catch-up in progress finishes first).

        Engines whose index and URL stay keep their known version; added ones are unknown until a probe reads them
        (and a catch-up brings them to the job's version). The trainer's group no longer matches the membership:
        its next push is told to form a new one."""
        if not endpoints:
            raise ValueError("a rollout group needs at least one engine")
        async with self._lock:
            while self._push_in_progress():
                await asyncio.wait(set(self._pushes.values()))
            old = [(e.index, e.endpoint.url) for e in self.engines]
            kept = [d for d, e in zip(self.engines, endpoints, strict=False) if (d.index, d.endpoint.url) ==
                    (e.index, e.url)]  # fmt: skip
            self.engines = kept + [EngineDriver(e, self.http) for e in endpoints[len(kept) :]]
            self.engine_versions = self.engine_versions[: len(kept)] + [None] * (len(endpoints) - len(kept))
            self.config.rollout = self.config.rollout.model_copy(update={"engines": list(endpoints)})
            if self.group is not None and not self.group.broken and old != [(e.index, e.url) for e in endpoints]:
                self.group.broken = f"the rollout group was scaled from {len(old)} to {len(endpoints)} engines"
            self.scales += 1
            log.info("rollout group now %d engines (was %d)", len(endpoints), len(old))

    # ---- catch-up -------------------------------------------------------------------------------------------

    def catch_up_candidates(self) -> list[int]:
        """Engines that do not serve the job's version while a peer does (restarted, added, or whose apply failed)."""
        if not self.spec.catch_up or self.spec.method == "nccl" or self.version is None:
            return []
        current = str(self.version)
        if current not in self.engine_versions:
            return []
        return [i for i, served in enumerate(self.engine_versions) if served != current]

    async def catch_up(self, indexes: list[int]) -> list[int]:
        """Bring engines ``indexes`` to the job's version from a peer engine's served copy, without waiting for the
        trainer's next push; returns those that now serve it (the others stay out of the rotation).

        The peer is rank 0 of a gloo group of its own (formed over this API's store with a one-time token: no
        workflow code holding the job token can pose as it), the others receive and apply exactly as in a push
        (staged, all or nothing). NCCL engines keep no copy (a second GPU model is too dear): they wait for the
        trainer's next push. A caught-up engine has left the trainer's group: the next push re-forms it.
        """
        async with self._lock:
            candidates = set(self.catch_up_candidates())
            strays = [self.engines[i] for i in indexes if i in candidates]
            if not strays or self._push_in_progress() or self.version is None:
                return []
            version = self.version
            sources = [e for e in self.engines if self.engine_versions[e.index] == str(version)]
            self.catching_up = True
            try:
                return await self._catch_up_from(sources[0], strays, version)
            except (api.SyncError, httpx.HTTPError, KeyError, ValueError) as err:
                self.last_error = f"engines {[e.index for e in strays]} could not catch up to version {version}: {err}"
                log.warning("%s", self.last_error)
                await asyncio.gather(*(e.rpc("ext_abort_update") for e in strays), return_exceptions=True)
                return []
            finally:
                await self._close_catch_up(strays)
                self.catching_up = False

    async def _catch_up_from(self, source: EngineDriver, strays: list[EngineDriver], version: int) -> list[int]:
        metas = [protocol.TensorMeta.model_validate(m) for m in await source.rpc("ext_served_metas")]
        if not metas:
            raise api.SyncError(409, f"engine {source.index} keeps no copy of version {version} to send")
        payload = json.dumps([m.to_wire() for m in metas])
        for engine, problems in zip(strays, await asyncio.gather(*(e.rpc("ext_validate", payload) for e in strays)),
                                    strict=True):  # fmt: skip
            if problems:
                raise api.SyncError(422, f"engine {engine.index} refuses engine {source.index}'s weights: "
                                    + "; ".join(problems[:5]))  # fmt: skip
        slots, world = protocol.rank_layout([e.endpoint.world_size for e in strays])
        incarnation = "catchup-" + uuid.uuid4().hex[:12]
        token = credentials.mint()
        group = Group(incarnation, world, joins=[], keys=formation_store.FormationKeys(world, source_token=token))
        self.catch_up_group = group
        store_url, timeout = self.api_url(), self.spec.timeout_seconds
        chunk_bytes = protocol.chunk_bytes(metas, self.spec.bucket_bytes)
        group.init_infos = [self._init_info(slot, world, incarnation, chunk_bytes) for slot in slots]
        plan = json.dumps({"store_url": store_url, "incarnation": incarnation, "token": token, "world_size": world,
                           "timeout_seconds": timeout, "bucket_bytes": self.spec.bucket_bytes,
                           "names": [m.name for m in metas]})  # fmt: skip
        started = time.monotonic()
        send = asyncio.create_task(source.rpc("ext_send_served", plan, timeout=2 * timeout + 30))
        try:
            self._start_joins(group, strays)
            await _unless_failed(send, asyncio.gather(*group.joins))
            await group.keys.close("the catch-up group has formed")  # type: ignore[union-attr]
            await asyncio.gather(*(e.post("/start_weight_update") for e in strays))
            info = _update_info(metas)
            await _unless_failed(send, asyncio.gather(*(
                e.post("/update_weights", {"update_info": info}, timeout=timeout + 30) for e in strays)))  # fmt: skip
            await send
        finally:
            send.cancel()
            await asyncio.gather(send, return_exceptions=True)
        applied = await self._apply(lambda e: e.post("/finish_weight_update", {"weight_version": str(version)},
                                                     timeout=timeout + 30), strays)  # fmt: skip
        caught_up = [e.index for e, ok in zip(strays, applied, strict=True) if ok]
        for index in caught_up:
            self.engine_versions[index] = str(version)
        self.catch_ups += len(caught_up)
        log.info("engines %s caught up to version %s from engine %s in %.2f s", caught_up, version, source.index,
                 time.monotonic() - started)  # fmt: skip
        if len(caught_up) < len(strays):
            self.last_error = f"engines {[e.index for e in strays if e.index not in caught_up]} failed to apply " \
                              f"version {version} from engine {source.index}"  # fmt: skip
        return caught_up

    async def _close_catch_up(self, strays: list[EngineDriver]) -> None:
        group, self.catch_up_group = self.catch_up_group, None
        await _dismantle(group, strays, "the catch-up is over")

    # ---- explorer side ---------------------------------------------------------------------------------------

    async def wait_for_syncs(self, count: int) -> None:
        """Block until the job has had at least ``count`` pushes (counted across coordinator restarts)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.syncs >= count)

    async def get_weight(self, name: str, engine: int = 0) -> torch.Tensor:
        body = await self.engines[engine].rpc("ext_get_weight", name, timeout=120)
        if not isinstance(body, dict):
            raise api.SyncError(404, f"engine {engine}: {body}")
        raw = bytearray(base64.b64decode(body["data"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(protocol.DTYPES[body["dtype"]]).reshape(body["shape"])

    def state(self) -> protocol.SyncState:
        group = self.group
        holder = self.lease.current(time.monotonic(), busy=self._push_in_progress())
        return protocol.SyncState(
            incarnation=group.incarnation if group else None, group_ready=bool(group and group.ready and
                                                                               not group.broken),
            version=self.version, engines=len(self.engines), engines_in_sync=self.engines_in_sync or 0,
            last_error=self.last_error, extra={"trainer": holder} if holder else {},
        )  # fmt: skip


def _update_info(metas: list[protocol.TensorMeta]) -> dict[str, Any]:
    """The ``update_info`` of ``/update_weights``: what the engines stage, in the order it is broadcast."""
    return {"names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
            "shapes": [m.shape for m in metas]}  # fmt: skip


async def _unless_failed(sender: asyncio.Task[Any], step: Awaitable[Any]) -> Any:
    """``step``'s result, or the sender's error as soon as it fails (receivers would otherwise wait out their
    timeout for a sender that is gone)."""
    waiting = asyncio.ensure_future(step)
    await asyncio.wait({sender, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        sender.result()  # raises the sender's error
        raise api.SyncError(502, "the sending engine finished before its receivers")
    return waiting.result()


async def _dismantle(group: Group | None, engines: list[EngineDriver], why: str) -> None:
    """Cancel ``group``'s joins, close its store and have ``engines`` leave it (errors ignored: they may be gone)."""
    if group is None:
        return
    for task in group.joins:
        task.cancel()
    await asyncio.gather(*group.joins, return_exceptions=True)
    if group.keys is not None:
        await group.keys.close(why)
    await asyncio.gather(*(e.post("/shutdown_weight_transfer_engine") for e in engines), return_exceptions=True)
