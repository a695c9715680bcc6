"""Leader election over a coordination.k8s.io Lease (the client library's), so two replicas are safe.

Every replica watches and queues; only the leader's workers reconcile. A leader that cannot renew its lease stops
the process (SIGTERM) rather than risk two writers; its Deployment restarts it as a follower.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading

from kubernetes import config
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock import leaselock

log = logging.getLogger(__name__)


class Leadership:
    """Whether this replica may reconcile now."""

    def __init__(self) -> None:
        self._leading = threading.Event()

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    def lead_alone(self) -> None:
        """Single-replica mode: always the leader."""
        self._leading.set()

    def elect(self, name: str, namespace: str, lease_seconds: int = 15) -> None:
        """Campaign for the Lease ``namespace/name`` in a background thread."""
        config.load_config()  # the library's lock uses the default client configuration
        identity = f"{socket.gethostname()}-{os.getpid()}"
        cfg = electionconfig.Config(
            leaselock.LeaseLock(name, namespace, identity),
            lease_duration=lease_seconds,
            renew_deadline=max(2, lease_seconds * 2 // 3),
            retry_period=max(1, lease_seconds // 7),
            onstarted_leading=self._started,
            onstopped_leading=self._stopped,
        )
        thread = threading.Thread(target=leaderelection.LeaderElection(cfg).run, name="leader-election", daemon=True)
        thread.start()

    def _started(self) -> None:
        log.info("became the leader: reconciling")
        self._leading.set()

    def _stopped(self) -> None:
        log.error("lost the leader lease: stopping so that no two replicas write")
        self._leading.clear()
        os.kill(os.getpid(), signal.SIGTERM)

    async def wait(self) -> None:
        while not self._leading.is_set():  # noqa: ASYNC110 - set from the election thread, not the loop
            await asyncio.sleep(0.2)


LEADERSHIP = Leadership()
