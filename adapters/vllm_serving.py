"""Serving through a vLLM server's runtime LoRA endpoints: each version is loaded once under an
immutable name `<agent>--<version>` (`/v1/load_lora_adapter`), requests name it as their model, and
it is unloaded (`/v1/unload_lora_adapter`) when nothing holds it. A name is never reloaded in place:
new weights are always a new version, so a call pinned to a name always gets the same weights."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger
from agent_dpo.registry import ModelRef
from agent_dpo.serving import ChatResult

log = get_logger(component="vllm_serving")
ArtifactPath = Callable[[ModelRef], Awaitable[Path | str]]


def lora_name(ref: ModelRef) -> str:
    return f"{ref.agent_id}--{ref.version}"


class VllmError(AgentDpoError):
    def __init__(self, status: int, message: str):
        super().__init__(f"vLLM answered {status}: {message}")
        self.status = status


class VllmBackend:
    """`artifact_path(ref)` returns where the vLLM server can read the version's adapter (a path
    on its disk, already digest-checked); the base model is served under `base_served_name`."""

    name = "vllm"

    def __init__(self, base_url: str, artifact_path: ArtifactPath, base_served_name: str | None = None,
                 api_key: str | None = None, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.artifact_path = artifact_path
        self.base_served_name = base_served_name
        self.api_key = api_key
        self.timeout = timeout

    def model_name(self, ref: ModelRef) -> str:
        if ref.version is None:
            return self.base_served_name or ref.serve_name
        return lora_name(ref)

    async def load(self, ref: ModelRef) -> None:
        if ref.version is None:
            return
        path = str(await self.artifact_path(ref))
        try:
            await self._post("/load_lora_adapter", {"lora_name": lora_name(ref), "lora_path": path})
        except VllmError as exc:
            # The same immutable name already there means the same weights: nothing to do.
            if exc.status == 400 and "already" in str(exc).lower():
                return
            raise
        log.info("lora_loaded", tenant_id=ref.tenant_id, agent_id=ref.agent_id, version=ref.version,
                 lora_name=lora_name(ref))

    async def unload(self, ref: ModelRef) -> None:
        if ref.version is None:
            return
        try:
            await self._post("/unload_lora_adapter", {"lora_name": lora_name(ref)})
        except VllmError as exc:
            if exc.status in (400, 404) and ("not found" in str(exc).lower() or "cannot be found" in str(exc).lower()):
                return
            raise
        log.info("lora_unloaded", tenant_id=ref.tenant_id, agent_id=ref.agent_id, version=ref.version,
                 lora_name=lora_name(ref))

    async def chat(self, ref: ModelRef, messages: list[dict], tools: list[dict] | None = None,
                   **params: Any) -> ChatResult:
        body: dict[str, Any] = {"model": self.model_name(ref), "messages": messages}
        if tools:
            body["tools"] = tools
        body.update({k: v for k, v in params.items() if v is not None})
        resp = await self._post("/chat/completions", body)
        choice = resp["choices"][0]
        usage = resp.get("usage") or {}
        return ChatResult(choice["message"], choice.get("finish_reason") or "stop",
                          usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    async def _post(self, path: str, body: dict) -> Any:
        return await asyncio.to_thread(self._post_sync, path, body)

    def _post_sync(self, path: str, body: dict) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise VllmError(exc.code, _error_text(exc.read())) from None
        except (urllib.error.URLError, OSError) as exc:
            raise AgentDpoError(f"vLLM at {self.base_url} unreachable: {exc}") from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")  # the LoRA endpoints answer plain text


def _error_text(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message", err))[:500]
        return str(obj.get("message", err))[:500]
    return str(obj)[:500]
