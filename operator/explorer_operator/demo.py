"""The main job on the embedded default: local plane + CRD + operator + the examples, until Ctrl-C.

``python -m explorer_operator.demo`` (``make demo``) brings everything up on loopback, applies every manifest in
``examples/``, waits until each job is Running with its engines on fake GPU nodes, prints ``kubectl get``, and
tears everything down on exit (``--exit-when-running`` returns at once, for scripts and CI).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from explorer_operator.local import running_operator
from kubeplane import cluster, paths

# The examples mount a `model-cache` claim; the local plane has no provisioner, so the demo binds one statically.
MODEL_CACHE = """
apiVersion: v1
kind: PersistentVolume
metadata: {name: demo-model-cache}
spec:
  capacity: {storage: 100Gi}
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  hostPath: {path: /models}
  claimRef: {namespace: default, name: model-cache}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: model-cache, namespace: default}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: demo-model-cache
  resources: {requests: {storage: 100Gi}}
"""


def kubectl(local: cluster.LocalCluster, *args: str, text_input: str | None = None) -> str:
    return subprocess.run(
        ["kubectl", *args], env=local.env(), input=text_input, capture_output=True, text=True, check=True, timeout=120
    ).stdout


def wait_running(local: cluster.LocalCluster, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phases = kubectl(local, "get", "ej", "-o", "jsonpath={range .items[*]}{.metadata.name}={.status.phase} {end}")
        state = dict(item.split("=", 1) for item in phases.split())
        if all(state.get(n) == "Running" for n in names):
            return
        failed = [n for n in names if state.get(n) == "Failed"]
        if failed:
            raise SystemExit(f"jobs failed: {failed}\n{kubectl(local, 'describe', 'ej', *failed)}")
        time.sleep(0.5)
    raise SystemExit(f"jobs not Running after {timeout:.0f}s:\n{kubectl(local, 'get', 'ej', '-o', 'yaml')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="explorer-demo", description=__doc__)
    parser.add_argument("--exit-when-running", action="store_true", help="tear down as soon as the jobs run")
    parser.add_argument("--examples", type=Path, default=paths.repo_root() / "examples")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # tear down through the context managers
    started = time.monotonic()
    with cluster.LocalCluster() as local:
        print(f"local plane up in {local.timings['total']:.1f}s ({len(local.node_names)} fake 8-GPU nodes)")
        kubectl(local, "apply", "--server-side", "-f", str(paths.repo_root() / "crds"))
        kubectl(local, "wait", "--for=condition=Established", "crd/explorerjobs.explorer.rft.dev")
        assert local.workdir is not None
        with running_operator(local, local.workdir / "operator.log") as operator:
            operator.wait_live()
            kubectl(local, "apply", "-f", "-", text_input=MODEL_CACHE)
            manifests = sorted(args.examples.glob("*.yaml"))
            kubectl(local, "apply", *[a for m in manifests for a in ("-f", str(m))])
            names = kubectl(local, "get", "ej", "-o", "jsonpath={.items[*].metadata.name}").split()
            wait_running(local, names, timeout=120)
            print(f"all {len(names)} job(s) Running {time.monotonic() - started:.1f}s after start\n")
            print(kubectl(local, "get", "ej", "-o", "wide"))
            print(kubectl(local, "get", "pods", "-o", "wide"))
            if args.exit_when_running:
                return 0
            print(f"KUBECONFIG={local.kubeconfig}  (kubectl, helm: {local.binary('kubectl').parent})")
            print("Ctrl-C tears everything down.")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
