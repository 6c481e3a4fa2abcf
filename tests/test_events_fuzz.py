"""Property-based fuzzing of the event parser: whatever bytes arrive, `parse_event` answers with an
accepted event or a rejection with a reason, never an exception, a hang, or garbage accepted."""

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_dpo.events import EVENT_TYPES, REASONS, Event, Rejection, build_envelope, parse_event

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=30)
ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(result, subject: str):
    assert isinstance(result, (Event, Rejection))
    if isinstance(result, Rejection):
        assert result.code in REASONS and result.detail
        assert result.dlq_subject.startswith("agentdpo.dlq.")
    else:
        # nothing accepted that the contract forbids
        assert subject == f"agents.{result.tenant_id}.{result.agent_id}.{result.type}"
        assert result.type in EVENT_TYPES


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash(payload):
    check(parse_event("agents.acme.salon.call.turn", payload), "agents.acme.salon.call.turn")


@FUZZ
@given(st.text(max_size=200))
def test_random_subjects_never_crash(subject):
    result = parse_event(subject, b"{}")
    assert isinstance(result, Rejection)


@FUZZ
@given(st.sampled_from(EVENT_TYPES), json_values)
def test_random_data_is_accepted_or_rejected_with_a_reason(event_type, data):
    env = build_envelope(event_id="e-1", event_type=event_type, tenant_id="acme", agent_id="salon",
                         call_id="c-1", data=data if isinstance(data, dict) else {"x": data})
    subject = f"agents.acme.salon.{event_type}"
    payload = json.dumps(env, allow_nan=True).encode()
    result = parse_event(subject, payload)
    check(result, subject)
    if isinstance(result, Event):
        dumped = result.data.model_dump()
        for value in dumped.values():
            if isinstance(value, float):
                assert math.isfinite(value)


@FUZZ
@given(st.sampled_from(["turn", "score", "scale_max", "asr_confidence", "duration_s"]),
       st.sampled_from(["3", "0.5", True, None, [1], {"a": 1}, float("nan"), float("inf"), -1, 1e400]))
def test_wrong_types_and_non_finite_numbers_are_rejected(field, value):
    data_by_field = {
        "turn": ("call.turn", {"turn": value, "role": "user", "content": "hi"}),
        "score": ("feedback.csat", {"score": value, "scale_max": 5, "source": "survey"}),
        "scale_max": ("feedback.csat", {"score": 1, "scale_max": value, "source": "survey"}),
        "asr_confidence": ("call.turn", {"turn": 0, "role": "user", "content": "hi", "asr_confidence": value}),
        "duration_s": ("call.ended", {"outcome": "completed", "duration_s": value}),
    }
    event_type, data = data_by_field[field]
    env = build_envelope(event_id="e-1", event_type=event_type, tenant_id="acme", agent_id="salon",
                         call_id="c-1", data=data)
    payload = json.dumps(env, allow_nan=True).encode()
    result = parse_event(f"agents.acme.salon.{event_type}", payload)
    optional = field in ("asr_confidence", "duration_s") and value is None
    if optional:
        assert isinstance(result, Event)
    else:
        assert isinstance(result, Rejection), (field, value, result)
        assert result.code in ("invalid_data", "invalid_json")


def test_deep_nesting_and_huge_strings_are_handled():
    deep = b"[" * 100_000 + b"]" * 100_000
    assert parse_event("agents.acme.salon.call.turn", deep).code == "invalid_json"
    huge = json.dumps(build_envelope(event_id="e", event_type="call.turn", tenant_id="acme", agent_id="salon",
                                     call_id="c", data={"turn": 0, "role": "user", "content": "x" * 2_000_000}))
    assert parse_event("agents.acme.salon.call.turn", huge.encode()).code == "payload_too_large"
    nested_data = build_envelope(event_id="e", event_type="call.tool_call", tenant_id="acme", agent_id="salon",
                                 call_id="c", data={"turn": 1, "tool_call_id": "t", "name": "f",
                                                    "arguments": "{}", "result": json.loads("[" * 500 + "]" * 500)})
    assert isinstance(parse_event("agents.acme.salon.call.tool_call", json.dumps(nested_data).encode()), Event)


def test_invalid_utf8_is_rejected_with_reason():
    result = parse_event("agents.acme.salon.call.turn", b'{"schema": "\xff\xfe"}')
    assert result.code == "invalid_utf8" and result.dlq_subject == "agentdpo.dlq.acme.salon"
