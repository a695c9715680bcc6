"""The weight-sync wire format, shared by trainer, coordinator and engines: pure functions, no I/O.

Tensors travel as HF-checkpoint names with their dtype and full shape. Data is packed into flat uint8 chunks cut
by vLLM's rule (append tensors until the running total *exceeds* the bucket size, then flush), so a chunk may
exceed the bucket by one tensor and the layout is byte-compatible with vLLM's packed NCCL consumer.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field

from explorer.config import WireModel

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DEFAULT_BUCKET_BYTES = 256 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_floating(dtype: str) -> bool:
    """Whether ``dtype`` names a floating type we can send (False for names outside ``DTYPES``)."""
    known = DTYPES.get(dtype)
    return known is not None and known.is_floating_point


class TensorMeta(WireModel):
    """One tensor of the state dict as the trainer will send it."""

    name: str = Field(min_length=1)
    dtype: str
    shape: list[Annotated[int, Field(ge=0)]]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPES[self.dtype].itemsize


def describe(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    return [TensorMeta(name=n, dtype=dtype_name(t.dtype), shape=list(t.shape)) for n, t in tensors]


def on_wire(metas: Sequence[TensorMeta], dtype: str | None) -> list[TensorMeta]:
    """``metas`` as sent: floating tensors cast to the rollout ``dtype`` (None: as they are)."""
    if dtype is None:
        return list(metas)
    return [m.model_copy(update={"dtype": dtype}) if is_floating(m.dtype) else m for m in metas]


def chunks(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Indexes of ``metas`` per chunk: flush after the running total exceeds ``bucket_bytes``."""
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, meta in enumerate(metas):
        current.append(i)
        size += meta.nbytes
        if size > bucket_bytes:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def chunk_bytes(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[int]:
    """Byte size of each chunk ``chunks`` cuts (what receive and pack buffers must hold)."""
    return [sum(metas[i].nbytes for i in indexes) for indexes in chunks(metas, bucket_bytes)]


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat uint8 CPU buffer holding ``tensors`` back to back."""
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)


def pack_into(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``pack`` into a reusable uint8 buffer (no fresh allocation, no page faults); returns the used prefix."""
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    size = sum(f.numel() for f in flat)
    used = out[:size]
    torch.cat(flat, out=used)
    return used


def unpack(buffer: torch.Tensor, metas: Sequence[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into ``buffer`` (the inverse of ``pack``)."""
    offset = 0
    for meta in metas:
        dtype = DTYPES[meta.dtype]
        piece = buffer[offset : offset + meta.nbytes]
        if offset % dtype.itemsize:
            piece = piece.clone()  # a view needs an aligned start; mixed dtypes can misalign one
        offset += meta.nbytes
        yield meta.name, piece.view(dtype).reshape(meta.shape)
    if offset != buffer.numel():
        raise ValueError(f"chunk holds {buffer.numel()} bytes but its tensors need {offset}")


def check_metadata(
    metas: Sequence[TensorMeta], expected: Mapping[str, tuple[str, list[int]]], served_dtype: str | None = None
) -> list[str]:
    """Problems with ``metas`` against the engine's checkpoint (name → (dtype, shape)), each naming its tensor.

    Shapes and dtypes must match exactly: a floating tensor must come in ``served_dtype`` (the dtype the engine
    serves, which the trainer casts to; default: the checkpoint's), any other in the checkpoint's dtype. Engines
    stage what the metadata declares, so a wider dtype (float64 for a bf16 model) would cost each of them 4x.
    """
    problems: list[str] = []
    seen: set[str] = set()
    for meta in metas:
        if meta.name in seen:
            problems.append(f"tensor {meta.name!r} is listed twice")
        seen.add(meta.name)
        if meta.dtype not in DTYPES:
            problems.append(f"tensor {meta.name!r} has unsupported dtype {meta.dtype!r}")
            continue
        if meta.name not in expected:
            problems.append(f"tensor {meta.name!r} is not a weight of the served model")
            continue
        want_dtype, want_shape = expected[meta.name]
        if served_dtype is not None and is_floating(want_dtype):
            want_dtype = served_dtype
        if list(meta.shape) != list(want_shape):
            problems.append(f"tensor {meta.name!r} has shape {meta.shape}, the served model's is {list(want_shape)}")
        elif meta.dtype != want_dtype:
            problems.append(f"tensor {meta.name!r} has dtype {meta.dtype}, the served model's is {want_dtype}")
    missing = [name for name in expected if name not in seen]
    if missing:
        # A partial push would leave layers unloaded (vLLM's layerwise reload needs every weight of a layer).
        problems.append(f"{len(missing)} weights of the served model are missing, e.g. {missing[0]!r}")
    return problems


@dataclasses.dataclass(frozen=True)
class RankSlot:
    """Where one engine sits in the sync group: ranks ``rank_offset .. rank_offset + world_size - 1``."""

    engine: int
    rank_offset: int
    world_size: int


def rank_layout(world_sizes: Sequence[int]) -> tuple[list[RankSlot], int]:
    """Trainer is rank 0; engine i starts at 1 + the ranks of the engines before it. Returns (slots, world size)."""
    slots, next_rank = [], 1
    for i, size in enumerate(world_sizes):
        slots.append(RankSlot(i, next_rank, size))
        next_rank += size
    return slots, next_rank


class GroupRequest(WireModel):
    """Trainer → coordinator: form a sync group for this state dict."""

    tensors: list[TensorMeta] = Field(min_length=1)


NCCL_UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)


def _nccl_unique_id(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not standard base64") from None
    if len(raw) != NCCL_UNIQUE_ID_BYTES:
        raise ValueError(f"decodes to {len(raw)} bytes; an NCCL unique id has {NCCL_UNIQUE_ID_BYTES}")
    return value


class NcclIdRequest(WireModel):
    """Trainer → coordinator: the NCCL unique id it minted (``ncclGetUniqueId``) for the group it is forming."""

    nccl_unique_id_b64: Annotated[str, AfterValidator(_nccl_unique_id)]


class GroupInfo(WireModel):
    """Coordinator → trainer: how to join (rank 0) the group. A gloo group forms over the coordinator's formation
    store at the address the trainer already uses; an NCCL group over the unique id the trainer then posts."""

    incarnation: str
    method: str
    world_size: int
    bucket_bytes: int
    timeout_seconds: float
    dtype: str | None = Field(default=None, description="Served dtype: floating tensors are cast to it before sending.")
    checkpoint_path: str | None = None


class PushRequest(WireModel):
    """Trainer → coordinator: a new policy version follows (broadcast, or a checkpoint directory)."""

    incarnation: str
    version: int | None = Field(default=None, ge=1, description="Default: the current version + 1.")
    tensors: list[TensorMeta] = Field(default_factory=list)
    checkpoint_dir: str | None = None


class PushResult(WireModel):
    """The outcome of one push, as the coordinator saw it."""

    version: int
    engines_in_sync: int
    engines: int
    bytes: int
    seconds: float
    apply_seconds: float


class SyncState(WireModel):
    """``GET /v1/sync``: the group and version as the coordinator knows them."""

    incarnation: str | None
    group_ready: bool
    version: int | None
    engines: int
    engines_in_sync: int
    last_error: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
