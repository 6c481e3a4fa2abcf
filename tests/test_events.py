"""The event contract at the byte boundary: every malformed class maps to its rejection code and
dead-letter subject; valid events parse into typed data. Pure: no bus needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent_dpo.events import (
    DLQ_UNKNOWN,
    MAX_PAYLOAD_BYTES,
    CallTurn,
    Event,
    Rejection,
    parse_event,
    subject_for,
)

sys.path.insert(0, str(Path(__file__).parent))
from ingest_fixtures import encode, envelope

TURN = {"turn": 0, "role": "user", "content": "Can I move my appointment?"}
SUBJECT = subject_for("acme", "salon-rebook", "call.turn")


def _turn(**changes) -> dict:
    env = envelope("call.turn", TURN)
    env.update(changes)
    return env


def test_valid_event_parses_and_keeps_unknown_data_keys():
    env = _turn(data={**TURN, "sentiment": "calm"}, extra_top_level="ignored")
    event = parse_event(SUBJECT, encode(env))
    assert isinstance(event, Event)
    assert isinstance(event.data, CallTurn) and event.data.content == TURN["content"]
    assert event.data.model_extra == {"sentiment": "calm"}
    assert event.payload == encode(env)
    assert event.ts.tzinfo is not None


@pytest.mark.parametrize("name, subject, payload, code", [
    ("bad json", SUBJECT, b'{"schema": "agent-dpo.event.v1",', "invalid_json"),
    ("not an object", SUBJECT, b'[1, 2]', "not_an_object"),
    ("subject/envelope mismatch: agent", subject_for("acme", "other-agent", "call.turn"), encode(_turn()),
     "subject_mismatch"),
    ("subject/envelope mismatch: type", subject_for("acme", "salon-rebook", "call.ended"), encode(_turn()),
     "subject_mismatch"),
    ("unknown type", subject_for("acme", "salon-rebook", "call.paused"), encode(_turn(type="call.paused")),
     "unknown_type"),
    ("unknown schema", SUBJECT, encode(_turn(schema="agent-dpo.event.v2")), "unknown_schema"),
    ("missing envelope field", SUBJECT, encode({k: v for k, v in _turn().items() if k != "call_id"}),
     "invalid_envelope"),
    ("missing data field", SUBJECT, encode(_turn(data={"turn": 0, "role": "user"})), "invalid_data"),
    ("payload over the size limit", SUBJECT,
     encode(_turn(data={**TURN, "content": "x" * MAX_PAYLOAD_BYTES})), "payload_too_large"),
    ("invalid utf-8", SUBJECT, encode(_turn()).replace(b"Can I", b"Can \xff"), "invalid_utf8"),
    ("NaN", SUBJECT, encode(_turn()).replace(b'"turn":0', b'"turn":NaN'), "invalid_json"),
    ("Infinity", SUBJECT, encode(_turn(data={"turn": 1, "role": "assistant", "content": "ok"})).replace(
        b'"content":"ok"', b'"content":"ok","asr_confidence":Infinity'), "invalid_json"),
    ("number as string", SUBJECT, encode(_turn(data={**TURN, "turn": "3"})), "invalid_data"),
    ("bool as number", SUBJECT, encode(_turn(data={**TURN, "turn": True})), "invalid_data"),
    ("bad ts: no zone", SUBJECT, encode(_turn(ts="2026-12-04T19:00:00")), "invalid_envelope"),
    ("bad ts: not a date", SUBJECT, encode(_turn(ts="2026-13-45T25:00:00Z")), "invalid_envelope"),
    ("tenant id with a dot", "agents.ac.me.salon-rebook.call.turn", encode(_turn()), "bad_subject"),
    ("event_id not printable", SUBJECT, encode(_turn(event_id="evt\n1")), "invalid_envelope"),
])
def test_each_malformed_class_maps_to_its_code(name, subject, payload, code):
    result = parse_event(subject, payload)
    assert isinstance(result, Rejection), name
    assert result.code == code, (name, result.reason)
    assert result.reason.startswith(code + ": ") and len(result.reason) <= 1024


def test_dead_letter_subject_follows_the_subject_not_the_payload():
    mismatch = parse_event(subject_for("acme", "salon-rebook", "call.turn"), encode(_turn(tenant_id="evil")))
    assert mismatch.dlq_subject == "agentdpo.dlq.acme.salon-rebook"
    assert parse_event("agents.only-two.tokens", b"{}").dlq_subject == DLQ_UNKNOWN
    assert parse_event("elsewhere.acme.salon-rebook.call.turn", encode(_turn())).dlq_subject == DLQ_UNKNOWN


def test_configurable_prefix():
    subject = subject_for("acme", "salon-rebook", "call.turn", prefix="prod.agents")
    assert isinstance(parse_event(subject, encode(_turn()), prefix="prod.agents"), Event)
    assert parse_event(subject, encode(_turn())).code == "bad_subject"
