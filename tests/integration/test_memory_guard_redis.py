"""The memory guard on a real redis-server (docs/design.md §15.48 A memory guard before Redis
refuses writes): the embedded server runs with maxmemory + noeviction, the guard closes
admission at the high-water mark, before Redis itself refuses writes, and opens it again
once a trim frees memory."""
from __future__ import annotations

import pytest
import redis

from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.memory_guard import AdmissionGuard, embedded_maxmemory_mb, memory_pressure, memory_use


def test_embedded_server_limit_guard_and_trim(tmp_path):
    server = EmbeddedRedis(tmp_path, maxmemory_mb=4)
    r = connect(server.start())
    try:
        used, limit = memory_use(r)
        assert limit == 4 * 2**20 and used < limit
        guard = AdmissionGuard(high_water=0.8)
        assert not guard.closed(r)
        payload = b"x" * 4096
        refused = None
        for i in range(2000):  # ~8 MB: twice the limit
            if guard.closed(r):
                break
            try:
                r.xadd("s", {"m": payload})
            except redis.ResponseError as exc:  # Redis refused before the guard closed
                refused = exc
                break
        assert refused is None, f"Redis refused a write before the guard closed: {refused}"
        assert guard.paused and memory_pressure(r, 0.8) is not None
        r.xtrim("s", maxlen=0, approximate=False)  # what the archive pass does to archived entries
        assert not guard.closed(r)
        with pytest.raises(redis.ResponseError, match="maxmemory"):  # past the limit, noeviction refuses (never evicts)
            for _ in range(4000):
                r.xadd("s", {"m": payload})
        assert r.xlen("s") > 0  # nothing evicted
    finally:
        r.close()
        server.stop()


def test_default_limit_is_half_the_machine():
    assert embedded_maxmemory_mb(123) == 123 and embedded_maxmemory_mb(0) == 0
    assert embedded_maxmemory_mb(None) > 0
