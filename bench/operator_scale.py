"""Benchmark: N ExplorerJobs x 4 engines on M fake 8-GPU nodes (default 100 x 4 on 50), through the real operator.

Prints p50/p95 time from create to all of a job's pods Running, the operator's API requests per job (from the API
server's audit log), and its RSS and CPU seconds. Baseline in the same run, same plane: the same pods created
directly (one bare pod per engine + coordinator, no operator), i.e. what scheduling + kwok alone cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import psutil
from kubernetes import client

from explorer_operator import builders, models
from explorer_operator.demo_stack import kubectl
from explorer_operator.local import running_operator
from kubeplane import cluster, nodes, paths

GIB = 2**30


def job(name: str, engines: int) -> dict[str, Any]:
    return {
        "apiVersion": models.API_VERSION, "kind": models.KIND, "metadata": {"name": name},
        "spec": {"model": {"path": "/models/m"}, "engines": {"replicas": engines}, "taskset": {"path": "/d/t.jsonl"},
                 "coordinator": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}},
    }  # fmt: skip


def bare_pod(name: str, group: str, gpus: int) -> dict[str, Any]:
    resources = {"limits": {nodes.GPU_RESOURCE: str(gpus)}} if gpus else {"requests": {"cpu": "1", "memory": "1Gi"}}
    container = {"name": "c", "image": "x.invalid/y", "resources": resources}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"bench": group}},
            "spec": {"restartPolicy": "Never", "containers": [container]}}  # fmt: skip


def running_by_group(core: client.CoreV1Api, namespace: str, label: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in core.list_namespaced_pod(namespace).items:
        if pod.status.phase == "Running":
            key = (pod.metadata.labels or {}).get(label, "")
            counts[key] = counts.get(key, 0) + 1
    return counts


def measure(core: client.CoreV1Api, namespace: str, label: str, created: dict[str, float], want: int) -> list[float]:
    done: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while len(done) < len(created) and time.monotonic() < deadline:
        for group, count in running_by_group(core, namespace, label).items():
            if group in created and group not in done and count >= want:
                done[group] = time.monotonic() - created[group]
        time.sleep(0.25)
    if len(done) < len(created):
        raise SystemExit(f"only {len(done)}/{len(created)} groups Running after 600s")
    return sorted(done.values())


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=50)
    args = parser.parse_args()
    with cluster.LocalCluster(cluster.ClusterConfig(nodes=args.nodes)) as local:
        kubectl(local, "apply", "--server-side", "-f", str(paths.repo_root() / "crds"))
        kubectl(local, "wait", "--for=condition=Established", "crd/explorerjobs.explorer.rft.dev")
        api = local.api_client()
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)

        # Baseline: the same pods, created directly.
        core.create_namespace({"metadata": {"name": "baseline"}})
        created: dict[str, float] = {}
        for j in range(args.jobs):
            created[f"b{j}"] = time.monotonic()
            core.create_namespaced_pod("baseline", bare_pod(f"b{j}-coordinator", f"b{j}", 0))
            for e in range(args.engines):
                core.create_namespaced_pod("baseline", bare_pod(f"b{j}-engine-{e}", f"b{j}", 1))
        baseline = measure(core, "baseline", "bench", created, args.engines + 1)
        core.delete_namespace("baseline")
        time.sleep(5)

        assert local.workdir is not None
        with running_operator(local, local.workdir / "operator.log") as running:
            running.wait_live()
            operator = psutil.Process(running.process.pid)
            cpu_before = sum(operator.cpu_times()[:2])
            offset = local.audit_offset()
            core.create_namespace({"metadata": {"name": "bench"}})
            created = {}
            for j in range(args.jobs):
                created[f"j{j}"] = time.monotonic()
                custom.create_namespaced_custom_object(models.GROUP, models.VERSION, "bench", models.PLURAL,
                                                       job(f"j{j}", args.engines))  # fmt: skip
            ours = measure(core, "bench", builders.JOB_LABEL, created, args.engines + 1)
            time.sleep(5)  # let status writes settle
            events = local.audit_events(offset)
            mine = [e for e in events if e["userAgent"].startswith(("explorer-operator", "kopf"))]
            writes = [e for e in mine if e["verb"] in ("create", "patch", "update", "delete")]
            rss = operator.memory_info().rss
            cpu = sum(operator.cpu_times()[:2]) - cpu_before
        print(f"{args.jobs} ExplorerJobs x {args.engines} engines on {args.nodes} fake 8-GPU nodes")
        o50, o95 = pct(ours, 0.5), pct(ours, 0.95)
        print(f"  create -> all pods Running   p50 {o50:6.2f}s  p95 {o95:6.2f}s  (operator)")
        b50, b95 = pct(baseline, 0.5), pct(baseline, 0.95)
        print(f"  same pods created directly   p50 {b50:6.2f}s  p95 {b95:6.2f}s  (baseline)")
        print(f"  operator API requests/job    {len(mine) / args.jobs:6.1f} ({len(writes) / args.jobs:.1f} writes)")
        print(f"  operator RSS                 {rss / GIB:6.2f} GiB;  CPU {cpu:.1f}s for the run "
              f"(mean {statistics.mean(ours):.2f}s/job)")  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    main()
