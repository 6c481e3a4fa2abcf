"""A deterministic serving backend for router and gateway tests: it implements the serving
protocol, records every load and unload, and answers with the version that served the request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from agent_dpo.registry import ModelRef, VersionManifest
from agent_dpo.serving import ChatResult


class EchoBackend:
    name = "echo"

    def __init__(self, fail_versions: set[str] | None = None, load_delay: float = 0.0):
        self.loaded: set[str] = set()
        self.events: list[tuple[str, str]] = []
        self.fail_versions = fail_versions or set()
        self.load_delay = load_delay

    async def load(self, ref: ModelRef) -> None:
        if self.load_delay:
            await asyncio.sleep(self.load_delay)
        if ref.version in self.fail_versions:
            raise RuntimeError(f"cannot load {ref.version}")
        self.loaded.add(ref.version)
        self.events.append(("load", ref.version))

    async def unload(self, ref: ModelRef) -> None:
        self.loaded.discard(ref.version)
        self.events.append(("unload", ref.version))

    async def chat(self, ref: ModelRef, messages: list[dict], tools: list[dict] | None = None,
                   **params: Any) -> ChatResult:
        if ref.version is not None and ref.version not in self.loaded:
            raise RuntimeError(f"{ref.version} served while not loaded")
        served = ref.version or "base"
        if tools:
            name = tools[0]["function"]["name"]
            return ChatResult({"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": name, "arguments": json.dumps({"served_by": served})}}]},
                finish_reason="tool_calls")
        return ChatResult({"role": "assistant", "content": f"served by {served}"})


def manifest(version: str, tenant: str = "acme", agent: str = "rebook", **kw) -> VersionManifest:
    kw.setdefault("base_model", "smollm2-135m-instruct")
    return VersionManifest(tenant_id=tenant, agent_id=agent, version=version, serve_name=f"{agent}--{version}",
                           method="dpo", **kw)
