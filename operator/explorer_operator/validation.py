"""Checks a job that passed the CRD schema but cannot work; each problem says what to fix.

The admission rules (``admission``) are checked here again: a job stored before its CRD had them must still fail
with a message rather than be built into objects the API server refuses.
"""

from __future__ import annotations

import re

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
    return [p for p in problems if p]


def _coordinator_volume_problems(coordinator: models.CoordinatorSpec) -> list[str]:
    """The coordinator pod already has the job's config volume; a second one of that name or path is refused."""
    problems = []
    if any(v.get("name") == builders.CONFIG_VOLUME for v in coordinator.volumes):
        problems.append(f"spec.coordinator.volumes must not use the name {builders.CONFIG_VOLUME!r}: the operator "
                        "mounts the job's ConfigMap under it; rename the volume (and its volumeMounts)")  # fmt: skip
    if any(m.get("mountPath", "").rstrip("/") == builders.CONFIG_DIR for m in coordinator.volume_mounts):
        problems.append(f"spec.coordinator.volumeMounts must not mount at {builders.CONFIG_DIR}: the job's config "
                        "file is there; choose another mountPath")  # fmt: skip
    return problems


def job_problems(job_name: str, spec: models.ExplorerJobSpec) -> list[str]:
    """Every reason this job cannot run: the admission rules (its name included), then ``spec_problems``."""
    return admission.problems(job_name, spec) + spec_problems(spec)
