"""OCI image layouts written by hand: one or more uncompressed layers, a config, a manifest, an index.

Used for the images no Dockerfile can make without a registry (the pause image and the Debian base). The result
is a layout directory (what BuildKit's ``oci-layout://`` contexts read) and, packed, a tar that
``ctr images import`` takes; ``io.containerd.image.name`` names the image on import.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, layers: list[Path], image_config: dict[str, Any], ref: str) -> str:
    """Write an OCI layout of ``layers`` (uncompressed tars, moved into the layout) named ``ref``.

    Returns the manifest digest (``sha256:...``).
    """
    if layout.exists():
        shutil.rmtree(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    descriptors = []
    for layer in layers:
        digest = _sha256_file(layer)
        size = layer.stat().st_size
        shutil.move(str(layer), layout / "blobs" / "sha256" / digest)
        descriptors.append({"mediaType": LAYER_MEDIA_TYPE, "digest": f"sha256:{digest}", "size": size})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
    }
    config_desc = {"mediaType": CONFIG_MEDIA_TYPE, **_put_blob(layout, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config_desc, "layers": descriptors}
    manifest_desc = _put_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    tag = ref.rpartition(":")[2]
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [
            {
                "mediaType": MANIFEST_MEDIA_TYPE,
                **manifest_desc,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return str(manifest_desc["digest"])


def pack_layout(layout: Path, archive: Path) -> None:
    """The layout as one tar (what ``ctr images import`` reads)."""
    with tarfile.open(archive, "w") as tar:
        for path in sorted(layout.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)


def layer_from_files(out: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    """An uncompressed layer tar holding ``files`` ({path: (content, mode)}), owned by root, fixed mtime."""
    with tarfile.open(out, "w") as tar:
        for name, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mode, info.mtime = len(content), mode, 0
            tar.addfile(info, io.BytesIO(content))
    return out
