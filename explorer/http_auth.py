"""Bearer-token authentication in front of every HTTP server of a job: the coordinator's (aiohttp) and the engines'
(an ASGI middleware vLLM loads with ``--middleware``).

Only health probes go unauthenticated (kubelet presents no token); anything else without an accepted token is a
401 that says which token the route wants, before the route (or vLLM's dev-mode control routes) sees the request.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web

from explorer import credentials

Accepted = Callable[[], list[str]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ENGINE_OPEN_PATHS = frozenset({"/health"})


def refusal(wants: str) -> str:
    return f"unauthorized: this route needs the job's {wants} as 'Authorization: Bearer <token>'"


def aiohttp_guard(
    accepted: Accepted, wants: str, open_paths: Collection[str] = (), own_auth_prefixes: tuple[str, ...] = ()
) -> Any:
    """An aiohttp middleware admitting requests that carry one of ``accepted()`` (read per request: a rotated token
    takes effect at once); ``wants`` names the token in the 401. Paths under ``own_auth_prefixes`` pass to routes
    that authenticate the caller themselves (they admit more than one token, each for its own part)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.path in open_paths or request.path.startswith(own_auth_prefixes)
                or credentials.matches(request.headers.get("Authorization"), accepted())):  # fmt: skip
            return await handler(request)
        return web.json_response({"error": refusal(wants)}, status=401)

    return guard


class EngineAuthMiddleware:
    """ASGI middleware for vLLM: every route but ``/health`` needs the job token (vLLM's own ``--api-key`` guards
    only ``/v1``-style paths, not the dev-mode routes that load weights or run code on the workers)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.token = credentials.job_token()  # fail at startup, not at the first request, when it is missing

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in ENGINE_OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if credentials.matches(authorization, [self.token]):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": refusal(credentials.JOB_TOKEN)}).encode()
        reply = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": reply})
        await send({"type": "http.response.body", "body": body})
