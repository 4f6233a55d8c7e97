"""How a worker's completions go over HTTP: ``CompletionsClient`` (one server, one event loop),
``post(path, json=body)`` as httpx's ``AsyncClient.post``, sent with aiohttp (docs/design.md
§15.77 Completions over aiohttp).

Why aiohttp and not httpx's async transport (httpcore): with a window of requests in flight its
connection pool costs 2-4 ms of CPU per request (each request and each answer scans the pool's
requests and connections; each of its locks asks which async library runs), about half of a
worker's CPU per sample against a latency-bound server; aiohttp's client costs ~0.2 ms.

Callers keep httpx's types: the answer is an ``httpx.Response`` (status, headers, body, the
request's URL) and every failure one of httpx's ``TransportError``s (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``, ``ProxyError``), so
``RemotePolicy`` judges them as before (rlstream.sampling.remote: which mark a server down,
which are retried, which shrink the window).

What is kept of httpx's behaviour: the JSON body's bytes (``json_bytes``), no redirects followed,
cookies a server sets sent back, certificates checked as httpx checks them (its SSL context:
certifi, ``SSL_CERT_FILE``/``SSL_CERT_DIR``), the proxy httpx would take from the environment
(``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``, ``NO_PROXY``), read once per client. httpx itself
still sends when a test passes a transport (``httpx.MockTransport``) and through a SOCKS proxy
(aiohttp has none). On purpose, as before: no connection limit (the concurrency controller
bounds the requests in flight); ``inference.timeout`` bounds each whole request; a request whose
kept connection the server closed before answering goes out once more on a new one.

A client's aiohttp session is closed with its loop: ``asyncio.run`` (the SDK's loop, one per
call) closes it when it shuts the loop's async generators down (``_close_with_loop``); a worker,
whose loop outlives it, at exit (``WorkerRuntime.close`` -> ``RemotePolicy.close`` ->
``Server.close_client``)."""
from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import json
import logging
import urllib.parse
import urllib.request
import weakref
from typing import Any, AsyncIterator

import aiohttp
import httpx

log = logging.getLogger(__name__)
# The connection the running request went out on: None while it has none (a timeout then is the
# connect's), else whether it had carried an earlier request. Set by _Connector.connect, read by
# CompletionsClient.post: both run in the request's own task.
_KEPT: contextvars.ContextVar[bool | None] = contextvars.ContextVar("rlstream_http_kept", default=None)
# The server closed the connection (or reset it) before any answer: on a kept connection, the
# keep-alive race, and the request goes out once more.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError)


def json_bytes(value: Any) -> bytes:
    """A JSON body as httpx encodes ``json=`` (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def environment_proxy(url: str) -> str | None:
    """The proxy httpx would take from the environment for ``url``: ``<SCHEME>_PROXY``, else
    ``ALL_PROXY``, unless ``NO_PROXY`` names the host; None without one."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"  # httpx reads a bare host:port as http


@functools.cache
def _ssl_context() -> Any:
    """httpx's default SSL context (certifi's roots, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), built
    once: a client per ``asyncio.run`` would otherwise load the roots each time."""
    return httpx.create_ssl_context()


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, which also tells the request that it has a connection and whether it
    was a kept one (``_KEPT``): only then is a connection closed before the answer the keep-alive
    race, and only before it is a timeout the connect's."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._used: weakref.WeakSet = weakref.WeakSet()  # protocols handed to a request already

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super().connect(*args, **kwargs)
        protocol = connection.protocol
        _KEPT.set(protocol in self._used)
        self._used.add(protocol)
        return connection


# Each event loop's open clients and the suspended async generator that closes them when the loop
# shuts its async generators down (_close_with_loop). The loop's own hook, where nothing else is
# told that a loop ends.
_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def _close_with_loop(client: CompletionsClient) -> None:
    """Have ``client`` closed with the running loop: ``asyncio.run`` (and any loop closed as
    asyncio documents it) shuts the loop's async generators down before closing it, and the
    closer, suspended in its ``try``, then closes each client still open. It is held here (the
    loop holds its generators weakly), so a client is closed even when dropped before."""
    loop = asyncio.get_running_loop()
    entry = _OPEN.get(loop)
    if entry is None or entry[0].ag_frame is None:  # none yet, or this loop's was shut down already
        clients: set[CompletionsClient] = set()
        closer = _closer(clients)
        await anext(closer)  # suspended at its yield: the loop now knows it
        entry = _OPEN[loop] = (closer, clients)
    entry[1].add(client)
    client._tracked = True


async def _closer(clients: set[CompletionsClient]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        while clients:
            await clients.pop().aclose()


class CompletionsClient:
    """A server's async client for its completions, for one event loop (``Server.client`` builds
    one per loop). ``transport``: send with ``httpx.AsyncClient`` over it instead (tests)."""

    def __init__(self, base_url: str, *, timeout: float, headers: dict[str, str],
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url, self.timeout, self.headers = base_url.rstrip("/"), timeout, dict(headers)
        self.httpx: httpx.AsyncClient | None = None  # the client when httpx sends
        self.session: aiohttp.ClientSession | None = None  # aiohttp's, opened by the first request
        self._proxy: dict[str, Any] = {}  # aiohttp's proxy arguments of every request
        self._urls: dict[str, tuple[str, httpx.Request]] = {}  # path -> (URL, the request answers carry)
        self._tracked = False  # known to its loop's closer (_close_with_loop)
        proxy = environment_proxy(self.base_url) if transport is None else None
        if transport is not None or (proxy is not None and not proxy.lower().startswith(("http://", "https://"))):
            # A test's transport, or a SOCKS proxy (httpx speaks it with its socksio extra; aiohttp not).
            self.httpx = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers,
                                           transport=transport)
        elif proxy is not None:
            parts = urllib.parse.urlsplit(proxy)
            self._proxy = {"proxy": parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()}
            if parts.username is not None:  # credentials in its URL go as Proxy-Authorization, as httpx sends them
                userpass = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
                authorization = {"Proxy-Authorization": "Basic " + base64.b64encode(userpass.encode()).decode()}
                if self.base_url.lower().startswith("https:"):  # to the proxy's CONNECT
                    self._proxy["proxy_headers"] = authorization
                else:  # plain HTTP goes to the proxy itself (aiohttp sends proxy_headers only with a CONNECT)
                    self.headers.update(authorization)

    async def post(self, path: str, *, json: Any) -> httpx.Response:
        if not self._tracked:
            await _close_with_loop(self)
        if self.httpx is not None:
            return await self.httpx.post(path, json=json)
        prepared = self._urls.get(path)
        if prepared is None:
            prepared = self._urls[path] = (self.base_url + path, httpx.Request("POST", self.base_url + path))
        url, request = prepared
        content = json_bytes(json)
        session = self.session if self.session is not None else self._open()
        deadline = asyncio.get_running_loop().time() + self.timeout
        for attempt in range(2):
            _KEPT.set(None)
            try:
                kwargs = self._proxy
                if attempt:  # what is left of the request's bound
                    left = max(1e-3, deadline - asyncio.get_running_loop().time())  # 0 would be no bound
                    kwargs = {**kwargs, "timeout": aiohttp.ClientTimeout(total=left)}
                async with session.post(url, data=content, allow_redirects=False, **kwargs) as answer:
                    body = await answer.read()
                    return _response(answer, body, request)
            except _STALE as exc:
                if attempt == 0 and _KEPT.get():
                    log.debug("a kept connection to %s was closed before the answer (%r): sending again", url, exc)
                    continue
                raise _httpx_error(exc, request) from exc
            except asyncio.TimeoutError as exc:  # the request's bound (aiohttp's ConnectionTimeoutError too)
                if _KEPT.get() is None:
                    raise httpx.ConnectTimeout(f"no connection to {url} within the request's bound",
                                               request=request) from exc
                raise httpx.ReadTimeout(f"no complete answer from {url} within the request's bound",
                                        request=request) from exc
            except aiohttp.ClientError as exc:
                raise _httpx_error(exc, request) from exc
        raise AssertionError("unreachable")

    def _open(self) -> aiohttp.ClientSession:
        # limit=0: no connection limit (the window bounds requests in flight); trust_env=False:
        # the proxy is read once above, where aiohttp's trust_env reads it (and ~/.netrc) in a
        # thread for every request; CookieJar(unsafe=True): cookies of servers named by their IP
        # address kept too, as httpx keeps them.
        connector = _Connector(limit=0, ssl=_ssl_context() if self.base_url.lower().startswith("https:") else True)
        self.session = aiohttp.ClientSession(
            connector=connector, headers={**self.headers, "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=self.timeout), cookie_jar=aiohttp.CookieJar(unsafe=True),
            trust_env=False)
        return self.session

    async def aclose(self) -> None:
        entry = _OPEN.get(asyncio.get_running_loop())
        if entry is not None:
            entry[1].discard(self)
        session, self.session = self.session, None
        if session is not None:
            await session.close()
        if self.httpx is not None:
            await self.httpx.aclose()


def _response(answer: aiohttp.ClientResponse, body: bytes, request: httpx.Request) -> httpx.Response:
    """aiohttp's answer as httpx's. aiohttp decoded the body already: a ``Content-Encoding`` it
    names (and the length of the encoded body) are left out, or httpx would decode it again."""
    headers: Any = answer.raw_headers
    if "Content-Encoding" in answer.headers:
        headers = [(k, v) for k, v in headers if k.lower() not in (b"content-encoding", b"content-length")]
    return httpx.Response(answer.status, headers=headers, content=body, request=request,
                          extensions={"http_version": b"HTTP/1.1", "reason_phrase": (answer.reason or "").encode()})


def _httpx_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception callers judge for aiohttp's ``exc`` (a timeout apart: ``post`` tells a
    connect's from an answer's)."""
    what = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, DNS, TLS, the proxy's too
        return httpx.ConnectError(what, request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(f"peer closed connection without sending complete message body: {what}",
                                         request=request)
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy refused the tunnel
        return httpx.ProxyError(what, request=request)
    if isinstance(exc, aiohttp.ClientResponseError):  # an answer that is not HTTP
        return httpx.RemoteProtocolError(f"not a valid HTTP answer: {what}", request=request)
    if isinstance(exc, (aiohttp.ClientOSError, aiohttp.ClientConnectionError)):  # reset, broken pipe
        return httpx.ReadError(what, request=request)
    return httpx.TransportError(f"{type(exc).__name__}: {what}", request=request)
