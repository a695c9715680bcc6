"""``python -m explorer_operator``: run the operator (kopf) with JSON logs, metrics and a liveness endpoint."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

import kopf
from kopf._core.engines import peering
from prometheus_client import start_http_server

from explorer_operator import handlers, leadership


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="explorer-operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", default=[], help="watch only these namespaces")
    scope.add_argument("--all-namespaces", action="store_true", help="cluster-wide mode (the default)")
    p.add_argument("--standalone", action="store_true", help="single replica: no leader election")
    p.add_argument(
        "--leader-elect-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the leader-election Lease (several replicas: one reconciles)",
    )
    p.add_argument("--leader-elect-name", default="explorer-operator", help="name of the leader-election Lease")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    p.add_argument("--metrics-address", default="0.0.0.0")
    p.add_argument("--metrics-port", type=int, default=9090, help="0 disables the metrics endpoint")
    p.add_argument("--log-format", choices=["json", "plain"], default="json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    kopf.configure(log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(logging.INFO)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)
    assert handlers  # registered on import
    if args.standalone:
        leadership.LEADERSHIP.lead_alone()
    else:
        leadership.LEADERSHIP.elect(args.leader_elect_name, args.leader_elect_namespace)
    asyncio.run(
        kopf.operator(
            standalone=True,  # kopf's own peering is replaced by the Lease election
            namespaces=args.namespace,
            clusterwide=not args.namespace,
            liveness_endpoint=args.liveness,
            # kopf's default identity asks the passwd database for the user, which a non-root image built with a
            # numeric USER (65532, as restricted pods run) does not have: name this replica by host and pid.
            identity=peering.Identity(f"{socket.gethostname()}/{os.getpid()}"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
