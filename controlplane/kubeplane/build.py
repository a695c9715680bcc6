"""Builds the control-plane binaries from the pinned Go modules, cached by a key of everything that shapes them.

Each component (k8s, etcd, kwok, helm, ...) is its own Go module under ``controlplane/modules`` so that their
dependency graphs never mix. A build lands in ``<cache>/<component>-<key>/`` and is renamed into place only
when complete, so an interrupted build never leaves a half-written binary behind; a rebuild with nothing
changed is a hash of a few files. Benchmark-only components (KubeRay's operator) are never built for a plane:
only by ``kubeplane build --bench`` or the benchmark that needs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from kubeplane import paths

# Bump when the recipe below changes in a way the hashed inputs (module files, Go version, flags) cannot see.
RECIPE_VERSION = "1"

KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "node/chaos/node-not-ready.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
    "pod/chaos/pod-container-running-failed.yaml",
)
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"
# All three: the operator runs the RayCluster, RayJob and RayService controllers and will not start without their kinds.
KUBERAY_CRDS = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")


@dataclasses.dataclass(frozen=True)
class Component:
    """One Go module and the commands it builds."""

    name: str
    packages: tuple[str, ...]
    binaries: tuple[str, ...]
    tags: str = ""
    cgo: bool = False
    # Real-node components are built only when a plane with real nodes (or `kubeplane build --all`) needs them.
    real_node: bool = False
    # Benchmark-only components are built only on request (`kubeplane build --bench`, bench/operator_vs_kuberay.py).
    bench: bool = False

    @property
    def module_dir(self) -> Path:
        return paths.modules_dir() / self.name


COMPONENTS: tuple[Component, ...] = (
    Component(
        "k8s",
        packages=tuple(
            f"k8s.io/kubernetes/cmd/{c}"
            for c in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy")
        ),
        binaries=("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy"),
        tags="selinux,notest",
    ),
    Component("etcd", packages=(".",), binaries=("etcd",)),
    Component("kwok", packages=("sigs.k8s.io/kwok/cmd/kwok",), binaries=("kwok",)),
    Component("helm", packages=("helm.sh/helm/v4/cmd/helm",), binaries=("helm",)),
    Component(
        "containerd",
        packages=tuple(
            f"github.com/containerd/containerd/v2/cmd/{c}" for c in ("containerd", "containerd-shim-runc-v2", "ctr")
        ),
        binaries=("containerd", "containerd-shim-runc-v2", "ctr"),
        tags="no_btrfs,no_devmapper,no_zfs,urfave_cli_no_docs",
        real_node=True,
    ),
    # runc needs cgo for seccomp (Debian's libseccomp-dev, installed by scripts/install-host.sh).
    Component(
        "runc",
        packages=("github.com/opencontainers/runc",),
        binaries=("runc",),
        tags="seccomp",
        cgo=True,
        real_node=True,
    ),
    Component("coredns", packages=("github.com/coredns/coredns",), binaries=("coredns",), real_node=True),
    Component(
        "kube-router",
        packages=("github.com/cloudnativelabs/kube-router/v2/cmd/kube-router",),
        binaries=("kube-router",),
        real_node=True,
    ),
    Component(
        "buildkit",
        packages=("github.com/moby/buildkit/cmd/buildkitd", "github.com/moby/buildkit/cmd/buildctl"),
        binaries=("buildkitd", "buildctl"),
        real_node=True,
    ),
    # KubeRay's operator, to compare ours with on the same plane (bench/operator_vs_kuberay.py).
    Component("kuberay", packages=(KUBERAY_MODULE,), binaries=("kuberay-operator",), bench=True),
)
# What a plane with real nodes needs: everything but the benchmark-only components.
NODE_COMPONENTS = tuple(c for c in COMPONENTS if not c.bench)
PLANE_COMPONENTS = tuple(c for c in NODE_COMPONENTS if not c.real_node)
BENCH_COMPONENTS = tuple(c for c in COMPONENTS if c.bench)


class BuildError(RuntimeError):
    """A Go build failed; the message carries the end of its output."""


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Where one component's binaries are, and what building them cost (zero when cached)."""

    component: str
    directory: Path
    seconds: float
    cached: bool
    sizes: dict[str, int]

    def binary(self, name: str) -> Path:
        return self.directory / name


def go_env(*names: str) -> list[str]:
    out = subprocess.run(["go", "env", *names], check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def module_version(component: Component, module: str) -> dict[str, str]:
    """The resolved version and release time of ``module`` in the component's go.mod."""
    out = subprocess.run(
        ["go", "list", "-m", "-json", module],
        cwd=component.module_dir,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: dict[str, str] = json.loads(out)
    return info


def build_ldflags(component: Component) -> str:
    """Linker flags: stripped binaries, and for Kubernetes the version a release build would stamp."""
    flags = ["-s", "-w"]
    if component.name == "k8s":
        info = module_version(component, "k8s.io/kubernetes")
        version = info["Version"]
        match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", version)
        if not match:
            raise BuildError(f"cannot parse k8s.io/kubernetes version {version!r} from controlplane/modules/k8s")
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += [
                f"-X {pkg}.gitVersion={version}",
                f"-X {pkg}.gitMajor={match.group(1)}",
                f"-X {pkg}.gitMinor={match.group(2)}",
                f"-X {pkg}.gitTreeState=clean",
                f"-X {pkg}.gitCommit=",
                f"-X {pkg}.buildDate={info.get('Time', '1970-01-01T00:00:00Z').replace('Z', '').split('.')[0]}Z",
            ]
    if component.name == "helm":
        version = module_version(component, "helm.sh/helm/v4")["Version"]
        flags += [
            f"-X helm.sh/helm/v4/internal/version.version={version}",
            "-X helm.sh/helm/v4/internal/version.gitTreeState=clean",
        ]
    return " ".join(flags)


def compute_key(component: Component, go_version: str, ldflags: str) -> str:
    """A hash of every input that shapes the binaries: module files, Go version, flags, build recipe."""
    digest = hashlib.sha256()
    recipe = f"{RECIPE_VERSION}\0{go_version}\0{component.tags}\0{component.packages}\0{ldflags}\0{component.cgo}\0"
    digest.update(recipe.encode())
    for path in sorted(component.module_dir.iterdir()):
        if path.is_file() and (path.suffix == ".go" or path.name in ("go.mod", "go.sum")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    if component.name == "kwok":
        digest.update("\0".join(KWOK_STAGES).encode())
    if component.name == "kuberay":
        digest.update("\0".join(KUBERAY_CRDS).encode())
    return digest.hexdigest()[:16]


def _module_dir(component: Component, module: str) -> Path:
    out = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", module], cwd=component.module_dir, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return Path(out.strip())


def _copy_kwok_stages(component: Component, out_dir: Path) -> None:
    module_dir = _module_dir(component, "sigs.k8s.io/kwok")
    stages = out_dir / "stages"
    stages.mkdir()
    for rel in KWOK_STAGES:
        shutil.copyfile(module_dir / "kustomize" / "stage" / rel, stages / Path(rel).name)


def _copy_kuberay_crds(component: Component, out_dir: Path) -> None:
    """KubeRay's CRDs as its module ships them (config/crd/bases), next to the binary they belong to."""
    bases = _module_dir(component, KUBERAY_MODULE) / "config" / "crd" / "bases"
    crds = out_dir / "crds"
    crds.mkdir()
    for rel in KUBERAY_CRDS:
        shutil.copyfile(bases / rel, crds / rel)


def build_component(component: Component, cache: Path, go_version: str, log: bool = True) -> BuildResult:
    """Build one component unless a complete build with the same key is cached."""
    ldflags = build_ldflags(component)
    key = compute_key(component, go_version, ldflags)
    final = cache / f"{component.name}-{key}"
    if (final / "build.json").is_file():
        sizes = {b: (final / b).stat().st_size for b in component.binaries}
        return BuildResult(component.name, final, 0.0, True, sizes)

    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{component.name}-", dir=cache))
    try:
        if log:
            print(f"kubeplane: building {component.name} ({', '.join(component.binaries)}) ...", flush=True)
        started = time.monotonic()
        cmd = ["go", "build", "-trimpath", f"-ldflags={ldflags}"]
        if component.tags:
            cmd.append(f"-tags={component.tags}")
        if len(component.packages) == 1 and len(component.binaries) == 1:
            cmd += ["-o", str(staging / component.binaries[0]), component.packages[0]]
        else:
            cmd += ["-o", f"{staging}/", *component.packages]
        env = {**os.environ, "CGO_ENABLED": "1" if component.cgo else "0"}
        proc = subprocess.run(cmd, cwd=component.module_dir, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(f"go build of {component.name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        if component.name == "kwok":
            _copy_kwok_stages(component, staging)
        if component.name == "kuberay":
            _copy_kuberay_crds(component, staging)
        seconds = time.monotonic() - started
        sizes = {b: (staging / b).stat().st_size for b in component.binaries}
        (staging / "build.json").write_text(json.dumps({"key": key, "seconds": seconds, "sizes": sizes}))
        _remove_older_builds(cache, component.name)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return BuildResult(component.name, final, seconds, False, sizes)


def _remove_older_builds(cache: Path, name: str) -> None:
    for old in cache.glob(f"{name}-*"):
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def ensure_built(components: tuple[Component, ...] = PLANE_COMPONENTS, log: bool = True) -> dict[str, BuildResult]:
    """Build (or find cached) every component; returns results by component name."""
    prebuilt = os.environ.get("KUBEPLANE_BIN_DIR")
    if prebuilt:
        return {c.name: _prebuilt(c, Path(prebuilt)) for c in components}
    (go_version,) = go_env("GOVERSION")
    cache = paths.cache_dir() / "bin"
    return {c.name: build_component(c, cache, go_version, log=log) for c in components}


def _prebuilt(component: Component, directory: Path) -> BuildResult:
    missing = [b for b in component.binaries if not (directory / b).is_file()]
    if missing:
        raise BuildError(f"KUBEPLANE_BIN_DIR={directory} lacks {', '.join(missing)}")
    sizes = {b: (directory / b).stat().st_size for b in component.binaries}
    return BuildResult(component.name, directory, 0.0, True, sizes)
