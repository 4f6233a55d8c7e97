"""The lean transport under the completions client (rlstream.sampling.http): the same bytes on the
wire as httpx's own transport, answers framed every way HTTP/1.1 frames them, connections kept
and reused, the keep-alive race retried once, httpx's exceptions for every failure, and httpx's
own path where the lean one would not be equivalent (TLS, a proxy, a cookie)."""
from __future__ import annotations

import asyncio
import gzip
import json
import socket
import sys
from pathlib import Path

import httpx
import pytest

from rlstream.sampling.http import CompletionsClient, KeepAliveTransport, completions_transport, json_bytes
from rlstream.sampling.remote import completion_request, parse_completions

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from standin_server import StandinServer  # noqa: E402

BODY = completion_request("m", [1, 2, 3], 1, max_tokens=4, temperature=1.0)
OK = '{"ok": "é"}'.encode()


class RawServer:
    """An asyncio server on the test's loop: records each request's bytes and answers with what
    ``answer(index, request_bytes)`` returns (None: close the connection without answering)."""

    def __init__(self, answer):
        self.answer, self.requests, self.connections = answer, [], 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

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
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes = OK, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra, len(body), body)


def lean_client(base: str, **kwargs) -> CompletionsClient:
    client = CompletionsClient(f"{base}/v1", timeout=kwargs.pop("timeout", 5), headers=kwargs.pop("headers", {}))
    assert isinstance(client._lean, KeepAliveTransport)
    return client


def test_the_request_bytes_are_httpx_own():
    other = {**BODY, "prompt": list(range(300)), "stop": ["é"]}

    async def main():
        server = RawServer(lambda i, request: ok())
        async with server as base:
            lean = lean_client(base, headers={"Authorization": "Bearer k"})
            plain = httpx.AsyncClient(base_url=f"{base}/v1", timeout=5, headers={"Authorization": "Bearer k"})
            for body in (BODY, other):
                a = await lean.post("/completions", json=body)
                b = await plain.post("/completions", json=body)
                assert a.status_code == b.status_code == 200 and a.json() == b.json() == {"ok": "é"}
                assert a.headers == b.headers and a.request.url == b.request.url
            await lean.aclose()
            await plain.aclose()
        return server.requests

    requests = asyncio.run(main())
    assert len(requests) == 4 and requests[0] == requests[1] and requests[2] == requests[3]
    assert json.loads(requests[2].split(b"\r\n\r\n", 1)[1]) == other
    assert json_bytes({"a": [1, 2.5], "b": "é"}) == '{"a":[1,2.5],"b":"é"}'.encode()


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
    ]

    async def main():
        server = RawServer(lambda i, request: answers[i] if i < len(answers) else ok())
        async with server as base:
            client = lean_client(base)
            got = [await client.post("/completions", json=BODY) for _ in answers]
            again = await client.post("/completions", json=BODY)
            await client.aclose()
        return got, again, server.connections

    got, again, connections = asyncio.run(main())
    assert [r.status_code for r in got] == [200, 200, 200, 200, 503, 200]
    assert all(r.json() == {"ok": "é"} for i, r in enumerate(got) if i != 4)
    assert got[4].text == "busy" and got[4].reason_phrase == "Service Unavailable"
    assert again.json() == {"ok": "é"}
    assert connections == 3  # the 503 said close, the HTTP/1.0 answer closed: two new connections


def test_connections_are_reused_and_one_per_request_in_flight():
    server = StandinServer("const:0.05", vocab_size=16)
    base = server.start()
    try:
        async def main():
            client = lean_client(base)
            for _ in range(3):
                answer = await client.post("/completions", json=BODY)
                assert len(parse_completions(answer.json(), [1, 2, 3], 0)) == 1
            sequential = client._lean.opened
            answers = await asyncio.gather(*(client.post("/completions", json=BODY) for _ in range(8)))
            await client.aclose()
            return sequential, client._lean.opened, answers

        sequential, opened, answers = asyncio.run(main())
    finally:
        server.stop()
    assert sequential == 1 and opened == 8 and all(a.status_code == 200 for a in answers)


def test_a_kept_connection_the_server_closed_is_not_a_failure():
    """The keep-alive race: the server drops an idle connection (uvicorn after 5 s) just as a
    request goes out on it. Sent again once, on a new connection."""
    async def main():
        server = RawServer(lambda i, request: None if i == 1 else ok())  # answers, then closes without answering
        async with server as base:
            client = lean_client(base)
            first = await client.post("/completions", json=BODY)
            second = await client.post("/completions", json=BODY)
            await client.aclose()
        return first, second, server

    first, second, server = asyncio.run(main())
    assert first.status_code == second.status_code == 200
    assert len(server.requests) == 3 and server.connections == 2


def test_failures_are_httpx_exceptions():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    async def main():
        with pytest.raises(httpx.ConnectError):
            await lean_client(f"http://127.0.0.1:{closed_port}").post("/completions", json=BODY)
        async with RawServer(lambda i, request: None) as base:  # a new connection closed without an answer
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await lean_client(base).post("/completions", json=BODY)
        async with RawServer(lambda i, request: ok()[:-3] + b"") as base:
            client = lean_client(base, timeout=0.3)  # the body never completes: the read times out
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/completions", json=BODY)
        async with RawServer(lambda i, request: b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\n"
                                                b"{\"ok") as base:
            with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
                await lean_client(base).post("/completions", json=BODY)
        async with RawServer(lambda i, request: b"garbage\r\n\r\n") as base:
            with pytest.raises(httpx.RemoteProtocolError, match="status line"):
                await lean_client(base).post("/completions", json=BODY)

    asyncio.run(main())


def test_a_cancelled_request_does_not_leave_its_connection_for_the_next():
    async def main():
        server = RawServer(lambda i, request: 5.0 if i == 0 else ok())
        async with server as base:
            client = lean_client(base)
            slow = asyncio.ensure_future(client.post("/completions", json=BODY))
            await asyncio.sleep(0.2)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            answer = await client.post("/completions", json=BODY)
            await client.aclose()
        return answer, server.connections

    answer, connections = asyncio.run(main())
    assert answer.json() == {"ok": "é"} and connections == 2


def test_a_server_that_sets_a_cookie_gets_it_back_through_httpx():
    async def main():
        server = RawServer(lambda i, request: ok(extra=b"Set-Cookie: route=r2; Path=/\r\n") if i == 0 else ok())
        async with server as base:
            client = lean_client(base)
            await client.post("/completions", json=BODY)
            await client.post("/completions", json=BODY)
            await client.aclose()
        return server.requests

    first, second = asyncio.run(main())
    assert b"cookie:" not in first.lower() and b"Cookie: route=r2" in second


def test_httpx_transport_where_the_lean_one_is_not_equivalent(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(completions_transport("http://gpu-1:8000/v1"), KeepAliveTransport)
    assert completions_transport("https://api.example/v1") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert completions_transport("http://gpu-1:8000/v1") is None
    mock = httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": 1}))
    client = CompletionsClient("http://gpu-1:8000/v1", timeout=5, headers={}, transport=mock)
    assert client._lean is None
    assert asyncio.run(client.post("/completions", json=BODY)).json() == {"ok": 1}
