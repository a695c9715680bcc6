"""Live membership: the coordinator follows the rollout group's engines as the operator rewrites its mounted config.

A scale of an ExplorerJob changes the engine list in the job's ConfigMap; kubelet updates the mounted file in place
(within its sync period, about a minute by default), so the coordinator polls the file and hands a changed list to
``Explorer.set_rollout_engines``. A file that does not parse, or a list with no engine (a scale to zero), leaves the
membership as it is, with an error in the log.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import ValidationError

from explorer import config as explorer_config

log = logging.getLogger(__name__)
POLL_SECONDS = 2.0


class Follower(Protocol):
    async def set_rollout_engines(self, endpoints: list[explorer_config.EngineEndpoint]) -> bool: ...


def read_engines(text: str) -> list[explorer_config.EngineEndpoint]:
    """The rollout engines a config file names (ValueError when it does not parse or names none)."""
    try:
        cfg = explorer_config.ExplorerConfig.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as err:
        raise ValueError(f"the config does not parse: {err}") from None
    if not cfg.rollout.engines:
        raise ValueError("the config names no rollout engine (scaled to zero)")
    return list(cfg.rollout.engines)


async def follow_config(explorer: Follower, path: Path, period: float = POLL_SECONDS) -> None:
    """Until cancelled: every ``period`` seconds, the engines ``path`` names go to ``explorer`` when they change."""
    seen: str | None = None
    while True:
        await asyncio.sleep(period)
        try:
            text = await asyncio.to_thread(path.read_text)
        except OSError as err:
            log.warning("cannot read the config %s to follow the engines: %s", path, err)
            continue
        if text == seen:
            continue
        seen = text
        try:
            engines = read_engines(text)
        except ValueError as err:
            log.error("the engines stay as they are: %s changed, but %s", path, err)
            continue
        try:
            await explorer.set_rollout_engines(engines)
        except Exception:  # the next change is followed all the same
            log.exception("could not follow the rollout group's new engines")
            seen = None
