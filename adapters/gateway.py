"""A local OpenAI-compatible endpoint, `POST /v1/chat/completions`, in front of a serving backend.
`model` names the agent (`<tenant>/<agent>`) and the `X-Call-Id` header the call: the gateway
resolves and pins a version per call through the router, so a runtime that points its OpenAI client
here gets hot-swapped models with no code change. Plain asyncio HTTP/1.1, no web framework."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from agent_dpo.logs import get_logger
from agent_dpo.registry import ID_RE, ModelRef
from agent_dpo.router import Router
from agent_dpo.serving import ServingBackend

MAX_BODY = 4 << 20
MAX_HEADER = 64 << 10
CALL_HEADER = "x-call-id"
END_HEADER = "x-call-ended"  # "true" on the last request of a call releases its pin at once
log = get_logger(component="gateway")


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class Gateway:
    """Owns the listening socket and the idle sweeper; `close()` stops both."""

    def __init__(self, router: Router, backend: ServingBackend, idle_release_s: float = 900.0):
        self.router = router
        self.backend = backend
        self.idle_release_s = idle_release_s
        self.server: asyncio.Server | None = None
        self._last_seen: dict[tuple[str, str, str], float] = {}
        self._sweeper: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        host = self.server.sockets[0].getsockname()[0]
        return f"http://{host}:{self.port}/v1"

    async def start(self, host: str, port: int) -> Gateway:
        self.server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEADER)
        self._sweeper = asyncio.create_task(self._sweep(), name="gateway-sweeper")
        log.info("gateway_listening", host=host, port=self.port)
        return self

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _sweep(self) -> None:
        """A runtime that never sends X-Call-Ended must not hold versions forever."""
        while True:
            await asyncio.sleep(min(30.0, self.idle_release_s / 2))
            cutoff = time.monotonic() - self.idle_release_s
            for key in [k for k, t in self._last_seen.items() if t < cutoff]:
                self._end_call(key)

    def _end_call(self, key: tuple[str, str, str]) -> None:
        self._last_seen.pop(key, None)
        self.router.release(key[2], key[0], key[1])

    # ---- HTTP ----

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except HttpError as exc:
                    await _write_json(writer, exc.status, _error_body(exc), keep_alive=False)
                    return
                if request is None:
                    return
                method, path, headers, body = request
                keep_alive = headers.get("connection", "").lower() != "close"
                try:
                    status, payload, extra = await self._route(method, path, headers, body)
                except HttpError as exc:
                    status, payload, extra = exc.status, _error_body(exc), {}
                except Exception as exc:  # noqa: BLE001 - one bad request must not kill the gateway
                    log.error("gateway_request_failed", error=f"{type(exc).__name__}: {exc}")
                    status, payload, extra = 500, _error_body(HttpError(500, str(exc), "server_error")), {}
                if isinstance(payload, list):  # server-sent events
                    await _write_sse(writer, payload, extra, keep_alive)
                else:
                    await _write_json(writer, status, payload, keep_alive, extra)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes):
        path = path.split("?", 1)[0]
        if path in ("/healthz", "/health"):
            return 200, {"ok": True}, {}
        if path == "/v1/models":
            return 200, {"object": "list", "data": [
                {"id": f"{t}/{a}", "object": "model", "owned_by": t} for t, a in self.router.agents()]}, {}
        if path.startswith("/v1/calls/"):
            return self._call(method, path)
        if path != "/v1/chat/completions":
            raise HttpError(404, f"no route {path}", "not_found")
        if method != "POST":
            raise HttpError(405, "use POST")
        try:
            req = json.loads(body or b"null")
        except ValueError as exc:
            raise HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(req, dict):
            raise HttpError(400, "body must be a JSON object")
        return await self._chat(req, headers)

    def _call(self, method: str, path: str):
        """`GET /v1/calls/<tenant>/<agent>/<call_id>` pins the call (if new) and says what serves it,
        so a runtime can stamp `call.started` before the first turn; `DELETE` ends the call."""
        parts = path[len("/v1/calls/"):].split("/")
        if len(parts) != 3 or not all(ID_RE.match(p) for p in parts[:2]) or not parts[2]:
            raise HttpError(404, "use /v1/calls/<tenant>/<agent>/<call_id>", "not_found")
        tenant_id, agent_id, call_id = parts
        key = (tenant_id, agent_id, call_id)
        if method == "DELETE":
            self._end_call(key)
            return 200, {"released": True}, {}
        if method != "GET":
            raise HttpError(405, "use GET or DELETE")
        ref = self.router.resolve(tenant_id, agent_id, call_id)
        self._last_seen[key] = time.monotonic()
        model = {"name": ref.serve_name, **({"version": ref.version} if ref.version else {})}
        return 200, {"tenant_id": tenant_id, "agent_id": agent_id, "call_id": call_id, "model": model,
                     "arm": ref.arm}, {"X-Model-Version": _version_label(ref)}

    async def _chat(self, req: dict[str, Any], headers: dict[str, str]):
        model = req.get("model")
        parts = model.split("/") if isinstance(model, str) else []
        if len(parts) != 2 or not all(ID_RE.match(p) for p in parts):
            raise HttpError(400, f"model must be <tenant>/<agent>, got {model!r}", "model_not_found")
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise HttpError(400, "messages must be a non-empty list of message objects")
        tools = req.get("tools") or None
        tenant_id, agent_id = parts
        call_id = headers.get(CALL_HEADER) or ""
        one_shot = not call_id
        if one_shot:
            call_id = f"gw-{uuid.uuid4().hex}"  # no call to pin: this request alone
        if len(call_id) > 128 or not call_id.isprintable():
            raise HttpError(400, "X-Call-Id must be 1-128 printable characters")
        key = (tenant_id, agent_id, call_id)
        ref = self.router.resolve(tenant_id, agent_id, call_id)
        self._last_seen[key] = time.monotonic()
        try:
            params = {k: req.get(k) for k in ("max_tokens", "max_completion_tokens", "temperature", "top_p",
                                              "seed")}
            result = await self.backend.chat(ref, messages, tools, **params)
        finally:
            if one_shot or headers.get(END_HEADER, "").lower() in ("1", "true", "yes"):
                self._end_call(key)
        message = dict(result.message)
        if not message.get("tool_calls"):
            message.pop("tool_calls", None)
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": ref.serve_name,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason,
                         "logprobs": None}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
            "system_fingerprint": _version_label(ref),
        }
        extra = {"X-Model-Version": _version_label(ref), "X-Call-Id": call_id}
        if req.get("stream"):
            return 200, _as_chunks(response), extra
        return 200, response, extra


def _version_label(ref: ModelRef) -> str:
    return ref.version or "base"


def _as_chunks(response: dict) -> list[dict]:
    """The whole answer as OpenAI stream chunks (one delta, then the finish), for clients that stream."""
    choice = response["choices"][0]
    message = choice["message"]
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(message["tool_calls"])]
    head = {k: response[k] for k in ("id", "created", "model", "system_fingerprint")}
    return [
        {**head, "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]},
        {**head, "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"], "logprobs": None}]},
    ]


def _error_body(exc: HttpError) -> dict:
    return {"error": {"message": exc.message, "type": exc.code, "param": None, "code": exc.code}}


async def _read_request(reader: asyncio.StreamReader):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise HttpError(400, "incomplete request") from None
    except asyncio.LimitOverrunError:
        raise HttpError(413, "headers too large") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, path, _version = lines[0].split(" ", 2)
    except ValueError:
        raise HttpError(400, "bad request line") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        raise HttpError(400, "chunked request bodies are not supported; send Content-Length")
    try:
        length = int(headers.get("content-length") or 0)
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if length > MAX_BODY:
        raise HttpError(413, f"body over {MAX_BODY} bytes")
    body = await reader.readexactly(length) if length else b""
    return method, path, headers, body


async def _write_json(writer: asyncio.StreamWriter, status: int, payload: Any, keep_alive: bool,
                      extra: dict[str, str] | None = None) -> None:
    raw = json.dumps(payload).encode()
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: application/json",
            f"Content-Length: {len(raw)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    head += [f"{k}: {v}" for k, v in (extra or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + raw)
    await writer.drain()


async def _write_sse(writer: asyncio.StreamWriter, chunks: list[dict], extra: dict[str, str],
                     keep_alive: bool) -> None:
    data = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Cache-Control: no-cache",
            f"Content-Length: {len(data)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    head += [f"{k}: {v}" for k, v in extra.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
    await writer.drain()


async def start_gateway(router: Router, backend: ServingBackend, host: str = "127.0.0.1", port: int = 8000,
                        idle_release_s: float = 900.0) -> Gateway:
    """Listen for OpenAI chat completions; `await gateway.close()` to stop."""
    return await Gateway(router, backend, idle_release_s).start(host, port)
