"""``python -m explorer``: ``run --config FILE`` explores; ``coordinator`` does the same inside an ExplorerJob's
coordinator pod (status API on all interfaces); ``demo`` is the embedded default on local CPU vLLM engines."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from tqdm import tqdm

from explorer import config as explorer_config
from explorer import credentials, engine_args, explorer, local_engine, termination, tiny_model
from explorer.weight_sync.rendezvous import SyncCoordinator

RAY_HEAD_PORT = 6379  # the coordinator Service's "ray" port; CPU worker pods join here


def load_config(path: Path) -> explorer_config.ExplorerConfig:
    try:
        return explorer_config.ExplorerConfig.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise SystemExit(f"no config file at {path}") from None
    except ValueError as err:
        raise SystemExit(f"invalid explorer config {path}:\n{err}") from None


def sync_coordinator(
    cfg: explorer_config.ExplorerConfig, in_pod: bool, port: int | None, bind_host: str = "0.0.0.0"
) -> SyncCoordinator:
    """The weight-sync side: in a pod it serves on all interfaces and advertises the sync Service's name (the one
    address string every side must use); a local run stays on 127.0.0.1."""
    if not in_pod:
        return SyncCoordinator(cfg, advertised_host="127.0.0.1", bind_host="127.0.0.1", api_port=port or cfg.sync.port)
    address = os.environ.get("EXPLORER_SYNC_ADDRESS", "")
    host = address.rpartition(":")[0] or address
    if not host:
        raise SystemExit("EXPLORER_SYNC_ADDRESS is not set (the operator sets it on the coordinator pod)")
    return SyncCoordinator(cfg, advertised_host=host, bind_host=bind_host, api_port=port or cfg.sync.port)


@contextlib.contextmanager
def ray_session(node_ip: str | None, head_port: int | None) -> Iterator[None]:
    """A local Ray instance, or (``head_port``) a Ray head that CPU worker pods join at ``<coordinator>:<port>``."""
    if head_port is not None:
        # Token auth with the job token: a pod of the job that has no token (or anything else reaching the port)
        # cannot join or submit work. Worker pods mount the same token (builders.build_worker_pod). Set before Ray
        # is imported: it reads its auth settings once.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(credentials.directory() / credentials.JOB_TOKEN)
        os.environ.pop("RAY_AUTH_TOKEN", None)  # a token value would win over the job's file
    import ray

    if head_port is None:
        # "local": always a fresh instance of our own, never a cluster some `ray start` left recorded in /tmp/ray.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address=node_ip)
        try:
            yield
        finally:
            ray.shutdown()
        return
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    argv = [ray_cli, "start", "--head", "--block", f"--port={head_port}", "--include-dashboard=false",
            "--disable-usage-stats", *([f"--node-ip-address={node_ip}"] if node_ip else [])]  # fmt: skip
    head = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # --block: dies with us
    try:
        address = f"{node_ip or socket.gethostbyname(socket.gethostname())}:{head_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except ConnectionError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the Ray head on port {head_port} did not start") from None
                time.sleep(1)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        head.terminate()
        head.wait(timeout=60)


def _run(
    cfg: explorer_config.ExplorerConfig,
    host: str,
    port: int,
    sync: SyncCoordinator,
    ray_head_port: int | None = None,
    node_ip: str | None = None,
    engines_first: bool = False,
    config_path: Path | None = None,
) -> int:
    with ray_session(node_ip or ("127.0.0.1" if host.startswith("127.") else None), ray_head_port):
        return _explore(cfg, host, port, sync, engines_first, config_path)


def _explore(
    cfg: explorer_config.ExplorerConfig,
    host: str,
    port: int,
    sync: SyncCoordinator,
    engines_first: bool,
    config_path: Path | None,
) -> int:
    ex = explorer.Explorer(cfg, sync=sync)
    bar = tqdm(total=cfg.explore.total_steps, desc="explore", unit="step")

    def progress(step: int, metrics: dict[str, float]) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(reward=f"{metrics.get('reward_mean', 0):.2f}", failed=int(metrics.get("failed_tasks", 0)))

    ex.on_step = progress
    try:
        summary = asyncio.run(explorer.serve_and_explore(ex, host, port, engines_first=engines_first,
                                                         config_path=config_path))  # fmt: skip
    finally:
        bar.close()
        termination.write(ex.current_report())  # in a pod: the operator's account of how this run ended
    for error in ex.row_errors:
        print(f"skipped taskset row {error}", file=sys.stderr)
    print(summary)
    return 0


def demo(args: argparse.Namespace) -> int:
    """Two local CPU engines on the tiny model, the built-in arithmetic taskset, experiences with rewards."""
    model = tiny_model.make_tiny_model(tiny_model.default_model_dir())
    work = Path(args.output or tempfile.mkdtemp(prefix="explorer-demo-"))
    local_credentials(work / "credentials")  # before the engines start: they inherit it
    engines = [
        local_engine.LocalEngine(
            engine_args.EngineArgs(model=str(model), served_model_name="tiny", dtype="float32",
                                   port=local_engine.free_port(),
                                   max_model_len=256, max_num_seqs=16, seed=0, kv_cache_memory_bytes=64 << 20,
                                   enforce_eager=True, weight_sync="gloo"),
            work / f"engine-{i}.log",
            env=local_engine.cpu_binding(i),
        )
        for i in range(args.engines)
    ]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"starting {args.engines} CPU vLLM engine(s) on the tiny model (about a minute on 2 cores) ...")
        for engine in engines:
            engine.launch()
        for engine in engines:
            engine.wait_ready()
        cfg = explorer_config.ExplorerConfig.model_validate({
            "job": "demo", "namespace": "local",
            "rollout": {"name": "rollout", "model": {"path": str(model), "servedName": "tiny"},
                        "engines": [{"index": i, "url": e.base_url, "rankOffset": 1 + i, "worldSize": 1}
                                    for i, e in enumerate(engines)]},
            "taskset": {"path": "builtin:arithmetic"},
            "workflow": {"name": "math", "maxTokens": 16},
            "sync": {"method": "gloo", "style": "trainer_driven"},  # no trainer here: explore without waiting
            "explore": {"batchSize": 8, "repeatTimes": 4, "totalSteps": args.steps},
            "scheduler": {"runnersPerEngine": 2, "taskTimeoutSeconds": 120},
            "experiences": {"path": str(work / "experiences"), "format": "jsonl"},
        })  # fmt: skip
        code = _run(cfg, "127.0.0.1", local_engine.free_port(), sync_coordinator(cfg, False, local_engine.free_port()))
        print(f"experiences: {work / 'experiences'} (manifest.json lists the committed steps)")
        return code
    finally:
        for engine in engines:
            engine.stop()


def local_credentials(directory: Path) -> None:
    """A local run's tokens: the ones ``EXPLORER_CREDENTIALS_DIR`` names, else fresh ones in ``directory``."""
    made = credentials.ensure_local(directory)
    if made is None:
        return
    print(f"credentials: {made} (a trainer presents {made / credentials.TRAINER_TOKEN}, "
          f"e.g. {credentials.CLIENT_TOKEN_FILE_ENV}={made / credentials.TRAINER_TOKEN})")  # fmt: skip


def pod_credentials() -> None:
    """In a pod the operator mounts the job's Secret: without it nothing may listen, so refuse to start."""
    try:
        credentials.job_token()
        credentials.trainer_tokens()
    except credentials.MissingCredentialError as err:
        raise SystemExit(f"cannot start without the job's credentials: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="explorer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "coordinator"):
        p = sub.add_parser(name, help=f"{name}: explore per --config")
        p.add_argument("--config", type=Path, required=True)
        p.add_argument("--status-host", default="127.0.0.1" if name == "run" else "0.0.0.0")
        p.add_argument("--status-port", type=int, default=None, help="default: the config's statusPort")
        p.add_argument("--sync-port", type=int, default=None, help="trainer-facing sync API (default: sync.port)")
    coordinator = sub.choices["coordinator"]
    coordinator.add_argument("--bind-host", default="0.0.0.0", help="interface of the sync API and store")
    coordinator.add_argument(
        "--ray-head-port",
        type=int,
        default=RAY_HEAD_PORT,
        help="start a Ray head here for CPU worker pods (0: a local Ray instance)",
    )
    coordinator.add_argument("--node-ip", default=None, help="the Ray node address (default: the pod IP)")
    d = sub.add_parser("demo", help="the embedded default on local CPU vLLM engines")
    d.add_argument("--steps", type=int, default=4)
    d.add_argument("--engines", type=int, default=2)
    d.add_argument("--output", default=None, help="directory for logs and experiences (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "demo":
        return demo(args)
    cfg = load_config(args.config)
    status_port = args.status_port or cfg.status_port
    if args.command == "run":
        local_credentials(Path(cfg.experiences.path) / "credentials")
        return _run(cfg, args.status_host, status_port, sync_coordinator(cfg, False, args.sync_port))
    pod_credentials()
    sync = sync_coordinator(cfg, True, args.sync_port, args.bind_host)
    # A coordinator pod starts long before its engines have loaded the model: it explores once they answer.
    return _run(
        cfg,
        args.status_host,
        status_port,
        sync,
        args.ray_head_port or None,
        args.node_ip,
        engines_first=True,
        config_path=args.config,
    )  # a scale rewrites the mounted config: the engines follow it


if __name__ == "__main__":
    sys.exit(main())
