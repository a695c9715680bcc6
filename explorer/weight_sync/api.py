"""The trainer-facing HTTP routes of the sync coordinator: bodies parsed within a size limit, every refusal as JSON.

A body over ``MAX_BODY_BYTES`` is a 413, a body that is not JSON or not the expected message a 400 naming the field,
and a refused step its ``SyncError`` status, each as ``{"error": message}`` (what ``TrainerClient`` raises). The
calling trainer is named by the ``X-Sync-Trainer`` header (``lease``); without one, by its address.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from explorer.weight_sync import lease, protocol

if TYPE_CHECKING:
    from explorer.weight_sync import rendezvous

MAX_BODY_BYTES = 64 << 20  # metadata of a 70B model is well under 1 MiB; a body near this is no trainer's
Call = Callable[[bytes, str], Awaitable[Any]]


class SyncError(Exception):
    """A refused or failed sync step; ``status`` is the HTTP status the trainer gets (4xx: fix the request)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def describe_invalid(err: ValidationError) -> str:
    """One line per problem, each naming the field (``body`` for JSON that does not parse)."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)]
    more = f" (and {len(parts) - 5} more)" if len(parts) > 5 else ""
    return "invalid request body: " + "; ".join(parts[:5]) + more


def trainer_name(request: web.Request) -> str:
    return request.headers.get(lease.HEADER) or f"anonymous trainer at {request.remote}"


async def respond(request: web.Request, call: Call) -> web.Response:
    """Run one API call on the request's body and trainer; refusals and bad bodies become JSON errors."""
    try:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise SyncError(413, f"request body over the {MAX_BODY_BYTES >> 20} MiB limit") from None
        result = await call(body, trainer_name(request))
    except SyncError as err:
        return web.json_response({"error": str(err)}, status=err.status)
    except ValidationError as err:
        return web.json_response({"error": describe_invalid(err)}, status=400)
    if result is None:
        return web.json_response({})
    if isinstance(result, int):
        return web.json_response({"version": result})
    return web.json_response(result.to_wire())


def build_app(sync: rendezvous.SyncCoordinator) -> web.Application:
    """The routes of ``docs/weight-sync.md`` over ``sync``."""

    async def state(_: web.Request) -> web.Response:
        return web.json_response(sync.state().to_wire())

    async def group(request: web.Request) -> web.Response:
        return await respond(request, lambda body, who: sync.open_group(protocol.GroupRequest.model_validate_json(body),
                                                                        who))  # fmt: skip

    async def joined(request: web.Request) -> web.Response:
        return await respond(request, lambda _, who: sync.group_joined(request.match_info["incarnation"], who))

    async def leave(request: web.Request) -> web.Response:
        return await respond(request, lambda _, who: sync.leave(who))

    async def push(request: web.Request) -> web.Response:
        return await respond(request, lambda body, who: sync.push(protocol.PushRequest.model_validate_json(body), who))

    async def result(request: web.Request) -> web.Response:
        return await respond(request, lambda _, who: sync.push_result(int(request.match_info["version"]), who))

    async def checkpoint(request: web.Request) -> web.Response:
        return await respond(request, lambda body, who: sync.push_checkpoint(
            protocol.PushRequest.model_validate_json(body), who))  # fmt: skip

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/v1/sync", state)
    app.router.add_post("/v1/sync/group", group)
    app.router.add_post("/v1/sync/group/{incarnation}/joined", joined)
    app.router.add_post("/v1/sync/leave", leave)
    app.router.add_post("/v1/sync/push", push)
    app.router.add_post(r"/v1/sync/push/{version:\d+}/result", result)  # digits only: anything else is a 404
    app.router.add_post("/v1/sync/checkpoint", checkpoint)
    return app
