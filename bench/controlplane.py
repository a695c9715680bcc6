"""Benchmark of the local control plane: build cost, binary sizes, warm start time and memory with 4 GPU nodes.

Prints figures next to the goals from the Foundation issue (start < 20 s, RSS < 2 GiB with 4 nodes). Build times
are those recorded when the cached binaries were made (``build.json``): a cold build only when the Go build cache
was empty too. The warm figure is a fresh cache check in this run.
"""

from __future__ import annotations

import json
import time

from kubeplane import build, cluster

GIB = 2**30
MIB = 2**20


def main() -> None:
    started = time.monotonic()
    results = build.ensure_built(log=False)
    warm_check = time.monotonic() - started
    print("control-plane build")
    total_cold = 0.0
    for result in results.values():
        record_file = result.directory / "build.json"
        cold = float(json.loads(record_file.read_text())["seconds"]) if record_file.is_file() else float("nan")
        total_cold += cold
        sizes = ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in result.sizes.items())
        print(f"  {result.component:5s} last build {cold:7.1f}s   {sizes}")
    print(f"  last builds, all components (as recorded): {total_cold:.1f}s")
    print(f"  warm rebuild check (nothing changed):      {warm_check:.2f}s")

    runs = []
    for attempt in (1, 2):
        with cluster.LocalCluster() as local:
            time.sleep(5)  # let the controllers settle before measuring memory
            runs.append((local.timings, local.rss_bytes()))
        print(f"start #{attempt}: " + ", ".join(f"{k} {v:.2f}s" for k, v in runs[-1][0].items()))
    best_start = min(t["total"] - t["build_check"] for t, _ in runs)
    worst_rss = max(r for _, r in runs)
    print("local plane, 4 nodes x 8 GPUs")
    print(f"  warm start (PKI -> nodes Ready): {best_start:6.2f}s   goal < 20 s")
    print(f"  total RSS of the components:     {worst_rss / GIB:6.2f} GiB goal < 2 GiB")


if __name__ == "__main__":
    main()
