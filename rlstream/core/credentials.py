"""Redis credentials and private run files.

A Redis password never goes into ``config.json``, an event, a log line or an error
message: those are copied around, shown on screens and attached to bug reports. The
URL keeps the user name (ACL users) and loses the password; the password reaches a
process by one of:

- the URL it was given itself (``redis://user:pw@host`` in its config or in
  ``RLSTREAM_REDIS_URL``): fine for the one process the user starts by hand;
- ``RLSTREAM_REDIS_PASSWORD`` in its environment: how ``rlstream up`` hands it to its
  children (and what compose and other launchers should set);
- for the embedded redis-server, its ``redis/password`` file (0600 inside the 0700 run
  directory), read by ``rlstream status``/``audit``/``dead`` and by a standalone worker
  attached to that run on the same machine.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

PASSWORD_ENV = "RLSTREAM_REDIS_PASSWORD"


def url_password(url: str) -> str | None:
    """The password a Redis URL carries (userinfo or ``?password=``), else None."""
    parts = urlsplit(url)
    if parts.password:
        return unquote(parts.password)
    return next((v for k, v in parse_qsl(parts.query) if k == "password" and v), None)


def _replace_password(url: str, replacement: str | None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        if replacement is not None:
            netloc = f"{user}:{replacement}@{host}"
        else:
            netloc = f"{user}@{host}" if user else host
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    if replacement is not None and len(query) != len(parse_qsl(parts.query, keep_blank_values=True)):
        query.append(("password", replacement))
    # unix:///path has an empty netloc that urlunsplit would drop: keep the three slashes
    text = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="/*"), parts.fragment))
    if parts.scheme == "unix" and not netloc and not text.startswith("unix:///"):
        text = text.replace("unix:", "unix://", 1)
    return text


def without_password(url: str | None) -> str | None:
    """``url`` with its password removed (the user name stays): what files and events hold."""
    return url if url is None or url_password(url) is None else _replace_password(url, None)


def redacted(url: str | None) -> str | None:
    """``url`` with its password shown as ``***``: what messages and logs show."""
    return url if url is None or url_password(url) is None else _replace_password(url, "***")


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) and make it owner-only (0700): a run directory holds
    the Redis AOF, checkpoints and the embedded server's password."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def read_secret(path: str | Path) -> str | None:
    """The secret stored at ``path``, or None when there is none."""
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def read_or_create_secret(path: str | Path) -> str:
    """The secret at ``path``; a new random one (written 0600, atomically) if there is none."""
    path = Path(path)
    existing = read_secret(path)
    if existing is not None:
        return existing
    value = secrets.token_urlsafe(32)  # URL-safe: it goes into redis:// URLs unquoted
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)
    return value
