"""The main job on the embedded default, on real pods: ``make demo`` (``python -m explorer_operator.demo``).

It starts the local plane with one real node (kubelet, containerd, cluster DNS, enforced NetworkPolicy), builds or
finds the images, installs the operator with the Helm chart, applies the CPU example job (two vLLM engines on a
tiny model made locally) and a reference trainer pod that pushes weights through ``status.sync.address``, then shows
the job's phase, step, policy version and experiences, refreshed, until Ctrl-C (which tears everything down).
``--exit-when-done`` returns once the job has succeeded (scripts, CI). Every wait is bounded and reports what it
last saw; a failing command's stderr is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from typing import Any

import yaml

from explorer import credentials
from explorer_operator import demo_stack
from kubeplane import cluster

NAMESPACE = "default"


def coordinator_report(plane: cluster.LocalCluster, job: str) -> dict[str, Any]:
    """The coordinator's own status API, read from inside its pod (no proxy through the API server)."""
    token_file = f"{credentials.MOUNT_DIR}/{credentials.JOB_TOKEN}"
    probe = (
        f"import urllib.request as u; t = open({token_file!r}).read().strip(); "
        "r = u.Request('http://127.0.0.1:8080/status', headers={'Authorization': 'Bearer ' + t}); "
        "print(u.urlopen(r, timeout=3).read().decode())"
    )
    try:
        out = demo_stack.kubectl(plane, "exec", "-n", NAMESPACE, f"{job}-coordinator", "--", "python3", "-c", probe,
                                 timeout=20)  # fmt: skip
        return dict(json.loads(out))
    except (demo_stack.StackError, ValueError):
        return {}


def render(status: dict[str, Any], report: dict[str, Any], trainer: str, elapsed: float) -> str:
    engines = status.get("engines", {})
    conditions = " ".join(f"{c['type']}={c['status']}" for c in status.get("conditions", []))
    lines = [
        f"ExplorerJob cpu-tiny on a real node  ({elapsed:.0f}s since start; Ctrl-C tears everything down)",
        "",
        f"  phase            {status.get('phase', '-')}",
        f"  step             {status.get('step', 0)} / {status.get('totalSteps', '-')}",
        f"  policy version   {status.get('policyVersion', '-')}",
        f"  engines          {engines.get('ready', 0)} ready / {engines.get('desired', 0)} desired, "
        f"{engines.get('inSync', 0)} in sync",
        f"  experiences      {report.get('experiences', '-')} "
        f"(last step {report.get('experiencesPerSecond') or '-'}/s)",
        f"  sync address     {(status.get('sync') or {}).get('address', '-')}",
        f"  conditions       {conditions}",
        f"  trainer pod      {trainer}",
        f"  coordinator      {report.get('message', '')}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="explorer-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--exit-when-done", action="store_true", help="return once the job has succeeded")
    parser.add_argument("--total-steps", type=int, default=20, help="steps the demo job explores")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each stage")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # tear down through the context managers
    started = time.monotonic()
    cfg = cluster.ClusterConfig(nodes=0, real_nodes=1, images=("operator", "runtime-cpu"))
    print("starting the local plane with one real node (first run builds binaries and images) ...", flush=True)
    with cluster.LocalCluster(cfg) as plane:
        timings = ", ".join(f"{k} {v:.0f}s" for k, v in plane.timings.items() if v >= 1)
        print(f"plane up in {plane.timings['total']:.0f}s ({timings})", flush=True)
        demo_stack.install_operator(plane)
        print("operator installed with the Helm chart (a pod of the operator image)", flush=True)
        demo_stack.enforce_restricted(plane, NAMESPACE)
        demo_stack.model_volume(plane, NAMESPACE)
        job = yaml.safe_load(demo_stack.CPU_JOB.read_text())
        job["spec"]["explore"]["totalSteps"] = args.total_steps
        name = job["metadata"]["name"]
        demo_stack.job_storage(plane, NAMESPACE, name)
        demo_stack.apply(plane, NAMESPACE, [job])
        address = wait(plane, name, lambda s: (s.get("sync") or {}).get("address"), args.timeout, "a sync address")
        pushes = max(1, args.total_steps // job["spec"]["sync"]["interval"] - 1)
        batch = demo_stack.experiences_per_push(job)
        trainer = demo_stack.trainer_objects(name, address, pushes=pushes, interval=5.0, batch=batch)
        demo_stack.apply(plane, NAMESPACE, trainer)
        print(f"job {name} applied; trainer pod pushing {pushes} versions to {address}", flush=True)
        return watch(plane, name, args, started)
    return 0


def wait(plane: cluster.LocalCluster, job: str, ready: Any, timeout: float, what: str) -> Any:
    deadline, last = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        last = demo_stack.job_status(plane, NAMESPACE, job)
        if value := ready(last):
            return value
        if last.get("phase") == "Failed":
            break
        time.sleep(1)
    raise SystemExit(f"{job}: no {what} after {timeout:.0f}s; last status:\n{yaml.safe_dump(last)}")


def watch(plane: cluster.LocalCluster, job: str, args: argparse.Namespace, started: float) -> int:
    tty = sys.stdout.isatty()
    deadline = time.monotonic() + args.timeout
    report: dict[str, Any] = {}
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            status = demo_stack.job_status(plane, NAMESPACE, job)
            # The last report stays on screen once the coordinator has finished and stopped serving it.
            report = coordinator_report(plane, job) or report
            trainer = demo_stack.kubectl(plane, "get", "pod", "trainer", "-n", NAMESPACE, "-o",
                                         "jsonpath={.status.phase}")  # fmt: skip
            screen = render(status, report, trainer, time.monotonic() - started)
            print(("\x1b[H\x1b[2J" + screen) if tty else screen + "\n", flush=True)
            phase = status.get("phase")
            if phase == "Failed":
                print(demo_stack.kubectl(plane, "describe", "ej", job, "-n", NAMESPACE))
                return 1
            if phase == "Succeeded" and args.exit_when_done:
                return 0
            if args.exit_when_done and time.monotonic() > deadline:
                print(f"the job did not succeed within {args.timeout:.0f}s")
                return 1
            time.sleep(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
