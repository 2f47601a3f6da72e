"""A bare ASGI toolkit: request, response and a small router.

The ingest hot path is a plain ASGI callable on uvicorn + httptools; a framework's
middleware stack would cost more than the whole routing decision. This module gives just
enough structure for the other endpoints: path parameters, body limits and JSON errors.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Container
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec

from engine.api.schemas import Error, ErrorDetail

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_json = msgspec.json.Encoder()
_PARAM = re.compile(r"\{(\w+)\}")


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client went away (or was cut off by a timeout) before its body arrived whole:
    nothing is decided on a partial body, and nothing is answered."""


class Request:
    __slots__ = ("body", "headers", "method", "params", "path", "query_string", "scope")

    def __init__(self, scope: Scope, body: bytes, params: dict[str, str]) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query_string: bytes = scope.get("query_string", b"")
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        self.body = body
        self.params = params

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return value.decode("latin-1") if value is not None else None

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True))

    @property
    def content_type(self) -> str:
        return media_type(self.headers.get(b"content-type", b""))


def media_type(content_type: bytes) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return content_type.decode("latin-1").split(";", 1)[0].strip().lower()


class Response:
    __slots__ = ("body", "content_type", "extra_headers", "status")

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        content_type: bytes = b"application/json",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.body, self.status, self.content_type = body, status, content_type
        self.extra_headers = headers or []

    async def send(self, send: Send) -> None:
        headers = [
            (b"content-type", self.content_type),
            (b"content-length", str(len(self.body)).encode()),
            *self.extra_headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def json_response(data: object, status: int = 200) -> Response:
    return Response(_json.encode(data), status)


def error_response(status: int, code: str, message: str, *,
                   attempt: str | msgspec.UnsetType = msgspec.UNSET) -> Response:
    """The one error shape of every non-ingest endpoint: ``{"error": {code, message}}``
    (engine.api.schemas.Error; billing's payment_failed adds the ``attempt``)."""
    return json_response(Error(ErrorDetail(code, message, attempt)), status)


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge the ASGI lifespan protocol; the service starts and stops its resources
    itself, outside the server's lifespan."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; BodyTooLarge as soon as it passes ``limit`` bytes,
    ClientGone if the client disconnects first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


Handler = Callable[[Request], Awaitable[Response]]


class Route:
    __slots__ = ("body_limit", "handler", "method", "name", "pattern", "too_large")

    def __init__(self, method: str, path: str, handler: Handler, body_limit: int,
                 too_large: Callable[[int], Response] | None = None) -> None:
        self.method, self.handler, self.body_limit = method, handler, body_limit
        # the 413 of a body over body_limit; ingest endpoints answer in their own shape
        self.too_large = too_large or _too_large
        self.name = path  # the template: a bounded label for metrics
        self.pattern = re.compile("^" + _PARAM.sub(r"(?P<\1>[^/]+)", path) + "$")


def _too_large(limit: int) -> Response:
    return error_response(413, "too_large", "request body too large")


class Router:
    """Exact paths are a dict lookup; templated ones are tried in order.

    With ``declared`` (the route table, engine.api.endpoints), only declared routes may be
    added: what the router serves is what the OpenAPI document describes. Templated paths
    are matched on the request's raw path, so a parameter holding an encoded ``/`` (``%2F``)
    stays one parameter; its value is then percent-decoded as the path is."""

    def __init__(self, declared: Container[tuple[str, str]] | None = None) -> None:
        self._exact: dict[tuple[str, str], Route] = {}
        self._templated: list[Route] = []
        self._paths: set[str] = set()
        self._declared = declared

    def add(self, method: str, path: str, handler: Handler, *, body_limit: int = 64 * 1024,
            too_large: Callable[[int], Response] | None = None) -> None:
        if self._declared is not None and (method, path) not in self._declared:
            raise LookupError(f"{method} {path} is not in the route table (engine.api.endpoints)")
        route = Route(method, path, handler, body_limit, too_large)
        self._paths.add(path)
        if "{" in path:
            self._templated.append(route)
        else:
            self._exact[(method, path)] = route

    def routes(self) -> list[tuple[str, str]]:
        """(method, path template) of every route, in the order they were added."""
        return [*self._exact, *((r.method, r.name) for r in self._templated)]

    def match(self, method: str, path: str, raw_path: bytes | None = None
              ) -> tuple[Route | None, dict[str, str], bool]:
        """(route, params, path_exists): path_exists tells 405 from 404. ``raw_path``: the
        path as sent (ASGI ``raw_path``), for templated routes."""
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}, True
        path_exists = any(p == path for (_, p) in self._exact)
        target = path if raw_path is None else raw_path.decode("latin-1")
        for route in self._templated:
            m = route.pattern.match(target)
            if m:
                if route.method == method:
                    params = m.groupdict()
                    if raw_path is not None:
                        params = {k: unquote(v) for k, v in params.items()}
                    return route, params, True
                path_exists = True
        return None, {}, path_exists

    def allowed(self, path: str, raw_path: bytes | None = None) -> list[str]:
        """The methods of the routes of this path (the ``Allow`` header of a 405)."""
        target = path if raw_path is None else raw_path.decode("latin-1")
        methods = {m for (m, p) in self._exact if p == path}
        methods.update(r.method for r in self._templated if r.pattern.match(target))
        return sorted(methods)


class TooManyFields(ValueError):
    """A form body with more fields than any campaign takes."""


MAX_FORM_FIELDS = 1000


def parse_form(body: bytes) -> dict[str, str]:
    """``application/x-www-form-urlencoded`` -> dict; strict UTF-8 (ValueError otherwise),
    at most ``MAX_FORM_FIELDS`` fields (:class:`TooManyFields`)."""
    text = body.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if text.count("&") >= MAX_FORM_FIELDS:  # as parse_qsl counts fields (1 + separators)
        raise TooManyFields(f"more than {MAX_FORM_FIELDS} form fields")
    return dict(parse_qsl(text, keep_blank_values=True, errors="strict"))
