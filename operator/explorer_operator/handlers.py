"""kopf wiring, and nothing else: watch events enqueue job keys; the controller does the work.

Only ``on.event`` handlers are registered, so kopf never writes to ExplorerJobs (no diff-base annotation, no
finalizer, no progress in status): the operator writes nothing but ``status`` and the children it owns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from explorer_operator import builders, controller, indexes, models

OWN = {builders.MANAGED_BY: builders.OPERATOR_NAME}
indexes.register()


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **indices: Any) -> None:
    settings.posting.enabled = False  # our own Events carry a fixed catalogue of reasons
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.scanning.disabled = True  # the resources are known: no CRD/namespace scanning, no RBAC for it
    indexes.filter_server_side(settings)
    memo["controller"] = controller.Controller(indexes.KopfView(indices))
    await memo["controller"].start()


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    ctl = memo.get("controller")
    if ctl is not None:
        await ctl.stop()


@kopf.on.event(models.GROUP, models.VERSION, models.PLURAL)
def job_changed(type: str, namespace: str | None, name: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    ctl: controller.Controller = memo["controller"]
    if namespace is None or ctl.reconciler.wrote(namespace, name, body.metadata.get("resourceVersion", "")):
        return  # the echo of our own status write: nothing in it is news
    if type == "DELETED":
        ctl.queue.forget((namespace, name))
    ctl.enqueue(namespace, name)


def _child_changed(namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any) -> None:
    job = labels.get(builders.JOB_LABEL)
    if job and namespace:
        memo["controller"].enqueue(namespace, job)


for _resource, _ in indexes.CHILD_RESOURCES.values():
    kopf.on.event(*_resource, labels=OWN)(_child_changed)


@kopf.on.probe(id="queued")
def queued(memo: kopf.Memo, **_: Any) -> int:
    return len(memo["controller"].queue)
