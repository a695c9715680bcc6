"""What a user does, on real pods: install the operator with the Helm chart, apply the CPU example job, run a trainer
pod beside it that knows only ``status.sync.address``, and watch the job explore, sync and succeed.

One job serves every test in this module (engines take minutes to start on two cores); the tests run in order.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client

from explorer import credentials
from explorer_operator import builders, demo_stack
from kubeplane.cluster import LocalCluster
from tests.e2e import pods
from tests.runtime import sync_support
from tests.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.vllm, pytest.mark.timeout(1800)]

NAMESPACE = "rollouts"
JOB = "cpu-tiny"
TRAINER_SEED = 7
TRAINER_LABEL = demo_stack.TRAINER_LABEL


def load_trainer_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_trainer", demo_stack.TRAINER_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def operator_installed(real_plane: LocalCluster) -> Iterator[None]:
    """The operator as a pod of the operator image, installed by the chart, running with the chart's ServiceAccount."""
    demo_stack.install_operator(real_plane)
    yield
    demo_stack.uninstall_operator(real_plane)


@pytest.fixture(scope="module")
def model_volume(real_plane: LocalCluster, real_api: client.ApiClient) -> Path:
    # Pod Security "restricted" enforced: every pod of the job (and the trainer's) must pass it to exist at all.
    metadata = {"name": NAMESPACE, "labels": demo_stack.RESTRICTED_NAMESPACE}
    client.CoreV1Api(real_api).create_namespace({"metadata": metadata})
    return demo_stack.model_volume(real_plane, NAMESPACE)


def job_status(real_plane: LocalCluster) -> dict[str, Any]:
    return demo_stack.job_status(real_plane, NAMESPACE, JOB)


@pytest.fixture(scope="module")
def job_storage(real_plane: LocalCluster, model_volume: Path) -> Path:
    """The host directory of the local volume bound ahead to the claim the operator makes for the job."""
    return demo_stack.job_storage(real_plane, NAMESPACE, JOB)


@pytest.fixture(scope="module")
def running_job(real_plane: LocalCluster, operator_installed: None, job_storage: Path) -> dict[str, Any]:
    demo_stack.kubectl(real_plane, "apply", "-n", NAMESPACE, "-f", str(demo_stack.CPU_JOB))

    def ready() -> dict[str, Any] | None:
        status = job_status(real_plane)
        if status.get("phase") == "Failed":  # say why at once instead of waiting out the timeout
            raise AssertionError(f"the job failed before its engines were Ready: {status.get('conditions')}")
        return status if status.get("engines", {}).get("ready") == 2 else None

    return wait_for(ready, timeout=900, what="both CPU engines Ready")


def port_forward(plane: LocalCluster, pod: str, port: int) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        local = sock.getsockname()[1]
    proc = subprocess.Popen(
        ["kubectl", "port-forward", "-n", NAMESPACE, f"pod/{pod}", f"{local}:{port}"],
        env=plane.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{local}"
    wait_for(lambda: _healthy(url), timeout=30, what=f"port-forward to {pod}")
    return proc, url


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def job_token(api: client.ApiClient, key: str = "job-token") -> str:
    """One token of the job's Secret, as the operator made it."""
    secret = client.CoreV1Api(api).read_namespaced_secret(f"{JOB}-credentials", NAMESPACE)
    return base64.b64decode(secret.data[key]).decode()


def engine_pods(api: client.ApiClient) -> list[str]:
    items = client.CoreV1Api(api).list_namespaced_pod(NAMESPACE, label_selector="explorer.rft.dev/role=engine").items
    return sorted(p.metadata.name for p in items)


def test_job_pods_run_on_the_real_node_and_the_sync_address_resolves(
    real_plane: LocalCluster, real_api: client.ApiClient, running_job: dict[str, Any]
) -> None:
    address = running_job["sync"]["address"]
    assert address.startswith(f"{JOB}-sync.{NAMESPACE}.svc")
    host = address.rsplit(":", 1)[0]
    resolve = f"import socket; print(socket.gethostbyname({host + '.cluster.local'!r}))"
    pods.apply(real_plane, NAMESPACE, pods.python_pod("resolve-sync", resolve))
    pods.wait_phase(real_api, NAMESPACE, "resolve-sync", {"Succeeded"}, timeout=120)
    coordinator = client.CoreV1Api(real_api).read_namespaced_pod(f"{JOB}-coordinator", NAMESPACE)
    assert pods.logs(real_plane, NAMESPACE, "resolve-sync").strip() == coordinator.status.pod_ip
    for name in [f"{JOB}-coordinator", *engine_pods(real_api)]:
        pod = client.CoreV1Api(real_api).read_namespaced_pod(name, NAMESPACE)
        assert pod.spec.node_name.startswith("real-"), name


def test_network_policy_admits_only_labelled_trainers_to_the_sync_port(
    real_plane: LocalCluster, real_api: client.ApiClient, running_job: dict[str, Any]
) -> None:
    sync_url = f"http://{running_job['sync']['address']}/v1/sync"
    engine_host = f"{engine_pods(real_api)[0]}.{JOB}-engines.{NAMESPACE}.svc.cluster.local"
    script = (
        "import socket, sys, time\n"
        "for host, port in [(sys.argv[1], int(sys.argv[2])), (sys.argv[3], 8000)]:\n"
        "    for attempt in range(8):  # a new pod's IP reaches kube-router's ipsets within about a second\n"
        "        try:\n"
        "            socket.create_connection((host, port), timeout=2).close(); print('open'); break\n"
        "        except OSError as err:\n"
        "            time.sleep(1)\n"
        "    else:\n"
        "        print('closed')\n"
    )
    sync_host, sync_port = running_job["sync"]["address"].rsplit(":", 1)
    elsewhere = "elsewhere"  # a namespace the job does not admit trainers from (sync.trainerNamespaces is empty)
    client.CoreV1Api(real_api).create_namespace({"metadata": {"name": elsewhere,
                                                              "labels": demo_stack.RESTRICTED_NAMESPACE}})  # fmt: skip
    accounts = client.CoreV1Api(real_api).list_namespaced_service_account
    wait_for(lambda: accounts(elsewhere).items, timeout=60, what="the new namespace's default ServiceAccount")
    outcomes = {}
    probes = (("stranger", NAMESPACE, {"app": "stranger"}), ("trainer-probe", NAMESPACE, {TRAINER_LABEL: JOB}),
              ("foreign-trainer", elsewhere, {TRAINER_LABEL: JOB}))  # fmt: skip
    try:
        for name, namespace, labels in probes:
            pod = pods.python_pod(name, script, labels=labels)
            pod["spec"]["containers"][0]["args"] = [sync_host, sync_port, engine_host]
            pods.apply(real_plane, namespace, pod)
            pods.wait_phase(real_api, namespace, name, {"Succeeded", "Failed"}, timeout=120)
            outcomes[name] = pods.logs(real_plane, namespace, name).split()
    finally:
        client.CoreV1Api(real_api).delete_namespace(elsewhere)
    # sync port, engine HTTP port (the vLLM dev routes): a stranger reaches neither, a trainer of the job's namespace
    # only the sync port, a pod with the trainer label in another namespace neither.
    assert outcomes == {"stranger": ["closed", "closed"], "trainer-probe": ["open", "closed"],
                        "foreign-trainer": ["closed", "closed"]}, (outcomes, sync_url)  # fmt: skip


ATTACK_SCRIPT = """
import json, socket, sys, time, urllib.request, urllib.error
targets = json.loads(sys.argv[1])
# A new pod's IP reaches kube-router's ipsets a moment after it starts (refused until then): wait until the open
# probes answer, so that every row below is the sockets' answer, not the network's.
for name, method, url, body in targets:
    if name.startswith("control"):
        for attempt in range(60):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
for token in (None, "wrong"):
    for name, method, url, body in targets:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        if method == "TCP":  # is anything listening there at all?
            host, port = url.rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
                status = "open"
            except ConnectionRefusedError:
                status = "refused"
            except OSError as err:
                status = "unreachable: " + str(err)
            print(json.dumps({"socket": name, "token": str(token), "status": status}), flush=True)
            continue
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            status = urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as err:
            status = err.code
        except OSError as err:
            status = "unreachable: " + str(err)
        print(json.dumps({"socket": name, "token": token or "none", "status": status}), flush=True)
"""


def test_every_http_socket_of_the_job_refuses_a_pod_with_stolen_labels_and_no_token(
    real_plane: LocalCluster, real_api: client.ApiClient, running_job: dict[str, Any]
) -> None:
    """The worst placed attacker: a pod carrying the job's own label and the trainer label, so the NetworkPolicy
    admits it to every port, but without the job's Secret. Authentication alone must refuse it everywhere."""
    sync = f"http://{running_job['sync']['address']}"
    coordinator_ip = client.CoreV1Api(real_api).read_namespaced_pod(f"{JOB}-coordinator", NAMESPACE).status.pod_ip
    engine = f"http://{engine_pods(real_api)[0]}.{JOB}-engines.{NAMESPACE}.svc.cluster.local:8000"
    status_api = f"http://{coordinator_ip}:8080"
    targets = [
        ("sync API", "GET", f"{sync}/v1/sync", None),
        ("sync group", "POST", f"{sync}/v1/sync/group", {"tensors": []}),
        ("sync store write rank 0", "PUT", f"{sync}/v1/sync/store/any?key=0/0", {"planted": "address"}),
        ("sync store read", "GET", f"{sync}/v1/sync/store/any?key=0/1", None),
        ("experience stream", "POST", f"{sync}/v1/experiences/read", {"consumer": "thief", "maxExperiences": 1}),
        ("status API", "GET", f"{status_api}/status", None),
        ("engine OpenAI", "POST", f"{engine}/v1/completions", {"model": "tiny", "prompt": "1", "max_tokens": 1}),
        ("engine collective_rpc", "POST", f"{engine}/collective_rpc", {"method": "ext_weight_version"}),
        ("engine update_weights", "POST", f"{engine}/update_weights", {"update_info": {}}),
        ("engine weight_info", "GET", f"{engine}/weight_info", None),
    ]
    # The probes stay open (kubelet has no token): they show the sockets are reachable, so a 401 is authentication.
    controls = [
        ("control: engine /health", "GET", f"{engine}/health", None),
        ("control: status /healthz", "GET", f"{status_api}/healthz", None),
    ]
    # Where earlier versions listened with a TCPStore (sync.port+1..+8): groups form over the sync API now.
    sync_port = int(running_job["sync"]["address"].rsplit(":", 1)[1])
    no_listener = [(f"old store port +{k}", "TCP", f"{coordinator_ip}:{sync_port + k}", None) for k in (1, 8)]
    labels = {builders.JOB_LABEL: JOB, TRAINER_LABEL: JOB}
    pod = pods.python_pod("stolen-labels", ATTACK_SCRIPT, labels=labels)
    pod["spec"]["containers"][0]["args"] = [json.dumps(targets + controls + no_listener)]
    pods.apply(real_plane, NAMESPACE, pod)
    try:
        pods.wait_phase(real_api, NAMESPACE, "stolen-labels", {"Succeeded", "Failed"}, timeout=180)
        out = pods.logs(real_plane, NAMESPACE, "stolen-labels")
    finally:
        demo_stack.kubectl(real_plane, "delete", "pod", "stolen-labels", "-n", NAMESPACE, "--wait=false")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print("\n".join(f"{r['socket']:24} {r['token']:18} {r['status']}" for r in rows))
    outcomes = {(r["socket"], r["token"]): r["status"] for r in rows}
    assert len(outcomes) == 2 * len(targets + controls + no_listener), out
    for (socket_name, token), status in outcomes.items():
        expected: int | str = 200 if socket_name in {c[0] for c in controls} else 401
        if socket_name in {n[0] for n in no_listener}:
            expected = "refused"
        assert status == expected, (socket_name, token, status, out)


def test_trainer_pod_pushes_weights_and_the_job_explores_to_success(
    real_plane: LocalCluster,
    real_api: client.ApiClient,
    running_job: dict[str, Any],
    model_volume: Path,
    job_storage: Path,
) -> None:
    address = running_job["sync"]["address"]
    demo_stack.apply(real_plane, NAMESPACE, demo_stack.trainer_objects(JOB, address, seed=TRAINER_SEED))
    phase = pods.wait_phase(real_api, NAMESPACE, "trainer", {"Succeeded", "Failed"}, timeout=600)
    out = pods.logs(real_plane, NAMESPACE, "trainer")
    assert phase == "Succeeded", out
    # The trainer's stdout is JSON lines; its log also holds stderr warnings (a hand-back to an explorer that ended).
    pushed = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert pushed["engines_in_sync"] == pushed["engines"] == 2

    status = wait_for(
        lambda: (s := job_status(real_plane)).get("phase") == "Succeeded" and s, timeout=900, what="job Succeeded"
    )
    assert status["step"] == status["totalSteps"]
    assert status["policyVersion"] == pushed["version"]
    synced = {c["type"]: c["status"] for c in status["conditions"]}
    assert synced.get("Synced") == "True", status["conditions"]
    printed = demo_stack.kubectl(real_plane, "get", "ej", JOB, "-n", NAMESPACE)
    assert "Succeeded" in printed
    assert_every_step_on_the_claim_once(job_storage, status["totalSteps"])

    # Both engines serve exactly the pushed weights: their logprobs match an HF forward pass of them.
    state = load_trainer_module().toy_update(model_volume, TRAINER_SEED)
    headers = credentials.bearer(job_token(real_api))
    for pod in engine_pods(real_api):
        forward, url = port_forward(real_plane, pod, 8000)
        try:
            served = sync_support.engine_logprobs(url, headers=headers)
            error = sync_support.max_logprob_error(served, model_volume, state)
        finally:
            forward.terminate()
            forward.wait(timeout=10)
        assert error < 2e-4, f"{pod} serves weights that differ from the push (max logprob error {error})"


def assert_every_step_on_the_claim_once(storage: Path, total_steps: int) -> None:
    """The coordinator (read-only root) wrote its log and resume state on the job's claim: every step committed,
    each (batch, task, run) exactly once, the full batch in each step."""
    job = yaml.safe_load(demo_stack.CPU_JOB.read_text())["spec"]
    per_step = job["explore"]["batchSize"] * job["explore"]["repeatTimes"]
    log = storage / "experiences"
    manifest = json.loads((log / "manifest.json").read_text())
    assert sorted(int(s) for s in manifest["steps"]) == list(range(1, total_steps + 1)), manifest
    keys = []
    for entry in manifest["steps"].values():
        records = [json.loads(line) for line in (log / entry["file"]).read_text().splitlines() if line]
        assert len(records) == entry["experiences"] == per_step, entry
        keys += [(r["batch_id"], r["task_id"], r["run_id"]) for r in records]
    assert len(keys) == len(set(keys)) == total_steps * per_step
    assert json.loads((log / "explorer-state.json").read_text())["step"] == total_steps
