"""Checking recorded tool calls: every failure class gets its code and a pointed reason, validators
are compiled once per schema digest, random argument text never crashes the checker, per-tool
stats come out of a real store, and the benchmark prints its ratio line."""

import argparse
import copy
import json
import pickle
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_dpo.benchmarks.toolcheck import build_calls, sample_arguments
from agent_dpo.benchmarks.toolcheck import run as run_bench
from agent_dpo.calls import StoredEvent
from agent_dpo.events import build_envelope, parse_event, subject_for
from agent_dpo.toolcheck import (
    CODES,
    ToolCallVerdict,
    ToolChecker,
    ToolStats,
    catalog_dir,
    check_tool_call,
    load_tool_catalog,
    store_tool_stats,
    tool_call_stats,
)

SALON = load_tool_catalog(catalog_dir() / "salon-rebook")
RESOLVER = load_tool_catalog(catalog_dir() / "appointment-resolver")


def args_for(name: str, tools: list[dict] = SALON, seed: int = 1, **override) -> str:
    fn = next(t["function"] for t in tools if t["function"]["name"] == name)
    args = sample_arguments(fn["parameters"], random.Random(seed))
    args.update(override)
    return json.dumps(args)


def test_catalog_holds_both_example_agents():
    assert sorted(t["function"]["name"] for t in SALON) == [
        "book_slot", "cancel_appointment", "find_slots", "reschedule_appointment", "transfer_to_human"]
    assert sorted(t["function"]["name"] for t in RESOLVER) == [
        "find_provider_availability", "flag_for_staff", "lookup_patient_appointments", "move_appointment"]
    assert all(t["type"] == "function" and t["function"]["strict"] is True for t in SALON + RESOLVER)


def test_sampled_arguments_for_every_catalog_tool_pass():
    checker = ToolChecker()
    for tools in (SALON, RESOLVER):
        for tool in tools:
            name = tool["function"]["name"]
            for seed in range(20):
                verdict = checker.check(tools, name, args_for(name, tools, seed))
                assert verdict == ToolCallVerdict(True, None, None), (name, verdict.reason)


@pytest.mark.parametrize("text", ['{"date_from": "2026-12-08"', "", "not json", '{"a": 1} trailing',
                                  "{'single': 'quotes'}"])
def test_text_that_is_not_json_is_invalid_json(text):
    verdict = check_tool_call(SALON, "find_slots", text)
    assert (verdict.ok, verdict.code) == (False, "invalid_json")
    assert verdict.reason.startswith("arguments are not valid JSON")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_invalid_json(constant):
    verdict = check_tool_call(SALON, "find_slots", args_for("find_slots")[:-1] + f', "max_results": {constant}}}')
    assert verdict.code == "invalid_json"
    assert constant.lstrip("-") in verdict.reason or constant in verdict.reason


@pytest.mark.parametrize("text,kind", [("[]", "array"), ('"2026-12-08"', "string"), ("3", "number"),
                                       ("null", "null"), ("true", "boolean")])
def test_arguments_must_be_an_object(text, kind):
    verdict = check_tool_call(SALON, "find_slots", text)
    assert verdict.code == "not_an_object"
    assert verdict.reason == f"arguments must be a JSON object, got {kind}"


def test_a_tool_not_offered_in_the_call_is_unknown_even_if_another_agent_has_it():
    verdict = check_tool_call(SALON, "move_appointment", args_for("move_appointment", RESOLVER))
    assert verdict.code == "unknown_tool"
    assert "'move_appointment' was not offered" in verdict.reason and "find_slots" in verdict.reason
    assert check_tool_call([], "find_slots", "{}").code == "unknown_tool"


def test_schema_violation_names_the_pointer_and_the_rule():
    verdict = check_tool_call(SALON, "find_slots", args_for("find_slots", date_from="12/08"))
    assert verdict.code == "schema_violation"
    assert verdict.reason == "/date_from: '12/08' does not match '^\\\\d{4}-\\\\d{2}-\\\\d{2}$'"
    assert verdict.rule == "/date_from pattern"


def test_nested_violations_point_into_the_nested_object():
    args = json.loads(args_for("book_slot"))
    args["customer"]["phone"] = "555-0100"
    verdict = check_tool_call(SALON, "book_slot", json.dumps(args))
    assert verdict.code == "schema_violation"
    assert verdict.reason.startswith("/customer/phone: '555-0100' does not match")
    del args["customer"]["email"]
    args["customer"]["phone"] = "+14155550123"
    verdict = check_tool_call(SALON, "book_slot", json.dumps(args))
    assert verdict.reason == "/customer: 'email' is a required property"
    assert verdict.rule == "/customer required email"


@pytest.mark.parametrize("override,fragment", [
    ({"time_of_day": "asap"}, "/time_of_day: 'asap' is not one of"),
    ({"max_results": 11}, "/max_results: 11 is greater than the maximum of 10"),
    ({"max_results": "3"}, "/max_results: '3' is not of type 'integer'"),
    ({"confirmed": True}, "(root): Additional properties are not allowed ('confirmed' was unexpected)"),
])
def test_each_kind_of_violation_reads_like_jsonschema(override, fragment):
    verdict = check_tool_call(SALON, "find_slots", args_for("find_slots", **override))
    assert verdict.code == "schema_violation"
    assert verdict.reason.startswith(fragment)


def test_formats_are_asserted():
    args = json.loads(args_for("book_slot"))
    args["customer"]["email"] = "not-an-address"
    verdict = check_tool_call(SALON, "book_slot", json.dumps(args))
    assert verdict.code == "schema_violation" and verdict.rule == "/customer/email format"


def test_an_invalid_tool_schema_is_reported_not_raised():
    tools = [{"type": "function", "function": {"name": "broken", "description": "x",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}]
    verdict = check_tool_call(tools, "broken", '{"a": "b"}')
    assert verdict.code == "invalid_schema"
    assert "/properties/a/type" in verdict.reason


def test_validators_are_compiled_once_per_schema_digest():
    checker = ToolChecker()
    checker.check(SALON, "find_slots", args_for("find_slots"))
    assert checker.compiles == len(SALON)
    # The same tools as fresh objects (every Call.tools is one), with keys in another order.
    reordered = [json.loads(json.dumps(t, sort_keys=True)) for t in reversed(SALON)]
    for tools in (copy.deepcopy(SALON), reordered, SALON):
        for _ in range(3):
            assert checker.check(tools, "find_slots", args_for("find_slots")).ok
    # Another agent offering an identical schema under another name reuses the validator too.
    alias = [{"type": "function", "function": {**SALON[0]["function"], "name": "alias"}}]
    assert checker.check(alias, "alias", "{}").code == "schema_violation"
    assert checker.compiles == len(SALON)
    assert checker.stats()["validators"] == len(SALON)
    checker.check(RESOLVER, "move_appointment", args_for("move_appointment", RESOLVER))
    assert checker.compiles == len(SALON) + len(RESOLVER)


def test_verdicts_compare_copy_and_pickle_with_their_reason_resolved():
    verdict = check_tool_call(SALON, "find_slots", args_for("find_slots", date_from="12/08"))
    clone = pickle.loads(pickle.dumps(verdict))
    assert clone == verdict and clone.reason == verdict.reason and clone.rule == "/date_from pattern"
    assert ToolCallVerdict(False, "schema_violation", verdict.reason) == verdict


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json.map(json.dumps), st.text(), _json.map(lambda v: json.dumps({"service": v}))),
       st.sampled_from(["find_slots", "book_slot", "transfer_to_human", "nope"]))
def test_random_argument_text_always_yields_a_verdict(text, name):
    verdict = check_tool_call(SALON, name, text)
    assert isinstance(verdict, ToolCallVerdict)
    if verdict.ok:
        assert verdict.code is None and verdict.reason is None
    else:
        assert verdict.code in CODES and isinstance(verdict.reason, str) and verdict.reason


def test_tool_stats_count_calls_failures_and_top_reasons_per_agent_and_tool():
    good, bad_date = args_for("find_slots"), args_for("find_slots", date_from="12/08")
    stats = tool_call_stats([
        ("acme", "salon-rebook", SALON, "find_slots", good),
        ("acme", "salon-rebook", SALON, "find_slots", bad_date),
        ("acme", "salon-rebook", SALON, "find_slots", bad_date.replace("12/08", "1/2")),
        ("acme", "salon-rebook", SALON, "find_slots", "{"),
        ("clinic", "appointment-resolver", RESOLVER, "flag_for_staff", args_for("flag_for_staff", RESOLVER)),
    ])
    rows = {(r["tenant_id"], r["tool"]): r for r in stats.rows()}
    salon = rows[("acme", "find_slots")]
    assert (salon["calls"], salon["failures"]) == (4, 3)
    assert salon["by_code"] == {"schema_violation": 2, "invalid_json": 1}
    assert salon["top_reasons"] == [("schema_violation: /date_from pattern", 2), ("invalid_json", 1)]
    assert rows[("clinic", "flag_for_staff")]["failures"] == 0
    assert ToolStats().rows() == []


def _event(seq: int, etype: str, data: dict, call_id: str = "call-1") -> StoredEvent:
    env = build_envelope(event_id=f"evt-{seq}", event_type=etype, tenant_id="acme", agent_id="salon-rebook",
                         call_id=call_id, data=data, ts=f"2026-12-04T19:00:{seq:02d}.000Z")
    event = parse_event(subject_for("acme", "salon-rebook", etype), json.dumps(env).encode())
    return StoredEvent(event, seq)


def test_tools_stats_reads_a_real_store(tmp_path, capsys):
    from agent_dpo.cli import main
    from agent_dpo_adapters.sqlite_store import SqliteStore

    started = {"system_prompt": "You rebook salon appointments.", "tools": SALON,
               "model": {"name": "smollm2", "version": "v1"}, "channel": "voice"}
    events = [
        _event(1, "call.started", started),
        _event(2, "call.turn", {"turn": 0, "role": "user", "content": "Can I move my cut to Tuesday?"}),
        _event(3, "call.turn", {"turn": 1, "role": "assistant", "content": "Let me look."}),
        _event(4, "call.tool_call", {"turn": 1, "tool_call_id": "tc-1", "name": "find_slots",
                                     "arguments": args_for("find_slots", date_from="tuesday")}),
        _event(5, "call.tool_call", {"turn": 1, "tool_call_id": "tc-2", "name": "find_slots",
                                     "arguments": args_for("find_slots")}),
        _event(6, "call.ended", {"outcome": "completed"}),
        # A call whose call.started has not arrived: what it offered is unknown, so it is skipped.
        _event(7, "call.tool_call", {"turn": 1, "tool_call_id": "tc-9", "name": "find_slots",
                                     "arguments": "{"}, call_id="call-2"),
    ]
    with SqliteStore(tmp_path) as store:
        store.write_batch(events)
        rows = store_tool_stats(store).rows()
    assert [(r["tool"], r["calls"], r["failures"]) for r in rows] == [("find_slots", 2, 1)]

    assert main(["tools", "stats", "--store", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tools"][0]["top_reasons"] == [["schema_violation: /date_from pattern", 1]]
    assert main(["tools", "stats", "--store", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "find_slots" in table and "50.0%" in table


def test_bench_prints_every_contender_and_the_ratio_last(capsys):
    calls = build_calls(200, seed=3)
    assert 0.1 < sum(not check_tool_call(*c).ok for c in calls) / len(calls) < 0.3
    run_bench(argparse.Namespace(calls=300, rounds=1, invalid_share=0.2, seed=3))
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("jsonschema-rs is_valid" in line for line in lines)
    assert any("agent-dpo check, full path" in line for line in lines)
    assert re.fullmatch(r"toolcheck: ratio \d+\.\d\d vs jsonschema-rs", lines[-1])


def test_redacted_placeholders_pass_shape_rules_only():
    """Exports redact phones and e-mails inside tool-call arguments, so a held-out chosen call (and what a model
    trained on it writes) carries `[PHONE]`: the strict check fails it on the phone pattern; the check for
    redacted data passes a placeholder where only the string's shape is wrong, and nothing else."""
    from agent_dpo.redaction import redact_value
    from agent_dpo.toolcheck import check_redacted_call

    raw = json.loads(args_for("book_slot"))
    raw["customer"]["phone"] = "+14155550123"
    raw["customer"]["email"] = "ana@example.com"
    assert check_tool_call(SALON, "book_slot", json.dumps(raw)).ok
    redacted = redact_value(raw)
    assert redacted["customer"]["phone"] == "[PHONE]" and redacted["customer"]["email"] == "[EMAIL]"
    strict = check_tool_call(SALON, "book_slot", json.dumps(redacted))
    assert not strict.ok and strict.code == "schema_violation"
    assert check_redacted_call(SALON, "book_slot", json.dumps(redacted)).ok

    wrong_phone = copy.deepcopy(redacted)
    wrong_phone["customer"]["phone"] = "555"  # a real value of the wrong shape still fails
    assert not check_redacted_call(SALON, "book_slot", json.dumps(wrong_phone)).ok
    missing = copy.deepcopy(redacted)
    del missing["slot_id"]  # and so does everything a placeholder does not explain
    assert not check_redacted_call(SALON, "book_slot", json.dumps(missing)).ok
    in_enum = copy.deepcopy(redacted)
    in_enum["send_confirmation"] = "[EMAIL]"
    assert not check_redacted_call(SALON, "book_slot", json.dumps(in_enum)).ok
    assert not check_redacted_call(SALON, "book_slot", '{"slot_id": ').ok

    # A placeholder inside a combinator (callback: an object with a phone, or null) is a value of its kind too.
    transfer = json.loads(args_for("transfer_to_human"))
    transfer["callback"] = {"date": "2026-11-04", "phone": "[PHONE]", "window_start": "10:00", "window_end": "12:00"}
    assert not check_tool_call(SALON, "transfer_to_human", json.dumps(transfer)).ok
    assert check_redacted_call(SALON, "transfer_to_human", json.dumps(transfer)).ok
    transfer["callback"]["phone"] = "[EMAIL]"  # the wrong kind of placeholder for a phone field
    assert not check_redacted_call(SALON, "transfer_to_human", json.dumps(transfer)).ok
