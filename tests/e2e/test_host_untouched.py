"""Real nodes leave the host as they found it: iptables, sysctls, routes, links, mounts and cgroups, after a clean
stop and after the launcher is SIGKILLed (the next start cleans up)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kubeplane import cgroups, cluster, netplan, paths
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.cluster,
    pytest.mark.timeout(1200),
]

# The host sysctls kubelet, kube-proxy, kube-router and the CNI bridge plugin would write if they ran on the host.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
)


def host_state() -> dict[str, object]:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    sysctls = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        sysctls[name] = path.read_text().strip() if path.exists() else None
    own = cgroups.nested_base(cgroups.hierarchies())
    cgroup_dirs = sorted(
        str(p) for h in cgroups.hierarchies() if h.dir(own).is_dir() for p in h.dir(own).iterdir() if p.is_dir()
    )
    mounts = sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return {
        "iptables": out("iptables-save"),
        "ip6tables": out("ip6tables-save"),
        "routes": out("ip", "-4", "route", "show", "table", "all"),
        "links": sorted(line.split(":")[1].strip() for line in out("ip", "-o", "link").splitlines()),
        "sysctls": sysctls,
        "mounts": mounts,
        "cgroups": cgroup_dirs,
    }


def strip_counters(state: dict[str, object]) -> dict[str, object]:
    """iptables-save prints packet counters and a timestamp line; only rules matter."""
    out = dict(state)
    for key in ("iptables", "ip6tables"):
        out[key] = "\n".join(line for line in str(state[key]).splitlines() if not line.startswith("#"))
    return out


def test_clean_stop_restores_the_host(tmp_path: Path) -> None:
    before = strip_counters(host_state())
    with cluster.LocalCluster(cluster.ClusterConfig(nodes=0, real_nodes=1), workdir_parent=tmp_path) as plane:
        assert plane.plan is not None
        during = host_state()
        assert plane.plan.bridge in during["links"]  # type: ignore[operator]
        # The plane is up only once kube-proxy has written its rules: inside the node, never on the host.
        assert "KUBE-SERVICES" in plane.node_exec(0, ["iptables-save"]).stdout
        assert strip_counters(during)["iptables"] == before["iptables"]
    assert strip_counters(host_state()) == before
    assert list(tmp_path.iterdir()) == []


def test_sigkilled_launcher_is_cleaned_up_by_the_next_start(tmp_path: Path) -> None:
    before = strip_counters(host_state())
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster.hold_cluster", str(tmp_path), "1"],
        cwd=paths.repo_root(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert holder.stdout is not None
    workdir = None
    for line in holder.stdout:
        if line.startswith("READY "):
            workdir = Path(line.split(" ", 1)[1].strip())
            break
    assert workdir is not None, f"launcher exited {holder.wait(timeout=30)} before its plane was ready"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    left = host_state()
    assert any(str(link).startswith(netplan.BRIDGE_PREFIX) for link in left["links"])  # type: ignore[attr-defined]
    assert cluster.remove_stale_workdirs(tmp_path) == [workdir]
    wait_for(lambda: strip_counters(host_state()) == before, timeout=30, what="host state as before the launcher")
