"""Checks a job that passed the CRD schema but cannot work; each problem says what to fix.

The admission rules (``admission``) are checked here again: a job stored before its CRD had them must still fail
with a message rather than be built into objects the API server refuses.
"""

from __future__ import annotations

import re
from typing import Any

from explorer import credentials
from explorer.config import BUILTIN_TASKSETS
from explorer_operator import admission, builders, models

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _path_problem(field: str, value: str) -> str | None:
    if "://" in value:
        return f"{field} must be a path inside the pod (mount the data as a volume), not a URI: {value!r}"
    if not value.startswith("/"):
        return f"{field} must be an absolute path inside the pod, got {value!r}"
    return None


def spec_problems(spec: models.ExplorerJobSpec) -> list[str]:
    """Every reason this spec cannot run, as messages naming the field."""
    problems = [
        None if spec.taskset.path in BUILTIN_TASKSETS else _path_problem("spec.taskset.path", spec.taskset.path)
    ]
    problems += [
        _path_problem(f"spec.explore.evalTasksets[{i}].path", t.path) for i, t in enumerate(spec.explore.eval_tasksets)
    ]
    problems.append(_path_problem("spec.experiences.path", spec.experiences.path))
    if spec.sync.checkpoint_path:
        problems.append(_path_problem("spec.sync.checkpointPath", spec.sync.checkpoint_path))
    if spec.workflow.import_path and not IMPORT_PATH.match(spec.workflow.import_path):
        problems.append(
            f"spec.workflow.importPath must look like 'package.module:ClassName', got {spec.workflow.import_path!r}"
        )
    problems += _coordinator_volume_problems(spec.coordinator)
    engine_reserved = {builders.SHM_VOLUME: builders.SHM_DIR, builders.TMP_VOLUME: builders.TMP_DIR,
                       builders.CREDENTIALS_VOLUME: credentials.MOUNT_DIR}  # fmt: skip
    problems += _volume_problems("spec.engines", spec.engines.volumes, spec.engines.volume_mounts, engine_reserved)
    for i, group in enumerate(spec.auxiliary_models):
        where = f"spec.auxiliaryModels[{i}]"
        problems += _volume_problems(where, group.volumes, group.volume_mounts, engine_reserved)
    return [p for p in problems if p]


def _coordinator_volume_problems(coordinator: models.CoordinatorSpec) -> list[str]:
    """The operator's own volumes (the job's config, the writable /tmp, the job's storage, its credentials) cannot be
    shadowed by the user's."""
    reserved = {builders.CONFIG_VOLUME: builders.CONFIG_DIR, builders.TMP_VOLUME: builders.TMP_DIR,
                builders.STORAGE_VOLUME: builders.STORAGE_DIR,
                builders.CREDENTIALS_VOLUME: credentials.MOUNT_DIR}  # fmt: skip
    return _volume_problems("spec.coordinator", coordinator.volumes, coordinator.volume_mounts, reserved)


def _volume_problems(
    where: str, volumes: list[dict[str, Any]], mounts: list[dict[str, Any]], reserved: dict[str, str]
) -> list[str]:
    problems = []
    for name in sorted({str(v.get("name")) for v in volumes} & set(reserved)):
        problems.append(f"{where}.volumes must not use the name {name!r}: the operator mounts its own volume "
                        f"at {reserved[name]} under it; rename the volume (and its volumeMounts)")  # fmt: skip
    for path in sorted({str(m.get("mountPath", "")).rstrip("/") for m in mounts} & set(reserved.values())):
        problems.append(f"{where}.volumeMounts must not mount at {path}: the operator mounts its own volume "
                        "there; choose another mountPath")  # fmt: skip
    return problems


def job_problems(job_name: str, spec: models.ExplorerJobSpec) -> list[str]:
    """Every reason this job cannot run: the admission rules (its name included), then ``spec_problems``."""
    return admission.problems(job_name, spec) + spec_problems(spec)
