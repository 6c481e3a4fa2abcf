"""In-process serving with transformers + PEFT: the base model is loaded once, each version is a LoRA
adapter loaded next to it, and every request selects its pinned adapter under one lock, so a swap
is atomic per request and never touches a generation in progress. Prompts go through the project's
tool-aware chat template; generated text is parsed back into an OpenAI message with tool_calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent_dpo.chat_template import parse_assistant_output, render
from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger
from agent_dpo.registry import ModelRef
from agent_dpo.serving import ChatResult

log = get_logger(component="local_serving")
ArtifactFetcher = Callable[[ModelRef], Awaitable[Path]]


def adapter_name(ref: ModelRef) -> str:
    # PEFT keeps adapters in module dicts, whose keys may not hold dots.
    return f"{ref.tenant_id}__{ref.agent_id}__{ref.version}"


class LocalPeftBackend:
    name = "local"

    def __init__(self, model: Any, tokenizer: Any, fetch_artifact: ArtifactFetcher,
                 base_model: str = "", max_new_tokens: int = 128, max_prompt_tokens: int | None = None):
        self.base = model
        self.model = model  # becomes a PeftModel once the first adapter is loaded
        self.tokenizer = tokenizer
        self.fetch_artifact = fetch_artifact
        self.base_model = base_model
        self.max_new_tokens = max_new_tokens
        # For versions trained on a window (truncation_mode keep_end): answer on what they were
        # trained to see, the newest `max_prompt_tokens` of the prompt.
        self.max_prompt_tokens = max_prompt_tokens
        self.adapters: set[str] = set()
        # One generation or adapter change at a time: PEFT's active adapter is model-wide state.
        self._lock = asyncio.Lock()

    @classmethod
    def from_store(cls, base_model: str, store_dir: Path, js=None, **kwargs: Any) -> LocalPeftBackend:
        """The base model from the store (provisioned once), adapters from the NATS object store."""
        from agent_dpo_adapters.hf_models import load_model, load_tokenizer
        from agent_dpo_adapters.nats_artifacts import get_artifact, verify_local

        async def fetch(ref: ModelRef) -> Path:
            if ref.artifact_name and Path(ref.artifact_name).is_dir():
                return verify_local(ref.artifact_name, ref.artifact_digest)
            if js is None:
                raise AgentDpoError(f"{ref.version}: artifact {ref.artifact_name} needs a NATS connection")
            return await get_artifact(js, ref.artifact_name, ref.artifact_digest, Path(store_dir) / "artifacts")

        model = load_model(base_model, store_dir)
        model.eval()
        return cls(model, load_tokenizer(base_model, store_dir), fetch, base_model=base_model, **kwargs)

    async def load(self, ref: ModelRef) -> None:
        if ref.version is None:
            return
        if self.base_model and ref.base_model and ref.base_model != self.base_model:
            raise AgentDpoError(f"{ref.version} was trained on {ref.base_model}, this backend serves "
                                f"{self.base_model}")
        path = await self.fetch_artifact(ref)  # digest-checked before any weight is read
        async with self._lock:
            await asyncio.to_thread(self._load_adapter, adapter_name(ref), path)
        log.info("adapter_loaded", tenant_id=ref.tenant_id, agent_id=ref.agent_id, version=ref.version)

    def _load_adapter(self, name: str, path: Path) -> None:
        if name in self.adapters:
            return
        from peft import PeftModel

        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
        else:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self.model.eval()
        self.adapters.add(name)

    async def unload(self, ref: ModelRef) -> None:
        name = adapter_name(ref)
        async with self._lock:
            if name in self.adapters:
                await asyncio.to_thread(self.model.delete_adapter, name)
                self.adapters.discard(name)
        log.info("adapter_unloaded", tenant_id=ref.tenant_id, agent_id=ref.agent_id, version=ref.version)

    async def chat(self, ref: ModelRef, messages: list[dict], tools: list[dict] | None = None,
                   **params: Any) -> ChatResult:
        async with self._lock:
            return await asyncio.to_thread(self._generate, ref, messages, tools, params)

    def _generate(self, ref: ModelRef, messages: list[dict], tools: list[dict] | None,
                  params: dict[str, Any]) -> ChatResult:
        import contextlib

        import torch

        name = adapter_name(ref)
        if ref.version is not None and name not in self.adapters:
            raise AgentDpoError(f"{ref.version} is not loaded")
        prompt = render(self.tokenizer, messages, tools, add_generation_prompt=True)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        if self.max_prompt_tokens and enc["input_ids"].shape[1] > self.max_prompt_tokens:
            enc = {k: v[:, -self.max_prompt_tokens:] for k, v in enc.items()}
        max_new = int(params.get("max_tokens") or params.get("max_completion_tokens") or self.max_new_tokens)
        temperature = float(params.get("temperature") or 0.0)
        gen: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=float(params.get("top_p") or 1.0))
            if params.get("seed") is not None:
                torch.manual_seed(int(params["seed"]))
        else:
            gen["do_sample"] = False
        end_ids = [i for i in (self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id)
                   if isinstance(i, int) and i >= 0]
        if end_ids:
            gen["eos_token_id"] = end_ids
        if self.model is self.base:
            scope = contextlib.nullcontext()
        elif ref.version is None:
            scope = self.model.disable_adapter()  # the base model, adapters bypassed
        else:
            self.model.set_adapter(name)
            scope = contextlib.nullcontext()
        with scope, torch.no_grad():
            out = self.model.generate(**enc, **gen)
        new = out[0, enc["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        message = parse_assistant_output(text)
        finish = "tool_calls" if message["tool_calls"] else ("length" if len(new) >= max_new else "stop")
        return ChatResult(message, finish, int(enc["input_ids"].shape[1]), len(new))
