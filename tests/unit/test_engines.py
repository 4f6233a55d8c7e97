"""rlstream.sampling.engines against stand-ins of vLLM 0.32 and SGLang 0.5.23
(tests/unit/engine_standins.py): the reload routes and their order, the version a server
reports, the checks at start and their refusals, the logprobs probe, health."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from engine_standins import SGLANG_SOURCE, SGLANG_UPDATE_FIELDS, FakeSglang, FakeVllm

from rlstream.core.config import MAX_SEQ_LEN_LIMIT
from rlstream.core.keys import engine_sync_lock
from rlstream.sampling.engines import (
    FOREIGN,
    EngineError,
    EngineRefused,
    check_server,
    engine_for,
    healthy,
    logprobs_after_temperature,
    server_root,
)

ROOT = "http://engine.test"
DIR = Path("/shared/runs/r/weights/v3")


def client(handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_server_root_drops_the_openai_prefix():
    assert server_root("http://h:8000/v1/") == "http://h:8000" == server_root("http://h:8000")


def test_vllm_reload_pauses_reloads_resets_labels_and_resumes():
    vllm = FakeVllm()
    engine = engine_for("vllm", namespace="run")
    assert engine.served_version(client(vllm), ROOT) == 0  # "default": a fresh server serves the base, v0
    engine.reload(client(vllm), ROOT, DIR, 3)
    assert [p for _, p in vllm.calls[1:]] == ["/pause", "/collective_rpc", "/reset_prefix_cache",
                                          "/update_weight_version", "/resume"]
    assert vllm.reloads == [str(DIR)] and vllm.label == "run:3" and not vllm.paused
    assert engine.served_version(client(vllm), ROOT) == 3


def test_vllm_failed_reload_reports_the_engine_message_and_still_resumes():
    vllm = FakeVllm(visible=set())
    with pytest.raises(EngineError, match=r"reloading v3 .*HTTP 500: Call to collective_rpc method failed.*v3"):
        engine_for("vllm").reload(client(vllm), ROOT, DIR, 3)
    assert vllm.calls[-1] == ("POST", "/resume") and not vllm.paused
    assert vllm.label == "default"  # not labelled with a version it does not serve


def test_vllm_is_resumed_even_when_it_drops_the_connection_after_a_failed_reload():
    vllm = FakeVllm(visible=set())
    vllm.drop_after_error = True
    with pytest.raises(EngineError, match="HTTP 500"):
        engine_for("vllm").reload(client(vllm), ROOT, DIR, 3)
    assert not vllm.paused and [p for _, p in vllm.calls][-2:] == ["/resume", "/resume"]


@pytest.mark.parametrize(("namespace", "label", "version"), [
    ("run", "default", 0), ("run", None, 0), ("run", "run:3", 3), ("run", "other:3", FOREIGN),
    ("run", "3", FOREIGN), ("", "3", 3), ("", "run:3", FOREIGN), ("run", "run:x", FOREIGN)])
def test_served_labels(namespace, label, version):
    """Another run's version 3 is not this run's: it is never adopted."""
    assert engine_for("vllm", namespace=namespace).parse_label(label) == version


def test_sglang_reload_body_follows_its_request_schema():
    """The body is validated against UpdateWeightFromDiskReqInput's fields (SGLANG_SOURCE)."""
    assert SGLANG_SOURCE == "sglang 0.5.23" and "weight_version" in SGLANG_UPDATE_FIELDS
    sglang = FakeSglang()
    engine = engine_for("sglang", namespace="run")
    engine.reload(client(sglang), ROOT, DIR, 3)
    assert sglang.reloads == [str(DIR)] and sglang.label == "run:3"
    assert engine.served_version(client(sglang), ROOT) == 3  # read from GET /model_info
    # rlstream's generic body names the version "version": SGLang has no such field
    generic = client(sglang).post(f"{ROOT}/update_weights_from_disk", json={"model_path": str(DIR), "version": 3})
    assert generic.status_code == 422 and "unknown field 'version'" in generic.text


def test_sglang_refusal_is_reported_with_its_message():
    with pytest.raises(EngineError, match=r"HTTP 400: Failed to get weights iterator: /shared/runs/r/weights/v3"):
        engine_for("sglang").reload(client(FakeSglang(visible=set())), ROOT, DIR, 3)


def test_openai_posts_the_generic_body_to_weight_sync_url_and_reports_no_version():
    seen = []

    def handler(request):
        seen.append((str(request.url), request.content))
        return httpx.Response(200, json={"success": True})

    engine = engine_for("openai", weight_sync_url="http://sync.test/update")
    engine.reload(client(handler), ROOT, DIR, 3)
    assert seen == [("http://sync.test/update", b'{"model_path":"/shared/runs/r/weights/v3","version":3}')]
    assert engine.served_version(client(handler), ROOT) is None and len(seen) == 1
    engine_for("openai").reload(client(handler), ROOT, DIR, 4)  # no sync URL: never told
    assert len(seen) == 1


def test_check_server_accepts_a_fit_server():
    check_server(client(FakeVllm()), ROOT, backend="vllm", model_name="m", max_seq_len=128)
    check_server(client(FakeSglang()), ROOT, backend="sglang", model_name="m", max_seq_len=100)
    check_server(client(FakeVllm(max_model_len=8)), ROOT, backend="vllm", model_name="m",
                 max_seq_len=MAX_SEQ_LEN_LIMIT)  # no limit asked: the server's own applies


@pytest.mark.parametrize(("server", "backend", "kwargs", "flag"), [
    (FakeVllm(dev_mode=False), "vllm", {}, "VLLM_SERVER_DEV_MODE=1"),
    (FakeVllm(name="other"), "vllm", {}, "--served-model-name m"),
    (FakeVllm(name="other"), "vllm", {}, "inference.model"),
    (FakeVllm(max_model_len=64), "vllm", {"max_seq_len": 256}, "--max-model-len 256"),
    (FakeSglang(max_model_len=64), "sglang", {"max_seq_len": 256}, "--context-length 256"),
])
def test_check_server_refusals_name_the_flag(server, backend, kwargs, flag):
    with pytest.raises(EngineRefused) as refused:
        check_server(client(server), ROOT, backend=backend, model_name="m", **{"max_seq_len": 128, **kwargs})
    assert flag in str(refused.value)


def test_check_server_names_an_unreachable_url_and_skips_generic_servers():
    def down(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(EngineRefused, match=r"http://engine.test did not answer.*is it up\? is inference.base_url"):
        check_server(client(down), ROOT, backend="vllm", model_name="m", max_seq_len=128)
    check_server(client(down), ROOT, backend="openai", model_name="m", max_seq_len=128)  # not checked


def test_logprobs_probe_tells_processed_from_raw():
    processed, raw = FakeVllm(), FakeVllm()
    raw.processed_logprobs = False
    assert logprobs_after_temperature(client(processed), ROOT, "m", [0, 1])
    assert not logprobs_after_temperature(client(raw), ROOT, "m", [0, 1])


def test_healthy_is_one_get_and_never_raises():
    vllm = FakeVllm()
    assert healthy(client(vllm), ROOT) and vllm.calls == [("GET", "/health")]
    vllm.alive = False
    assert not healthy(client(vllm), ROOT)
    assert not healthy(client(lambda r: httpx.Response(503)), ROOT)


def test_sync_lock_key_hashes_the_server_url():
    key = engine_sync_lock("run", "http://10.0.0.1:8000/v1")
    assert key.startswith("rl:run:engine_sync:") and "10.0.0.1" not in key
    assert key != engine_sync_lock("run", "http://10.0.0.2:8000/v1")


def test_each_call_of_a_reload_gets_only_what_is_left_of_its_bound(monkeypatch):
    """``timeout`` bounds the whole attempt, not each of vLLM's five calls (which could
    otherwise take five times the bound, past the sync lock's expiry)."""
    import rlstream.sampling.engines as engines

    now = [1000.0]
    monkeypatch.setattr(engines, "_clock", lambda: now[0])
    vllm, given = FakeVllm(), {}

    def handler(request):
        given[request.url.path] = request.extensions["timeout"]["read"]
        if request.url.path == "/collective_rpc":
            now[0] += 30.0  # a slow load
        return vllm(request)

    engine_for("vllm").reload(client(handler), ROOT, DIR, 3, timeout=60.0)
    assert given["/pause"] == given["/collective_rpc"] == 60.0
    assert given["/reset_prefix_cache"] == given["/update_weight_version"] == given["/resume"] == 30.0


def test_check_server_refuses_an_answer_that_is_not_json_naming_the_url():
    def proxy_page(request):  # e.g. a web server or proxy in front of the wrong port
        return httpx.Response(200, text="<html>it works</html>")

    with pytest.raises(EngineRefused, match=r"openapi.json answered something that is not a JSON object.*base_url"):
        check_server(client(proxy_page), ROOT, backend="vllm", model_name="m", max_seq_len=128)
