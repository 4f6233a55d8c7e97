"""How a worker's completions go over HTTP: ``CompletionsClient`` (one server, one event loop) on
``KeepAliveTransport``, plain HTTP/1.1 with keep-alive over asyncio streams, wherever that is
equivalent to httpx's own stack; httpx everywhere else (docs/design.md §15.77 A lean transport for
completions).

Why not httpx's own transport (httpcore): with a window of requests in flight its connection
pool costs 2-4 ms of CPU per request (every request and every answer scans the pool's requests
and connections, and each of its locks and events asks for the running async library, an import
of ``sniffio`` that fails and searches ``sys.path`` when sniffio is not installed), about half a
worker's CPU per sample against a latency-bound server; this transport costs ~0.1 ms, and
``CompletionsClient`` leaves out httpx's per-request work too (~0.3 ms; bench/worker_cpu.py).

What the transport does: one connection per request in flight, reused once its answer is read (an
idle one the server closed is dropped; a request whose reused connection was closed before any
byte of the answer goes out again once on a new connection: the keep-alive race, which httpx
turned into a ``RemoteProtocolError``); answers framed by Content-Length, chunked, or read to the
close; httpx's exceptions for every failure (``ConnectError``, ``ConnectTimeout``,
``ReadTimeout``, ``WriteError``, ``ReadError``, ``RemoteProtocolError``), so callers judge them as
before. The request's timeouts: ``connect`` bounds the connect, ``read`` the whole exchange once
connected. No connection limit: the concurrency controller bounds the requests in flight.

``completions_transport`` picks it only for ``http://`` URLs with no proxy in the environment
(httpx honours ``HTTP_PROXY``/``ALL_PROXY`` only with its own transport); TLS and proxies stay
with httpx's.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.request
from typing import Any

import httpx

log = logging.getLogger(__name__)
MAX_HEADER_BYTES = 1 << 16  # the status line and headers of one answer
NO_BODY_STATUS = frozenset({204, 304})


def completions_transport(url: str) -> httpx.AsyncBaseTransport | None:
    """The transport for a server at ``url``: ``KeepAliveTransport`` for plain HTTP without a
    proxy, else None (httpx's own)."""
    if not url.lower().startswith("http://"):
        return None
    proxies = urllib.request.getproxies()
    if proxies.get("http") or proxies.get("all"):
        return None
    return KeepAliveTransport()


class CompletionsClient:
    """A server's async client for its completions, for one event loop: ``post(path, json=body)``
    as httpx's ``AsyncClient.post``. It wraps an ``httpx.AsyncClient`` (``self.httpx``), which
    sends the request when its transport is not a ``KeepAliveTransport`` (tests, TLS, a proxy)
    or once the server has set a cookie (httpx's jar sends it back). Otherwise the request goes
    to the transport as bytes: the request line and headers of a request httpx built for that path
    (once per path, so they are httpx's own, Content-Length apart), the body encoded as httpx
    encodes JSON. That leaves out httpx's per-request work (URL parsing and merging, header
    objects, the cookie jar: ~0.3 ms of CPU a request), not what goes on the wire."""

    def __init__(self, base_url: str, *, timeout: float, headers: dict[str, str],
                 transport: httpx.AsyncBaseTransport | None = None):
        transport = transport if transport is not None else completions_transport(base_url)
        self.httpx = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers,
                                       transport=transport)
        self._lean = transport if isinstance(transport, KeepAliveTransport) else None
        self._prepared: dict[str, tuple[httpx.Request, bytes, bytes]] = {}

    async def post(self, path: str, *, json: Any) -> httpx.Response:
        if self._lean is None or self.httpx.cookies:
            return await self.httpx.post(path, json=json)
        prepared = self._prepared.get(path)
        if prepared is None:
            prepared = self._prepared[path] = self._prepare(path)
        request, before, after = prepared
        content = json_bytes(json)
        response = await self._lean.exchange(request, b"%sContent-Length: %d\r\n%s%s" % (before, len(content), after,
                                                                                         content))
        response.read()  # decodes a Content-Encoding, as httpx does
        if "set-cookie" in response.headers:
            self.httpx.cookies.extract_cookies(response)
        return response

    def _prepare(self, path: str) -> tuple[httpx.Request, bytes, bytes]:
        """(httpx's request for ``path``, the bytes before its Content-Length header, those after
        it up to the body)."""
        request = self.httpx.build_request("POST", path, json={})
        lines = [b"%s: %s\r\n" % pair for pair in request.headers.raw]
        at = [name.lower() for name, _ in request.headers.raw].index(b"content-length")
        line = b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)
        return request, line + b"".join(lines[:at]), b"".join(lines[at + 1:]) + b"\r\n"

    async def aclose(self) -> None:
        await self.httpx.aclose()


def json_bytes(value: Any) -> bytes:
    """A JSON body as httpx encodes ``json=`` (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class _Stale(Exception):
    """A reused connection was closed before any byte of the answer came."""


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @property
    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing() or self.reader.exception() is not None)

    def close(self) -> None:
        self.writer.close()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams, idle connections kept per (host, port). One instance per
    event loop (``Server.client`` builds a client per loop)."""

    def __init__(self, max_idle: int = 1024):
        self.max_idle = max_idle  # idle connections kept per origin; more are closed
        self.opened = 0  # connections opened so far (tests)
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        head += [b"%s: %s\r\n" % pair for pair in request.headers.raw]
        return await self.exchange(request, b"".join(head) + b"\r\n" + body)

    async def exchange(self, request: httpx.Request, data: bytes) -> httpx.Response:
        """Send ``data`` (``request`` as bytes: request line, headers, body) to ``request``'s
        origin with its timeouts; the answer, its body not yet decoded (``read()`` decodes it)."""
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"KeepAliveTransport speaks plain HTTP, not {url.scheme!r}",
                                            request=request)
        origin = (url.host, url.port or 80)
        timeouts = request.extensions.get("timeout") or {}
        for attempt in range(2):
            connection = self._take(origin) if attempt == 0 else None
            reused = connection is not None
            if connection is None:
                connection = await self._connect(origin, timeouts.get("connect"), request)
            try:
                status, reason, headers, content, version, keep = await self._exchange(
                    connection, data, timeouts.get("read"), request, reused, request.method == "HEAD")
            except _Stale:
                connection.close()
                continue  # the keep-alive race: once more, on a new connection (never reused: not stale)
            except BaseException:  # cancelled mid-answer, or failed: the connection is in an unknown state
                connection.close()
                raise
            if keep:
                self._put(origin, connection)
            else:
                connection.close()
            return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), request=request,
                                  extensions={"http_version": version, "reason_phrase": reason})
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    def _take(self, origin: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    def _put(self, origin: tuple[str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle:
            connection.close()
        else:
            idle.append(connection)

    async def _connect(self, origin: tuple[str, int], timeout: float | None, request: httpx.Request) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(*origin, limit=MAX_HEADER_BYTES)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {origin[0]}:{origin[1]} within {timeout}s",
                                       request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        self.opened += 1
        return _Connection(reader, writer)

    async def _exchange(self, connection: _Connection, data: bytes, timeout: float | None, request: httpx.Request,
                        reused: bool, head_only: bool
                        ) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes, bytes, bool]:
        """Send ``data``, read one answer: (status, reason, headers, body, HTTP version, keep the
        connection)."""
        reader, writer = connection.reader, connection.writer
        try:
            async with asyncio.timeout(timeout):
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError as exc:
                    if reused:
                        raise _Stale from None
                    raise httpx.WriteError(str(exc) or type(exc).__name__, request=request) from exc
                while True:
                    try:
                        raw = await reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError as exc:
                        if reused and not exc.partial:
                            raise _Stale from None
                        raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                                        request=request) from None
                    except ConnectionError:
                        if reused:
                            raise _Stale from None
                        raise
                    status, reason, headers, version = _parse_head(raw, request)
                    if status >= 200 or status == 101:
                        break
                    reused = False  # a 1xx came: the connection was live; the real answer follows
                fields = _framing(headers)
                if head_only or status in NO_BODY_STATUS:
                    body = b""
                elif b"chunked" in fields["transfer-encoding"]:
                    body = await _read_chunked(reader, request)
                elif fields["content-length"] is not None:
                    body = await reader.readexactly(_content_length(fields["content-length"], request))
                else:  # framed by the close
                    body = await reader.read()
                    return status, reason, headers, body, version, False
        except TimeoutError:
            raise httpx.ReadTimeout(f"no complete answer within {timeout}s", request=request) from None
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body",
                                            request=request) from None
        except asyncio.LimitOverrunError:
            raise httpx.RemoteProtocolError(f"the answer's headers exceed {MAX_HEADER_BYTES} bytes",
                                            request=request) from None
        except ConnectionError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        keep = version == b"HTTP/1.1" and b"close" not in fields["connection"]
        return status, reason, headers, body, version, keep

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                with contextlib.suppress(Exception):
                    connection.close()
        self._idle.clear()


def _parse_head(raw: bytes, request: httpx.Request) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    """The status line and headers of one answer: (status, reason, headers, HTTP version)."""
    lines = raw[:-4].split(b"\r\n")
    try:
        version, status, *reason = lines[0].split(b" ", 2)
        code = int(status)
    except ValueError:
        raise httpx.RemoteProtocolError(f"not an HTTP status line: {lines[0][:100]!r}", request=request) from None
    if not version.startswith(b"HTTP/1."):
        raise httpx.RemoteProtocolError(f"not an HTTP/1 answer: {lines[0][:100]!r}", request=request)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx.RemoteProtocolError(f"malformed header line {line[:100]!r}", request=request)
        headers.append((name.strip(), value.strip()))
    return code, reason[0] if reason else b"", headers, version


def _framing(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """What frames the body and whether the connection stays: Content-Length (raw), and the
    Transfer-Encoding and Connection values (lower case, joined)."""
    fields: dict[str, Any] = {"content-length": None, "transfer-encoding": b"", "connection": b""}
    for name, value in headers:
        key = name.lower().decode("latin-1")
        if key == "content-length":
            fields[key] = value
        elif key in ("transfer-encoding", "connection"):
            fields[key] += value.lower()
    return fields


def _content_length(value: bytes, request: httpx.Request) -> int:
    try:
        length = int(value.split(b",")[0])  # repeated equal values are allowed (RFC 9110)
    except ValueError:
        raise httpx.RemoteProtocolError(f"bad Content-Length {value[:50]!r}", request=request) from None
    if length < 0:
        raise httpx.RemoteProtocolError(f"bad Content-Length {value[:50]!r}", request=request)
    return length


async def _read_chunked(reader: asyncio.StreamReader, request: httpx.Request) -> bytes:
    parts = []
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size line {line[:50]!r}", request=request) from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the empty line
                pass
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])
