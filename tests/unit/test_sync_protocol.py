"""Pure weight-sync logic: chunk boundaries (vLLM's rule), packing, metadata checks, rank layout, engine flags."""

from __future__ import annotations

import json

import pytest
import torch

from explorer import engine_args
from explorer.weight_sync import protocol


def meta(name: str, numel: int, dtype: str = "float32") -> protocol.TensorMeta:
    return protocol.TensorMeta(name=name, dtype=dtype, shape=[numel])


def test_chunks_flush_after_the_running_total_exceeds_the_bucket() -> None:
    metas = [meta("a", 10), meta("b", 10), meta("c", 10), meta("d", 1)]  # 40, 40, 40, 4 bytes
    assert protocol.chunks(metas, 40) == [[0, 1], [2, 3]]  # 80 > 40 flushes after b; c+d never exceed
    assert protocol.chunks(metas, 1000) == [[0, 1, 2, 3]]
    assert protocol.chunks(metas, 1) == [[0], [1], [2], [3]]
    assert protocol.chunks([], 10) == []


def test_pack_and_unpack_round_trip_mixed_dtypes_and_shapes() -> None:
    tensors = {
        "w": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.bfloat16),
        "t": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # non-contiguous
    }
    metas = protocol.describe(tensors.items())
    buffer = protocol.pack(list(tensors.values()))
    assert buffer.dtype == torch.uint8 and buffer.numel() == sum(m.nbytes for m in metas)
    for name, tensor in protocol.unpack(buffer, metas):
        assert torch.equal(tensor, tensors[name]) and tensor.dtype == tensors[name].dtype
    reused = torch.full((buffer.numel() + 7,), 255, dtype=torch.uint8)
    assert torch.equal(protocol.pack_into(list(tensors.values()), reused), buffer)
    with pytest.raises(ValueError, match="chunk holds"):
        list(protocol.unpack(torch.cat([buffer, torch.zeros(1, dtype=torch.uint8)]), metas))


def test_check_metadata_names_every_problem_by_tensor() -> None:
    expected = {"x.weight": ("float32", [4, 4]), "x.bias": ("float32", [4]), "ids": ("int64", [4])}
    good = [meta("x.bias", 4), protocol.TensorMeta(name="x.weight", dtype="float32", shape=[4, 4]),
            meta("ids", 4, "int64")]  # fmt: skip
    assert protocol.check_metadata(good, expected) == []
    bad = [
        protocol.TensorMeta(name="x.weight", dtype="float32", shape=[4, 5]),
        meta("x.bias", 4, "int32"),
        meta("ids", 4, "int64"),
        meta("ids", 4, "int64"),
        meta("extra", 1),
        meta("odd", 1, "complex64"),
    ]
    problems = protocol.check_metadata(bad, expected)
    assert "tensor 'x.weight' has shape [4, 5], the served model's is [4, 4]" in problems
    assert "tensor 'x.bias' has dtype int32, the served model's is float32" in problems
    assert "tensor 'ids' is listed twice" in problems
    assert "tensor 'extra' is not a weight of the served model" in problems
    assert "tensor 'odd' has unsupported dtype 'complex64'" in problems
    assert protocol.check_metadata([meta("x.bias", 4), meta("ids", 4, "int64")], expected) == [
        "1 weights of the served model are missing, e.g. 'x.weight'"
    ]


def test_floating_tensors_must_come_in_the_served_dtype_and_others_in_the_checkpoints() -> None:
    """A push once declared float64 for a float32 model: every engine staged twice the model's bytes."""
    expected = {"w": ("bfloat16", [4]), "ids": ("int64", [4])}
    served_bf16 = [meta("w", 4, "bfloat16"), meta("ids", 4, "int64")]
    assert protocol.check_metadata(served_bf16, expected) == []  # default: the checkpoint's own dtype
    served_f32 = [meta("w", 4, "float32"), meta("ids", 4, "int64")]
    assert protocol.check_metadata(served_f32, expected, served_dtype="float32") == []  # bf16 on disk, fp32 served
    assert protocol.check_metadata([meta("w", 4, "float64"), meta("ids", 4, "int64")], expected, "float32") == [
        "tensor 'w' has dtype float64, the served model's is float32"
    ]
    assert protocol.check_metadata([meta("w", 4, "bfloat16"), meta("ids", 4, "int32")], expected, "bfloat16") == [
        "tensor 'ids' has dtype int32, the served model's is int64"
    ]
    assert protocol.check_metadata(served_f32, expected) == [
        "tensor 'w' has dtype float32, the served model's is bfloat16"
    ]


def test_on_wire_casts_only_floating_tensors_and_leaves_unknown_dtypes_for_the_check() -> None:
    metas = [meta("w", 4, "float64"), meta("ids", 4, "int64"), meta("odd", 1, "complex64")]
    assert [m.dtype for m in protocol.on_wire(metas, "bfloat16")] == ["bfloat16", "int64", "complex64"]
    assert protocol.on_wire(metas, None) == metas


def test_tensor_meta_refuses_negative_dimensions() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        protocol.TensorMeta(name="w", dtype="float32", shape=[4, -1])


def test_rank_layout_places_engines_after_the_trainer_without_collisions() -> None:
    slots, world = protocol.rank_layout([2, 1, 4])
    assert [(s.rank_offset, s.world_size) for s in slots] == [(1, 2), (3, 1), (4, 4)]
    assert world == 8
    ranks = [r for s in slots for r in range(s.rank_offset, s.rank_offset + s.world_size)]
    assert sorted(ranks) == list(range(1, world))


@pytest.mark.parametrize(("method", "backend"), [("gloo", "gloo"), ("nccl", "explorer_nccl"), ("checkpoint", "gloo")])
def test_engine_flags_for_each_sync_method(method: str, backend: str) -> None:
    args = engine_args.EngineArgs(model="/m", served_model_name="p", weight_sync=method)
    argv = engine_args.build_vllm_serve_args(args)
    assert json.loads(argv[argv.index("--weight-transfer-config") + 1]) == {"backend": backend}
    assert argv[argv.index("--worker-extension-cls") + 1] == engine_args.WORKER_EXTENSION
    assert engine_args.engine_env(args) == {"VLLM_SERVER_DEV_MODE": "1"}
    plain = engine_args.EngineArgs(model="/m", served_model_name="p")
    assert "--weight-transfer-config" not in engine_args.build_vllm_serve_args(plain)
    assert engine_args.engine_env(plain) == {}
