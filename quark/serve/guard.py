"""Protection from other web pages: a Host allow-list (DNS rebinding), an Origin check on state-changing routes
(CSRF) and CORS only for origins the user names. One small ASGI middleware in front of the server's app.

Choices:
- Host: a page on `http://evil.example` whose name the attacker re-points at 127.0.0.1 (DNS rebinding) reaches
  a loopback server with `Host: evil.example`, so any Host not on the list gets 403: the bound address,
  localhost, 127.0.0.1 and [::1], plus `--allowed-hosts` (`*` allows any). The port is not compared (rebinding
  cannot change a name into a number). A server bound to every interface (0.0.0.0 or ::) also accepts any IP
  address literal, which rebinding cannot produce, so probes and clients on other machines that use the
  address keep working; names still need `--allowed-hosts`. A request with no Host header (HTTP/1.0) is no
  browser's, and passes.
- Origin: browsers send it on every cross-origin POST, including the "simple" `text/plain` ones that skip a
  CORS preflight and so would otherwise run. A request whose Origin is neither this server itself (its
  host:port equals the Host header) nor one of `--allowed-origins` is refused (403) on every method other than
  GET, HEAD and OPTIONS. Clients that are not browsers (SDKs, curl) send no Origin and are not affected; the
  bundled chat page is same-origin.
- CORS: only an origin in `--allowed-origins` (or any, with `*`) gets `Access-Control-Allow-Origin` and an
  answered preflight; a preflight from any other origin gets 403, so the browser never sends the request.
- Refusals are JSON in the OpenAI error shape, like every other error of the server.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

ASGIApp = Callable  # (scope, receive, send) -> awaitable

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
EVERY_INTERFACE = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def host_name(value: str) -> str:
    """A Host header (or --host value) -> its lower-case name without the port: "[::1]:8000" -> "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:value.index("]")] if "]" in value else value
    elif value.count(":") == 1:
        value = value.split(":")[0]
    return value.rstrip(".")  # else a bare name, or an IPv6 literal without brackets (a --host value)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def check_origin(origin: str) -> str:
    """An --allowed-origins value -> its normalized form; ValueError unless it is '*' or scheme://host[:port]."""
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"--allowed-origins: {origin!r} is not an origin; give scheme://host[:port] "
                         "(e.g. http://localhost:3000) or '*'")
    return f"{parts.scheme}://{parts.netloc}".lower()


class BrowserGuard:
    """ASGI middleware: Host allow-list, Origin check on state-changing methods, CORS for allowed origins."""

    def __init__(self, app: ASGIApp, bound_host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = ()):
        self.app = app
        extra = [host_name(h) for h in allowed_hosts]
        bound = host_name(bound_host)
        self.any_host = "*" in extra
        self.any_ip = bound in EVERY_INTERFACE
        self.hosts = frozenset([*LOOPBACK_HOSTS, *extra] + ([] if self.any_ip else [bound]))
        self.origins = frozenset(check_origin(o) for o in allowed_origins)

    def host_ok(self, host: str | None) -> bool:
        if host is None or self.any_host:
            return True
        name = host_name(host)
        return name in self.hosts or (self.any_ip and _is_ip(name))

    def cors_ok(self, origin: str) -> bool:
        return "*" in self.origins or origin.lower() in self.origins

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin, method = headers.get("host"), headers.get("origin"), scope["method"]
        if not self.host_ok(host):
            return await _refuse(send, f"Host '{host}' is not allowed: this server answers to "
                                       f"{', '.join(sorted(self.hosts))} (start it with --allowed-hosts NAME to add one)",
                                 "host_not_allowed")
        if origin is None:
            return await self.app(scope, receive, send)
        try:
            same = host is not None and urlsplit(origin).netloc.lower() == host.lower()
        except ValueError:  # not even a URL ("http://[x")
            same = False
        allowed = same or self.cors_ok(origin)
        if method == "OPTIONS" and "access-control-request-method" in headers:  # a CORS preflight
            if not allowed:
                return await _refuse(send, f"cross-origin requests from '{origin}' are not allowed (start the "
                                           "server with --allowed-origins ORIGIN to allow one)", "origin_not_allowed")
            return await _preflight(send, origin, headers.get("access-control-request-headers"))
        if not allowed and method not in SAFE_METHODS:
            return await _refuse(send, f"requests from the web page at '{origin}' are not allowed (start the server "
                                       "with --allowed-origins ORIGIN to allow one)", "origin_not_allowed")
        if allowed and not same:
            async def send_cors(message: dict) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), *_cors_headers(origin)]
                await send(message)
            return await self.app(scope, receive, send_cors)
        return await self.app(scope, receive, send)


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


async def _preflight(send: Callable, origin: str, request_headers: str | None) -> None:
    headers = _cors_headers(origin) + [
        (b"access-control-allow-methods", b"GET, HEAD, POST, OPTIONS"),
        (b"access-control-allow-headers", (request_headers or "Authorization, Content-Type").encode("latin-1")),
        (b"access-control-max-age", b"600"), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _refuse(send: Callable, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
