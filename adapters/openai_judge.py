"""An OpenAI-compatible chat model as the evaluation judge: given one held-out context and two
candidate assistant turns, it returns "a", "b" or "tie" by a strict rubric and a JSON verdict.
Eval asks in both orders (position swap) and refuses a judge that also labelled the data."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import openai

from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger
from agent_dpo_adapters.openai_finetune import OpenAISettings, make_client

Verdict = Literal["a", "b", "tie"]

RUBRIC = """You judge two candidate replies of a customer-service agent that talks to callers and uses tools.
Both replies answer the same conversation at the same point. Decide which reply is better by these
criteria, in this order of importance:
1. Tool use: when the situation needs a tool, the reply calls the right offered tool with arguments
   that fit its parameter schema and come from the conversation. It never invents facts (times,
   prices, names, bookings) that no tool result or caller message gave.
2. Progress: the reply moves the caller's request forward concretely (specific options, a clear
   confirmation of what was done, the next step), and respects what the caller asked for,
   including a request for a human.
3. Manner: polite and calm; no pressure, no upselling the caller did not ask for, no blame.
4. Fit for a voice call: short, clear sentences; no lists or markup read aloud.
Ignore which reply comes first and do not prefer a reply for being longer. Answer "tie" only when
neither reply is better on any criterion.
Reply with one JSON object and nothing else: {"reason": "<one sentence>", "verdict": "A" | "B" | "tie"}"""

_VERDICT = re.compile(r'"verdict"\s*:\s*"\s*(a|b|tie)\s*"', re.IGNORECASE)


def render_message(message: dict[str, Any]) -> str:
    """One message as plain text the judge can read; tool calls and tool results spelled out."""
    role = message.get("role", "?")
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    lines = [f"[{role}] {content}"] if content else []
    if role == "tool":
        lines = [f"[tool result {message.get('tool_call_id', '?')}] {content}"]
    for call in message.get("tool_calls") or []:
        function = call.get("function", {})
        arguments = function.get("arguments")
        if not isinstance(arguments, str):  # trl-dpo rows hold arguments as objects
            arguments = json.dumps(arguments, ensure_ascii=False)
        lines.append(f"[{role} calls tool {function.get('name')} ({call.get('id', '?')})] {arguments}")
    return "\n".join(lines) or f"[{role}] (empty)"


def render_tools(tools: list[dict[str, Any]]) -> str:
    if not tools:
        return "(no tools offered)"
    lines = []
    for tool in tools:
        function = tool.get("function", tool)
        lines.append(f"- {function.get('name')}: {function.get('description', '')}\n  parameters: "
                     f"{json.dumps(function.get('parameters', {}), ensure_ascii=False, separators=(',', ':'))}")
    return "\n".join(lines)


def judge_messages(prompt: list[dict[str, Any]], tools: list[dict[str, Any]], a: dict[str, Any] | str,
                   b: dict[str, Any] | str) -> list[dict[str, str]]:
    a, b = (_as_message(x) for x in (a, b))
    conversation = "\n".join(render_message(m) for m in prompt)
    user = (f"Tools offered to the agent:\n{render_tools(tools)}\n\n"
            f"Conversation so far:\n{conversation}\n\n"
            f"Reply A:\n{render_message(a)}\n\nReply B:\n{render_message(b)}\n\n"
            "Which reply is better? Answer with the JSON object only.")
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}]


def _as_message(answer: dict[str, Any] | str) -> dict[str, Any]:
    # Eval may hand over raw generated text instead of a parsed Message.
    return {"role": "assistant", "content": answer} if isinstance(answer, str) else answer


def parse_verdict(text: str | None) -> Verdict | None:
    """"a", "b" or "tie" from the judge's reply; None when it gave no readable verdict."""
    if not text:
        return None
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match:
        try:
            verdict = json.loads(match.group(0)).get("verdict")
        except (ValueError, AttributeError):
            verdict = None
        if isinstance(verdict, str) and verdict.strip().lower() in ("a", "b", "tie"):
            return verdict.strip().lower()  # type: ignore[return-value]
    found = _VERDICT.search(text)
    return found.group(1).lower() if found else None  # type: ignore[return-value]


class OpenAIJudge:
    """Compares two answers with a chat model on any OpenAI-compatible endpoint (OpenAI, Azure
    OpenAI with `provider="azure"` and the deployment as `model`, vLLM, a local server).
    `name` ("openai:<model>") is what eval compares with the labeller to refuse self-judging."""

    def __init__(self, model: str, base_url: str | None = None, *, provider: str = "openai",
                 azure_endpoint: str | None = None, api_version: str | None = None,
                 client: openai.OpenAI | None = None, temperature: float = 0.0, seed: int | None = 0,
                 json_mode: bool = True, max_tokens: int = 200, attempts: int = 2):
        self.model = model
        self.name = f"openai:{model}"
        self.temperature, self.seed, self.json_mode = temperature, seed, json_mode
        self.max_tokens, self.attempts = max_tokens, attempts
        self.unparsed = 0  # verdicts the model never gave readably, counted as ties
        self._client = client or make_client(OpenAISettings(provider=provider, base_url=base_url,
                                                            azure_endpoint=azure_endpoint,
                                                            api_version=api_version))
        self._log = get_logger(judge=self.name)

    @classmethod
    def from_spec(cls, spec: str, **options: Any) -> OpenAIJudge:
        """`openai:<model>` (OPENAI_BASE_URL picks the endpoint) or `azure:<deployment>` (endpoint and
        api-version from AZURE_OPENAI_ENDPOINT and OPENAI_API_VERSION), as eval's --judge takes it."""
        provider, _, model = spec.partition(":")
        if provider not in ("openai", "azure") or not model:
            raise AgentDpoError(f"judge {spec!r} is not openai:<model> or azure:<deployment>")
        return cls(model, provider=provider, **options)

    def compare(self, prompt: list[dict[str, Any]], tools: list[dict[str, Any]], a: dict[str, Any] | str,
                b: dict[str, Any] | str) -> Verdict:
        """"a", "b" or "tie" for two answers (Messages or plain text) to the same context."""
        messages = judge_messages(prompt, tools or [], a, b)
        request: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                   "max_tokens": self.max_tokens}
        if self.seed is not None:
            request["seed"] = self.seed
        if self.json_mode:
            request["response_format"] = {"type": "json_object"}
        text = None
        for _ in range(self.attempts):
            try:
                reply = self._client.chat.completions.create(**request)
            except openai.APIStatusError as exc:
                raise AgentDpoError(f"judge {self.name} refused ({exc.status_code}): {exc.message}") from None
            except openai.OpenAIError as exc:
                raise AgentDpoError(f"judge {self.name} failed: {exc}") from None
            text = reply.choices[0].message.content if reply.choices else None
            verdict = parse_verdict(text)
            if verdict is not None:
                return verdict
        self.unparsed += 1
        self._log.warning("judge_verdict_unreadable", reply=(text or "")[:200], counted_as="tie")
        return "tie"
