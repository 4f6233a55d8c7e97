"""A stand-in for the vLLM / SGLang server ``rlstream up`` launches (tests/unit/test_engine_launch.py):
it takes their command-line flags, forks a helper process into its process group (as vLLM's
API server forks an EngineCore), and serves what the launcher talks to: ``GET /health``,
``GET /v1/models``, ``GET /weight_info`` and ``POST /update_weight_version`` (vLLM dev mode),
``GET /openapi.json``. No model, no completions.

``install(directory)`` writes ``vllm/entrypoints/openai/api_server.py`` and
``sglang/launch_server.py`` shims under ``directory`` that run this file: put ``directory`` on
the engine's ``PYTHONPATH`` (``inference.engine_env``) and ``python -m <module>`` starts the
stand-in. Behaviour from the environment:

- ``STANDIN_RECORD``: a directory; each start writes ``<pid>.json`` there (argv, the engine
  variables it got, its helper's pid).
- ``STANDIN_EXIT``: exit with this code at once, after printing a line (a bad flag).
- ``STANDIN_HEALTH``: the status ``/health`` answers (default 200).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SHIM = "import runpy\nrunpy.run_path({path!r}, run_name='__main__')\n"
ENGINE_ENV = ("VLLM_SERVER_DEV_MODE", "SGLANG_RETURN_ORIGINAL_LOGPROB", "VLLM_CPU_KVCACHE_SPACE",
              "RLSTREAM_REDIS_PASSWORD")


def install(directory: Path) -> Path:
    """Write the ``vllm`` and ``sglang`` module shims under ``directory``; return it."""
    for module in ("vllm.entrypoints.openai.api_server", "sglang.launch_server"):
        parts = module.split(".")
        for i in range(1, len(parts)):
            package = directory.joinpath(*parts[:i])
            package.mkdir(parents=True, exist_ok=True)
            (package / "__init__.py").touch()
        directory.joinpath(*parts[:-1], parts[-1] + ".py").write_text(SHIM.format(path=str(Path(__file__).resolve())))
    return directory


def main() -> None:
    if code := os.environ.get("STANDIN_EXIT"):
        print(f"standin engine: refusing to start (STANDIN_EXIT={code})", flush=True)
        sys.exit(int(code))
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", "--model-path", dest="model")
    parser.add_argument("--served-model-name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int, default=128)
    parser.add_argument("--weight-version", default="default")
    args, _ = parser.parse_known_args()
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # vLLM's EngineCore
    if record := os.environ.get("STANDIN_RECORD"):
        Path(record, f"{os.getpid()}.json").write_text(json.dumps({
            "argv": sys.argv[1:], "env": {k: os.environ[k] for k in ENGINE_ENV if k in os.environ},
            "helper": helper.pid}))
    state = {"weight_version": args.weight_version}
    health = int(os.environ.get("STANDIN_HEALTH", "200"))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(health, {})
            elif self.path == "/v1/models":
                self._reply(200, {"data": [{"id": args.served_model_name or args.model,
                                            "max_model_len": args.max_model_len}]})
            elif self.path == "/weight_info":
                self._reply(200, {"weight_version": state["weight_version"]})
            elif self.path == "/openapi.json":
                self._reply(200, {"paths": {p: {} for p in ("/health", "/v1/completions", "/pause", "/resume",
                                                            "/collective_rpc", "/reset_prefix_cache",
                                                            "/update_weight_version", "/weight_info")}})
            else:
                self._reply(404, {"error": self.path})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/update_weight_version":
                state["weight_version"] = body["new_version"]
                self._reply(200, {"success": True, "new_version": body["new_version"]})
            else:
                self._reply(404, {"error": self.path})

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"standin engine serving {args.model} on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
