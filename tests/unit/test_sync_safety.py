"""Pure parts of sync hardening: the version ledger, the trainer lease, checkpoint-path confinement, body errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from explorer.weight_sync import api, checkpoint_dir, lease, protocol, versions


def test_next_version_is_one_more_or_the_requested_newer_one() -> None:
    assert versions.next_version(0, None) == 1
    assert versions.next_version(4, None) == 5
    assert versions.next_version(4, 9) == 9
    with pytest.raises(versions.VersionConflictError, match="version 4 is not newer than the current policy version 4"):
        versions.next_version(4, 4)
    with pytest.raises(versions.VersionConflictError, match=r"version 2 .* current policy version 4") as refused:
        versions.next_version(4, 2)
    assert (refused.value.current, refused.value.requested) == (4, 2)


def test_version_ledger_round_trips_atomically_and_starts_at_zero(tmp_path: Path) -> None:
    state = tmp_path / "experiences"
    assert versions.load_version(state) == 0  # neither the directory nor the file exists yet
    versions.save_version(state, 7)
    assert versions.load_version(state) == 7
    versions.save_version(state, 8)
    assert versions.load_version(state) == 8
    assert sorted(p.name for p in state.iterdir()) == [versions.STATE_FILE], "no temporary file is left behind"


@pytest.mark.parametrize("text", ["{not json", "[]", '{"policyVersion": "3"}', '{"policyVersion": -1}', "{}"])
def test_a_damaged_ledger_is_refused_naming_the_file_never_read_as_zero(tmp_path: Path, text: str) -> None:
    """Reading a damaged ledger as 0 would hand out versions the engines already served."""
    (tmp_path / versions.STATE_FILE).write_text(text)
    with pytest.raises(ValueError, match=versions.STATE_FILE):
        versions.load_version(tmp_path)


def test_lease_keeps_a_second_trainer_out_until_the_first_leaves() -> None:
    held = lease.Lease(seconds=10)
    held.claim("trainer-a", now=100.0)
    held.claim("trainer-a", now=101.0)  # the owner renews
    with pytest.raises(lease.GroupHeldError, match=r"held by trainer 'trainer-a'.*lapses in 9 s") as refused:
        held.check("trainer-b", now=102.0)
    assert refused.value.holder == "trainer-a"
    assert not held.release("trainer-b"), "only the owner hands the group back"
    assert held.current(103.0) == "trainer-a"
    assert held.release("trainer-a")
    held.claim("trainer-b", now=104.0)
    assert held.current(104.0) == "trainer-b"


def test_lease_lapses_after_silence_but_not_while_a_push_is_in_progress() -> None:
    held = lease.Lease(seconds=10)
    held.claim("trainer-a", now=0.0)
    with pytest.raises(lease.GroupHeldError, match="push in progress"):
        held.check("trainer-b", now=50.0, busy=True)
    assert held.current(10.0) is None
    held.renew("trainer-b", now=11.0)  # renewing never takes the group over
    assert held.holder == "trainer-a"
    held.claim("trainer-b", now=11.0)
    assert held.current(11.0) == "trainer-b"
    held.release()
    assert held.current(11.0) is None


def _checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"x")
    return directory


def test_checkpoint_directories_inside_the_root_resolve(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    inside = _checkpoint(root / "policy-3")
    assert checkpoint_dir.confine(str(inside), str(root)) == inside.resolve()
    assert checkpoint_dir.confine("policy-3", str(root)) == inside.resolve()  # relative: to the root
    (root / "latest").symlink_to(inside)
    assert checkpoint_dir.confine(str(root / "latest"), str(root)) == inside.resolve()


def test_checkpoint_directories_outside_the_root_are_refused_symlinks_included(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    _checkpoint(root / "policy-1")
    outside = _checkpoint(tmp_path / "elsewhere")
    (root / "escape").symlink_to(outside)
    leaky = root / "leaky"
    leaky.mkdir()
    (leaky / "model.safetensors").symlink_to(outside / "model.safetensors")
    cases = {
        str(outside): "not inside sync.checkpointPath",
        str(root / ".." / "elsewhere"): "not inside sync.checkpointPath",
        str(root / "escape"): "not inside sync.checkpointPath",
        str(root): "not inside sync.checkpointPath",  # the root itself is no checkpoint
        str(leaky): "checkpoint file 'model.safetensors' .* not a file inside",
        str(root / "missing"): "cannot be read",
        str(root / "policy-1" / "model.safetensors"): "not a directory",
    }
    for directory, problem in cases.items():
        with pytest.raises(checkpoint_dir.CheckpointDirError, match=problem):
            checkpoint_dir.confine(directory, str(root))
    (root / "empty").mkdir()
    with pytest.raises(checkpoint_dir.CheckpointDirError, match=r"no \*\.safetensors"):
        checkpoint_dir.confine(str(root / "empty"), str(root))
    assert os.path.isdir(outside), "nothing outside the root was touched"


def test_bad_bodies_are_described_by_field() -> None:
    with pytest.raises(ValidationError) as not_json:
        protocol.GroupRequest.model_validate_json(b"{not json")
    assert api.describe_invalid(not_json.value).startswith("invalid request body: body: Invalid JSON")
    with pytest.raises(ValidationError) as wrong:
        protocol.PushRequest.model_validate_json(b'{"incarnation": "abc", "version": "new"}')
    assert "version: Input should be a valid integer" in api.describe_invalid(wrong.value)
