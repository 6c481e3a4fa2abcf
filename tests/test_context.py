"""The context of an assistant turn: system prompt, every earlier turn in order, tool calls on their
assistant message and their results as `tool` messages right after it."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pairing_fixtures import FIND_SLOTS_OK, SALON_TOOLS, SYSTEM, CallBuilder, args

from agent_dpo.calls import assemble_call
from agent_dpo.context import CallContexts, assistant_message, context_of


def test_context_is_system_then_earlier_turns_with_tool_results_after_their_call():
    call = CallBuilder().basic().ended().call()
    ctx = context_of(call, 3)
    assert [m["role"] for m in ctx] == ["system", "user", "assistant", "tool", "user"]
    assert ctx[0] == {"role": "system", "content": SYSTEM}
    assistant = ctx[2]
    assert assistant["content"] == "Let me look."
    assert assistant["tool_calls"] == [{"id": "t1-0", "type": "function",
                                        "function": {"name": "find_slots", "arguments": args(FIND_SLOTS_OK)}}]
    # A JSON result becomes compact JSON text under the call's id.
    assert ctx[3] == {"role": "tool", "tool_call_id": "t1-0",
                      "content": '{"slots":[{"slot_id":"slot-0a1b2c3d","start":"14:00"}]}'}
    assert context_of(call, 1) == ctx[:2]  # the first assistant turn sees system + the caller


def test_turn_is_its_assistant_message_with_its_tool_calls():
    call = CallBuilder().basic().ended().call()
    assert assistant_message(call, 1)["tool_calls"][0]["function"]["name"] == "find_slots"
    assert "tool_calls" not in assistant_message(call, 3)


def test_tool_errors_and_string_results_become_tool_messages():
    b = CallBuilder().started().user(0, "hi")
    b.event("call.turn", {"turn": 1, "role": "assistant", "content": ""})
    b.event("call.tool_call", {"turn": 1, "tool_call_id": "a", "name": "find_slots",
                               "arguments": args(FIND_SLOTS_OK), "error": "calendar offline"})
    b.event("call.tool_call", {"turn": 1, "tool_call_id": "b", "name": "find_slots",
                               "arguments": args(FIND_SLOTS_OK), "result": "no slots"})
    b.user(2, "ok").assistant(3, "Anything else?")
    ctx = context_of(b.ended().call(), 3)
    assert ctx[-3:] == [{"role": "tool", "tool_call_id": "a", "content": '{"error": "calendar offline"}'},
                        {"role": "tool", "tool_call_id": "b", "content": "no slots"},
                        {"role": "user", "content": "ok"}]
    assert [tc["id"] for tc in ctx[2]["tool_calls"]] == ["a", "b"]  # bus order


def test_arrival_order_does_not_change_the_context():
    b = CallBuilder().basic().ended()
    stored = b.stored()
    shuffled = stored[:]
    random.Random(7).shuffle(shuffled)
    assert context_of(assemble_call(shuffled), 3) == context_of(assemble_call(stored), 3)


def test_contexts_of_one_call_share_their_messages():
    call = CallBuilder().basic().ended().call()
    contexts = CallContexts(call)
    assert contexts.context(3)[:2] == contexts.context(1)
    assert contexts.context(3)[1] is contexts.context(1)[1]
    assert call.tools == SALON_TOOLS
