"""One real CPU vLLM engine on the tiny local model, shared by the session's vLLM tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from explorer import engine_args, local_engine, tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return tiny_model.make_tiny_model(tiny_model.default_model_dir())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def cpu_engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_engine.LocalEngine]:
    args = engine_args.EngineArgs(
        model=str(tiny_model_dir),
        served_model_name="tiny",
        port=_free_port(),
        dtype="float32",
        max_model_len=256,
        max_num_seqs=16,
        seed=0,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
    )
    log = tmp_path_factory.mktemp("engine") / "vllm.log"
    with local_engine.LocalEngine(args, log) as engine:
        yield engine
