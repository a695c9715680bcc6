"""Runs reconciles from the work queue: a few workers, retries with backoff, periodic resync of every job."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import httpx
from kubernetes import client, config

from explorer_operator import indexes, kube, leadership, metrics, reconcile, workqueue

log = logging.getLogger(__name__)
RESYNC_SECONDS = 300.0
MAX_RETRY_SECONDS = 60.0
POLL_TIMEOUT = httpx.Timeout(1.0)


class Controller:
    """Owns the queue, the workers and the clients; ``stop`` releases all of them."""

    def __init__(self, view: indexes.View, workers: int = 8):
        self.queue: workqueue.WorkQueue[tuple[str, str]] = workqueue.WorkQueue()
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._failures: dict[tuple[str, str], int] = {}
        self._http = httpx.AsyncClient(timeout=POLL_TIMEOUT)
        self._api_client = config.new_client_from_config() if _has_kubeconfig() else _in_cluster()
        self.reconciler = reconcile.Reconciler(kube.Kube(self._api_client), self._http, view)

    def enqueue(self, namespace: str, name: str) -> None:
        self.queue.add((namespace, name))

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.queue.close()
        await self._http.aclose()
        self._api_client.close()

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            await leadership.LEADERSHIP.wait()  # followers queue work but never write
            namespace, name = key
            try:
                requeue = await self.reconciler.reconcile(namespace, name)
            except Exception:
                metrics.RECONCILE_ERRORS.inc()
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(2.0 ** (failures - 1), MAX_RETRY_SECONDS)
                log.exception(
                    "reconcile of %s/%s failed (attempt %d); retrying in %.0fs", namespace, name, failures, delay
                )
                self.queue.add_after(key, delay)
            else:
                self._failures.pop(key, None)
                self.queue.add_after(key, requeue if requeue is not None else RESYNC_SECONDS)
            finally:
                self.queue.done(key)


def _has_kubeconfig() -> bool:
    return bool(os.environ.get("KUBECONFIG")) or os.path.exists(os.path.expanduser("~/.kube/config"))


def _in_cluster() -> Any:
    config.load_incluster_config()
    return client.ApiClient()
