"""Runs inside every vLLM worker process: staged weight-transfer backends and the ``ext_*`` worker methods.

vLLM imports this module in its workers because the engine is started with ``--worker-extension-cls
explorer.weight_sync.engine_ext.WorkerExtension``; importing it registers two weight-transfer backends:

- ``gloo`` (CPU): the trainer broadcasts packed chunks over a gloo group;
- ``explorer_nccl`` (GPU): vLLM's packed NCCL consumer, with a watchdog that aborts a stuck communicator.

Both are *staged*: every chunk is received into a side buffer and the model is touched only in
``finish_weight_update``, after the whole state dict has arrived. A trainer that dies mid-push therefore leaves the
engine serving the previous version exactly (vLLM's stock lifecycle reloads layer by layer as chunks arrive and
leaves a half-loaded model behind, see docs/weight-sync.md). Checkpoint reloads go through the same staged apply.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

from explorer import credentials
from explorer.weight_sync import checkpoint_dir, formation_store, protocol

# A child of vLLM's logger, so these lines land in the engine's log with vLLM's own.
log = logging.getLogger("vllm.explorer.weight_sync")
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                      "I32": "int32", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def checkpoint_index(directory: str) -> dict[str, tuple[str, list[int]]]:
    """name → (dtype, shape) of every tensor in a directory's safetensors files (headers only)."""
    from safetensors import safe_open

    index: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = handle.get_slice(name)
                index[name] = (SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype()), list(piece.get_shape()))
    return index


def read_checkpoint(directory: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    weights: list[tuple[str, torch.Tensor]] = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        weights.extend(load_file(str(path)).items())
    return weights


def read_checkpoint_tensor(directory: str, name: str) -> torch.Tensor:
    """One tensor of a checkpoint directory, read alone (not the whole checkpoint)."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor: torch.Tensor = handle.get_tensor(name)
                return tensor
    raise KeyError(f"no weight named {name!r} in the served model")


def apply_weights(model: torch.nn.Module, model_config: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Load a complete state dict through vLLM's layerwise reload (CPU prepacked kernels need it, see notes)."""
    from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    initialize_layerwise_reload(model)
    with disable_mtp_completeness_check():
        model.load_weights(weights)  # type: ignore[operator]
    finalize_layerwise_reload(model, model_config)


@dataclasses.dataclass
class GlooInitInfo(WeightTransferInitInfo):
    store_url: str  # the coordinator's sync API: the group forms over its formation store (job token)
    rank_offset: int
    world_size: int
    incarnation: str = ""
    timeout_seconds: float = 60.0
    bucket_bytes: int = protocol.DEFAULT_BUCKET_BYTES
    chunk_bytes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StagedUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def metas(self) -> list[protocol.TensorMeta]:
        return [protocol.TensorMeta(name=n, dtype=d, shape=s) for n, d, s in zip(self.names, self.dtype_names,
                                                                                 self.shapes, strict=True)]  # fmt: skip


class Staging:
    """The side buffer of a push in progress, and what the engine last applied (for ``ext_get_weight``).

    Receive buffers are recycled: the generation backing the served record stays untouched until the next push is
    applied; free generations are reused (already faulted in: first-touching a fresh GiB costs seconds on a busy
    host). ``prefault`` makes them up front, when the group forms.
    """

    def __init__(self) -> None:
        self.incarnation = ""
        self.staged: list[tuple[str, torch.Tensor]] = []
        self.served: dict[str, torch.Tensor] = {}
        self.keep_served = True
        self.applied = False
        self._free: list[list[torch.Tensor]] = []  # generations of receive buffers nobody reads
        self._reuse: list[torch.Tensor] = []
        self._incoming: list[torch.Tensor] = []
        self._live: list[torch.Tensor] = []

    def prefault(self, chunk_bytes: list[int], generations: int = 2) -> None:
        self._free = [[torch.zeros(n, dtype=torch.uint8) for n in chunk_bytes] for _ in range(generations)]

    def _recycle(self, generation: list[torch.Tensor]) -> None:
        if generation:
            self._free.append(generation)

    def start(self) -> None:
        self.staged = []
        self._recycle(self._incoming or self._reuse)  # an unfinished push: its buffers are free again
        self._incoming = []
        self._reuse = self._free.pop(0) if self._free else []

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A receive buffer for the next chunk (recycled when one of the right size is free)."""
        index = len(self._incoming)
        spare = self._reuse[index] if index < len(self._reuse) else None
        buffer = spare if spare is not None and spare.numel() == nbytes else torch.empty(nbytes, dtype=torch.uint8)
        self._incoming.append(buffer)
        return buffer

    def finish(self, model: torch.nn.Module, model_config: Any) -> None:
        staged, self.staged = self.staged, []
        if not staged:
            raise RuntimeError("finish_weight_update without any received tensors")
        started = time.monotonic()
        apply_weights(model, model_config, staged)
        log.info("applied %d staged tensors in %.2f s", len(staged), time.monotonic() - started)
        self.applied = True
        if self.keep_served:
            self.served = {name: tensor.to("cpu") for name, tensor in staged}
            self._recycle(self._live)
            self._live = self._incoming
        else:
            self._recycle(self._incoming)
        self._incoming, self._reuse = [], []


class GlooStagedEngine(WeightTransferEngine[GlooInitInfo, StagedUpdateInfo]):
    """CPU backend: chunks arrive by gloo broadcast from rank 0 (the trainer) into host buffers."""

    init_info_cls = GlooInitInfo
    update_info_cls = StagedUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.staging = Staging()
        self.pg: Any = None
        self.member: formation_store.GlooMember | None = None
        self.bucket_bytes = protocol.DEFAULT_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.shutdown()
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.member = formation_store.gloo_group(init_info.store_url, init_info.incarnation, credentials.job_token(),
                                                 rank, init_info.world_size, init_info.timeout_seconds)  # fmt: skip
        self.pg = self.member.group
        self.bucket_bytes = init_info.bucket_bytes
        self.staging.incarnation = init_info.incarnation
        self.staging.prefault(init_info.chunk_bytes)

    def start_weight_update(self) -> None:
        self.staging.start()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronizes an accelerator, which a CPU engine does not have.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: StagedUpdateInfo) -> None:
        if self.pg is None:
            raise RuntimeError("gloo weight transfer is not initialized (no sync group joined)")
        metas = update_info.metas()
        started = time.monotonic()
        waiting = 0.0
        for indexes in protocol.chunks(metas, self.bucket_bytes):
            part = [metas[i] for i in indexes]
            buffer = self.staging.buffer(sum(m.nbytes for m in part))
            mark = time.monotonic()
            self.pg.broadcast(buffer, 0).wait()
            waiting += time.monotonic() - mark
            self.staging.staged.extend(protocol.unpack(buffer, part))
        log.info("received %d tensors (%.3f GiB) in %.2f s, %.2f s of it in broadcast", len(metas),
                 sum(m.nbytes for m in metas) / 2**30, time.monotonic() - started, waiting)  # fmt: skip

    def finish_weight_update(self) -> None:
        self.staging.finish(self.model, self.model_config)

    def shutdown(self) -> None:
        member, self.member, self.pg = self.member, None, None
        if member is not None:
            member.shutdown()
        self.staging.incarnation = ""


@dataclasses.dataclass(kw_only=True)
class NcclInitInfo(NCCLWeightTransferInitInfo):
    incarnation: str = ""
    timeout_seconds: float = 60.0


class NcclStagedEngine(NCCLWeightTransferEngine):
    """GPU backend: vLLM's packed NCCL consumer; received tensors are cloned aside and applied at finish.

    NCCL has no timeout of its own: a watchdog aborts the communicator when a receive outlives the group timeout,
    which turns a dead trainer into an error instead of a hung engine.
    """

    init_info_cls = NcclInitInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.staging = Staging()
        self.staging.keep_served = False  # a second copy of a GPU model is too dear; get_weight reads checkpoints
        self.timeout_seconds = 60.0

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
        self.shutdown()
        super().init_transfer_engine(init_info)
        assert isinstance(init_info, NcclInitInfo)
        self.staging.incarnation = init_info.incarnation
        self.timeout_seconds = init_info.timeout_seconds

    def start_weight_update(self) -> None:
        self.staging.start()

    def receive_weights(self, update_info: Any) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_consumer

        group: Any = getattr(self, "model_update_group", None)
        if group is None:
            raise RuntimeError("NCCL weight transfer is not initialized (no sync group joined)")
        watchdog = threading.Timer(self.timeout_seconds, group.destroy)
        watchdog.daemon = True
        watchdog.start()
        try:
            specs = ((n, (s, getattr(torch, d))) for n, d, s in zip(update_info.names, update_info.dtype_names,
                                                                       update_info.shapes, strict=True))  # fmt: skip
            packed_nccl_broadcast_consumer(
                iterator=specs, group=group, src=0,
                post_unpack_func=lambda pairs: self.staging.staged.extend((n, t.clone()) for n, t in pairs),
                buffer_size_bytes=self.packed_buffer_size_bytes, num_buffers=self.packed_num_buffers,
                device=self.device,
            )  # fmt: skip
            torch.accelerator.synchronize()
        finally:
            watchdog.cancel()
        if not group.available:
            self.model_update_group = None
            raise RuntimeError(f"NCCL receive exceeded {self.timeout_seconds}s; communicator aborted")

    def finish_weight_update(self) -> None:
        self.staging.finish(self.model, self.model_config)

    def shutdown(self) -> None:
        super().shutdown()
        self.model_update_group = None
        self.staging.incarnation = ""


for _name, _cls in (("gloo", GlooStagedEngine), ("explorer_nccl", NcclStagedEngine)):
    if _name not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(_name, _cls)


class WorkerExtension:
    """Methods mixed into vLLM's Worker, called through the dev-mode ``/collective_rpc`` route with string args."""

    # Attributes of vLLM's Worker this extension relies on (declared for the type checker).
    weight_transfer_engine: Any
    model_runner: Any
    model_config: Any
    vllm_config: Any
    _weight_update_active: bool

    def _ext_staging(self) -> Staging | None:
        return getattr(self.weight_transfer_engine, "staging", None)

    def _ext_model(self) -> torch.nn.Module:
        model: torch.nn.Module = self.model_runner.get_model()
        return model

    def ext_sync_state(self) -> dict[str, Any]:
        staging = self._ext_staging()
        return {"incarnation": staging.incarnation if staging else "", "active": bool(self._weight_update_active)}

    def ext_model_dtype(self) -> str:
        """The dtype this engine serves (what ``auto`` resolved to): floating tensors must arrive in it."""
        return protocol.dtype_name(self.model_config.dtype)

    def ext_validate(self, metas_json: str) -> list[str]:
        metas = [protocol.TensorMeta.model_validate(m) for m in json.loads(metas_json)]
        return protocol.check_metadata(metas, checkpoint_index(self.model_config.model), self.ext_model_dtype())

    def ext_abort_update(self) -> bool:
        """Drop a push that will not be finished: staged tensors are discarded, the model is untouched."""
        staging = self._ext_staging()
        if staging is not None:
            staging.start()
        self._weight_update_active = False
        if self.weight_transfer_engine is not None:
            self.weight_transfer_engine.reset_weight_update_target()
        return True

    def ext_load_checkpoint(self, directory: str, root: str = "") -> dict[str, Any]:
        """The checkpoint method: validate, read the whole directory, then apply (same all-or-nothing rule).

        With ``root`` (``sync.checkpointPath``) the directory is confined to it again here, where it is read.
        """
        if root:
            directory = str(checkpoint_dir.confine(directory, root))
        index = checkpoint_index(directory)
        metas = [protocol.TensorMeta(name=n, dtype=d, shape=s) for n, (d, s) in index.items()]
        problems = protocol.check_metadata(metas, checkpoint_index(self.model_config.model), self.ext_model_dtype())
        if problems:
            raise ValueError("; ".join(problems))
        weights = read_checkpoint(directory)
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            apply_weights(self._ext_model(), self.model_config, weights)
        staging = self._ext_staging()
        if staging is not None:
            staging.applied = True
            staging.served = dict(weights) if staging.keep_served else {}
        return {"bytes": sum(t.numel() * t.element_size() for _, t in weights)}

    def ext_served_metas(self) -> list[dict[str, Any]]:
        """What this worker keeps of the weights it serves (name, dtype, shape, in push order): what it can send to a
        peer that must catch up. Empty: it keeps no copy (an NCCL engine, or one that serves its base checkpoint)."""
        staging = self._ext_staging()
        served = staging.served if staging is not None else {}
        return [meta.to_wire() for meta in protocol.describe(served.items())]

    def ext_send_served(self, plan_json: str) -> dict[str, Any]:
        """Rank 0 of a catch-up group (``rendezvous.SyncCoordinator.catch_up``): broadcast the served copy of
        ``names``, in chunks the receivers expect, to the engines that joined. Only the first worker sends (each
        keeps the same full copy); generation on this engine waits meanwhile."""
        if getattr(self, "rank", 0) != 0:
            return {"bytes": 0}
        plan = json.loads(plan_json)
        staging = self._ext_staging()
        served = staging.served if staging is not None else {}
        missing = [name for name in plan["names"] if name not in served]
        if missing:
            raise RuntimeError(f"this engine keeps no served copy of {missing[:3]} (it cannot be a catch-up source)")
        tensors = [served[name] for name in plan["names"]]
        metas = protocol.describe(zip(plan["names"], tensors, strict=True))
        member = formation_store.gloo_group(plan["store_url"], plan["incarnation"], plan["token"], 0,
                                            plan["world_size"], plan["timeout_seconds"])  # fmt: skip
        try:
            for indexes in protocol.chunks(metas, plan["bucket_bytes"]):
                member.group.broadcast(protocol.pack([tensors[i] for i in indexes]), 0).wait()
        finally:
            member.shutdown()
        return {"bytes": sum(m.nbytes for m in metas)}

    def ext_get_weight(self, name: str) -> dict[str, Any]:
        """The HF-named tensor this worker serves: as last applied, or from the model's checkpoint before any sync."""
        staging = self._ext_staging()
        tensor = staging.served.get(name) if staging is not None else None
        if tensor is None and staging is not None and staging.applied:
            raise RuntimeError("this engine keeps no copy of pushed weights (NCCL); compare logprobs instead")
        if tensor is None:
            tensor = read_checkpoint_tensor(self.model_config.model, name)
        data = tensor.detach().contiguous().cpu()
        return {"dtype": protocol.dtype_name(data.dtype), "shape": list(data.shape),
                "data": base64.b64encode(data.reshape(-1).view(torch.uint8).numpy().tobytes()).decode()}  # fmt: skip
