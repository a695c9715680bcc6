"""Starts and stops a real Kubernetes control plane on loopback: etcd, apiserver, controllers, scheduler, kwok.

``LocalCluster`` is the one launcher the tests, the demo and the benchmarks use. Every component binds to
127.0.0.1 on a free port; fake nodes and pods get 127.x addresses, so nothing can dial outside loopback.
``stop()`` leaves no process and no temporary directory behind; children also die with the launcher
(PR_SET_PDEATHSIG), and a later start removes directories left by a launcher that was SIGKILLed.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil
import yaml
from kubernetes import client, config

from kubeplane import build, cgroups, image_store, images, netplan, nodeconfig, pki, procs, realnode, slots
from kubeplane import nodes as fake_nodes

WORKDIR_PREFIX = "kubeplane-"
# Every request at Metadata level: tests count the writes a client made (by user agent) from this log.
AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                "rules": [{"level": "Metadata"}]}  # fmt: skip
# Services get loopback ClusterIPs too: even a stray dial of one stays on this machine. With real nodes, pods
# cannot use a loopback ClusterIP (127.0.0.0/8 is each pod's own loopback): the plane's own /16 is used instead.
SERVICE_CIDR = "127.96.0.0/16"
REALNODE_STATE = "realnodes.json"
CGROUP_MANIFEST = "cgroups.json"
POD_CIDR = "127.64.0.0/16"
KWOK_NODE_IP = "127.63.0.254"


class ClusterStartError(RuntimeError):
    """A component did not become ready; the message names it and carries the end of its log."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How big the fake cluster is."""

    nodes: int = 4
    node_shape: fake_nodes.NodeShape = dataclasses.field(default_factory=fake_nodes.NodeShape)
    ready_timeout: float = 90.0
    # Real nodes (kubelet + containerd + kube-proxy, pods that actually run) next to the fake ones.
    real_nodes: int = 0
    # kube-router enforcing NetworkPolicy on the real nodes (off: policies are stored but not enforced).
    network_policy: bool = True
    # Project images (``images.PROJECT_TARGETS``) built and imported into every real node; pause and base always.
    images: tuple[str, ...] = ()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def build_kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    """A kubeconfig with every credential inline, so it works from any working directory."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubeplane", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": "admin", "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": "kubeplane", "context": {"cluster": "kubeplane", "user": "admin"}}],
        "current-context": "kubeplane",
    }


def remove_stale_workdirs(parent: Path | None = None) -> list[Path]:
    """Delete work directories whose launcher process no longer exists (it was SIGKILLed)."""
    removed = []
    for directory in Path(parent or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        owner = directory / "owner.pid"
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(pid):
            clean_up_real_nodes(directory)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def clean_up_real_nodes(workdir: Path) -> None:
    """Undo what a launcher that died without stopping made for real nodes: processes and cgroups, its bridge."""
    cgroups.destroy_from_manifest(workdir / CGROUP_MANIFEST)
    with contextlib.suppress(OSError, ValueError, KeyError):
        state = json.loads((workdir / REALNODE_STATE).read_text())
        realnode.delete_bridge(netplan.NetPlan(int(state["slot"])))


class LocalCluster:
    """One local control plane. Use as a context manager, or call ``start``/``stop``."""

    def __init__(self, cfg: ClusterConfig | None = None, workdir_parent: Path | None = None):
        self.cfg = cfg or ClusterConfig()
        self._workdir_parent = workdir_parent
        self.workdir: Path | None = None
        self.processes: list[procs.ManagedProcess] = []
        self.timings: dict[str, float] = {}
        self.ports: dict[str, int] = {}
        self.node_names: list[str] = []
        self._binaries: dict[str, build.BuildResult] = {}
        self._pki: pki.Pki | None = None
        self.plan: netplan.NetPlan | None = None
        self.real_nodes: list[realnode.RealNode] = []
        self.images: dict[str, images.Image] = {}
        self._slot: slots.SlotLock | None = None
        self._cgroups: cgroups.CgroupTree | None = None
        self._stores: list[image_store.Store] = []

    # ---- public surface ---------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("cluster is not started")
        return self.workdir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def binary(self, name: str) -> Path:
        for result in self._binaries.values():
            if (result.directory / name).is_file():
                return result.directory / name
        raise KeyError(name)

    def env(self) -> dict[str, str]:
        """Environment for a kubectl/helm/operator subprocess pointed at this cluster."""
        bin_dirs = os.pathsep.join(str(r.directory) for r in self._binaries.values())
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{bin_dirs}{os.pathsep}{os.environ['PATH']}",
        }

    @property
    def audit_log(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("cluster is not started")
        return self.workdir / "audit.log"

    def audit_events(self, offset: int = 0) -> list[dict[str, Any]]:
        """Audit events written after byte ``offset`` of the audit log (see ``audit_offset``)."""
        with self.audit_log.open("rb") as log:
            log.seek(offset)
            return [json.loads(line) for line in log.read().splitlines() if line.strip()]

    def audit_offset(self) -> int:
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def rss_bytes(self) -> int:
        """Resident memory of every component process (and its children), summed."""
        total = 0
        for proc in self.processes:
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                total += sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
        return total

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        started = time.monotonic()
        remove_stale_workdirs(self._workdir_parent)
        wanted = build.NODE_COMPONENTS if self.cfg.real_nodes else build.PLANE_COMPONENTS
        self._binaries = build.ensure_built(wanted)
        self.timings["build_check"] = time.monotonic() - started
        if self.cfg.real_nodes:
            image_started = time.monotonic()
            self.images = images.ensure_images(self.cfg.images)
            self.timings["images"] = time.monotonic() - image_started
        self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=self._workdir_parent))
        (self.workdir / "owner.pid").write_text(str(os.getpid()))
        atexit.register(self.stop)
        try:
            self._start_components()
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - started

    def stop(self) -> None:
        """Stop components in reverse start order and delete the work directory. Safe to call twice."""
        for node in reversed(self.real_nodes):
            node.stop()
        if self._cgroups is not None:
            self._cgroups.destroy()  # whatever the daemons left: shims and containers
            self._cgroups = None
        self.real_nodes.clear()
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.plan is not None:
            realnode.delete_bridge(self.plan)
            self.plan = None
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        for store in self._stores:
            store.release()
        self._stores.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        atexit.unregister(self.stop)

    # ---- internals ------------------------------------------------------------------------------------
    def _phase(self, name: str, action: Callable[[], None]) -> None:
        started = time.monotonic()
        action()
        self.timings[name] = time.monotonic() - started

    def _start_components(self) -> None:
        assert self.workdir is not None
        extra_ips: tuple[str, ...] = ()
        if self.cfg.real_nodes:
            self._slot = slots.acquire(lambda slot: realnode.delete_bridge(netplan.NetPlan(slot)))
            self.plan = netplan.NetPlan(self._slot.slot)
            (self.workdir / REALNODE_STATE).write_text(json.dumps({"slot": self.plan.slot}))
            realnode.create_bridge(self.plan)
            extra_ips = (self.plan.host_ip, self.plan.kubernetes_service_ip)
        self._pki = pki.create_pki(self.workdir / "pki", extra_ips=extra_ips)
        for name in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler", "kwok"):
            self.ports[name] = free_port()
        kubeconfig = build_kubeconfig(self.server, self._pki.ca_cert, self._pki.admin_cert, self._pki.admin_key)
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig))
        self.kubeconfig.chmod(0o600)

        self._phase("etcd", self._start_etcd)
        self._phase("apiserver", self._start_apiserver)
        self._phase("controllers", self._start_controllers)
        self._phase("kwok_nodes", self._start_kwok_and_nodes)
        if self.cfg.real_nodes:
            self._phase("real_nodes", self._start_real_nodes)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
               cgroup_procs: tuple[Path, ...] | list[Path] = ()) -> procs.ManagedProcess:  # fmt: skip
        assert self.workdir is not None
        proc = procs.ManagedProcess(name, argv, self.workdir / f"{name}.log", env=env, cgroup_procs=cgroup_procs)
        self.processes.append(proc)
        return proc

    def _wait_http(self, proc: procs.ManagedProcess, url: str, mtls: bool, accept: Callable[[str], bool]) -> None:
        assert self._pki is not None
        verify: ssl.SSLContext | bool = False
        if url.startswith("https://"):
            ctx = ssl.create_default_context(cafile=str(self._pki.ca_cert))
            if mtls:
                ctx.load_cert_chain(str(self._pki.admin_cert), str(self._pki.admin_key))
            verify = ctx
        deadline = time.monotonic() + self.cfg.ready_timeout
        last = "no answer yet"
        with httpx.Client(verify=verify, timeout=2.0) as http:
            while time.monotonic() < deadline:
                if not proc.running():
                    raise ClusterStartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
                try:
                    response = http.get(url)
                    last = f"{response.status_code} {response.text[:200]}"
                    if response.status_code == 200 and accept(response.text):
                        return
                except httpx.HTTPError as err:
                    last = repr(err)
                time.sleep(0.1)
        raise ClusterStartError(
            f"{proc.name} not ready at {url} after {self.cfg.ready_timeout:.0f}s (last: {last}):\n{proc.log_tail()}"
        )

    def _start_etcd(self) -> None:
        assert self.workdir is not None
        client_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd_peer']}"
        proc = self._spawn(
            "etcd",
            [
                str(self.binary("etcd")),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",
                "--auto-compaction-retention=1",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        self._wait_http(proc, f"{client_url}/health", mtls=False, accept=lambda body: '"health":"true"' in body)

    def _start_apiserver(self) -> None:
        assert self.workdir is not None and self._pki is not None
        p = self._pki
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.binary("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={p.admin_cert}",
                f"--tls-private-key-file={p.admin_key}",
                f"--client-ca-file={p.ca_cert}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                *self._apiserver_network_flags(),
                "--profiling=false",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.workdir / 'audit.log'}",
                "--audit-log-format=json",
            ],
        )
        self._wait_http(proc, f"{self.server}/readyz", mtls=True, accept=lambda body: body.strip() == "ok")

    def _apiserver_network_flags(self) -> list[str]:
        assert self._pki is not None
        if self.plan is None:
            # Fake nodes only: no ServiceAccount admission (as in envtest), no kubernetes endpoints, loopback Services.
            return [f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=RBAC",
                    "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true",
                    "--endpoint-reconciler-type=none"]  # fmt: skip
        # Real nodes: pods reach the API server at the bridge address (a relay, see _start_real_nodes) through the
        # kubernetes Service; kubelets are authorised by the Node authorizer and dialled by IP, never by name.
        return [
            f"--service-cluster-ip-range={self.plan.service_cidr}",
            f"--advertise-address={self.plan.host_ip}",
            "--endpoint-reconciler-type=lease",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={self._pki.admin_cert}",
            f"--kubelet-client-key={self._pki.admin_key}",
        ]

    def _start_controllers(self) -> None:
        assert self._pki is not None
        p = self._pki
        common = [
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            f"--tls-cert-file={p.admin_cert}",
            f"--tls-private-key-file={p.admin_key}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        ]
        cm = self._spawn(
            "kube-controller-manager",
            [
                str(self.binary("kube-controller-manager")),
                *common,
                f"--secure-port={self.ports['controller_manager']}",
                "--controllers=*",
                f"--service-account-private-key-file={p.sa_key}",
                f"--root-ca-file={p.ca_cert}",
                f"--cluster-signing-cert-file={p.ca_cert}",
                f"--cluster-signing-key-file={p.directory / 'ca.key'}",
                "--node-monitor-period=5s",
                "--node-monitor-grace-period=40s",
            ],
        )
        sched = self._spawn(
            "kube-scheduler",
            [str(self.binary("kube-scheduler")), *common, f"--secure-port={self.ports['scheduler']}"],
        )
        for proc, port in ((cm, self.ports["controller_manager"]), (sched, self.ports["scheduler"])):
            self._wait_http(proc, f"https://127.0.0.1:{port}/healthz", mtls=False, accept=lambda b: b == "ok")

    def _kwok_argv(self) -> list[str]:
        stages = self.binary("kwok").parent / "stages"
        argv = [
            str(self.binary("kwok")),
            f"--kubeconfig={self.kubeconfig}",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={POD_CIDR}",
            f"--node-ip={KWOK_NODE_IP}",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
            "--node-lease-duration-seconds=40",
        ]
        return argv + [f"--config={path}" for path in sorted(stages.glob("*.yaml"))]

    def _start_kwok_and_nodes(self) -> None:
        assert self.workdir is not None
        home = self.workdir / "kwok-home"
        home.mkdir()
        proc = self._spawn("kwok", self._kwok_argv(), env={**os.environ, "HOME": str(home)})
        self._wait_http(proc, f"http://127.0.0.1:{self.ports['kwok']}/healthz", mtls=False, accept=lambda b: True)
        with self.api_client() as api:
            self.node_names = fake_nodes.create_nodes(
                client.CoreV1Api(api), self.cfg.nodes, self.cfg.node_shape, timeout=self.cfg.ready_timeout
            )

    # ---- real nodes ------------------------------------------------------------------------------------
    def _start_real_nodes(self) -> None:
        assert self.workdir is not None and self._pki is not None and self.plan is not None
        plan, port = self.plan, self.ports["apiserver"]
        self._spawn("apiserver-relay", ["socat", f"TCP-LISTEN:{port},bind={plan.host_ip},fork,reuseaddr",
                                        f"TCP:127.0.0.1:{port}"])  # fmt: skip
        self._cgroups = cgroups.new_tree(f"kubeplane-{os.getpid()}-{plan.slot}", self.workdir / CGROUP_MANIFEST)
        self._cgroups.make()
        bin_dirs = {name: result.directory for name, result in self._binaries.items()}
        count = self.cfg.real_nodes
        for index in range(count):
            layout = nodeconfig.NodeLayout(
                index=index,
                name=realnode_name(index),
                directory=self.workdir / "nodes" / realnode_name(index),
                bin_dirs=bin_dirs,
                plan=plan,
                nodes=count,
                cgroup_root=f"{self._cgroups.path}/node-{index}",
                containerd_root=self._image_store(index),
            )
            self.real_nodes.append(realnode.RealNode(
                layout, self._pki, f"https://{plan.host_ip}:{port}", self._cgroups, self._spawn,
                run_policy=self.cfg.network_policy, run_dns=index == 0))  # fmt: skip
        for node in self.real_nodes:
            node.start_namespaces()
        realnode.add_host_routes(plan, count)
        with self.api_client() as api:
            for obj in nodeconfig.kube_dns_objects(plan, plan.node_ip(0)):
                _create(api, obj)
        for node in self.real_nodes:
            node.write_configs()
            node.start_containerd()
            node.remove_stale_containers()
            for image in self.images.values():
                seconds = node.import_image(image.archive, image.ref, image.digest)
                self.timings[f"import_{image.name}_{node.name}"] = seconds
            node.start_node_daemons({nodeconfig.REAL_NODE_LABEL: "true"})
        self._wait_real_nodes_ready()
        # kube-proxy's first sync before kube-router starts: kube-router rewrites the filter table with
        # iptables-restore, and a kube-proxy sync that overlaps it loses its chains ("Chain 'KUBE-SERVICES' does
        # not exist") and retries only 30 s later. A plane that says it is up routes Services.
        for node in self.real_nodes:
            node.wait_service_rules()
        for node in self.real_nodes:
            node.start_addons()

    def _image_store(self, index: int) -> Path | None:
        """Node ``index``'s kept image store when no other live plane holds it, else None (a fresh one)."""
        store = image_store.acquire(index)
        if store is None:
            return None
        self._stores.append(store)
        return store.path

    def _wait_real_nodes_ready(self) -> None:
        deadline = time.monotonic() + max(self.cfg.ready_timeout, 120)
        names = {n.name for n in self.real_nodes}
        last = "no node yet"
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            while time.monotonic() < deadline:
                for node in self.real_nodes:
                    node.check_daemons()
                ready = set()
                for item in core.list_node(label_selector=f"{nodeconfig.REAL_NODE_LABEL}=true").items:
                    conditions = {c.type: c for c in item.status.conditions or []}
                    if conditions.get("Ready") and conditions["Ready"].status == "True":
                        ready.add(item.metadata.name)
                    elif conditions.get("Ready"):
                        last = f"{item.metadata.name}: {conditions['Ready'].message}"
                if ready >= names:
                    return
                time.sleep(0.3)
        logs = "\n".join(p.log_tail(15) for n in self.real_nodes for p in n.daemons if "kubelet" in p.name)
        raise ClusterStartError(f"real nodes not Ready ({last}):\n{logs}")

    def node_exec(self, index: int, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside real node ``index``'s namespaces (tests inspect iptables, routes, containerd)."""
        node = self.real_nodes[index]
        return subprocess.run(node.nsenter(argv), capture_output=True, text=True, timeout=timeout, check=False)


def realnode_name(index: int) -> str:
    return f"real-{index}"


def _create(api: client.ApiClient, obj: dict[str, Any]) -> None:
    from kubernetes import utils

    utils.create_from_dict(api, obj)


@contextlib.contextmanager
def running(cfg: ClusterConfig | None = None) -> Iterator[LocalCluster]:
    """``with running() as cluster:`` — a started cluster, always stopped afterwards."""
    cluster = LocalCluster(cfg)
    with cluster:
        yield cluster
