"""Checkpoint pushes read only under ``sync.checkpointPath``: a trainer may not point engines at any other path.

The directory and every ``*.safetensors`` file in it are resolved (symlinks followed) and must lie strictly inside
the resolved root; engines are handed the resolved path, so a symlink swapped in afterwards is not followed again.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointDirError(ValueError):
    """A checkpoint directory the engines must not read (permanent: write it under the shared path)."""


def confine(directory: str, root: str) -> Path:
    """``directory`` resolved, or ``CheckpointDirError`` unless it and its safetensors files are inside ``root``.

    A relative ``directory`` is taken relative to ``root``.
    """
    base = Path(root).resolve()
    try:
        resolved = (base / directory).resolve(strict=True)
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise CheckpointDirError(f"checkpoint directory {directory!r} cannot be read: {err}") from None
    if resolved == base or not resolved.is_relative_to(base):
        raise CheckpointDirError(
            f"checkpoint directory {directory!r} resolves to {str(resolved)!r}, which is not inside "
            f"sync.checkpointPath {str(base)!r}"
        )
    if not resolved.is_dir():
        raise CheckpointDirError(f"checkpoint directory {directory!r} is not a directory")
    files = sorted(resolved.glob("*.safetensors"))
    if not files:
        raise CheckpointDirError(f"checkpoint directory {directory!r} holds no *.safetensors file")
    for path in files:
        target = path.resolve()
        if not target.is_relative_to(base) or not target.is_file():
            raise CheckpointDirError(
                f"checkpoint file {path.name!r} in {directory!r} resolves to {str(target)!r}, which is not a file "
                f"inside sync.checkpointPath {str(base)!r}"
            )
    return resolved
