"""End to end against a password-protected external Redis (an ACL user on the system's
redis-server 7, plain and over TLS): `rlstream up` trains, and the password is in no
file under the run directory, in no Redis value (every stream entry, hash, list, rq's
compressed job data) and in nothing `up` printed (Reliability II, item 7)."""
from __future__ import annotations

import json
import stat
from pathlib import Path
from urllib.parse import quote

import pytest
from external_redis import ExternalRedis, every_value
from factories import rlstream

from rlstream.core import keys
from rlstream.core.connection import connect
from rlstream.core.credentials import PASSWORD_ENV

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "builtin" / "config.toml"
RUN = "auth"


@pytest.mark.parametrize("tls", [False, True], ids=["acl", "acl+tls"])
def test_up_on_a_password_protected_redis_leaves_the_password_nowhere(tmp_path: Path, tls: bool) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with ExternalRedis(tmp_path / "redis", tls=tls) as server:
        secret = server.password
        # the password given the way a user would, in the URL
        proc = rlstream("up", str(CONFIG), "--run-id", RUN, "--set", "max_steps=3", "--set", "workers.count=1",
                        "--set", "prompt_groups_per_step=4", "--set", "completions_per_prompt=4", cwd=work,
                        timeout=300, env={"RLSTREAM_REDIS_URL": server.url}, unset=(PASSWORD_ENV,))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1].startswith("summary: steps=3"), proc.stdout[-500:]
        assert secret not in proc.stdout + proc.stderr

        run_dir = work / "runs" / RUN
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        resolved = json.loads((run_dir / "config.json").read_text())
        assert resolved["redis"]["url"] == server.url_without_password  # user kept, password dropped
        files = [p for p in run_dir.rglob("*") if p.is_file()]
        assert any(p.name == "trainer.log" for p in files) and any(p.suffix == ".safetensors" for p in files)
        for path in files:
            data = path.read_bytes()
            assert secret.encode() not in data and quote(secret).encode() not in data, path

        r = connect(server.url)
        try:
            values = every_value(r)
            assert keys.events(RUN).encode() in {k for k, _ in values}
            assert keys.rollouts(RUN).encode() in {k for k, _ in values}
            leaks = sorted({k for k, v in values if secret.encode() in v})
            assert leaks == [], f"the password is stored under {leaks}"
        finally:
            r.close()
