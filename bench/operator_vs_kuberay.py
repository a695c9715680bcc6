"""Benchmark: our operator side by side with KubeRay's on the same local plane, and the same pods created directly.

Each part has the plane to itself, in its own namespace: the pods created directly (no operator), then our operator
(as in bench/operator_scale.py), then KubeRay's (built from controlplane/modules/kuberay, a host process). Every
job is 1 coordinator/head (1 CPU, 1 GiB) + N engines/workers (1 nvidia.com/gpu each) on fake 8-GPU nodes:

1. one job with 8 engines: create -> all pods Running;
2. --jobs jobs x --engines (4) in one burst: p50/p95/max to all Running, the operator's API requests (audit log, by
   user agent), CPU seconds and peak RSS (/proc);
3. the running jobs left alone for --steady-minutes: API requests and CPU per minute;
4. --scale-jobs jobs scaled from 4 to 8 engines at once (jobs beyond them deleted first when the GPUs are short):
   time until every new pod is Running;
5. --recreate-jobs jobs deleted and created again under the same names: delete -> all new pods Running, and the
   children left that no live job owns (must be 0).

Prints one table (plain text, then markdown for docs/). ``--jobs 20 --steady-minutes 1`` is a smoke run of minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable

import kuberay_local
import operator_figures as figs
import subjects
from kubernetes import client

from explorer_operator.local import running_operator
from kubeplane import build, cluster, nodes, paths

SINGLE_ENGINES = 8
SCALE_TO = 8
POLL = 0.25
Figures = dict[str, figs.Cell]


def wait_running(subject: subjects.Subject, started: dict[str, float], want: int | dict[str, int],
                 timeout: float) -> list[float]:  # fmt: skip
    """Seconds from each group's start until ``want`` of its pods are Running (not terminating), sorted."""
    wants = want if isinstance(want, dict) else dict.fromkeys(started, want)
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = Counter(subject.group_of(p) for p in subjects.raw_list(subject.api, subject.namespace)
                         if subjects.is_running(p))  # fmt: skip
        now = time.monotonic()
        for group, t0 in started.items():
            if group not in done and counts[group] >= wants[group]:
                done[group] = now - t0
        if len(done) == len(started):
            return sorted(done.values())
        time.sleep(POLL)
    raise SystemExit(f"{subject.name}: only {len(done)}/{len(started)} jobs with all pods Running after {timeout}s")


def wait_pods_gone(subject: subjects.Subject, groups: Iterable[str], timeout: float) -> None:
    wanted = set(groups)
    deadline = time.monotonic() + timeout
    while any(subject.group_of(p) in wanted for p in subjects.raw_list(subject.api, subject.namespace)):
        if time.monotonic() > deadline:
            raise SystemExit(f"{subject.name}: deleted jobs' pods still there after {timeout}s")
        time.sleep(POLL)


def delete_and_wait(subject: subjects.Subject, names: dict[str, str], timeout: float) -> None:
    """Delete jobs (name -> group) and wait until they and their pods are gone (not timed)."""
    for name in names:
        subject.delete(name)
    deadline = time.monotonic() + timeout
    while not all(subject.gone(n) for n in names):
        if time.monotonic() > deadline:
            raise SystemExit(f"{subject.name}: jobs not deleted after {timeout}s")
        time.sleep(POLL)
    wait_pods_gone(subject, names.values(), timeout)


def recreate(subject: subjects.Subject, engines: dict[str, int], timeout: float) -> list[float]:
    """Delete the jobs at once, create each again as soon as it is gone; delete -> all new pods Running."""
    deleted = {}
    for name in engines:
        deleted[name] = time.monotonic()
        subject.delete(name)
    started: dict[str, float] = {}
    wants: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while deleted:
        for name in [n for n in deleted if subject.gone(n)]:
            group = subject.create(name, engines[name])
            started[group], wants[group] = deleted.pop(name), engines[name] + 1
        if time.monotonic() > deadline:
            raise SystemExit(f"{subject.name}: deleted jobs still there after {timeout}s")
        time.sleep(POLL)
    return wait_running(subject, started, wants, timeout)


def orphans_after(subject: subjects.Subject, timeout: float) -> int | None:
    """Children no live job owns, once the garbage collector has had up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    count = subject.orphans()
    while count and time.monotonic() < deadline:
        time.sleep(1)
        count = subject.orphans()
    return count


def single(subject: subjects.Subject, args: argparse.Namespace) -> Figures:
    print(f"[{subject.name}] one job x {SINGLE_ENGINES} engines", flush=True)
    t0 = time.monotonic()
    group = subject.create("single", SINGLE_ENGINES)
    seconds = wait_running(subject, {group: t0}, SINGLE_ENGINES + 1, args.timeout)[0]
    delete_and_wait(subject, {"single": group}, args.timeout)  # its GPUs back for the burst
    return {"single": seconds}


def burst(local: cluster.LocalCluster, subject: subjects.Subject, args: argparse.Namespace,
          groups: dict[str, str]) -> Figures:  # fmt: skip
    """Create ``--jobs`` jobs in one go (their groups land in ``groups``), then the steady state."""
    print(f"[{subject.name}] burst: {args.jobs} jobs x {args.engines} engines", flush=True)
    cpu0, offset = subject.cpu_seconds(), local.audit_offset()
    started: dict[str, float] = {}
    for j in range(args.jobs):
        t0 = time.monotonic()
        groups[f"j{j}"] = subject.create(f"j{j}", args.engines)
        started[groups[f"j{j}"]] = t0
    times = wait_running(subject, started, args.engines + 1, args.timeout)
    out: Figures = {"burst_p50": figs.pct(times, 0.5), "burst_p95": figs.pct(times, 0.95), "burst_max": times[-1]}
    time.sleep(5)  # let status writes settle
    if subject.pid is None:
        return out
    for phase, minutes in (("burst", 1.0), ("steady", args.steady_minutes)):
        if phase == "steady":
            print(f"[{subject.name}] steady: {minutes:g} min", flush=True)
            cpu0, offset = subject.cpu_seconds(), local.audit_offset()
            time.sleep(minutes * 60)
        events = local.audit_events(offset)
        requests = figs.count_requests(events, subject.agents)
        for what, writes in (("requests", False), ("writes", True)):
            top = figs.top_requests(events, subject.agents, n=8 if writes else 5, writes=writes)
            print(f"[{subject.name}] {phase} {what}: {', '.join(top) or 'none'}")
        out |= {f"{phase}_requests": requests.total / minutes, f"{phase}_cpu": (subject.cpu_seconds() - cpu0) / minutes}
        if phase == "burst":
            out |= {"burst_requests": requests.total, "burst_writes": requests.writes}
    return out


def scale(
    subject: subjects.Subject, args: argparse.Namespace, groups: dict[str, str], engines: dict[str, int]
) -> Figures:
    """Scale the first ``--scale-jobs`` jobs to 8 engines at once, deleting the last jobs first if GPUs are short."""
    scaled = list(groups)[: args.scale_jobs]
    short = args.scale_jobs * (SCALE_TO - args.engines) - (args.nodes * args.gpus - args.jobs * args.engines)
    victims = list(groups)[len(groups) - math.ceil(short / args.engines) :] if short > 0 else []
    if set(victims) & set(scaled):
        raise SystemExit("not enough GPUs to scale: lower --scale-jobs or raise --nodes")
    print(f"[{subject.name}] scale: {len(scaled)} jobs {args.engines} -> {SCALE_TO} engines "
          f"({len(victims)} jobs deleted first for GPUs)", flush=True)  # fmt: skip
    delete_and_wait(subject, {n: groups.pop(n) for n in victims}, args.timeout)
    for name in victims:
        engines.pop(name)
    started = {}
    for name in scaled:
        started[groups[name]] = time.monotonic()
        subject.scale(name, args.engines, SCALE_TO)
        engines[name] = SCALE_TO
    times = wait_running(subject, started, SCALE_TO + 1, args.timeout)
    return {"scale_p50": figs.pct(times, 0.5), "scale_max": times[-1]}


def run_part(local: cluster.LocalCluster, subject: subjects.Subject, args: argparse.Namespace) -> Figures:
    """The five workloads, in order, on one subject alone on the plane."""
    out = single(subject, args)
    groups: dict[str, str] = {}
    out |= burst(local, subject, args, groups)
    engines = dict.fromkeys(groups, args.engines)
    out |= scale(subject, args, groups, engines)
    targets = sorted(groups, key=lambda n: engines[n] != args.engines)[: args.recreate_jobs]  # unscaled ones first
    print(f"[{subject.name}] recreate: {len(targets)} jobs", flush=True)
    again = recreate(subject, {n: engines[n] for n in targets}, args.timeout)
    out |= {"recreate_p50": figs.pct(again, 0.5), "recreate_max": again[-1], "orphans": orphans_after(subject, 60)}
    if subject.pid is not None:
        out["peak_rss"] = subject.peak_rss() / 2**20
    return out


def table(args: argparse.Namespace, parts: dict[str, Figures]) -> list[figs.Row]:
    def row(key: str, name: str, unit: str) -> figs.Row:
        ours, kuberay, direct = (parts.get(p, {}) for p in ("ours", "kuberay", "direct"))
        return figs.Row(name, unit, ours.get(key), kuberay.get(key), direct.get(key))

    burst = f"{args.jobs} jobs x (1 + {args.engines}) burst"
    return [
        row("single", f"1 job x (1 + {SINGLE_ENGINES}): create -> all Running", "s"),
        row("burst_p50", f"{burst}: p50 to all Running", "s"),
        row("burst_p95", f"{burst}: p95", "s"),
        row("burst_max", f"{burst}: max", "s"),
        row("burst_requests", f"{burst}: operator API requests", ""),
        row("burst_writes", f"{burst}: of which writes", ""),
        row("burst_cpu", f"{burst}: operator CPU", "s"),
        row("steady_requests", f"steady ({args.steady_minutes:g} min): API requests / min", ""),
        row("steady_cpu", "steady: operator CPU / min", "s"),
        row("scale_p50", f"{args.scale_jobs} jobs {args.engines} -> {SCALE_TO} engines: p50 to new pods Running", "s"),
        row("scale_max", f"{args.scale_jobs} jobs scaled: max (all new pods Running)", "s"),
        row("recreate_p50", f"{args.recreate_jobs} jobs deleted + recreated: p50 delete -> Running", "s"),
        row("recreate_max", f"{args.recreate_jobs} jobs recreated: max", "s"),
        row("orphans", "children left that no live job owns", ""),
        row("peak_rss", "operator peak RSS (whole run)", "MiB"),
    ]


def run_alone(local: cluster.LocalCluster, api: client.ApiClient, part: str, kuberay: build.BuildResult,
              args: argparse.Namespace) -> Figures:  # fmt: skip
    """One part in namespace ``bench-<part>``, its operator (if any) the only one running; the namespace is deleted
    after, with the operator still running (for finalizers, should it ever have some)."""
    namespace = f"bench-{part}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    assert local.workdir is not None
    with contextlib.ExitStack() as stack:
        if part == "direct":
            subject = subjects.Subject(api, namespace)
        elif part == "ours":
            ours = stack.enter_context(running_operator(local, local.workdir / "operator.log"))
            ours.wait_live()
            subject = subjects.Ours(api, namespace, ours.process.pid)
        elif part == "kuberay":
            ray = stack.enter_context(kuberay_local.running_kuberay(local, kuberay, local.workdir / "kuberay.log"))
            ray.wait_live()
            subject = subjects.KubeRay(api, namespace, ray.process.pid)
        else:
            raise SystemExit(f"unknown part {part!r}: direct, ours or kuberay")
        figures = run_part(local, subject, args)
        subjects.delete_namespace(core, namespace, args.timeout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per fake node")
    parser.add_argument("--steady-minutes", type=float, default=5.0)
    parser.add_argument("--scale-jobs", type=int, default=20)
    parser.add_argument("--recreate-jobs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any one wait may take")
    parser.add_argument("--parts", default="direct,ours,kuberay", help="which parts to run, in this order")
    args = parser.parse_args()
    kuberay = kuberay_local.ensure_built()
    parts: dict[str, Figures] = {}
    cfg = cluster.ClusterConfig(nodes=args.nodes, node_shape=nodes.NodeShape(gpus=args.gpus))
    with cluster.LocalCluster(cfg) as local:
        kubectl = str(local.binary("kubectl"))
        for argv in (["apply", "--server-side", "-f", str(paths.repo_root() / "crds")],
                     ["wait", "--for=condition=Established", "crd/explorerjobs.explorer.rft.dev"]):  # fmt: skip
            subprocess.run([kubectl, *argv], env=local.env(), check=True, capture_output=True)
        kuberay_local.install_crds(local, kuberay)
        with local.api_client() as api:
            for part in args.parts.split(","):
                parts[part] = run_alone(local, api, part, kuberay, args)
    rows = table(args, parts)
    print(f"\n{args.jobs} jobs x (1 + {args.engines}) on {args.nodes} fake {args.gpus}-GPU nodes; KubeRay "
          f"{kuberay_local.version()}; steady {args.steady_minutes:g} min\n")  # fmt: skip
    print(figs.text_table(rows))
    print("\nmarkdown:\n")
    print(figs.markdown_table(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
