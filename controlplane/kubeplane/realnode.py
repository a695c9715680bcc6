"""Real Kubernetes nodes next to kwok's fake ones: containerd + runc + kubelet + kube-proxy (+ kube-router, CoreDNS).

Each node is a *holder* process (``unshare --net --mount``) that owns a fresh network namespace and a private mount
namespace; every node daemon is started inside both with ``nsenter``. The host side is one bridge and one veth per
node, created here and removed on stop; inside a node there is no default route, so a pod can reach only the plane's
own ranges (``netplan``). Hard-coded daemon paths get node-private bind mounts, kubelet's host sysctls get
bind-mounted stand-in files, and every process (daemons, shims, containers) lives in a cgroup tree nested under the
launcher's own. ``docs/controlplane.md`` has the whole picture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kubeplane import cgroups, nodeconfig, pki, procs
from kubeplane.netplan import NetPlan

Spawn = Callable[..., procs.ManagedProcess]


class RealNodeError(RuntimeError):
    """A real node did not come up; the message names the step and carries the daemon's log tail."""


def run(argv: Sequence[str], check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RealNodeError(f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def in_node(holder_pid: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside a node's network and mount namespaces."""
    return ["nsenter", "-t", str(holder_pid), "-n", "-m", "--", *argv]


def normalized_ref(ref: str) -> str:
    """The name containerd gives an image reference without a registry host (``docker.io/...``)."""
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"docker.io/{ref}" if "/" in ref else f"docker.io/library/{ref}"


def kubeconfig_for(server: str, ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubeplane", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "u", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "kubeplane", "context": {"cluster": "kubeplane", "user": "u"}}],
        "current-context": "kubeplane",
    }


# ---- the host side: one bridge per plane ---------------------------------------------------------------------


def create_bridge(plan: NetPlan) -> None:
    run(["ip", "link", "add", plan.bridge, "type", "bridge"])
    run(["ip", "addr", "add", f"{plan.host_ip}/{plan.node_subnet.prefixlen}", "dev", plan.bridge])
    run(["ip", "link", "set", plan.bridge, "up"])


def delete_bridge(plan: NetPlan) -> None:
    """Remove the bridge; the routes through it go with it. Safe when it is already gone."""
    if Path(f"/sys/class/net/{plan.bridge}").exists():
        run(["ip", "link", "del", plan.bridge], check=False)


def add_host_routes(plan: NetPlan, nodes: int) -> None:
    for destination, via in plan.host_routes(nodes):
        run(["ip", "route", "replace", destination, "via", via, "dev", plan.bridge])


# ---- one node ------------------------------------------------------------------------------------------------


class RealNode:
    """One real node: its namespaces, configuration and daemons."""

    def __init__(
        self,
        layout: nodeconfig.NodeLayout,
        plane_pki: pki.Pki,
        server: str,
        tree: cgroups.CgroupTree,
        spawn: Spawn,
        run_policy: bool,
        run_dns: bool,
    ):
        self.layout = layout
        self.pki = plane_pki
        self.server = server
        self.tree = tree
        self.spawn = spawn
        self.run_policy = run_policy
        self.run_dns = run_dns
        self.holder: procs.ManagedProcess | None = None
        self.daemons: list[procs.ManagedProcess] = []
        self.timings: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def holder_pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def nsenter(self, argv: Sequence[str]) -> list[str]:
        return in_node(self.holder_pid, argv)

    def start_namespaces(self) -> None:
        """Holder, mounts and network; after this the node's daemons can start."""
        started = time.monotonic()
        lay = self.layout
        for sub in ("containerd/root", "cni/net.d", "private", "sysctl", "certs"):
            lay.path(sub).mkdir(parents=True, exist_ok=True)
        lay.path("resolv.conf").write_text("")
        self.tree.make(f"node-{lay.index}/daemons")
        self.holder = self.spawn(
            f"{self.name}-holder",
            ["unshare", "--net", "--mount", "--propagation", "private", "sleep", "infinity"],
            cgroup_procs=self.tree.procs_files(f"node-{lay.index}/daemons"),
        )
        self._wait_for_holder()
        self._mount_private_paths()
        self._wire_network()
        self.timings["namespaces"] = time.monotonic() - started

    def _wait_for_holder(self) -> None:
        assert self.holder is not None
        own_netns = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.holder.pid}/ns/net") != own_netns and Path(
                    f"/proc/{self.holder.pid}/exe"
                ).resolve().name.startswith("sleep"):
                    return
            if not self.holder.running():
                raise RealNodeError(f"{self.name}: unshare exited: {self.holder.log_tail()}")
            time.sleep(0.02)
        raise RealNodeError(f"{self.name}: the namespace holder did not start")

    def _mount_private_paths(self) -> None:
        lay = self.layout
        script = ["set -e"]
        script += [f"mount -t tmpfs -o mode=0755,size=256m kubeplane-{lay.name} {t}" for t in nodeconfig.PRIVATE_TMPFS]
        for target in nodeconfig.PRIVATE_BINDS:
            source = lay.path("private", target.strip("/").replace("/", "_"))
            source.mkdir(parents=True, exist_ok=True)
            script.append(f"mount --bind {source} {target}")
        script += [f"mkdir -p {d}" for d in nodeconfig.PRIVATE_SUBDIRS]
        for name, value in nodeconfig.KUBELET_SYSCTLS.items():
            stand_in = lay.path("sysctl", name.replace("/", "_"))
            stand_in.write_text(value + "\n")
            script.append(f"mount --bind {stand_in} /proc/sys/{name}")
        run(["nsenter", "-t", str(self.holder_pid), "-m", "--", "sh", "-c", "\n".join(script)])

    def _wire_network(self) -> None:
        lay, plan = self.layout, self.layout.plan
        host_end, node_end = plan.veth_names(lay.index)
        run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end, "netns", str(self.holder_pid)])
        run(["ip", "link", "set", host_end, "master", plan.bridge, "up"])
        inside = [
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{lay.ip}/{plan.node_subnet.prefixlen}", "dev", node_end],
            ["ip", "link", "set", node_end, "up"],
        ]
        inside += [
            ["ip", "route", "add", dst, "via", via, "dev", node_end]
            for dst, via in plan.node_routes(lay.index, lay.nodes)
        ]
        for argv in inside:
            run(self.nsenter(argv))

    # ---- daemons ------------------------------------------------------------------------------------------
    def _daemon(self, name: str, argv: list[str]) -> procs.ManagedProcess:
        proc = self.spawn(
            f"{self.name}-{name}",
            self.nsenter(argv),
            cgroup_procs=self.tree.procs_files(f"node-{self.layout.index}/daemons"),
        )
        self.daemons.append(proc)
        return proc

    def _certs(self) -> dict[str, tuple[Path, Path]]:
        lay = self.layout
        node_pki = pki.Pki(self.pki.directory)
        return {
            "kubelet": pki.issue(node_pki, f"{lay.name}-kubelet", f"system:node:{lay.name}", ("system:nodes",)),
            "serving": pki.issue(
                node_pki,
                f"{lay.name}-serving",
                f"system:node:{lay.name}",
                ("system:nodes",),
                ips=(lay.ip,),
                dns_names=(lay.name,),
            ),
            "proxy": pki.issue(node_pki, f"{lay.name}-proxy", "system:kube-proxy", ("system:node-proxier",)),
        }

    def write_configs(self) -> dict[str, Path]:
        lay = self.layout
        certs = self._certs()
        files: dict[str, Path] = {}

        def write(name: str, content: str) -> Path:
            path = lay.path(name)
            path.write_text(content)
            files[name] = path
            return path

        ca = self.pki.ca_cert
        write("containerd.toml", nodeconfig.containerd_config(lay))
        write("cni/net.d/10-kubeplane.conflist", json.dumps(nodeconfig.cni_config(lay), indent=2))
        write("kubelet.kubeconfig", yaml.safe_dump(kubeconfig_for(self.server, ca, *certs["kubelet"])))
        write("kubelet.yaml", yaml.safe_dump(nodeconfig.kubelet_config(lay, ca, *certs["serving"])))
        proxy_kc = write("kube-proxy.kubeconfig", yaml.safe_dump(kubeconfig_for(self.server, ca, *certs["proxy"])))
        write("kube-proxy.yaml", yaml.safe_dump(nodeconfig.kube_proxy_config(lay, proxy_kc)))
        admin = kubeconfig_for(self.server, ca, self.pki.admin_cert, self.pki.admin_key)
        admin_kc = write("admin.kubeconfig", yaml.safe_dump(admin))
        if self.run_dns:
            write("Corefile", nodeconfig.corefile(lay, admin_kc, health_port=8181))
        return files

    def start_containerd(self) -> procs.ManagedProcess:
        started = time.monotonic()
        proc = self._daemon(
            "containerd",
            [self.layout.binary("containerd", "containerd"), "--config", str(self.layout.path("containerd.toml"))],
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not proc.running():
                raise RealNodeError(f"{proc.name} exited:\n{proc.log_tail()}")
            probe = run(self.ctr(["version"]), check=False, timeout=10)
            if probe.returncode == 0:
                self.timings["containerd"] = time.monotonic() - started
                return proc
            time.sleep(0.2)
        raise RealNodeError(f"{proc.name} did not answer on {self.layout.containerd_socket}:\n{proc.log_tail()}")

    def ctr(self, argv: Sequence[str]) -> list[str]:
        return self.nsenter(
            [
                self.layout.binary("containerd", "ctr"),
                "--address",
                str(self.layout.containerd_socket),
                "--namespace",
                "k8s.io",
                *argv,
            ]
        )

    def image_digests(self) -> dict[str, str]:
        """{ref: manifest digest} of the images this node's containerd holds."""
        out = run(self.ctr(["images", "ls"]), timeout=60).stdout.splitlines()[1:]
        return {fields[0]: fields[2] for fields in (line.split() for line in out) if len(fields) > 2}

    def import_image(self, archive: Path, ref: str, digest: str) -> float:
        """Import an image archive unless the store already holds ``ref`` at ``digest``; returns seconds spent."""
        held = self.image_digests()
        if digest in (held.get(ref), held.get(normalized_ref(ref))):
            return 0.0
        started = time.monotonic()
        # Unpacked layers are all kubelet needs: dropping their compressed copies halves the store (6 GiB per runtime).
        # (--local: only the client-side import can discard them.)
        argv = ["images", "import", "--local", "--snapshotter", "overlayfs", "--discard-unpacked-layers", str(archive)]
        run(self.ctr(argv), timeout=1800)
        return time.monotonic() - started

    def remove_stale_containers(self) -> None:
        """A kept image store may still list the containers of an earlier plane's pods: remove them before kubelet
        starts (their processes and namespaces died with that plane)."""
        for kind in ("containers", "sandboxes"):
            listed = run(self.ctr([kind, "ls", "-q"]), check=False, timeout=60).stdout.split()
            if listed:
                run(self.ctr([kind, "rm", *listed]), check=False, timeout=120)

    def start_node_daemons(self, labels: dict[str, str]) -> None:
        lay = self.layout
        label_arg = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        self._daemon(
            "kubelet",
            [
                lay.binary("k8s", "kubelet"),
                f"--config={lay.path('kubelet.yaml')}",
                f"--kubeconfig={lay.path('kubelet.kubeconfig')}",
                f"--root-dir={nodeconfig.KUBELET_ROOT}",
                f"--cert-dir={lay.path('certs')}",
                f"--hostname-override={lay.name}",
                f"--node-ip={lay.ip}",
                f"--node-labels={label_arg}",
                "--v=1",
            ],
        )
        self._daemon(
            "kube-proxy",
            [
                lay.binary("k8s", "kube-proxy"),
                f"--config={lay.path('kube-proxy.yaml')}",
                f"--hostname-override={lay.name}",
                "--v=1",
            ],
        )

    def start_addons(self) -> None:
        """kube-router and CoreDNS: they look up their Node object, so they start once kubelet registered it."""
        lay = self.layout
        if self.run_policy:
            self._daemon(
                "kube-router",
                [
                    lay.binary("kube-router", "kube-router"),
                    f"--kubeconfig={lay.path('admin.kubeconfig')}",
                    f"--hostname-override={lay.name}",
                    "--run-firewall=true",
                    "--run-router=false",
                    "--run-service-proxy=false",
                    "--enable-cni=false",
                    "--enable-ipv6=false",
                    "--metrics-port=0",
                    "--health-port=20244",
                    "--v=1",
                ],
            )
        if self.run_dns:
            self._daemon("coredns", [lay.binary("coredns", "coredns"), "-conf", str(lay.path("Corefile"))])
        checks = [("kube-router", 20244, "/healthz")] if self.run_policy else []
        checks += [("coredns", 8182, "/ready")] if self.run_dns else []  # ready: its Service cache is synced
        for name, port, path in checks:
            self._wait_local_http(name, port, path)

    def wait_service_rules(self, timeout: float = 180.0) -> None:
        """Wait for kube-proxy's first sync inside the node (its KUBE-SERVICES chain): until then no ClusterIP routes,
        and kube-proxy's /healthz says healthy while it is still starting, so it cannot tell."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_daemons()
            listed = run(self.nsenter(["iptables-save", "-t", "nat"]), check=False, timeout=30).stdout
            if ":KUBE-SERVICES" in listed:
                return
            time.sleep(0.5)
        proxy = next((p for p in self.daemons if p.name.endswith("kube-proxy")), None)
        tail = proxy.log_tail(20) if proxy is not None else "(kube-proxy not started)"
        raise RealNodeError(f"{self.name}: kube-proxy wrote no Service rules after {timeout:.0f}s:\n{tail}")

    def _wait_local_http(self, name: str, port: int, path: str, timeout: float = 60.0) -> None:
        """Wait for a daemon's health endpoint on the node's own loopback."""
        probe = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}{path}', timeout=2)"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_daemons()
            if run(self.nsenter(["python3", "-c", probe]), check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.3)
        raise RealNodeError(f"{self.name}: {name} not healthy on 127.0.0.1:{port}{path} after {timeout:.0f}s")

    def check_daemons(self) -> None:
        for proc in self.daemons:
            if not proc.running():
                raise RealNodeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")

    def stop(self) -> None:
        """Daemons in reverse order, then everything left in the node's cgroups (shims, containers), then the holder."""
        for proc in reversed(self.daemons):
            proc.stop(grace_seconds=5)
        self.daemons.clear()
        if self.holder is not None:
            self.holder.stop(grace_seconds=1)
            self.holder = None


def remove_node_dir(directory: Path) -> None:
    """Delete a stopped node's files (container snapshots included; their mounts died with the namespace)."""
    shutil.rmtree(directory, ignore_errors=True)
