"""The trainer's client library: join a job's sync group as rank 0 and push new policy versions.

Usage (the whole integration for any trainer loop)::

    client = TrainerClient(job_status["sync"]["address"])   # "<job>-sync.<ns>.svc:29500"
    client.setup(model)                                      # publish names/dtypes/shapes, join the group
    result = client.push(model)                              # a new policy version on every engine, all at once

``push`` takes a module or a state dict with HF checkpoint names, casts floating tensors to the rollout dtype,
packs them into buckets and broadcasts them in one pass (gloo on CPU, NCCL on GPU), or, for the checkpoint method,
writes safetensors to the shared directory and has the engines reload it. When the coordinator says the group
changed (an engine restarted or was added), ``push`` forms the group again once and retries.

Each client names itself on every call (``trainer_id``, hostname/pid/random by default): the group belongs to one
trainer at a time, and ``close`` hands it back.

Experiences come from the same address: ``experiences(n)`` blocks until ``n`` committed experiences are there (an
``ExperienceBatch``: a pyarrow table and where it ends) and ``ack(batch)`` marks them consumed. The cursor belongs to
``consumer`` (default ``"trainer"``), a stable name, so a restarted trainer gets again what it had not acknowledged.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from explorer import credentials, experience_wire
from explorer.experience_wire import ExperienceBatch, Position
from explorer.weight_sync import formation_store, lease, protocol

log = logging.getLogger(__name__)
StateLike = torch.nn.Module | Mapping[str, torch.Tensor]


class SyncRefusedError(RuntimeError):
    """The coordinator refused or failed a step; the message says why (and which tensor, for bad metadata)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ExperienceTimeoutError(SyncRefusedError):
    """Fewer experiences than asked arrived in time; the message says how many and how far the explorer is."""


class ExperiencesExhaustedError(SyncRefusedError):
    """The explorer has finished and this consumer has consumed every experience."""


def _refusal(response: httpx.Response) -> SyncRefusedError:
    try:
        message = str(response.json().get("error", response.text))
    except ValueError:
        message = response.text
    kind = {504: ExperienceTimeoutError, 410: ExperiencesExhaustedError}.get(response.status_code, SyncRefusedError)
    return kind(response.status_code, message)


@dataclasses.dataclass(frozen=True)
class PushFigures:
    """What one push cost, seen from the trainer."""

    version: int
    bytes: int
    seconds: float
    engines_in_sync: int
    engines: int
    apply_seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


def _named_tensors(state: StateLike) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(state, torch.nn.Module):
        yield from state.state_dict().items()
    else:
        yield from state.items()


class TrainerClient:
    """Rank 0 of one job's weight-sync group."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        timeout: float = 300.0,
        trainer_id: str | None = None,
        consumer: str = "trainer",
    ):
        """``token``: the job's trainer token (default: ``EXPLORER_SYNC_TOKEN`` or the file
        ``EXPLORER_SYNC_TOKEN_FILE`` names; the job's Secret ``<job>-credentials`` holds it as ``trainer-token``)."""
        base = address if address.startswith("http") else f"http://{address}"
        token = token or credentials.client_token()
        if not token:
            raise credentials.MissingCredentialError(
                f"no trainer token: pass token=, or set {credentials.CLIENT_TOKEN_ENV} (or "
                f"{credentials.CLIENT_TOKEN_FILE_ENV}) to key {credentials.TRAINER_TOKEN!r} of the job's Secret "
                "<job>-credentials"
            )
        self.trainer_id = trainer_id or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.consumer = consumer
        self.last_batch: ExperienceBatch | None = None
        headers = {lease.HEADER: self.trainer_id, **credentials.bearer(token)}
        self.base_url, self._token = base, token
        self.http = httpx.Client(base_url=base, timeout=timeout, headers=headers)
        self.info: protocol.GroupInfo | None = None
        self._claimed = False
        self._group: formation_store.GlooMember | None = None
        self._comm: Any = None
        self._buffers: list[torch.Tensor] = []
        self.formation_seconds = 0.0  # rank 0's time in the last gloo group formation (for benchmarks and logs)

    # ---- HTTP ----------------------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.http.post(path, json=body or {})
        data: dict[str, Any] = response.json() if response.content else {}
        if response.status_code != 200:
            raise SyncRefusedError(response.status_code, data.get("error", response.text))
        return data

    def state(self) -> protocol.SyncState:
        response = self.http.get("/v1/sync")
        if response.status_code != 200:
            raise _refusal(response)
        return protocol.SyncState.model_validate(response.json())

    # ---- experiences ---------------------------------------------------------------------------------------

    def experiences(
        self,
        batch_size: int,
        timeout: float = 300.0,
        *,
        min_policy_version: int | None = None,
        ack_previous: bool = False,
    ) -> ExperienceBatch:
        """The next ``batch_size`` experiences from this consumer's acknowledged cursor, in commit order, waiting up
        to ``timeout`` s (``ExperienceTimeoutError``); fewer only when the explorer has finished (``finished``).
        Older policy versions than ``min_policy_version`` are skipped (``skipped``). Reading again without an ack
        returns the same experiences; ``ack_previous`` acknowledges the batch this client read last first."""
        body: dict[str, Any] = {"consumer": self.consumer, "maxExperiences": batch_size, "timeoutSeconds": timeout,
                                "minPolicyVersion": min_policy_version}  # fmt: skip
        if ack_previous and self.last_batch is not None:
            body["ack"] = self.last_batch.cursor.to_wire()
        response = self.http.post("/v1/experiences/read", json=body, timeout=timeout + 60)
        if response.status_code != 200:
            raise _refusal(response)
        self.last_batch = experience_wire.decode(response.content)
        return self.last_batch

    def ack(self, consumed: ExperienceBatch | Position) -> Position:
        """Everything up to the end of ``consumed`` (a batch, or its ``cursor``) is used: it is never delivered to
        this consumer again, also after a restart. Returns the consumer's cursor."""
        cursor = consumed.cursor if isinstance(consumed, ExperienceBatch) else consumed
        response = self.http.post("/v1/experiences/ack", json={"consumer": self.consumer, "cursor": cursor.to_wire()})
        if response.status_code != 200:
            raise _refusal(response)
        return experience_wire.AckResult.model_validate(response.json()).cursor

    def experience_state(self) -> experience_wire.StreamState:
        """The stream's progress and every consumer's cursor."""
        response = self.http.get("/v1/experiences")
        if response.status_code != 200:
            raise _refusal(response)
        return experience_wire.StreamState.model_validate(response.json())

    # ---- group ---------------------------------------------------------------------------------------------

    def _prepared(self, state: StateLike) -> list[tuple[str, torch.Tensor]]:
        """Tensors as they go on the wire: floating ones cast to the rollout dtype (half the bytes for bf16)."""
        dtype = protocol.DTYPES.get(self.info.dtype) if self.info and self.info.dtype else None
        out = []
        for name, tensor in _named_tensors(state):
            data = tensor.detach()
            if dtype is not None and data.is_floating_point() and data.dtype != dtype:
                data = data.to(dtype)
            out.append((name, data))
        return out

    def setup(self, state: StateLike) -> protocol.GroupInfo:
        """Publish the state dict's metadata and join the group (``Explorer.setup_weight_sync_group`` on the other
        side); refused with a message naming the tensor when it does not match the served model."""
        self._leave()
        metas = protocol.describe(_named_tensors(state))
        self.info = None
        body = {"tensors": [m.to_wire() for m in metas]}
        info = protocol.GroupInfo.model_validate(self._post("/v1/sync/group", body))
        self.info, self._claimed = info, True
        if info.method == "gloo":
            self._reserve_buffers(max(protocol.chunk_bytes(protocol.on_wire(metas, info.dtype), info.bucket_bytes)))
            # The store is reached at the address this client authenticated to, not one the coordinator names.
            joining = time.monotonic()
            self._group = formation_store.gloo_group(self.base_url, info.incarnation, self._token, 0,
                                                     info.world_size, info.timeout_seconds)  # fmt: skip
            self.formation_seconds = time.monotonic() - joining
        elif info.method == "nccl":
            self._comm = self._nccl_group(info)
        if info.method != "checkpoint":
            self._post(f"/v1/sync/group/{info.incarnation}/joined")
        return info

    def _nccl_group(self, info: protocol.GroupInfo) -> Any:
        """Mint the group's NCCL unique id, hand it to the coordinator (which starts the engines' joins with it) and
        enter the communicator as rank 0 while they do: no store, nothing unpickled."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

        unique_id = bytes(NCCLLibrary().ncclGetUniqueId().internal)
        self._post(f"/v1/sync/group/{info.incarnation}/nccl",
                   {"ncclUniqueIdB64": base64.b64encode(unique_id).decode()})  # fmt: skip
        return PyNcclCommunicator.from_unique_id_bytes(unique_id, rank=0, world_size=info.world_size,
                                                       device=torch.cuda.current_device())  # fmt: skip

    def _leave(self) -> None:
        if self._group is not None:
            self._group.shutdown()
            self._group = None
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None

    def close(self) -> None:
        """Leave the group and hand it back, so another trainer need not wait for this one's lease to lapse."""
        self._leave()
        if self._claimed:
            try:
                self.http.post("/v1/sync/leave", json={}, timeout=10.0)
            except httpx.HTTPError as err:  # the lease lapses on its own
                log.warning("could not hand the sync group back: %s", err)
            self._claimed = False
        self.http.close()

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- push ----------------------------------------------------------------------------------------------

    def push(self, state: StateLike, version: int | None = None) -> PushFigures:
        """Make ``state`` the served policy on every engine; returns the version and what it cost."""
        if self.info is None:
            self.setup(state)
        try:
            return self._push_once(state, version)
        except SyncRefusedError as err:
            if err.status != 409 or "form a new group" not in str(err):
                raise
            self.setup(state)  # membership changed: re-form the group once, then push again
            return self._push_once(state, version)

    def _push_once(self, state: StateLike, version: int | None) -> PushFigures:
        assert self.info is not None
        started = time.monotonic()
        tensors = self._prepared(state)
        if self.info.method == "checkpoint":
            result = self._push_checkpoint(tensors, version)
        else:
            metas = protocol.describe(tensors)
            body = {"incarnation": self.info.incarnation, "version": version, "tensors": [m.to_wire() for m in metas]}
            accepted = self._post("/v1/sync/push", body)["version"]
            try:
                self._broadcast(tensors, metas)
            except BaseException:
                self._leave()  # the group is unusable after a failed collective; the next push re-forms it
                self.info = None
                raise
            result = protocol.PushResult.model_validate(self._post(f"/v1/sync/push/{accepted}/result"))
        return PushFigures(result.version, result.bytes, time.monotonic() - started, result.engines_in_sync,
                           result.engines, result.apply_seconds)  # fmt: skip

    def _broadcast(self, tensors: list[tuple[str, torch.Tensor]], metas: list[protocol.TensorMeta]) -> None:
        assert self.info is not None
        if self.info.method == "nccl":
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(iterator=iter(tensors), group=self._comm, src=0,
                                           post_iter_func=lambda item: item[1].cuda(),
                                           buffer_size_bytes=self.info.bucket_bytes, num_buffers=2)  # fmt: skip
            torch.cuda.synchronize()
            return
        plan = protocol.chunks(metas, self.info.bucket_bytes)
        if self._group is None:
            raise RuntimeError("no gloo group joined: call setup() first")
        group = self._group.group
        self._reserve_buffers(max(protocol.chunk_bytes(metas, self.info.bucket_bytes)))
        started = time.monotonic()
        waiting = 0.0
        # Two reused buffers: chunk k+1 is packed in a thread while chunk k is on the wire.
        with ThreadPoolExecutor(max_workers=1) as packer:
            pending = packer.submit(protocol.pack_into, [tensors[i][1] for i in plan[0]], self._buffers[0])
            for k in range(len(plan)):
                mark = time.monotonic()
                buffer = pending.result()
                waiting += time.monotonic() - mark
                if k + 1 < len(plan):
                    parts = [tensors[i][1] for i in plan[k + 1]]
                    pending = packer.submit(protocol.pack_into, parts, self._buffers[(k + 1) % 2])
                group.broadcast(buffer, 0).wait()
        log.info("broadcast %d chunks in %.2f s (%.2f s waiting for packing)", len(plan), time.monotonic() - started,
                 waiting)  # fmt: skip

    def _reserve_buffers(self, largest: int) -> None:
        """Two pack buffers for the largest chunk, touched once (fresh memory would fault page by page mid-push)."""
        if not self._buffers or self._buffers[0].numel() < largest:
            self._buffers = [torch.zeros(largest, dtype=torch.uint8) for _ in range(2)]

    def _push_checkpoint(self, tensors: list[tuple[str, torch.Tensor]], version: int | None) -> protocol.PushResult:
        """Write safetensors into a fresh directory under the shared path (complete before its name appears)."""
        from safetensors.torch import save_file

        assert self.info is not None and self.info.checkpoint_path
        root = Path(self.info.checkpoint_path)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".push-", dir=root))
        final = root / f"policy-{version or 'next'}-{uuid.uuid4().hex[:8]}"
        try:
            save_file({n: t.contiguous() for n, t in tensors}, str(staging / "model.safetensors"))
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        body = {"incarnation": self.info.incarnation, "version": version, "checkpointDir": str(final)}
        try:
            return protocol.PushResult.model_validate(self._post("/v1/sync/checkpoint", body))
        finally:
            shutil.rmtree(final, ignore_errors=True)  # engines have read it (or refused it)
