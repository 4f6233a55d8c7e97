"""A minimal OpenAI-compatible inference server for the end-to-end test of
``inference.backend = "openai"``: ``POST /v1/completions`` with token-id prompts (answered
the way vLLM answers with ``return_token_ids`` and ``--logprobs-mode processed_logprobs``),
and SGLang's ``POST /update_weights_from_disk {model_path}``. It serves a local HF
directory with rlstream's own ``LocalPolicy``, one request at a time.

    python tests/e2e/openai_server.py MODEL_DIR PORT_FILE [PORT]

binds 127.0.0.1 on PORT (default: a free one; a restarted server takes its predecessor's), writes
the port to PORT_FILE, and appends every weight update it applied to PORT_FILE.updates (one JSON
line each). It starts with MODEL_DIR's weights, as a restarted engine would.
"""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlstream.sampling.local import LocalPolicy
from rlstream.sampling.torch_setup import load_model_and_tokenizer, setup_torch


def serve(model_dir: str, port_file: Path, port: int = 0) -> None:
    device = setup_torch("cpu", 1, 0)
    model, tokenizer = load_model_and_tokenizer(model_dir, device)
    policy = LocalPolicy.from_model(model.eval(), tokenizer, device, version=0)
    lock = threading.Lock()
    updates = port_file.with_name(port_file.name + ".updates")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/completions":
                self._reply(200, complete(body))
            elif self.path == "/update_weights_from_disk":
                update(body)
                self._reply(200, {"success": True})
            else:
                self._reply(404, {"error": f"no route {self.path}"})

    def complete(body: dict) -> dict:
        with lock:
            completions = policy.generate([body["prompt"]] * body["n"], max_tokens=body["max_tokens"],
                                          temperature=body["temperature"], top_p=body["top_p"],
                                          top_k=max(body["top_k"], 0))
        return {"choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                             "token_ids": c.output_tokens,
                             "logprobs": {"tokens": [f"token_id:{t}" for t in c.output_tokens],
                                          "token_logprobs": c.inference_logprobs}}
                            for i, c in enumerate(completions)]}

    def update(body: dict) -> None:
        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(body["model_path"]).glob("*.safetensors")):
            state.update(load_file(str(f)))
        with lock:
            model.load_state_dict(state, strict=False)
            policy.version = body["version"]
        with updates.open("a") as out:
            out.write(json.dumps(body) + "\n")

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
