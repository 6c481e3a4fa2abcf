"""The JSON Schema of one OpenAI preference fine-tuning row: well-formed rows (tool calls, tool
results, extra meta) pass; each broken form fails with a pointer to the spot and a reason."""

import copy
import json

import pytest

from agent_dpo.schemas import OPENAI_PREFERENCE_ROW, load_schema, openai_file_errors, openai_row_errors

TOOLS = [{"type": "function", "function": {
    "name": "book_slot", "description": "Book a salon slot", "strict": True,
    "parameters": {"type": "object", "properties": {"slot_id": {"type": "string"}},
                   "required": ["slot_id"], "additionalProperties": False}}}]

ROW = {
    "input": {
        "messages": [
            {"role": "system", "content": "You rebook salon appointments."},
            {"role": "user", "content": "Can I move my haircut to Tuesday?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "tc-1", "type": "function",
                 "function": {"name": "find_slots", "arguments": "{\"day\": \"tuesday\"}"}}]},
            {"role": "tool", "tool_call_id": "tc-1", "content": "[{\"slot_id\": \"s-2pm\"}]"},
            {"role": "user", "content": "2pm is fine."},
        ],
        "tools": TOOLS,
        "parallel_tool_calls": False,
    },
    "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "tc-2", "type": "function", "function": {"name": "book_slot", "arguments": "{\"slot_id\": \"s-2pm\"}"}}]}],
    "non_preferred_output": [{"role": "assistant", "content": "Would you like our premium colour package too?"}],
    "meta": {"call_id": "call-42", "signal": "preference"},
}


def broken(edit):
    row = copy.deepcopy(ROW)
    edit(row)
    return openai_row_errors(row)


def test_schema_is_valid_2020_12():
    schema = load_schema(OPENAI_PREFERENCE_ROW)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert openai_row_errors(ROW) == []


def test_minimal_text_row_and_developer_role_pass():
    row = {"input": {"messages": [{"role": "developer", "content": "Be brief."},
                                  {"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
           "preferred_output": [{"role": "assistant", "content": "Hello!"}],
           "non_preferred_output": [{"role": "assistant", "content": [{"type": "text", "text": "What."}]}]}
    assert openai_row_errors(row) == []


@pytest.mark.parametrize("edit, pointer, reason", [
    (lambda r: r.pop("preferred_output"), "/", "'preferred_output' is a required property"),
    (lambda r: r["input"].pop("messages"), "/input", "'messages' is a required property"),
    (lambda r: r["input"].update(messages=[]), "/input/messages", "has 0 items, at least 1"),
    (lambda r: r["preferred_output"].append({"role": "assistant", "content": "Also this."}),
     "/preferred_output", "has 2 items, at most 1"),
    (lambda r: r.update(non_preferred_output=[]), "/non_preferred_output", "has 0 items, at least 1"),
    (lambda r: r.update(non_preferred_output={"role": "assistant", "content": "x"}),
     "/non_preferred_output", "is not of type 'array'"),
    (lambda r: r["non_preferred_output"][0].update(role="user"), "/non_preferred_output/0/role",
     "'assistant' was expected"),
    (lambda r: r["preferred_output"][0]["tool_calls"][0]["function"].update(arguments={"slot_id": "s-2pm"}),
     "/preferred_output/0/tool_calls/0/function/arguments", "is not of type 'string'"),
    (lambda r: r["preferred_output"][0].pop("tool_calls"), "/preferred_output/0", "'tool_calls' is a required"),
    (lambda r: r["preferred_output"][0]["tool_calls"][0].update(type="code"),
     "/preferred_output/0/tool_calls/0/type", "'function' was expected"),
    (lambda r: r["input"]["messages"][3].pop("tool_call_id"), "/input/messages/3",
     "'tool_call_id' is a required property"),
    (lambda r: r["input"]["messages"][1].update(role="caller"), "/input/messages/1/role",
     "is not one of ['system', 'developer', 'user', 'assistant', 'tool']"),
    (lambda r: r["input"]["messages"][0].pop("content"), "/input/messages/0", "'content' is a required"),
    (lambda r: r["input"]["tools"][0]["function"].update(name="book slot!"), "/input/tools/0/function/name",
     "does not match"),
    (lambda r: r["input"].update(parallel_tool_calls="no"), "/input/parallel_tool_calls",
     "is not of type 'boolean'"),
    (lambda r: r["input"].update(chosen="x"), "/input", "Additional properties are not allowed ('chosen'"),
])
def test_broken_row_fails_with_pointer_and_reason(edit, pointer, reason):
    errors = broken(edit)
    assert errors, "the broken row passed"
    assert any(e.startswith(pointer + ":") and reason in e for e in errors), errors


def test_file_check_names_the_line(tmp_path):
    bad = copy.deepcopy(ROW)
    bad["preferred_output"][0]["tool_calls"][0]["function"]["arguments"] = {"slot_id": "s-2pm"}
    path = tmp_path / "openai-dpo.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(bad) + "\n{not json\n")
    errors = openai_file_errors(path)
    assert errors[0].startswith("line 2: /preferred_output/0/tool_calls/0/function/arguments:")
    assert errors[1].startswith("line 3: not JSON")
