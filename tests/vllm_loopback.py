"""A loopback HTTP server that speaks the parts of vLLM's OpenAI server that serving uses: runtime
LoRA loading and unloading (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, with vLLM's answers
for a name already loaded or not found), `/v1/models` and `/v1/chat/completions` on the base model
or a loaded adapter. It records every request so tests can assert names are never reloaded."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self


class VllmLoopback:
    """`with VllmLoopback(base="smollm2") as vllm:` then point the backend at `vllm.base_url`."""

    def __init__(self, base: str = "smollm2-135m-instruct"):
        self.base = base
        self.loras: dict[str, str] = {}  # name -> path
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> Self:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    ids = [owner.base, *owner.loras]
                    self._send(200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})
                else:
                    self._send(404, {"object": "error", "message": "Not Found", "code": 404})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with owner._lock:
                    owner.requests.append((self.path, body))
                    status, answer = owner.handle(self.path, body)
                self._send(status, answer)

            def _send(self, status: int, answer: Any) -> None:
                raw = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def _error(status: int, message: str) -> tuple[int, dict]:
        return status, {"object": "error", "message": message, "type": "InvalidUserInput", "code": status}

    def handle(self, path: str, body: dict) -> tuple[int, Any]:
        if path == "/v1/load_lora_adapter":
            name, lpath = body.get("lora_name"), body.get("lora_path")
            if not name or not lpath:
                return self._error(400, "Both 'lora_name' and 'lora_path' must be provided.")
            if name in self.loras:
                return self._error(400, f"The lora adapter '{name}' has already been loaded.")
            if not (Path(lpath) / "adapter_config.json").is_file():
                return self._error(400, f"No adapter found at {lpath}")
            self.loras[name] = lpath
            return 200, f"Success: LoRA adapter '{name}' added successfully."
        if path == "/v1/unload_lora_adapter":
            name = body.get("lora_name")
            if name not in self.loras:
                return self._error(404, f"The lora adapter '{name}' cannot be found.")
            del self.loras[name]
            return 200, f"Success: LoRA adapter '{name}' removed successfully."
        if path == "/v1/chat/completions":
            model = body.get("model")
            if model != self.base and model not in self.loras:
                return self._error(404, f"The model `{model}` does not exist.")
            if body.get("tools"):
                name = body["tools"][0]["function"]["name"]
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "chatcmpl-tool-0", "type": "function",
                     "function": {"name": name, "arguments": json.dumps({"served_by": model})}}]}
                finish = "tool_calls"
            else:
                message = {"role": "assistant", "content": f"served by {model}"}
                finish = "stop"
            return 200, {"id": "chatcmpl-loopback", "object": "chat.completion", "created": int(time.time()),
                         "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        return self._error(404, "Not Found")

    def ops(self, kind: str) -> list[str]:
        """Names sent to one LoRA endpoint, in order (`load` or `unload`)."""
        return [b.get("lora_name") for p, b in self.requests if p == f"/v1/{kind}_lora_adapter"]
