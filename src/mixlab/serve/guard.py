"""The outermost ASGI layer (`Guard`), before any route: the cap on open connections, the Host header (against
DNS rebinding), the API key, the request body's size and time limits, and request counts."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from mixlab.serve.common import Server
from mixlab.serve.protocol import error_body


def _host_name(header: str) -> str:
    """The name in a Host header: no port, no IPv6 brackets, lower case, no final dot."""
    name = header.strip().lower()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    return name.rstrip(".")


def _host_allowed(name: str, allowed: list[str]) -> bool:
    """An IP address (DNS rebinding needs a name), localhost and its subdomains (RFC 6761: browsers
    resolve them to loopback themselves), an empty Host (HTTP/1.0, not a browser), or a listed name."""
    if not name or name == "localhost" or name.endswith(".localhost") or name in map(_host_name, allowed):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the cap on open connections, the Host header (against DNS rebinding), the API key
    (constant-time compare) on /v1 and the tokenizer endpoints, the body size limit (Content-Length or
    counted while buffering a chunked body) and time limit, request counts; repeated slashes in the path
    are merged."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
    KNOWN = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics",
             "/tokenize", "/detokenize", "/tokenizer_info", "/"}

    def __init__(self, app: FastAPI, srv: Server) -> None:
        self.app, self.srv = app, srv
        self.state = app.state  # tests reach the server through app.state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if "//" in path:  # a base URL that ends in "/" + "/v1/models": merged, as nginx does (it was a 404)
            path = re.sub(r"/{2,}", "/", path)
            scope = {**scope, "path": path}
            if scope.get("raw_path"):
                scope["raw_path"] = re.sub(rb"/{2,}", b"/", scope["raw_path"])
        endpoint = path if path in self.KNOWN else ("/v1/models" if path.startswith("/v1/models/") else
                                                    "/v1/responses/{id}" if path.startswith("/v1/responses/") else
                                                    "other")
        status = {"code": 0}
        # the caller's X-Request-Id comes back on the response (vLLM's and OpenAI's header), else a new one
        headers = dict(scope.get("headers", []))
        given = headers.get(b"x-request-id", b"")[:256]
        request_id = given if given.isascii() and given.strip() else f"req-{uuid.uuid4().hex}".encode()
        # for the app's log lines (`common.log`), which a proxy's log or a client's report can then be matched with
        scope = {**scope, "state": {**scope.get("state", {}), "request_id": request_id.decode()}}

        async def counting_send(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", request_id)]}
            await send(msg)

        async def reply(code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            await JSONResponse(body, status_code=code, headers=headers)(scope, receive, counting_send)

        try:
            cap = self.srv.cfg.max_connections
            if cap is not None and len(self.srv.connections) > cap and endpoint != "/metrics":  # this one counts
                # closed: a connection over the cap is not kept, nor its body read (/metrics still answers)
                retry = str(self.srv.cfg.retry_after_s)
                await reply(503, error_body(f"the server has its limit of {cap} connections open (--max-connections); "
                                            f"retry after {retry} s", type="server_error",
                                            code="too_many_connections"),
                            {"Retry-After": retry, "Connection": "close"})
                return
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            allowed = self.srv.cfg.allowed_hosts
            if allowed is not None and not _host_allowed(host, allowed):
                await reply(403, error_body(f"this server does not answer to the host name {host!r} (a defence against "
                                            "DNS rebinding); to reach it by that name, start it with --allowed-hosts "
                                            f"{host}", code="host_not_allowed"))
                return
            key = self.srv.cfg.api_key
            if key is not None and path.startswith(self.PROTECTED):
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:] if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(given.encode(), key.encode()):
                    await reply(401, error_body("missing or wrong API key (send 'Authorization: Bearer KEY')",
                                                code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
                    return
            limit = self.srv.cfg.max_body_bytes
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                length = dict(scope.get("headers", [])).get(b"content-length")
                too_big = error_body(f"the request body is over the limit of {limit} bytes", code="body_too_large")
                # and the connection closed: else the rest of the body, however large, was read to keep it
                close = {"Connection": "close"}
                if length is not None and (not length.isdigit() or int(length) > limit):
                    await reply(413, too_big, close)
                    return
                chunks, size, more = [], 0, True
                # a client that sends its body slowly or never finishes it (slowloris) would hold the
                # connection and what it sent so far, up to the size limit, for ever
                try:
                    async with asyncio.timeout(self.srv.cfg.read_timeout_s):
                        while more and size <= limit:
                            msg = await receive()
                            if msg["type"] == "http.disconnect":
                                return
                            chunks.append(msg.get("body", b""))
                            size += len(chunks[-1])
                            more = msg.get("more_body", False)
                except TimeoutError:
                    late = f"the request body did not arrive within {self.srv.cfg.read_timeout_s:g} s"
                    await reply(408, error_body(late, code="body_timeout"), {"Connection": "close"})
                    return
                if size > limit:
                    await reply(413, too_big, close)
                    return
                body = b"".join(chunks)
                sent = False

                async def replay() -> dict[str, Any]:
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()  # later: the disconnect

                await self.app(scope, replay, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.srv.metrics.requests.labels(endpoint, str(status["code"] or 499)).inc()
