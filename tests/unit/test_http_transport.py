"""The completions client (rlstream.sampling.http) against real local servers: the JSON body's
bytes as httpx sends them, answers framed every way HTTP/1.1 frames them and returned as
httpx's, connections kept and reused (one per request in flight), the keep-alive race sent again
once, aiohttp's failures as the httpx exceptions callers judge, certificates and proxies as httpx
took them, httpx itself behind a test's transport and a SOCKS proxy, and sessions closed with
their loop."""
from __future__ import annotations

import asyncio
import gc
import gzip
import json
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import aiohttp
import httpx
import pytest

from rlstream.sampling import http
from rlstream.sampling.http import CompletionsClient, environment_proxy, json_bytes
from rlstream.sampling.remote import completion_request, parse_completions
from rlstream.sampling.servers import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from standin_server import StandinServer  # noqa: E402

BODY = completion_request("m", [1, 2, 3], 1, max_tokens=4, temperature=1.0)
OK = '{"ok": "é"}'.encode()
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
              "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


class RawServer:
    """An asyncio server on the test's loop: records each request's bytes and answers with what
    ``answer(index, request_bytes)`` returns (None: close the connection without answering; a
    float: wait that long, then answer OK). ``ssl``: serve TLS."""

    def __init__(self, answer, ssl: ssl.SSLContext | None = None):
        self.answer, self.ssl, self.requests, self.connections = answer, ssl, [], 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.ssl)
        scheme = "https" if self.ssl else "http"
        return f"{scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                reply = self.answer(len(self.requests) - 1, self.requests[-1])
                if isinstance(reply, float):  # a slow server
                    await asyncio.sleep(reply)
                    reply = ok()
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply.lower() or reply.startswith(b"HTTP/1.0"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def ok(body: bytes = OK, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra, len(body), body)


def client_for(base: str, **kwargs) -> CompletionsClient:
    client = CompletionsClient(f"{base}/v1", timeout=kwargs.pop("timeout", 5), headers=kwargs.pop("headers", {}))
    assert client.httpx is None  # aiohttp sends
    return client


def head_and_body(request: bytes) -> tuple[list[bytes], bytes]:
    head, body = request.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n"), body


def test_the_request_and_its_answer():
    other = {**BODY, "prompt": list(range(300)), "stop": ["é"]}

    async def main():
        server = RawServer(lambda i, request: ok())
        async with server as base:
            client = client_for(base, headers={"Authorization": "Bearer k"})
            plain = httpx.AsyncClient(base_url=f"{base}/v1", timeout=5, headers={"Authorization": "Bearer k"})
            answers = []
            for body in (BODY, other):
                a = await client.post("/completions", json=body)
                b = await plain.post("/completions", json=body)
                answers.append(a)
                assert a.status_code == b.status_code == 200 and a.json() == b.json() == {"ok": "é"}
                assert a.headers == b.headers and a.request.url == b.request.url and a.reason_phrase == "OK"
            await plain.aclose()
        return server.requests, answers

    requests, answers = asyncio.run(main())
    assert len(requests) == 4
    for ours, httpx_own in ((requests[0], requests[1]), (requests[2], requests[3])):
        (line, *headers), body = head_and_body(ours)
        assert line == b"POST /v1/completions HTTP/1.1"
        assert body == head_and_body(httpx_own)[1]  # the body's very bytes
        lower = {h.split(b":", 1)[0].lower(): h.split(b":", 1)[1].strip() for h in headers}
        assert lower[b"authorization"] == b"Bearer k" and lower[b"content-type"] == b"application/json"
        assert int(lower[b"content-length"]) == len(body)
    assert json.loads(head_and_body(requests[2])[1]) == other
    assert json_bytes({"a": [1, 2.5], "b": "é"}) == '{"a":[1,2.5],"b":"é"}'.encode()
    with pytest.raises(ValueError):  # as httpx refuses it
        json_bytes({"a": float("nan")})


def test_answers_framed_by_length_chunks_or_the_close_and_decoded():
    zipped = gzip.compress(OK)
    answers = [
        ok(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\n{\"ok\r\n8;x=1\r\n\": \"\xc3\xa9\"}\r\n0\r\nT: 1\r\n\r\n",  # two chunks, an extension, a trailer
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(),
        ok(zipped, b"Content-Encoding: gzip\r\n"),
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy",
        b"HTTP/1.0 200 OK\r\n\r\n" + OK,  # framed by the close
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",  # not followed
    ]

    async def main():
        server = RawServer(lambda i, request: answers[i] if i < len(answers) else ok())
        async with server as base:
            client = client_for(base)
            got = [await client.post("/completions", json=BODY) for _ in answers]
            again = await client.post("/completions", json=BODY)
        return got, again, server

    got, again, server = asyncio.run(main())
    assert [r.status_code for r in got] == [200, 200, 200, 200, 503, 200, 307]
    assert all(r.json() == {"ok": "é"} for r in got[:4] + got[5:6])
    assert got[4].text == "busy" and got[4].reason_phrase == "Service Unavailable"
    assert got[6].headers["location"] == "/elsewhere" and again.json() == {"ok": "é"}
    assert len(server.requests) == len(answers) + 1
    assert server.connections == 3  # the 503 said close, the HTTP/1.0 answer closed: two new connections


def test_connections_are_kept_and_one_per_request_in_flight():
    async def main():
        server = RawServer(lambda i, request: 0.05)
        async with server as base:
            client = client_for(base)
            for _ in range(3):
                assert (await client.post("/completions", json=BODY)).status_code == 200
            sequential = server.connections
            answers = await asyncio.gather(*(client.post("/completions", json=BODY) for _ in range(40)))
        return sequential, server.connections, answers

    sequential, connections, answers = asyncio.run(main())
    # no connection limit beyond the requests in flight (aiohttp's default would hold them to 100 in all)
    assert sequential == 1 and connections == 40 and all(a.status_code == 200 for a in answers)


def test_against_the_standin_server():
    server = StandinServer("const:0.02", vocab_size=16)
    base = server.start()
    try:
        async def main():
            client = client_for(base)
            answers = await asyncio.gather(*(client.post("/completions", json={**BODY, "n": 2}) for _ in range(8)))
            return [parse_completions(a.json(), [1, 2, 3], 0) for a in answers]

        completions = asyncio.run(main())
    finally:
        server.stop()
    assert all(len(c) == 2 for c in completions)


def test_a_kept_connection_the_server_closed_is_sent_again_once():
    """The keep-alive race: the server drops an idle connection (uvicorn after 5 s) just as a
    request goes out on it. Sent again once, on a new connection; a new connection closed
    without an answer is not (the server failed on it), nor a kept one twice."""
    async def main():
        raced = RawServer(lambda i, request: None if i == 1 else ok())  # answers, then closes without answering
        async with raced as base:
            client = client_for(base)
            first = await client.post("/completions", json=BODY)
            second = await client.post("/completions", json=BODY)
        fresh = RawServer(lambda i, request: None)
        async with fresh as base:
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await client_for(base).post("/completions", json=BODY)
        twice = RawServer(lambda i, request: ok() if i == 0 else None)
        async with twice as base:
            client = client_for(base)
            await client.post("/completions", json=BODY)
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/completions", json=BODY)
        return first, second, raced, fresh, twice

    first, second, raced, fresh, twice = asyncio.run(main())
    assert first.status_code == second.status_code == 200
    assert len(raced.requests) == 3 and raced.connections == 2
    assert len(fresh.requests) == 1
    assert len(twice.requests) == 3  # the first, then the kept connection's and one retry


def test_failures_are_httpx_exceptions(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    async def main():
        with pytest.raises(httpx.ConnectError):
            await client_for(f"http://127.0.0.1:{closed_port}").post("/completions", json=BODY)
        async with RawServer(lambda i, request: ok()[:-3]) as base:
            client = client_for(base, timeout=0.3)  # the body never completes: the request's bound ends it
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/completions", json=BODY)
        async with RawServer(lambda i, request: 1.0) as base:  # no answer within the bound
            with pytest.raises(httpx.ReadTimeout):
                await client_for(base, timeout=0.3).post("/completions", json=BODY)
        async with RawServer(lambda i, request: b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\n"
                                                b"{\"ok") as base:
            with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
                await client_for(base).post("/completions", json=BODY)
        async with RawServer(lambda i, request: b"garbage\r\n\r\n") as base:
            with pytest.raises(httpx.RemoteProtocolError, match="not a valid HTTP answer"):
                await client_for(base).post("/completions", json=BODY)

    asyncio.run(main())

    async def slow_connect(*args, **kwargs):  # a connect that takes longer than the request's bound
        await asyncio.sleep(5)

    monkeypatch.setattr(aiohttp.TCPConnector, "_create_connection", slow_connect)

    async def connect_timeout():
        with pytest.raises(httpx.ConnectTimeout):
            await client_for("http://127.0.0.1:9", timeout=0.2).post("/completions", json=BODY)

    asyncio.run(connect_timeout())


def test_a_cancelled_request_leaves_no_connection_for_the_next():
    async def main():
        server = RawServer(lambda i, request: 5.0 if i == 0 else ok())
        async with server as base:
            client = client_for(base)
            slow = asyncio.ensure_future(client.post("/completions", json=BODY))
            await asyncio.sleep(0.2)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            answer = await client.post("/completions", json=BODY)
        return answer, server.connections

    answer, connections = asyncio.run(main())
    assert answer.json() == {"ok": "é"} and connections == 2


def test_a_server_that_sets_a_cookie_gets_it_back():
    async def main():
        server = RawServer(lambda i, request: ok(extra=b"Set-Cookie: route=r2; Path=/\r\n") if i == 0 else ok())
        async with server as base:  # named by its IP address, as inference servers often are
            client = client_for(base)
            await client.post("/completions", json=BODY)
            await client.post("/completions", json=BODY)
        return server.requests

    first, second = asyncio.run(main())
    assert b"cookie:" not in first.lower() and b"Cookie: route=r2" in second


def unclosed(caplog, record) -> list[str]:
    gc.collect()
    return [str(w.message) for w in record if "Unclosed" in str(w.message)] + \
        [r.getMessage() for r in caplog.records if "Unclosed" in r.getMessage()]


def test_sessions_close_with_their_loop(caplog):
    """Each ``asyncio.run`` (the SDK's loop) gets a client of its own, closed as the loop ends,
    cancelled requests and all; a loop that outlives its clients (a worker's) closes them through
    ``Server.close_client`` (``RemotePolicy.close``), on its own thread while it runs."""
    server = StandinServer("const:0.02", vocab_size=16)
    base = server.start()
    clients = []
    caplog.set_level(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            url = f"{base}/v1"
            s = Server(0, url, lambda: CompletionsClient(url, timeout=5, headers={}))

            async def draw(cancel: bool = False):
                clients.append(s.client())
                task = asyncio.ensure_future(s.client().post("/completions", json=BODY))
                if cancel:  # left in flight: asyncio.run cancels it before closing the loop
                    await asyncio.sleep(0)
                    return None
                return (await task).status_code

            assert asyncio.run(draw()) == 200
            asyncio.run(draw(cancel=True))
            assert asyncio.run(draw()) == 200
            assert len({id(c) for c in clients}) == 3 and all(c.session is None for c in clients)

            loop = asyncio.new_event_loop()  # a worker's loop, one job at a time
            assert loop.run_until_complete(draw()) == 200
            s.close_client()
            assert clients[-1].session is None
            loop.close()

            loop = asyncio.new_event_loop()  # a worker's sampling loop, in a thread of its own
            thread = threading.Thread(target=loop.run_forever, daemon=True)
            thread.start()
            assert asyncio.run_coroutine_threadsafe(draw(), loop).result(10) == 200
            s.close_client()
            assert clients[-1].session is None
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            clients.clear()
            assert unclosed(caplog, record) == []
    finally:
        server.stop()


def test_httpx_where_aiohttp_is_not_equivalent(monkeypatch):
    mock = httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": 1}))
    client = CompletionsClient("http://gpu-1:8000/v1", timeout=5, headers={}, transport=mock)
    assert client.httpx is not None and asyncio.run(client.post("/completions", json=BODY)).json() == {"ok": 1}
    monkeypatch.setenv("ALL_PROXY", "socks5://proxy:1080")  # aiohttp has no SOCKS; httpx has, with socksio
    try:
        import socksio  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="socksio"):  # httpx's own word, as before
            CompletionsClient("http://gpu-1:8000/v1", timeout=5, headers={})
    else:
        assert CompletionsClient("http://gpu-1:8000/v1", timeout=5, headers={}).httpx is not None


def test_the_proxy_httpx_would_take_from_the_environment(monkeypatch):
    assert environment_proxy("http://gpu-1:8000/v1") is None
    monkeypatch.setenv("ALL_PROXY", "proxy:3128")
    assert environment_proxy("http://gpu-1:8000/v1") == "http://proxy:3128"
    monkeypatch.setenv("HTTPS_PROXY", "http://tls-proxy:3128")
    assert environment_proxy("https://gpu-1:8000/v1") == "http://tls-proxy:3128"
    monkeypatch.setenv("NO_PROXY", "gpu-1,.internal")
    assert environment_proxy("http://gpu-1:8000/v1") is None and environment_proxy("http://a.internal/v1") is None
    assert environment_proxy("http://gpu-2:8000/v1") == "http://proxy:3128"

    async def main():
        proxy = RawServer(lambda i, request: ok())
        async with proxy as proxy_url:
            monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("http://", "http://user:p%40ss@"))
            client = CompletionsClient("http://gpu-2.invalid:8000/v1", timeout=5, headers={})
            assert client.httpx is None
            answer = await client.post("/completions", json=BODY)
        return answer, proxy.requests

    answer, requests = asyncio.run(main())
    (line, *headers), _ = head_and_body(requests[0])
    assert answer.json() == {"ok": "é"} and line == b"POST http://gpu-2.invalid:8000/v1/completions HTTP/1.1"
    assert b"Proxy-Authorization: Basic dXNlcjpwQHNz" in headers  # user:p@ss


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_certificates_are_checked_as_httpx_checks_them(tmp_path, monkeypatch):
    """An https server whose certificate httpx's roots do not vouch for is a ConnectError;
    named by SSL_CERT_FILE (as httpx reads it), it answers."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def main():
        async with RawServer(lambda i, request: ok(), ssl=tls) as base:
            with pytest.raises(httpx.ConnectError, match="certificate"):
                await client_for(base).post("/completions", json=BODY)
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            http._ssl_context.cache_clear()
            return await client_for(base).post("/completions", json=BODY)

    http._ssl_context.cache_clear()
    try:
        assert asyncio.run(main()).json() == {"ok": "é"}
    finally:
        http._ssl_context.cache_clear()
