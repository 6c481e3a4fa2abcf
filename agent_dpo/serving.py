"""What the router asks of a serving engine (load a version, answer a chat, unload it), and the
lease book that says when unloading is safe: only once no alias and no live call holds a version.
Engines live in `agent_dpo_adapters` (local_serving, vllm_serving, openai_serving)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent_dpo.registry import ModelRef

VersionKey = tuple[str, str, str]  # (tenant_id, agent_id, version)


@dataclass
class ChatResult:
    """One assistant turn in OpenAI shape: `message` has role, content and maybe tool_calls."""

    message: dict[str, Any]
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ServingBackend(Protocol):
    """A serving engine. `load` runs before the router lets any call resolve to the version, so a
    call start never waits on it; `unload` only after the lease book says nothing holds it."""

    name: str

    async def load(self, ref: ModelRef) -> None: ...

    async def unload(self, ref: ModelRef) -> None: ...

    async def chat(self, ref: ModelRef, messages: list[dict], tools: list[dict] | None = None,
                   **params: Any) -> ChatResult: ...


@dataclass
class Leases:
    """Who holds each trained version: aliases (from rollout documents) and live calls.
    Pure bookkeeping; the router turns "now free" answers into backend unloads."""

    live: Counter = field(default_factory=Counter)
    aliased: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def held(self, key: VersionKey) -> bool:
        tenant_id, agent_id, version = key
        return self.live[key] > 0 or version in self.aliased.get((tenant_id, agent_id), ())

    def acquire(self, key: VersionKey) -> None:
        self.live[key] += 1

    def release(self, key: VersionKey) -> bool:
        """Drop one call's lease; True when the version is now held by nothing."""
        self.live[key] -= 1
        if self.live[key] <= 0:
            del self.live[key]
        return not self.held(key)

    def set_aliases(self, tenant_id: str, agent_id: str, versions: set[str]) -> list[VersionKey]:
        """Record the agent's aliased versions; returns the versions that just became free."""
        before = self.aliased.get((tenant_id, agent_id), set())
        self.aliased[(tenant_id, agent_id)] = set(versions)
        return [k for k in ((tenant_id, agent_id, v) for v in sorted(before - versions))
                if not self.held(k)]

    def live_calls(self, key: VersionKey) -> int:
        return self.live[key]
