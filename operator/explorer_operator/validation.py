"""Checks a spec that passed the CRD schema but cannot work; each problem says what to fix."""

from __future__ import annotations

import re

from explorer_operator import models

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _path_problem(field: str, value: str) -> str | None:
    if "://" in value:
        return f"{field} must be a path inside the pod (mount the data as a volume), not a URI: {value!r}"
    if not value.startswith("/"):
        return f"{field} must be an absolute path inside the pod, got {value!r}"
    return None


def spec_problems(spec: models.ExplorerJobSpec) -> list[str]:
    """Every reason this spec cannot run, as messages naming the field."""
    problems = [_path_problem("spec.taskset.path", spec.taskset.path)]
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
    names = [aux.name for aux in spec.auxiliary_models]
    if len(set(names)) != len(names) or "engine" in names:
        problems.append(f"spec.auxiliaryModels names must be unique and not 'engine': {names}")
    if spec.sync.port in {spec.coordinator.api_port, 6379}:
        problems.append(f"spec.sync.port {spec.sync.port} collides with a coordinator port (api or Ray 6379)")
    return [p for p in problems if p]
