"""The tool-aware chat template: tools and tool calls reach the model's text, and what the model writes
comes back as the same OpenAI assistant message."""

# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import smollm2_store  # noqa: F401  (pytest fixture)

from agent_dpo.chat_template import parse_assistant_output, render

TOOLS = [{"type": "function", "function": {
    "name": "book_slot", "description": "Book a salon slot",
    "parameters": {"type": "object", "properties": {"date": {"type": "string"}, "time": {"type": "string"}},
                   "required": ["date"]}}}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_store):
    from agent_dpo_adapters.hf_models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct", smollm2_store)


def conversation(arguments):
    return [
        {"role": "system", "content": "You are the salon's booking agent."},
        {"role": "user", "content": "Can I come Tuesday at 2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "tc-1", "type": "function", "function": {"name": "book_slot", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "tc-1", "content": '{"booked": true}'},
        {"role": "assistant", "content": "Booked: Tuesday 2pm."},
    ]


def test_tools_tool_calls_and_tool_results_are_rendered(tokenizer):
    text = render(tokenizer, conversation({"date": "2026-12-08", "time": "14:00"}), TOOLS)
    assert '"name": "book_slot"' in text and "Book a salon slot" in text  # the offered tool
    assert ('<tool_call>{"name": "book_slot", "arguments": {"date": "2026-12-08", "time": "14:00"}}'
            '</tool_call><|im_end|>') in text
    assert '<|im_start|>tool\n<tool_response id="tc-1">\n{"booked": true}\n</tool_response>' in text
    assert text.count("<|im_start|>system") == 1
    assert "None" not in text  # content: null renders as nothing


def test_object_and_text_arguments_render_the_same(tokenizer):
    as_object = render(tokenizer, conversation({"date": "2026-12-08"}), TOOLS)
    as_text = render(tokenizer, conversation('{"date": "2026-12-08"}'), TOOLS)
    assert as_object == as_text


def test_prompt_with_generation_prompt_is_a_prefix_of_prompt_plus_answer(tokenizer):
    # Trainers find the completion by this prefix; a template that breaks it trains on the wrong tokens.
    messages = conversation({"date": "2026-12-08"})
    prompt = render(tokenizer, messages[:2], TOOLS, add_generation_prompt=True)
    full = render(tokenizer, messages[:3], TOOLS)
    assert full.startswith(prompt)


def test_no_tools_no_system_is_plain_chatml(tokenizer):
    text = render(tokenizer, [{"role": "user", "content": "hi"}], None, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_rendered_assistant_turn_parses_back(tokenizer):
    messages = conversation({"date": "2026-12-08", "time": "14:00"})
    prompt = render(tokenizer, messages[:2], TOOLS, add_generation_prompt=True)
    generated = render(tokenizer, messages[:3], TOOLS)[len(prompt):]
    parsed = parse_assistant_output(generated)
    assert parsed["content"] is None
    [call] = parsed["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "book_slot"
    assert json.loads(call["function"]["arguments"]) == {"date": "2026-12-08", "time": "14:00"}


def test_text_and_several_calls_parse_back():
    text = ('Let me check both.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call><|im_end|>junk')
    parsed = parse_assistant_output(text)
    assert parsed["content"] == "Let me check both."
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["a", "b"]
    assert [json.loads(c["function"]["arguments"]) for c in parsed["tool_calls"]] == [{"x": 1}, {"y": 2}]
    assert parse_assistant_output("Just words.") == {"role": "assistant", "content": "Just words.",
                                                     "tool_calls": []}


def test_malformed_block_stays_a_tool_call_with_raw_arguments():
    parsed = parse_assistant_output('<tool_call>{"name": "book_slot", "arguments": {"date": </tool_call>')
    [call] = parsed["tool_calls"]
    assert call["function"]["name"] == "book_slot"
    with pytest.raises(ValueError):
        json.loads(call["function"]["arguments"])
    # cut off by the length limit: still a (broken) call, not text
    cut = parse_assistant_output('<tool_call>{"name": "book_slot", "argu')
    assert cut["content"] is None and cut["tool_calls"][0]["function"]["name"] == "book_slot"
