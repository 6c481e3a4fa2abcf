"""Serving through OpenAI (or Azure OpenAI, or any compatible API): a version trained there is a
`ft:` model id, so there is nothing to load or unload; each call names its pinned id."""

from __future__ import annotations

from typing import Any

from agent_dpo.errors import AgentDpoError
from agent_dpo.registry import ModelRef
from agent_dpo.serving import ChatResult


class OpenAIBackend:
    name = "openai"

    def __init__(self, client: Any = None, **client_kwargs: Any):
        if client is None:
            from openai import AsyncOpenAI

            client = AsyncOpenAI(**client_kwargs)
        self.client = client

    async def load(self, ref: ModelRef) -> None:
        if ref.version is not None and not ref.serve_name.startswith("ft:"):
            raise AgentDpoError(f"{ref.version}: OpenAI serve name {ref.serve_name!r} is not a ft: model id")

    async def unload(self, ref: ModelRef) -> None:
        return None

    async def chat(self, ref: ModelRef, messages: list[dict], tools: list[dict] | None = None,
                   **params: Any) -> ChatResult:
        kwargs = {k: v for k, v in params.items() if v is not None}
        if tools:
            kwargs["tools"] = tools
        resp = await self.client.chat.completions.create(model=ref.serve_name, messages=messages, **kwargs)
        choice = resp.choices[0]
        message = choice.message.model_dump(exclude_none=True)
        message.setdefault("content", None)
        usage = resp.usage
        return ChatResult(message, choice.finish_reason or "stop",
                          usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
