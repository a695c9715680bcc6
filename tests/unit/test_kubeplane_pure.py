"""Pure parts of the launcher: node manifests, kubeconfig, PKI contents, build cache keys."""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubeplane import build, cluster, nodes, pki

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def test_fake_node_offers_gpus_and_only_loopback_addresses() -> None:
    node = nodes.build_node(2, nodes.NodeShape(gpus=4, cpu="16", memory="64Gi"))
    assert node["metadata"]["name"] == "kwok-gpu-2"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["status"]["allocatable"] == {
        "cpu": "16",
        "memory": "64Gi",
        "pods": "110",
        "nvidia.com/gpu": "4",
    }
    internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
    assert internal and all(ipaddress.ip_address(a) in LOOPBACK for a in internal)
    assert ipaddress.ip_network(node["spec"]["podCIDR"]).subnet_of(LOOPBACK)


def test_nodes_without_gpus_do_not_advertise_the_resource() -> None:
    node = nodes.build_node(0, nodes.NodeShape(gpus=0))
    assert nodes.GPU_RESOURCE not in node["status"]["capacity"]


def test_every_cidr_the_plane_hands_out_is_loopback() -> None:
    for cidr in (cluster.SERVICE_CIDR, cluster.POD_CIDR, f"{cluster.KWOK_NODE_IP}/32"):
        assert ipaddress.ip_network(cidr).subnet_of(LOOPBACK), cidr


def test_admin_certificate_is_a_loopback_server_and_a_cluster_admin_client(tmp_path: Path) -> None:
    files = pki.create_pki(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    admin = x509.load_pem_x509_certificate(files.admin_cert.read_bytes())
    admin.verify_directly_issued_by(ca)
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    sans = admin.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    usages = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert files.sa_key.stat().st_mode & 0o077 == 0
    assert files.admin_key.stat().st_mode & 0o077 == 0


def test_kubeconfig_inlines_every_credential(tmp_path: Path) -> None:
    files = pki.create_pki(tmp_path)
    config = cluster.build_kubeconfig("https://127.0.0.1:6443", files.ca_cert, files.admin_cert, files.admin_key)
    assert config["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    user = config["users"][0]["user"]
    assert set(user) == {"client-certificate-data", "client-key-data"}
    assert config["current-context"] == config["contexts"][0]["name"]


@pytest.fixture
def module_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> build.Component:
    etcd = next(c for c in build.COMPONENTS if c.name == "etcd")
    shutil.copytree(etcd.module_dir, tmp_path / "etcd")
    monkeypatch.setenv("KUBEPLANE_MODULES", str(tmp_path))
    return dataclasses.replace(etcd)


def test_build_key_changes_with_module_files_go_version_and_flags(module_copy: build.Component) -> None:
    before = build.compute_key(module_copy, "go1.26.8", "-s -w")
    assert build.compute_key(module_copy, "go1.26.8", "-s -w") == before
    assert build.compute_key(module_copy, "go1.26.9", "-s -w") != before
    assert build.compute_key(module_copy, "go1.26.8", "-s") != before
    main_go = module_copy.module_dir / "main.go"
    main_go.write_text(main_go.read_text() + "\n// changed\n")
    assert build.compute_key(module_copy, "go1.26.8", "-s -w") != before


def test_prebuilt_binary_dir_missing_a_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEPLANE_BIN_DIR", str(tmp_path))
    (tmp_path / "etcd").write_text("")
    with pytest.raises(build.BuildError, match="lacks kube-apiserver"):
        build.ensure_built()
