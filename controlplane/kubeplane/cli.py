"""Command line: ``kubeplane build`` and ``kubeplane cluster up | env | down | status`` for poking with kubectl."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from kubeplane import build, cluster, images, nodes, paths


def state_dir() -> Path:
    override = os.environ.get("KUBEPLANE_STATE_DIR")
    return Path(override) if override else paths.cache_dir() / "cluster"


def _state_file() -> Path:
    return state_dir() / "state.json"


def read_state() -> dict[str, object] | None:
    """The running background cluster's state, or None when there is none (stale state is removed)."""
    try:
        state: dict[str, object] = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or not psutil.pid_exists(pid):
        _state_file().unlink(missing_ok=True)
        return None
    return state


def cmd_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    wanted = build.NODE_COMPONENTS if args.all else build.PLANE_COMPONENTS
    results = build.ensure_built(wanted + (build.BENCH_COMPONENTS if args.bench else ()))
    for result in results.values():
        sizes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in result.sizes.items())
        how = "cached" if result.cached else f"built in {result.seconds:.1f}s"
        print(f"{result.component:11s} {how:18s} {sizes}", flush=True)
    print(f"build total {time.monotonic() - started:.1f}s")
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    started = time.monotonic()
    for image in images.ensure_images(args.images).values():
        how = "cached" if image.cached else f"built in {image.seconds:.1f}s"
        print(f"{image.name:11s} {how:18s} {image.ref} {image.size / 2**20:.0f} MiB", flush=True)
    print(f"images total {time.monotonic() - started:.1f}s")
    return 0


def _cluster_config(args: argparse.Namespace) -> cluster.ClusterConfig:
    return cluster.ClusterConfig(
        nodes=args.nodes,
        node_shape=nodes.NodeShape(gpus=args.gpus),
        real_nodes=args.real_nodes,
        network_policy=not args.no_network_policy,
        images=tuple(args.images) if args.real_nodes else (),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a cluster in the foreground until SIGTERM/SIGINT, publishing its state for ``env``/``down``."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    state_dir().mkdir(parents=True, exist_ok=True)
    with cluster.LocalCluster(_cluster_config(args)) as local:
        kubeconfig = state_dir() / "kubeconfig"
        kubeconfig.write_bytes(local.kubeconfig.read_bytes())
        kubeconfig.chmod(0o600)
        bin_dirs = sorted({str(local.binary(b).parent) for b in ("kubectl", "helm", "kwok")})
        state = {
            "pid": os.getpid(),
            "kubeconfig": str(kubeconfig),
            "server": local.server,
            "path": bin_dirs,
            "timings": local.timings,
            "nodes": local.node_names,
        }
        tmp = _state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(_state_file())
        print(f"cluster ready in {local.timings['total']:.1f}s at {local.server}", flush=True)
        try:
            stop.wait()
        finally:
            _state_file().unlink(missing_ok=True)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    if read_state():
        print("a cluster is already up; `kubeplane cluster env` prints its settings", file=sys.stderr)
        return 1
    state_dir().mkdir(parents=True, exist_ok=True)
    # Build in the foreground so its progress is visible.
    build.ensure_built(build.NODE_COMPONENTS if args.real_nodes else build.PLANE_COMPONENTS)
    if args.real_nodes:
        images.ensure_images(args.images)
    log = (state_dir() / "serve.log").open("wb")
    argv = [
        sys.executable,
        "-m",
        "kubeplane",
        "cluster",
        "serve",
        "--nodes",
        str(args.nodes),
        "--gpus",
        str(args.gpus),
        "--real-nodes",
        str(args.real_nodes),
        *(["--no-network-policy"] if args.no_network_policy else []),
        "--images",
        *args.images,
    ]
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print((state_dir() / "serve.log").read_text()[-4000:], file=sys.stderr)
            print(f"cluster failed to start (exit {proc.returncode})", file=sys.stderr)
            return 1
        if read_state():
            return cmd_env(args)
        time.sleep(0.2)
    proc.terminate()
    print(f"cluster not ready after {args.timeout}s; log: {state_dir() / 'serve.log'}", file=sys.stderr)
    return 1


def cmd_env(_: argparse.Namespace) -> int:
    state = read_state()
    if not state:
        print("no cluster is up; run `kubeplane cluster up`", file=sys.stderr)
        return 1
    path_dirs = state["path"]
    assert isinstance(path_dirs, list)
    print(f"export KUBECONFIG={state['kubeconfig']}")
    print(f"export PATH={os.pathsep.join(path_dirs)}{os.pathsep}$PATH")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    state = read_state()
    print(json.dumps(state, indent=2) if state else "no cluster is up")
    return 0 if state else 1


def cmd_down(args: argparse.Namespace) -> int:
    state = read_state()
    if not state:
        print("no cluster is up")
        return 0
    pid = state["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        os.kill(pid, signal.SIGKILL)  # its components die with it (PR_SET_PDEATHSIG)
    print("cluster stopped")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kubeplane", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build or find the cached control-plane binaries")
    b.add_argument("--all", action="store_true", help="also the real-node binaries (containerd, runc, ...)")
    b.add_argument("--bench", action="store_true", help="also the benchmark-only binaries (KubeRay's operator)")
    b.set_defaults(func=cmd_build)
    im = sub.add_parser("images", help="build or find the cached images real nodes run")
    im.add_argument("images", nargs="*", default=list(images.PROJECT_TARGETS), help="project images (default all)")
    im.set_defaults(func=cmd_images)
    cl = sub.add_parser("cluster", help="a background local cluster").add_subparsers(dest="action", required=True)
    for name, func, text in (
        ("up", cmd_up, "start a cluster in the background and print its environment"),
        ("serve", cmd_serve, "run a cluster in the foreground until interrupted"),
        ("env", cmd_env, "print `export` lines for kubectl/helm"),
        ("status", cmd_status, "print the running cluster's state"),
        ("down", cmd_down, "stop the background cluster"),
    ):
        p = cl.add_parser(name, help=text)
        p.set_defaults(func=func)
        p.add_argument("--nodes", type=int, default=4, help="fake GPU nodes (default 4)")
        p.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per node (default 8)")
        p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for up/down")
        p.add_argument("--real-nodes", type=int, default=0, help="real nodes (kubelet, containerd) next to the fake")
        p.add_argument("--no-network-policy", action="store_true", help="real nodes without kube-router")
        p.add_argument(
            "--images",
            nargs="*",
            default=list(images.PROJECT_TARGETS),
            help="project images imported into real nodes (default all)",
        )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
