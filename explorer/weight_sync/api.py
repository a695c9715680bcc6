"""The trainer-facing HTTP routes of the sync coordinator: bodies parsed within a size limit, every refusal as JSON.

A body over ``MAX_BODY_BYTES`` is a 413, a body that is not JSON or not the expected message a 400 naming the field,
and a refused step its ``SyncError`` (or ``StreamError``) status, each as ``{"error": message}`` (what
``TrainerClient`` raises). The calling trainer is named by the ``X-Sync-Trainer`` header (``lease``); without one, by
its address. Every route, the experience stream's too, answers through ``respond``, and only to a caller presenting
the trainer token (``explorer/credentials.py``): without it, a 401 before any body is read.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from explorer import credentials, experience_stream, http_auth
from explorer import experience_wire as wire
from explorer.weight_sync import formation_store, lease, protocol

if TYPE_CHECKING:
    from explorer.weight_sync import rendezvous

STORE_PREFIX = "/v1/sync/store/"  # the formation store's route authenticates trainer and engines itself
MAX_BODY_BYTES = 64 << 20  # metadata of a 70B model is well under 1 MiB; a body near this is no trainer's
Call = Callable[[bytes, str], Awaitable[Any]]
StreamSource = Callable[[], "experience_stream.ExperienceStream | None"]


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
    except (SyncError, experience_stream.StreamError) as err:
        return web.json_response({"error": str(err)}, status=err.status)
    except ValidationError as err:
        return web.json_response({"error": describe_invalid(err)}, status=400)
    if isinstance(result, web.Response):
        return result
    if result is None:
        return web.json_response({})
    if isinstance(result, int):
        return web.json_response({"version": result})
    return web.json_response(result.to_wire())


def add_experience_routes(app: web.Application, source: StreamSource) -> None:
    """``/v1/experiences`` (``docs/weight-sync.md``) over the stream ``source`` returns (None: 503)."""

    def stream() -> experience_stream.ExperienceStream:
        found = source()
        if found is None:
            raise SyncError(503, "this coordinator runs no explorer: it has no experiences to serve")
        return found

    async def read_batch(body: bytes, _: str) -> web.Response:
        data, _info = await stream().read(wire.ReadRequest.model_validate_json(body))
        return web.Response(body=data, content_type=wire.CONTENT_TYPE)

    async def ack(body: bytes, _: str) -> wire.AckResult:
        request = wire.AckRequest.model_validate_json(body)
        return await stream().ack(request.consumer, request.cursor)

    async def state(_body: bytes, _: str) -> wire.StreamState:
        return await stream().state()

    async def on_read(request: web.Request) -> web.Response:
        return await respond(request, read_batch)

    async def on_ack(request: web.Request) -> web.Response:
        return await respond(request, ack)

    async def on_state(request: web.Request) -> web.Response:
        return await respond(request, state)

    app.router.add_get("/v1/experiences", on_state)
    app.router.add_post("/v1/experiences/read", on_read)
    app.router.add_post("/v1/experiences/ack", on_ack)


def build_app(sync: rendezvous.SyncCoordinator | None, experiences: StreamSource = lambda: None) -> web.Application:
    """The routes of ``docs/weight-sync.md``: the sync group's over ``sync`` (None: none), the experience stream's
    over what ``experiences`` returns; every one needs the trainer token."""
    guard = http_auth.aiohttp_guard(credentials.trainer_tokens, credentials.TRAINER_TOKEN,
                                    own_auth_prefixes=(STORE_PREFIX,))  # fmt: skip
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[guard])
    add_experience_routes(app, experiences)
    if sync is not None:
        add_sync_routes(app, sync)
    return app


def add_sync_routes(app: web.Application, sync: rendezvous.SyncCoordinator) -> None:
    """``/v1/sync``: the weight-sync group's routes over ``sync``."""

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

    async def nccl(request: web.Request) -> web.Response:
        return await respond(request, lambda body, who: sync.start_nccl(
            request.match_info["incarnation"], protocol.NcclIdRequest.model_validate_json(body), who))  # fmt: skip

    async def checkpoint(request: web.Request) -> web.Response:
        return await respond(request, lambda body, who: sync.push_checkpoint(
            protocol.PushRequest.model_validate_json(body), who))  # fmt: skip

    app.router.add_get("/v1/sync", state)
    app.router.add_post("/v1/sync/group", group)
    app.router.add_post("/v1/sync/group/{incarnation}/joined", joined)
    app.router.add_post("/v1/sync/leave", leave)
    app.router.add_post("/v1/sync/push", push)
    app.router.add_post(r"/v1/sync/push/{version:\d+}/result", result)  # digits only: anything else is a 404
    app.router.add_post("/v1/sync/checkpoint", checkpoint)
    app.router.add_post("/v1/sync/group/{incarnation}/nccl", nccl)
    add_store_routes(app, sync)


def store_role(request: web.Request, source_token: str | None = None) -> str:
    """Who presents the request: the trainer (trainer token), one of the job's engines (job token), or a catch-up
    group's sending peer (its one-time ``source_token``); else 401."""
    authorization = request.headers.get("Authorization")
    if source_token and credentials.matches(authorization, [source_token]):
        return formation_store.SOURCE
    if credentials.matches(authorization, credentials.trainer_tokens()):
        return formation_store.TRAINER
    if credentials.matches(authorization, [credentials.job_token()]):
        return formation_store.ENGINE
    raise web.HTTPUnauthorized(
        text=json.dumps({"error": "unauthorized: the sync store needs the job's trainer-token (rank 0) or "
                                  "job-token (engines) as 'Authorization: Bearer <token>'"}),
        content_type="application/json",
    )  # fmt: skip


def add_store_routes(app: web.Application, sync: rendezvous.SyncCoordinator) -> None:
    """``/v1/sync/store/{incarnation}?key=…``: the formation store of a gloo group (``formation_store``)."""

    async def answer(request: web.Request, write: bool) -> web.Response:
        role = store_role(request, sync.source_token(request.match_info["incarnation"]))
        key = request.query.get("key", "")
        try:
            keys = sync.formation_keys(request.match_info["incarnation"])
            if write:
                keys.check_write(key, request.content_length or 0, role)  # before reading a body of any size
                await keys.put(key, await request.read(), role)
                return web.json_response({})
            wait = min(float(request.query.get("wait", "0") or 0), formation_store.POLL_SECONDS)
            value = await keys.get(key, max(wait, 0.0))
        except (formation_store.StoreRefusedError, SyncError) as err:
            return web.json_response({"error": str(err)}, status=err.status)
        except ValueError:
            return web.json_response({"error": "wait must be a number of seconds"}, status=400)
        if value is None:
            return web.json_response({"error": f"store key {key!r} is not set yet"}, status=404)
        return web.Response(body=value, content_type="application/octet-stream")

    async def put(request: web.Request) -> web.Response:
        return await answer(request, write=True)

    async def get(request: web.Request) -> web.Response:
        return await answer(request, write=False)

    app.router.add_put(STORE_PREFIX + "{incarnation}", put)
    app.router.add_get(STORE_PREFIX + "{incarnation}", get)
