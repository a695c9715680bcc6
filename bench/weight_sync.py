"""Benchmark of a weight push: a 1 GiB fp32 state dict to two real CPU vLLM engines over loopback (gloo).

Prints, side by side in one run: raw loopback TCP delivering the same 1 GiB to two receiver processes (the
baseline; also one stream to one receiver), and our push (trainer client → coordinator → 2 engines, staged,
applied everywhere). Goal: push throughput ≥ 0.5x the raw two-receiver figure. The model is a 16-layer Llama
(hidden 1024) made locally with random weights (cached in .cache/).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import shutil
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import torch

from explorer import config, credentials, engine_args, local_engine, tiny_model
from explorer.weight_sync.rendezvous import SyncCoordinator
from explorer.weight_sync.trainer import TrainerClient
from kubeplane import paths

GIB = 1 << 30
STREAM_CHUNK = 4 << 20


def _receive(port_queue: multiprocessing.Queue, nbytes: int) -> None:  # type: ignore[type-arg]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port_queue.put(server.getsockname()[1])
        conn, _ = server.accept()
        with conn:
            buffer, left = bytearray(STREAM_CHUNK), nbytes
            while left:
                got = conn.recv_into(buffer, min(left, STREAM_CHUNK))
                if not got:
                    raise RuntimeError("sender closed early")
                left -= got
            conn.sendall(b"k")


def raw_tcp_seconds(receivers: int, nbytes: int) -> float:
    """Seconds for one sender to deliver ``nbytes`` to each of ``receivers`` processes over loopback."""
    ports: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=_receive, args=(ports, nbytes)) for _ in range(receivers)]
    for proc in procs:
        proc.start()
    payload = memoryview(bytes(STREAM_CHUNK))
    socks = [socket.create_connection(("127.0.0.1", ports.get(timeout=30))) for _ in procs]

    def send(sock: socket.socket) -> None:
        left = nbytes
        while left:
            step = min(left, STREAM_CHUNK)
            sock.sendall(payload[:step])
            left -= step
        sock.recv(1)

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(s,)) for s in socks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    for sock in socks:
        sock.close()
    for proc in procs:
        proc.join(timeout=30)
    return seconds


def _gloo_rank(rank: int, port: int, nbytes: int, chunk: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from torch._C._distributed_c10d import ProcessGroupGloo, TCPStore

    store = TCPStore("127.0.0.1", port, 3, rank == 0, timedelta(seconds=60))
    formed = time.monotonic()
    group = ProcessGroupGloo(store, rank, 3, timedelta(seconds=60))
    formed = time.monotonic() - formed
    buffer = torch.zeros(chunk, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        started = time.monotonic()
        for _ in range(nbytes // chunk):
            group.broadcast(buffer, 0).wait()
        best = min(best, time.monotonic() - started)
    if rank == 0:
        out.put((best, formed))


def raw_gloo_seconds(nbytes: int, chunk: int) -> tuple[float, float]:
    """Best of 3: a bare torch gloo broadcast of ``nbytes`` from rank 0 to 2 processes (pre-faulted buffers), and
    rank 0's group formation over an (unauthenticated) TCPStore, the baseline of our formation store."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=_gloo_rank, args=(r, port, nbytes, chunk, out)) for r in range(3)]
    for proc in procs:
        proc.start()
    seconds, formed = out.get(timeout=300)
    for proc in procs:
        proc.join(timeout=30)
    return float(seconds), float(formed)


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def authenticated_workdir() -> Path:
    """A scratch directory holding this run's credentials: engines, coordinator and trainer authenticate as in a pod."""
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    credentials.ensure_local(work / "credentials")
    return work


def baselines(nbytes: int, bucket: int) -> tuple[float, float]:
    """Print the raw figures of this machine; return the 2-receiver TCP seconds and the bare gloo formation."""
    raw_one = raw_tcp_seconds(1, nbytes)
    raw_two = raw_tcp_seconds(2, nbytes)
    print(f"raw loopback TCP, 1 receiver : {raw_one:6.2f} s  {nbytes / raw_one / GIB:5.2f} GiB/s")
    print(f"raw loopback TCP, 2 receivers: {raw_two:6.2f} s  {nbytes / raw_two / GIB:5.2f} GiB/s (baseline)")
    raw_gloo, raw_formation = raw_gloo_seconds(nbytes, bucket)
    print(f"bare gloo broadcast to 2     : {raw_gloo:6.2f} s  {nbytes / raw_gloo / GIB:5.2f} GiB/s")
    print(f"bare gloo formation, 3 ranks over a TCPStore: {raw_formation:6.3f} s (baseline of the formation store)")
    return raw_two, raw_formation


def catch_up(
    loop: asyncio.AbstractEventLoop, coordinator: SyncCoordinator, engine: local_engine.LocalEngine,
    push_seconds: float, name: str, state: dict[str, torch.Tensor],
) -> None:  # fmt: skip
    """Restart one engine (base weights again) and time its catch-up from the peer, beside the trainer's push."""
    engine.stop()
    engine.launch()
    engine.wait_ready(1200)

    async def run() -> tuple[list[int], float, str | None]:
        index = coordinator.engines.index(next(d for d in coordinator.engines if d.endpoint.url == engine.base_url))
        coordinator.engine_versions[index] = await coordinator.engines[index].weight_version()  # what a probe reads
        started = time.monotonic()
        caught_up = await coordinator.catch_up([index])
        seconds = time.monotonic() - started
        served = await coordinator.get_weight(name, engine=index)
        return caught_up, seconds, None if torch.equal(served, state[name]) else f"{name} differs from the push"

    caught_up, seconds, problem = asyncio.run_coroutine_threadsafe(run(), loop).result(900)
    if not caught_up or problem:
        raise SystemExit(f"catch-up failed: {coordinator.last_error or problem}")
    print(f"catch-up of 1 restarted engine from its peer: {seconds:6.2f} s (the trainer's last push to 2 engines: "
          f"{push_seconds:.2f} s; no trainer involved; {name} checked equal to the push)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--bucket-mib", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s")
    logging.getLogger("explorer").setLevel(logging.INFO)

    model_dir = tiny_model.make_llama(paths.repo_root() / ".cache" / "bench-llama-1g", hidden_size=1024,
                                      intermediate_size=4096, layers=16, heads=16, kv_heads=16,
                                      head_dim=64)  # fmt: skip
    from safetensors.torch import load_file

    shapes = {n: t.shape for n, t in load_file(str(model_dir / "model.safetensors")).items()}
    nbytes = sum(s.numel() * 4 for s in shapes.values())
    print(f"state dict: {len(shapes)} tensors, {nbytes / GIB:.3f} GiB fp32")

    raw_two, raw_formation = baselines(nbytes, args.bucket_mib << 20)

    work = authenticated_workdir()
    engines = [
        local_engine.LocalEngine(
            engine_args.EngineArgs(model=str(model_dir), served_model_name="bench", port=local_engine.free_port(),
                                   dtype="float32", max_model_len=256, max_num_seqs=4, seed=0,
                                   kv_cache_memory_bytes=64 << 20, enforce_eager=True, weight_sync="gloo"),
            work / f"engine-{i}.log", env=local_engine.cpu_binding(i),
        )
        for i in range(2)
    ]  # fmt: skip
    cfg = config.ExplorerConfig.model_validate({
        "job": "bench", "namespace": "local",
        "rollout": {"name": "rollout", "model": {"path": str(model_dir), "servedName": "bench", "dtype": "float32"},
                    "engines": [{"index": i, "url": e.base_url, "rankOffset": 1 + i, "worldSize": 1}
                                for i, e in enumerate(engines)]},
        "taskset": {"path": "builtin:arithmetic"},
        "sync": {"method": "gloo", "port": local_engine.free_port(), "timeoutSeconds": 300,
                 "bucketBytes": args.bucket_mib << 20},
    })  # fmt: skip
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        for engine in engines:
            engine.launch()
        for engine in engines:
            engine.wait_ready(1200)
        print(f"2 engines ready in {time.monotonic() - started:.0f} s")
        coordinator = SyncCoordinator(cfg, advertised_host="127.0.0.1", bind_host="127.0.0.1",
                                      api_port=cfg.sync.port)  # fmt: skip
        asyncio.run_coroutine_threadsafe(coordinator.start(), loop).result(60)
        with TrainerClient(f"127.0.0.1:{cfg.sync.port}", timeout=600) as trainer:
            generator = torch.Generator().manual_seed(0)
            state = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
            setup_started = time.monotonic()
            trainer.setup(state)
            print(f"group formed in {time.monotonic() - setup_started:.2f} s (metadata checked by every engine, then "
                  f"gloo formation over the authenticated store: {trainer.formation_seconds:.3f} s at rank 0 vs "
                  f"{raw_formation:.3f} s over a bare TCPStore)")  # fmt: skip
            for i in range(args.pushes):
                state = {n: t.add_(0.001) for n, t in state.items()}
                figures = trainer.push(state)
                ratio = figures.bytes_per_second / (nbytes / raw_two)
                print(f"push {i + 1} (v{figures.version}): {figures.seconds:6.2f} s  "
                      f"{figures.bytes_per_second / GIB:5.2f} GiB/s = {ratio:.2f}x raw 2-receiver TCP; "
                      f"apply {figures.apply_seconds:.2f} s; engines in sync {figures.engines_in_sync}/2")  # fmt: skip
            catch_up(loop, coordinator, engines[1], figures.seconds, next(iter(state)), state)
        for engine in engines:
            for line in engine.log_tail(400).splitlines():
                if "received" in line or "applied" in line:
                    print("  engine:", line.split("]", 1)[-1].strip())
        rss = [tree_rss(e.pid) / GIB for e in engines if e.pid]
        print("engine RSS after pushes (GiB): " + ", ".join(f"{r:.2f}" for r in rss))
        asyncio.run_coroutine_threadsafe(coordinator.stop(), loop).result(60)
    finally:
        for engine in engines:
            engine.stop()
        loop.call_soon_threadsafe(loop.stop)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
