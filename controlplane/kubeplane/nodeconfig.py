"""Configuration files of one real node's daemons (containerd, CNI, kubelet, kube-proxy, CoreDNS): pure functions.

Every path a daemon writes to is node-private (under the node's directory, or a node-private directory
bind-mounted over a hard-coded path in the node's mount namespace), and every address is the plane's own
(``netplan``). The comments say why a value differs from a daemon's default; see ``docs/controlplane.md``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kubeplane.netplan import NetPlan

PAUSE_IMAGE = "kubeplane.local/pause:1"
REAL_NODE_LABEL = "kubeplane.dev/real-node"
REAL_NODE_TAINT = {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}
# Inside a node's mount namespace: a fresh tmpfs on /run (containerd's state, shim sockets and runc root, pod netns
# files, the xtables lock) and node-private directories bind-mounted over /var/lib (CNI IPAM and cache, kube-router)
# and /var/log (pod and container logs). Only existing mount points are used, so the host gets no new directory.
PRIVATE_TMPFS = ("/run",)
PRIVATE_BINDS = ("/var/lib", "/var/log")
# kubelet's root dir holds unix sockets (pod-resources, device plugins): paths are capped at 108 bytes, so it lives at
# its usual short path on the node-private /var/lib, never under a deep work directory.
KUBELET_ROOT = "/var/lib/kubelet"
PRIVATE_SUBDIRS = (
    "/run/containerd", "/run/netns", "/var/lib/cni", KUBELET_ROOT, "/var/log/pods", "/var/log/containers"
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Where one node's files live, and what it needs from the plane."""

    index: int
    name: str
    directory: Path
    bin_dirs: dict[str, Path]  # component -> directory with its binaries
    plan: NetPlan
    nodes: int
    cgroup_root: str
    # containerd's image and snapshot store: kept between planes (see images_store.py), or inside ``directory``.
    containerd_root: Path | None = None

    @property
    def ip(self) -> str:
        return self.plan.node_ip(self.index)

    def path(self, *parts: str) -> Path:
        return self.directory.joinpath(*parts)

    @property
    def containerd_socket(self) -> Path:
        # In the node's private /run: a unix socket path must stay under 108 bytes, the node directory may be deep.
        return Path("/run/containerd/containerd.sock")

    def binary(self, component: str, name: str) -> str:
        return str(self.bin_dirs[component] / name)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def to_toml(tables: dict[str, dict[str, Any]], top: dict[str, Any]) -> str:
    """A minimal TOML writer for flat tables (all containerd needs); table names are written as given."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, values in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def containerd_config(node: NodeLayout) -> str:
    cri_runtime = "plugins.'io.containerd.cri.v1.runtime'"
    runc = f"{cri_runtime}.containerd.runtimes.runc"
    top = {
        "version": 3,
        "root": str(node.containerd_root or node.path("containerd", "root")),
        "state": "/run/containerd",  # node-private: a bind mount in the node's mount namespace
    }
    tables: dict[str, dict[str, Any]] = {
        "grpc": {"address": str(node.containerd_socket)},
        "ttrpc": {"address": "/run/containerd/containerd.sock.ttrpc"},
        "metrics": {"address": ""},
        "plugins.'io.containerd.cri.v1.images'": {"snapshotter": "overlayfs"},
        # The sandbox image is built locally (images.py); nothing is ever pulled.
        "plugins.'io.containerd.cri.v1.images'.pinned_images": {"sandbox": PAUSE_IMAGE},
        cri_runtime: {
            "enable_selinux": False,
            # No CAP_SYS_RESOURCE in this sandbox: never lower a container's OOM score below containerd's.
            "restrict_oom_score_adj": True,
            "netns_mounts_under_state_dir": True,
            "enable_unprivileged_ports": False,
            "enable_unprivileged_icmp": False,
        },
        f"{cri_runtime}.containerd": {"default_runtime_name": "runc"},
        # The shim and runc we built, never a distribution's older ones found on PATH.
        runc: {
            "runtime_type": "io.containerd.runc.v2",
            "runtime_path": node.binary("containerd", "containerd-shim-runc-v2"),
        },
        f"{runc}.options": {"BinaryName": node.binary("runc", "runc"), "SystemdCgroup": False},
        f"{cri_runtime}.cni": {
            "bin_dirs": ["/usr/lib/cni"],
            "conf_dir": str(node.path("cni", "net.d")),
            "max_conf_num": 1,
        },
        "plugins.'io.containerd.grpc.v1.cri'": {
            "disable_tcp_service": True,
            "stream_server_address": "127.0.0.1",
            "stream_server_port": "0",
        },
    }
    return to_toml(tables, top)


def cni_config(node: NodeLayout) -> dict[str, Any]:
    """A bridge network with host-local IPAM on the node's pod range; the node namespace is the gateway."""
    return {
        "cniVersion": "1.0.0",
        "name": "kubeplane",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,  # turns on ip_forward, inside the node's network namespace only
                "ipMasq": False,  # no NAT: there is nowhere to go but the plane's own ranges
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [
                        [{"subnet": node.plan.pod_cidr(node.index), "gateway": node.plan.pod_gateway(node.index)}]
                    ],
                    "dataDir": "/var/lib/cni/networks",
                    # Pods get a route to the plane's own /16 through the node, and no default route.
                    "routes": [{"dst": str(node.plan.supernet)}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(node: NodeLayout, ca_file: Path, serving_cert: Path, serving_key: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # this machine has cgroup v1 controllers (kubelet >= 1.35 refuses them otherwise)
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,  # below the launcher's own cgroup, never the machine's root
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "containerRuntimeEndpoint": f"unix://{node.containerd_socket}",
        "address": node.ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [node.plan.dns_service_ip],
        "resolvConf": str(node.path("resolv.conf")),  # empty: no upstream resolver for dnsPolicy Default
        "podLogsDir": "/var/log/pods",
        "imageGCHighThresholdPercent": 100,  # locally imported images can never be pulled again
        "imageGCLowThresholdPercent": 99,
        "imageMinimumGCAge": "87600h",
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "failSwapOn": False,
        "protectKernelDefaults": False,  # the sysctls kubelet writes are bind-mounted stand-ins (realnode.py)
        "serializeImagePulls": False,
        "maxPods": 110,
        "registerWithTaints": [REAL_NODE_TAINT],
        "shutdownGracePeriod": "0s",
        "kernelMemcgNotification": False,
        "localStorageCapacityIsolation": True,
        "makeIPTablesUtilChains": False,
    }


def kube_proxy_config(node: NodeLayout, kubeconfig: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node.name,
        "mode": "iptables",
        "clusterCIDR": node.plan.cluster_cidr,
        "bindAddress": node.ip,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [f"{node.ip}/32"],
        # Zero means "leave the kernel's conntrack settings alone": kube-proxy writes no sysctl.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
    }


def corefile(node: NodeLayout, kubeconfig: Path, health_port: int) -> str:
    """Cluster DNS only: no ``forward`` (nothing leaves the plane), no ``loop`` (no upstream to loop through)."""
    return (
        ".:53 {\n"
        f"    bind {node.ip}\n"
        "    errors\n"
        f"    health 127.0.0.1:{health_port}\n"
        f"    ready 127.0.0.1:{health_port + 1}\n"
        "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n"
        f"        kubeconfig {kubeconfig}\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "    }\n"
        "    cache 5\n"
        "}\n"
    )


def kube_dns_objects(plan: NetPlan, dns_node_ip: str) -> list[dict[str, Any]]:
    """The standard ``kube-dns`` Service and an EndpointSlice pointing at CoreDNS on the first real node."""
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {"clusterIP": plan.dns_service_ip, "ports": [{**p, "targetPort": 53} for p in ports]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-coredns",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "kubeplane",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [dns_node_ip], "conditions": {"ready": True}}],
            "ports": ports,
        },
    ]


# kubelet writes these host sysctls at start; in the node's mount namespace each is a bind-mounted file holding the
# value kubelet wants, so the host keeps its own.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "vm/panic_on_oom": "0",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
