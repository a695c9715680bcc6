"""Real nodes do what a cluster does: pods run, logs/exec/port-forward work, cluster DNS, Services, in-cluster API
access with a ServiceAccount token, enforced NetworkPolicy, and no route out of the plane's own ranges."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx
import pytest
from kubernetes import client

from kubeplane.cluster import LocalCluster
from tests.e2e import pods
from tests.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.timeout(1200)]

HTTP_SERVER = (
    "import http.server, socketserver\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = b'hello from ' + self.server.server_address[0].encode()\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
    "    def log_message(self, *a): pass\n"
    "print('serving on 8080', flush=True)\n"
    "socketserver.TCPServer(('0.0.0.0', 8080), H).serve_forever()\n"
)


def http_client_script(url: str, attempts: int) -> str:
    """A client that tries ``attempts`` times, a second apart (a new pod's IP reaches kube-router's ipsets within
    about a second); prints the body, or the last error's class (the test reads the pod's log)."""
    return (
        "import time, urllib.request\n"
        f"for attempt in range({attempts}):\n"
        "    try:\n"
        f"        print('OK', urllib.request.urlopen({url!r}, timeout=3).read().decode()); break\n"
        "    except Exception as err:\n"
        "        last = err; time.sleep(1)\n"
        "else:\n"
        "    print('ERR', type(last).__name__, last)\n"
    )


def run_client(
    plane: LocalCluster,
    api: client.ApiClient,
    namespace: str,
    name: str,
    url: str,
    labels: dict[str, str] | None = None,
    attempts: int = 10,
) -> str:
    pods.apply(plane, namespace, pods.python_pod(name, http_client_script(url, attempts), labels=labels))
    pods.wait_phase(api, namespace, name, {"Succeeded", "Failed"}, timeout=120)
    return pods.logs(plane, namespace, name).strip()


def serve(plane: LocalCluster, api: client.ApiClient, namespace: str) -> str:
    """An HTTP server pod plus a ClusterIP Service and a headless Service in front of it; returns its pod IP."""
    server = pods.python_pod("web", HTTP_SERVER, labels={"app": "web"})
    server["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8080}]
    server["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web-headless"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8080}]},
    }
    pods.apply(plane, namespace, server, service, headless)
    pods.wait_ready(api, namespace, "web", timeout=120)
    return str(client.CoreV1Api(api).read_namespaced_pod("web", namespace).status.pod_ip)


def test_pod_runs_and_logs_exec_port_forward_work(
    real_plane: LocalCluster, real_api: client.ApiClient, real_namespace: str
) -> None:
    pod_ip = serve(real_plane, real_api, real_namespace)
    assert real_plane.plan is not None and real_plane.plan.pod_cidr(0).rsplit(".", 2)[0] in pod_ip
    assert "serving on 8080" in pods.logs(real_plane, real_namespace, "web")
    done = pods.kubectl(
        real_plane, "exec", "-n", real_namespace, "web", "--", "python3", "-c", "import os; print(os.getuid())"
    )
    assert done.stdout.strip() == "1000"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        local_port = sock.getsockname()[1]
    forward = subprocess.Popen(
        ["kubectl", "port-forward", "-n", real_namespace, "pod/web", f"{local_port}:8080"],
        env=real_plane.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = wait_for(lambda: _get(f"http://127.0.0.1:{local_port}/"), timeout=30, what="port-forward answer")
        assert body.startswith("hello from ")
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def _get(url: str) -> str | None:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return None


def test_cluster_dns_resolves_services_and_headless_services_to_pods(
    real_plane: LocalCluster, real_api: client.ApiClient, real_namespace: str
) -> None:
    pod_ip = serve(real_plane, real_api, real_namespace)
    through_service = run_client(
        real_plane, real_api, real_namespace, "via-svc", f"http://web.{real_namespace}.svc.cluster.local/"
    )
    assert through_service.startswith("OK hello from "), through_service
    resolve = (
        "import socket\n"
        f"name = 'web-headless.{real_namespace}.svc.cluster.local'\n"
        "print(sorted({a[4][0] for a in socket.getaddrinfo(name, 8080)}))\n"
        f"print(socket.gethostbyname('kubernetes.default.svc.cluster.local'))\n"
    )
    pods.apply(real_plane, real_namespace, pods.python_pod("resolver", resolve))
    pods.wait_phase(real_api, real_namespace, "resolver", {"Succeeded"}, timeout=120)
    headless, kubernetes_ip = pods.logs(real_plane, real_namespace, "resolver").split()
    assert headless == str([pod_ip]).replace(" ", "")
    assert real_plane.plan is not None and kubernetes_ip == real_plane.plan.kubernetes_service_ip


def test_in_cluster_config_reaches_and_verifies_the_api_server(
    real_plane: LocalCluster, real_api: client.ApiClient, real_namespace: str
) -> None:
    script = (
        "import json, ssl, urllib.request\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "ctx = ssl.create_default_context(cafile=sa + '/ca.crt')\n"
        "token = open(sa + '/token').read()\n"
        "req = urllib.request.Request('https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews',"
        ' data=b\'{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}\', method=\'POST\','
        " headers={'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json'})\n"
        "print(json.load(urllib.request.urlopen(req, context=ctx, timeout=10))['status']['userInfo']['username'])\n"
    )
    pod = pods.python_pod("in-cluster", script, automountServiceAccountToken=True)
    pods.apply(real_plane, real_namespace, pod)
    phase = pods.wait_phase(real_api, real_namespace, "in-cluster", {"Succeeded", "Failed"}, timeout=120)
    out = pods.logs(real_plane, real_namespace, "in-cluster")
    assert phase == "Succeeded", out
    # Admission gave the pod the namespace's default ServiceAccount, and TLS verified against the serving cert.
    assert out.strip() == f"system:serviceaccount:{real_namespace}:default"


def test_network_policy_is_enforced(real_plane: LocalCluster, real_api: client.ApiClient, real_namespace: str) -> None:
    serve(real_plane, real_api, real_namespace)
    url = f"http://web.{real_namespace}.svc.cluster.local/"
    assert run_client(real_plane, real_api, real_namespace, "before", url).startswith("OK")
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-only-friends"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"friend": "yes"}}}]}],
        },
    }
    pods.apply(real_plane, real_namespace, policy)
    time.sleep(2)  # kube-router applies policies within about a second
    stranger = run_client(real_plane, real_api, real_namespace, "stranger", url)
    assert stranger.startswith("ERR"), stranger
    friend = run_client(real_plane, real_api, real_namespace, "friend", url, labels={"friend": "yes"})
    assert friend.startswith("OK"), friend


def test_nodes_have_no_route_out_of_the_plane(real_plane: LocalCluster) -> None:
    routes = real_plane.node_exec(0, ["ip", "-4", "route", "show", "table", "all"]).stdout
    assert "default" not in routes, routes
    # A routing lookup (no packet is sent) for an address outside the plane fails inside the node.
    lookup = real_plane.node_exec(0, ["ip", "route", "get", "192.0.2.10"])
    assert lookup.returncode != 0 and "unreachable" in lookup.stderr.lower(), lookup.stderr
    nodes = client.CoreV1Api(real_plane.api_client()).list_node(label_selector="kubeplane.dev/real-node=true")
    assert [n.spec.taints[0].key for n in nodes.items] == ["kubeplane.dev/real-node"]
