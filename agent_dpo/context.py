"""The conversation an assistant turn answered: an assembled `Call` becomes OpenAI-shaped chat messages
(system prompt, the turns before it, tool results after each tool-calling assistant message).
Pairing builds every prompt, chosen, rejected and completion from here; exports only change their shape.

Messages here are the neutral shape: OpenAI chat dicts with tool-call `arguments` as the JSON text the
model produced. A tool call's `result` (or `error`) becomes a `tool` message right after its assistant
message: a string result as it is, any other JSON value as compact JSON text, an error as
`{"error": "<text>"}`, and a call with neither (no result recorded) as the empty string.
"""

from __future__ import annotations

import json
from typing import Any

from agent_dpo.calls import Call, ToolCallRecord, TurnRecord
from agent_dpo.events import Message


def system_message(call: Call) -> dict[str, Any]:
    return {"role": "system", "content": call.started.system_prompt if call.started else ""}


def tool_call_dict(record: ToolCallRecord) -> dict[str, Any]:
    return {"id": record.tool_call_id, "type": "function",
            "function": {"name": record.name, "arguments": record.arguments}}


def tool_result_text(record: ToolCallRecord) -> str:
    if record.has_result and (record.result is not None or record.error is None):
        if isinstance(record.result, str):
            return record.result
        return json.dumps(record.result, ensure_ascii=False, separators=(",", ":"))
    if record.error is not None:
        return json.dumps({"error": record.error}, ensure_ascii=False)
    return ""


def assistant_message(call: Call, turn: int) -> dict[str, Any]:
    """The assistant message the call actually had at `turn`, with its tool calls."""
    record = call.turns[turn]
    message: dict[str, Any] = {"role": "assistant", "content": record.content}
    calls = call.tool_calls_of(turn)
    if calls:
        message["tool_calls"] = [tool_call_dict(tc) for tc in calls]
    return message


def tool_messages(call: Call, turn: int) -> list[dict[str, Any]]:
    return [{"role": "tool", "tool_call_id": tc.tool_call_id, "content": tool_result_text(tc)}
            for tc in call.tool_calls_of(turn)]


def turn_messages(call: Call, record: TurnRecord) -> list[dict[str, Any]]:
    """One turn as it appears inside a later turn's context."""
    if record.role == "user":
        return [{"role": "user", "content": record.content}]
    return [assistant_message(call, record.turn), *tool_messages(call, record.turn)]


def message_dict(message: Message) -> dict[str, Any]:
    """A feedback `Message` (preference chosen/rejected, correction) in the neutral shape."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"id": tc.id, "type": "function",
                              "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                             for tc in message.tool_calls]
    return out


class CallContexts:
    """Contexts of every turn of one call, built once in a single pass (linear in the call's length):
    the context of turn t is a prefix of one shared message list, so many examples from one call
    share their message dicts instead of copying them."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.messages: list[dict[str, Any]] = [system_message(call)]
        self._end: dict[int, int] = {}  # turn -> number of messages before it
        for record in call.ordered_turns():
            self._end[record.turn] = len(self.messages)
            self.messages.extend(turn_messages(call, record))

    def context(self, turn: int) -> list[dict[str, Any]]:
        """System message, then every turn before `turn` in order (the turn must exist)."""
        return self.messages[: self._end[turn]]


def context_of(call: Call, turn: int) -> list[dict[str, Any]]:
    """The context of one turn; use `CallContexts` when building several from one call."""
    return CallContexts(call).context(turn)
