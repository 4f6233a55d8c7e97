"""Redis clients never block forever on a silent peer (issue "Reliability II" item 8): a
TCP server that accepts and never answers stands in for a half-open connection; a
blocking read must end with an error, and the bound must exceed every blocking read
rlstream issues."""
from __future__ import annotations

import socket
import threading

import pytest
import redis

from rlstream.core import connection
from rlstream.core.connection import LONGEST_BLOCK_S, SOCKET_TIMEOUT_S, client


@pytest.fixture
def silent_server():
    """Accepts connections, reads nothing, answers nothing."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for s in accepted:
        s.close()
    server.close()


def test_every_client_read_is_bounded_beyond_the_longest_block():
    kwargs = client("redis://127.0.0.1:6379/0").connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == SOCKET_TIMEOUT_S > LONGEST_BLOCK_S
    assert kwargs["socket_keepalive"] is True and kwargs["socket_keepalive_options"]
    unix = client("unix:///tmp/none.sock").connection_pool.connection_kwargs
    assert unix["socket_timeout"] == SOCKET_TIMEOUT_S and "socket_keepalive" not in unix


def test_a_blocking_read_on_a_silent_peer_ends_with_an_error(silent_server, monkeypatch):
    monkeypatch.setattr(connection, "SOCKET_TIMEOUT_S", 0.5)  # the same code path, a shorter bound
    r = client(silent_server, command_retries=1)
    outcome: list[BaseException | object] = []

    def read() -> None:
        try:
            outcome.append(r.xread({"rl:x:events": "0-0"}, block=200))
        except BaseException as exc:  # noqa: BLE001 - the outcome is the point
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(30)  # a bound for the test, far above the client's (~2 x 0.5 s plus backoff)
    assert not thread.is_alive(), "the read on a silent peer is still blocked"
    assert isinstance(outcome[0], (redis.TimeoutError, redis.ConnectionError)), outcome
