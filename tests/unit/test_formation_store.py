"""The gloo formation store's write rules, and the NCCL unique id message (pure logic; real groups: runtime tests)."""

from __future__ import annotations

import asyncio
import base64

import pytest
from pydantic import ValidationError

from explorer.weight_sync import formation_store, protocol
from explorer.weight_sync.formation_store import ENGINE, TRAINER, FormationKeys, StoreRefusedError


def refusal(keys: FormationKeys, key: str, role: str, size: int = 170) -> int:
    with pytest.raises(StoreRefusedError) as caught:
        keys.check_write(key, size, role)
    return caught.value.status


def test_each_rank_is_written_once_and_only_by_its_owner() -> None:
    keys = FormationKeys(world_size=3)
    keys.check_write("0/0", 170, TRAINER)
    keys.check_write("0/2", 170, ENGINE)
    assert refusal(keys, "0/0", ENGINE) == 403, "an engine (or workflow code holding the job token) posing as rank 0"
    assert refusal(keys, "0/1", TRAINER) == 403, "the trainer posing as an engine"
    assert refusal(keys, "0/3", ENGINE) == 400, "a rank outside the group"
    assert refusal(keys, "tcp://x/0/1", ENGINE) == 400, "a key gloo's rendezvous does not use"
    assert refusal(keys, "0/1", ENGINE, size=formation_store.MAX_VALUE_BYTES + 1) == 413

    async def run() -> None:
        await keys.put("0/1", b"address of rank 1", ENGINE)
        assert refusal(keys, "0/1", ENGINE) == 409, "a planted second value for a rank already joined"
        assert await keys.get("0/1", 0) == b"address of rank 1"
        assert await keys.get("0/2", 0.05) is None, "not written yet: the client asks again"
        await keys.close("the group has formed")
        assert refusal(keys, "0/2", ENGINE) == 409
        with pytest.raises(StoreRefusedError, match="closed"):
            await keys.get("0/1", 0)

    asyncio.run(run())


def test_a_waiting_reader_gets_the_value_as_soon_as_it_is_written() -> None:
    async def run() -> bytes | None:
        keys = FormationKeys(world_size=2)
        reader = asyncio.create_task(keys.get("0/0", 5))
        await asyncio.sleep(0.05)
        await keys.put("0/0", b"rank 0", TRAINER)
        return await asyncio.wait_for(reader, 1)

    assert asyncio.run(run()) == b"rank 0"


def test_the_nccl_unique_id_must_be_128_bytes_of_standard_base64() -> None:
    good = base64.b64encode(bytes(range(128))).decode()
    assert protocol.NcclIdRequest.model_validate({"ncclUniqueIdB64": good}).nccl_unique_id_b64 == good
    for bad, why in ((base64.b64encode(bytes(64)).decode(), "64 bytes"), ("not base64!", "standard base64"),
                     (base64.urlsafe_b64encode(bytes([251] * 128)).decode(), "standard base64")):  # fmt: skip
        with pytest.raises(ValidationError, match=why):
            protocol.NcclIdRequest.model_validate({"ncclUniqueIdB64": bad})
