"""Where the control plane's Go modules and build cache live (overridable for installed copies)."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The source checkout this package runs from (controlplane/kubeplane/paths.py -> repo)."""
    return Path(__file__).resolve().parents[2]


def modules_dir() -> Path:
    override = os.environ.get("KUBEPLANE_MODULES")
    return Path(override) if override else repo_root() / "controlplane" / "modules"


def cache_dir() -> Path:
    """Git-ignored cache for built binaries and the CLI's cluster state."""
    override = os.environ.get("KUBEPLANE_CACHE")
    return Path(override) if override else repo_root() / ".cache" / "kubeplane"
