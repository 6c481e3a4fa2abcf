"""An OpenAI-compatible chat model as eval judge, through the real SDK against the loopback API:
the request carries the rubric, the context, the tools and both answers; scripted verdicts come
back as "a"/"b"/"tie"; swapping positions swaps the verdict; Azure deployments work too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the loopback helper sits beside this file

from openai_loopback import LoopbackOpenAI

from agent_dpo.errors import AgentDpoError
from agent_dpo_adapters.openai_judge import OpenAIJudge, parse_verdict

TOOLS = [{"type": "function", "function": {"name": "book_slot", "description": "Book a slot",
                                           "parameters": {"type": "object",
                                                          "properties": {"slot_id": {"type": "string"}}}}}]
PROMPT = [{"role": "system", "content": "You rebook salon appointments."},
          {"role": "user", "content": "Can I move my haircut to Tuesday afternoon?"}]
GOOD = {"role": "assistant", "content": "I can offer Tuesday at 2pm or 4pm. Which works for you?"}
BOOKS = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "tc-1", "type": "function", "function": {"name": "book_slot", "arguments": {"slot_id": "tue-2pm"}}}]}
PUSHY = {"role": "assistant", "content": "Tuesday is full. You should really add our premium colour package."}


@pytest.fixture
def api(monkeypatch):
    with LoopbackOpenAI() as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback-test")
        monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
        yield server


def test_request_holds_rubric_context_tools_and_both_answers(api):
    api.chat_replies.append('{"reason": "A offers concrete slots politely.", "verdict": "A"}')
    judge = OpenAIJudge("gpt-4.1-mini", base_url=api.base_url)
    assert judge.name == "openai:gpt-4.1-mini"
    assert judge.compare(PROMPT, TOOLS, GOOD, BOOKS) == "a"
    (request,) = api.calls("POST", "/chat/completions")
    body = request.body
    assert body["model"] == "gpt-4.1-mini" and body["temperature"] == 0
    assert body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert system["role"] == "system" and '"verdict"' in system["content"]
    assert "Can I move my haircut to Tuesday afternoon?" in user["content"]
    assert "book_slot" in user["content"] and '"slot_id"' in user["content"]
    a_at, b_at = user["content"].index("Reply A:"), user["content"].index("Reply B:")
    assert a_at < user["content"].index("Tuesday at 2pm or 4pm") < b_at
    assert user["content"].index('calls tool book_slot (tc-1)] {"slot_id": "tue-2pm"}') > b_at


@pytest.mark.parametrize("reply, verdict", [
    ('{"reason": "B books the slot.", "verdict": "B"}', "b"),
    ('{"verdict": "tie", "reason": "same"}', "tie"),
    ('Sure. ```json\n{"reason": "x", "verdict": "a"}\n```', "a"),
])
def test_scripted_verdicts(api, reply, verdict):
    api.chat_replies.append(reply)
    assert OpenAIJudge("judge-model", base_url=api.base_url).compare(PROMPT, TOOLS, GOOD, PUSHY) == verdict


def test_swapping_positions_swaps_the_verdict(api):
    def prefers_concrete_slots(body: dict) -> str:
        text = body["messages"][1]["content"]
        first = "A" if text.index("Tuesday at 2pm") < text.index("Reply B:") else "B"
        return json.dumps({"reason": "concrete slots", "verdict": first})

    api.chat_reply = prefers_concrete_slots
    judge = OpenAIJudge("judge-model", base_url=api.base_url)
    assert judge.compare(PROMPT, TOOLS, GOOD, PUSHY) == "a"
    assert judge.compare(PROMPT, TOOLS, PUSHY, GOOD) == "b"
    assert judge.compare(PROMPT, TOOLS, PUSHY["content"], GOOD["content"]) == "b"  # raw generated text


def test_unreadable_verdict_is_retried_then_counted_as_tie(api):
    api.chat_replies.extend(["I think the first one.", '{"verdict": "B"}'])
    judge = OpenAIJudge("judge-model", base_url=api.base_url)
    assert judge.compare(PROMPT, TOOLS, GOOD, PUSHY) == "b"
    api.chat_replies.extend(["no idea", "still no idea"])
    assert judge.compare(PROMPT, TOOLS, GOOD, PUSHY) == "tie"
    assert judge.unparsed == 1
    assert len(api.calls("POST", "/chat/completions")) == 4


def test_azure_deployment_as_judge(api, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-loopback-key")
    api.chat_replies.append('{"verdict": "A", "reason": "x"}')
    judge = OpenAIJudge("judge-deployment", provider="azure", azure_endpoint=api.azure_endpoint,
                        api_version="2025-04-01-preview")
    assert judge.compare(PROMPT, TOOLS, GOOD, PUSHY) == "a"
    (request,) = api.calls("POST", "/deployments/judge-deployment/chat/completions")
    assert request.query["api-version"] == ["2025-04-01-preview"]
    assert request.headers["api-key"] == "azure-loopback-key"


def test_judge_from_spec(api, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)
    api.chat_replies.append('{"verdict": "B"}')
    judge = OpenAIJudge.from_spec("openai:gpt-4.1-mini")
    assert judge.name == "openai:gpt-4.1-mini"
    assert judge.compare(PROMPT, TOOLS, PUSHY, GOOD) == "b"
    with pytest.raises(AgentDpoError, match="not openai:<model> or azure:<deployment>"):
        OpenAIJudge.from_spec("gpt-4.1-mini")


def test_api_errors_are_one_line(api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")
    with pytest.raises(AgentDpoError, match="OPENAI_API_KEY"):
        OpenAIJudge("judge-model", base_url=api.base_url)


def test_parse_verdict_edges():
    assert parse_verdict(None) is None
    assert parse_verdict('{"verdict": "C"}') is None
    assert parse_verdict('prefix "verdict": "TIE" suffix') == "tie"
