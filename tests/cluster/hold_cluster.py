"""Helper process for the launcher tests: start a one-node plane under a given parent dir, report, then wait."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kubeplane import cluster

if __name__ == "__main__":
    with cluster.LocalCluster(cluster.ClusterConfig(nodes=1), workdir_parent=Path(sys.argv[1])) as local:
        print(f"READY {local.workdir}", flush=True)
        time.sleep(600)
