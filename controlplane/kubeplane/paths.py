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
    """Cache for built binaries, images and the CLI's cluster state: outside the checkout, so a fresh clone on a
    warm machine rebuilds nothing (every entry is keyed by a hash of its inputs)."""
    override = os.environ.get("KUBEPLANE_CACHE")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubeplane"
