"""Helper process for the launcher tests: start a plane under a given parent dir, report, then wait.

``hold_cluster PARENT [REAL_NODES]``: one fake node, and REAL_NODES real ones (default none).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from kubeplane import cluster

if __name__ == "__main__":
    # A shell without job control starts background commands with SIGINT ignored, and Python then keeps it ignored:
    # a test suite run with `make test &` handed that to this holder, which never saw the test's Ctrl-C and hung.
    # Ctrl-C in a terminal is what the test stands for: take SIGINT as Python does by default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    cfg = cluster.ClusterConfig(nodes=1, real_nodes=real)
    with cluster.LocalCluster(cfg, workdir_parent=Path(sys.argv[1])) as local:
        print(f"READY {local.workdir}", flush=True)
        time.sleep(600)
