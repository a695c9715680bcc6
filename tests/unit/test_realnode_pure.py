"""Pure parts of real nodes: the address plan, daemon configs, cgroup parsing, OCI layouts, image references."""

from __future__ import annotations

import ipaddress
import json
import tarfile
from pathlib import Path

import pytest

from kubeplane import cgroups, nodeconfig, oci, realnode
from kubeplane.netplan import MAX_SLOTS, NetPlan, owned_by_plan


def test_every_address_of_a_plan_is_inside_its_own_private_16_and_plans_never_overlap() -> None:
    supernets = []
    for slot in range(MAX_SLOTS):
        plan = NetPlan(slot)
        supernets.append(plan.supernet)
        assert plan.supernet.is_private
        addresses = [plan.host_ip, plan.kubernetes_service_ip, plan.dns_service_ip,
                     *(plan.node_ip(i) for i in range(64)), *(plan.pod_gateway(i) for i in range(64))]  # fmt: skip
        assert len(set(addresses)) == len(addresses)
        assert all(owned_by_plan(a, plan) for a in addresses)
        pods = [ipaddress.ip_network(plan.pod_cidr(i)) for i in range(64)]
        assert all(p.subnet_of(ipaddress.ip_network(plan.cluster_cidr)) for p in pods)
        assert not ipaddress.ip_network(plan.cluster_cidr).overlaps(ipaddress.ip_network(plan.service_cidr))
        assert not ipaddress.ip_network(plan.cluster_cidr).overlaps(plan.node_subnet)  # host traffic is masqueraded
        assert all(len(name) <= 15 for i in range(64) for name in (*plan.veth_names(i), plan.bridge))
    assert len(set(supernets)) == MAX_SLOTS
    with pytest.raises(ValueError):
        NetPlan(MAX_SLOTS)


def test_routes_never_include_a_default_route() -> None:
    plan = NetPlan(3)
    routes = plan.node_routes(0, 4) + plan.host_routes(4)
    assert all(owned_by_plan(str(ipaddress.ip_network(dst)[0]), plan) for dst, _ in routes)
    assert "0.0.0.0/0" not in {dst for dst, _ in routes}


def layout(tmp_path: Path) -> nodeconfig.NodeLayout:
    bins = {name: tmp_path / name for name in ("k8s", "containerd", "runc", "coredns", "kube-router")}
    return nodeconfig.NodeLayout(0, "real-0", tmp_path / "n", bins, NetPlan(0), 1, "/own/kubeplane-1/node-0")


def test_daemon_configs_stay_inside_the_node_and_the_plane(tmp_path: Path) -> None:
    node = layout(tmp_path)
    kubelet = nodeconfig.kubelet_config(node, tmp_path / "ca", tmp_path / "c", tmp_path / "k")
    assert kubelet["failCgroupV1"] is False and kubelet["cgroupRoot"] == node.cgroup_root
    assert kubelet["readOnlyPort"] == 0 and kubelet["authentication"]["anonymous"]["enabled"] is False
    assert kubelet["registerWithTaints"] == [nodeconfig.REAL_NODE_TAINT]
    cni = nodeconfig.cni_config(node)["plugins"][0]
    assert cni["ipMasq"] is False and cni["ipam"]["routes"] == [{"dst": "10.200.0.0/16"}]  # no default route
    corefile = nodeconfig.corefile(node, tmp_path / "kc", 8181)
    assert "forward" not in corefile and "loop" not in corefile and f"bind {node.ip}" in corefile
    proxy = nodeconfig.kube_proxy_config(node, tmp_path / "kc")
    assert set(proxy["conntrack"].values()) == {0, "0s"}  # kube-proxy writes no sysctl
    toml = nodeconfig.containerd_config(node)
    assert str(tmp_path / "runc" / "runc") in toml and nodeconfig.PAUSE_IMAGE in toml


MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
"""
PROC_CGROUP = "4:memory:/session/abc\n3:cpu,cpuacct:/\n1:name=systemd:/\n0::/\n"


def test_cgroup_tree_nests_under_the_most_specific_own_path_in_every_hierarchy() -> None:
    found = cgroups.match_hierarchies(cgroups.parse_mountinfo(MOUNTINFO), cgroups.parse_proc_cgroup(PROC_CGROUP))
    assert {str(h.mount) for h in found} == {"/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu,cpuacct",
                                             "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"}  # fmt: skip
    assert cgroups.nested_base(found) == "/session/abc"
    split = cgroups.parse_proc_cgroup("4:memory:/session/abc\n3:cpu,cpuacct:/other\n")
    with pytest.raises(cgroups.CgroupError, match="one cgroup path"):
        cgroups.nested_base(cgroups.match_hierarchies(cgroups.parse_mountinfo(MOUNTINFO), split))


def test_oci_layout_names_the_image_and_points_at_its_layer(tmp_path: Path) -> None:
    layer = oci.layer_from_files(tmp_path / "layer.tar", {"pause": (b"\x7fELF", 0o755)})
    digest = oci.write_layout(tmp_path / "layout", [layer], {"Entrypoint": ["/pause"]}, "kubeplane.local/pause:1")
    oci.pack_layout(tmp_path / "layout", tmp_path / "image.tar")
    with tarfile.open(tmp_path / "image.tar") as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}"))  # type: ignore[arg-type]
        layer_member = tar.extractfile(f"blobs/{manifest['layers'][0]['digest'].replace(':', '/')}")
        assert layer_member is not None
        with tarfile.open(fileobj=layer_member) as inner:
            assert inner.getnames() == ["pause"]
    assert index["manifests"][0]["digest"] == digest
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "kubeplane.local/pause:1"


@pytest.mark.parametrize(("ref", "normal"), [
    ("rft-explorer/runtime-cpu:local", "docker.io/rft-explorer/runtime-cpu:local"),
    ("kubeplane.local/pause:1", "kubeplane.local/pause:1"),
    ("busybox:1", "docker.io/library/busybox:1"),
])  # fmt: skip
def test_image_references_normalise_as_containerd_names_them(ref: str, normal: str) -> None:
    assert realnode.normalized_ref(ref) == normal
