"""The experience stream's wire format, shared by coordinator and trainer: JSON requests, Arrow IPC batches. Pure.

A read answers with an Arrow IPC stream of one record batch, one row per experience in commit order: ``step`` and
``index`` (its place in the step's file), ``batch_id``, ``task_id``, ``run_id``, ``tokens`` (prompt then response,
int32), ``prompt_length``, ``mask`` (one bool per token: True for the tokens the policy sampled, the ones a policy loss
counts: the response, less the tool results and template text of a merged multi-turn conversation), ``logprobs``
(response tokens, float32), ``reward``, ``policy_version`` (null before the first sync), ``policy_versions``,
``response_text`` and ``info`` (JSON). The schema's metadata holds ``BatchInfo`` under ``explorer.batch``: where the
batch starts and ends, what was skipped, how far the explorer is.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from typing import Annotated, Any

from pydantic import Field

from explorer.config import CONSUMER_PATTERN, WireModel
from explorer.experience import Experience

CONTENT_TYPE = "application/vnd.apache.arrow.stream"
METADATA_KEY = b"explorer.batch"


class Position(WireModel):
    """A place in the stream: experience ``offset`` of step ``step`` (everything before it comes earlier)."""

    step: int = Field(default=0, ge=0)
    offset: int = Field(default=0, ge=0)

    @property
    def key(self) -> tuple[int, int]:
        return (self.step, self.offset)

    def __str__(self) -> str:
        return f"step {self.step} offset {self.offset}"


ConsumerName = Annotated[str, Field(pattern=CONSUMER_PATTERN, description="Its cursor outlives restarts.")]


class ReadRequest(WireModel):
    """Trainer → coordinator: up to ``max_experiences`` from the consumer's acknowledged cursor."""

    consumer: ConsumerName
    max_experiences: int = Field(ge=1, le=1_000_000)
    timeout_seconds: float = Field(default=300, ge=0, le=3600, description="How long to wait for them.")
    min_policy_version: int | None = Field(
        default=None, description="Skip experiences of older policy versions (and of none: before the first sync)."
    )
    ack: Position | None = Field(default=None, description="Acknowledge up to here first (the previous batch's end).")


class AckRequest(WireModel):
    """Trainer → coordinator: every experience before ``cursor`` is consumed."""

    consumer: ConsumerName
    cursor: Position


class AckResult(WireModel):
    consumer: str
    cursor: Position
    removed_steps: list[int] = Field(default_factory=list, description="Step files retention deleted just now.")


class BatchInfo(WireModel):
    """What a read delivered, and the explorer's progress when it did."""

    consumer: str
    start: Position = Field(description="The consumer's acknowledged cursor the batch starts from.")
    end: Position = Field(description="Just after the batch: acknowledge this once the batch is consumed.")
    experiences: int
    skipped: int = Field(default=0, description="Experiences in the batch's range older than minPolicyVersion.")
    finished: bool = Field(default=False, description="The explorer is done and nothing remains after this batch.")
    committed_step: int = Field(default=0, description="The newest step the explorer has committed.")
    total_steps: int = 0


class ConsumerState(WireModel):
    cursor: Position
    unconsumed_steps: int
    unconsumed_experiences: int


class StreamState(WireModel):
    """``GET /v1/experiences``: the stream's progress and every consumer's cursor."""

    committed_step: int
    total_steps: int
    finished: bool
    retention: str
    max_unconsumed_steps: int | None = None
    waiting_for: str | None = Field(default=None, description="Why the explorer is holding, if it is.")
    consumers: dict[str, ConsumerState] = Field(default_factory=dict)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("step", pa.int64()), ("index", pa.int32()), ("batch_id", pa.string()), ("task_id", pa.int64()),
        ("run_id", pa.int64()), ("tokens", pa.list_(pa.int32())), ("prompt_length", pa.int32()),
        ("mask", pa.list_(pa.bool_())), ("logprobs", pa.list_(pa.float32())), ("reward", pa.float64()),
        ("policy_version", pa.int64()), ("policy_versions", pa.list_(pa.int64())), ("response_text", pa.string()),
        ("info", pa.string()),
    ])  # fmt: skip


def encode(rows: list[tuple[int, int, Experience]], info: BatchInfo) -> bytes:
    """``(step, index, experience)`` rows as an Arrow IPC stream of one record batch, ``info`` in its metadata."""
    import pyarrow as pa

    schema = _schema().with_metadata({METADATA_KEY: info.model_dump_json(by_alias=True).encode()})
    experiences = [exp for _, _, exp in rows]
    # Column by column from the experiences' own lists (no per-row dict copies): encoding dominated a read before.
    columns: dict[str, list[Any]] = {
        "step": [step for step, _, _ in rows], "index": [index for _, index, _ in rows],
        "info": [json.dumps(e.info) for e in experiences],
        "mask": [e.token_mask() for e in experiences],
    }  # fmt: skip
    for name in schema.names:
        if name not in columns:
            columns[name] = [getattr(e, name) for e in experiences]
    batch = pa.record_batch([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    data: bytes = sink.getvalue().to_pybytes()
    return data


@dataclasses.dataclass(frozen=True)
class ExperienceBatch:
    """One read: ``table`` (pyarrow.Table, columns as in the module docstring) and ``info``; acknowledge ``cursor``."""

    table: Any
    info: BatchInfo

    @property
    def cursor(self) -> Position:
        return self.info.end

    @property
    def skipped(self) -> int:
        return self.info.skipped

    @property
    def finished(self) -> bool:
        return self.info.finished

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @cached_property
    def experiences(self) -> list[Experience]:
        """The rows as ``Experience`` objects (logprobs come back as float32 values)."""
        names = {f.name for f in dataclasses.fields(Experience)}
        return [Experience(**{**{k: v for k, v in row.items() if k in names}, "info": json.loads(row["info"]),
                              "action_mask": _action_mask(row["mask"], row["prompt_length"])})
                for row in self.table.to_pylist()]  # fmt: skip


def _action_mask(mask: list[bool], prompt_length: int) -> list[bool] | None:
    response = mask[prompt_length:]
    return None if all(response) else response


def decode(data: bytes) -> ExperienceBatch:
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    info = BatchInfo.model_validate_json(table.schema.metadata[METADATA_KEY])
    return ExperienceBatch(table, info)
