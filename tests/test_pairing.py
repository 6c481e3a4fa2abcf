"""The five signals into pairs and KTO examples, and every reason something is left out
(spec/events-v1.md "From a call to training data"). Calls are built from real envelopes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pairing_fixtures import (
    BOOK_OK,
    FIND_SLOTS_BAD,
    FIND_SLOTS_OK,
    CallBuilder,
    args,
    assistant,
)

from agent_dpo.context import assistant_message, context_of
from agent_dpo.pairing import PairingConfig, build_examples

TENANT, AGENT = "acme-salons", "salon-rebook"
GOOD = assistant("I have Tuesday at 2pm or 4pm. Which suits you?")
PUSHY = assistant("You should really buy our premium package too.")
BAD_CALL = assistant(None, ("find_slots", args(FIND_SLOTS_BAD)))


def build(*calls, **config):
    return build_examples(calls, TENANT, AGENT, PairingConfig(**config) if config else None)


def reasons(examples):
    return sorted(d.reason for d in examples.drops)


# ---- preference and correction ----------------------------------------------------------------------

def test_preference_gives_a_pair_on_the_context_before_its_turn():
    call = CallBuilder().basic().ended().preference(3, GOOD, PUSHY).call()
    ex = build(call)
    [pair] = ex.pairs
    assert (pair.signal, pair.turn, pair.rater) == ("preference", 3, "csm")
    assert pair.prompt == context_of(call, 3)
    assert pair.chosen["content"] == GOOD["content"] and pair.rejected["content"] == PUSHY["content"]
    assert pair.tools == call.tools
    assert pair.event_ids == (call.feedback[0].event_id,)


def test_correction_rejects_what_the_call_actually_said_with_its_tool_calls():
    corrected = assistant("Let me check Tuesday afternoon for you.", ("find_slots", args(FIND_SLOTS_OK)))
    call = CallBuilder().basic().ended().correction(1, corrected).call()
    [pair] = build(call).pairs
    assert pair.signal == "correction"
    assert pair.rejected == assistant_message(call, 1)
    assert pair.rejected["tool_calls"][0]["function"]["name"] == "find_slots"
    assert pair.chosen["content"] == corrected["content"]


def test_correction_equal_to_the_original_answer_is_dropped():
    same = assistant("Booked you for Tuesday at 2pm. See you then!")
    ex = build(CallBuilder().basic().ended().correction(3, same).call())
    assert ex.pairs == [] and reasons(ex) == ["chosen_equals_rejected"]


@pytest.mark.parametrize("chosen", [
    BAD_CALL,  # schema violation
    assistant(None, ("find_slots", "{not json")),
    assistant(None, ("order_pizza", "{}")),  # no such tool offered
])
def test_chosen_with_an_invalid_tool_call_is_never_emitted(chosen):
    call = CallBuilder().basic().ended().preference(3, chosen, PUSHY).correction(1, chosen).call()
    ex = build(call)
    assert ex.pairs == []
    assert reasons(ex) == ["invalid_tool_call_chosen"] * 2


def test_rejected_may_hold_an_invalid_tool_call():
    [pair] = build(CallBuilder().basic().ended().preference(3, GOOD, BAD_CALL).call()).pairs
    assert pair.rejected["tool_calls"][0]["function"]["arguments"] == args(FIND_SLOTS_BAD)


@pytest.mark.parametrize(("turn", "reason"), [(9, "feedback_turn_missing"), (2, "feedback_turn_not_assistant")])
def test_feedback_on_a_missing_or_user_turn_is_dropped(turn, reason):
    call = (CallBuilder().basic().ended().preference(turn, GOOD, PUSHY)
            .correction(turn, GOOD).thumbs(turn, True).call())
    ex = build(call)
    assert ex.pairs == [] and ex.kto == []
    assert reasons(ex) == [reason] * 3


# ---- schema retry ----------------------------------------------------------------------------------

def retry_call(between_user: bool = False, retry_tool: str = "find_slots", bad_args: str | None = None):
    b = (CallBuilder().started().user(0, "Haircut next Tuesday?")
         .assistant(1, "Checking.", ("find_slots", bad_args or args(FIND_SLOTS_BAD))))
    nxt = 2
    if between_user:
        b.user(2, "hello?")
        nxt = 3
    retry_args = args(FIND_SLOTS_OK) if retry_tool == "find_slots" else args(BOOK_OK)
    return b.assistant(nxt, "Checking again.", (retry_tool, retry_args)).ended().call()


@pytest.mark.parametrize("bad_args", [args(FIND_SLOTS_BAD), "{'service': 'haircut'", '["haircut"]'])
def test_failing_tool_call_fixed_by_the_next_assistant_turn_gives_a_pair(bad_args):
    call = retry_call(bad_args=bad_args)
    [pair] = build(call).pairs
    assert (pair.signal, pair.turn) == ("schema_retry", 1)
    assert pair.prompt == context_of(call, 1)
    assert pair.chosen == assistant_message(call, 2)
    assert pair.rejected == assistant_message(call, 1)


def test_unknown_tool_is_a_failing_call_but_a_retry_must_call_the_same_name():
    b = (CallBuilder().started().user(0, "hi").assistant(1, "x", ("book", args(BOOK_OK)))
         .assistant(2, "y", ("book_slot", args(BOOK_OK))).ended())
    ex = build(b.call())
    assert ex.pairs == [] and reasons(ex) == ["failed_tool_call_without_retry"]


def test_no_retry_pair_across_a_user_turn_or_to_another_tool():
    for call in (retry_call(between_user=True), retry_call(retry_tool="book_slot")):
        ex = build(call)
        assert ex.pairs == []
        assert reasons(ex) == ["failed_tool_call_without_retry"]


# ---- thumbs and CSAT --------------------------------------------------------------------------------

def test_thumbs_give_kto_examples_labelled_by_up():
    call = CallBuilder().basic().ended().thumbs(3, True).thumbs(1, False, rater="judge").call()
    ex = build(call)
    by_turn = {k.turn: k for k in ex.kto}
    assert by_turn[3].label is True and by_turn[1].label is False
    assert by_turn[3].completion == assistant_message(call, 3)
    assert by_turn[3].prompt == context_of(call, 3)
    assert {k.signal for k in ex.kto} == {"thumbs"}


def test_disagreeing_thumbs_on_one_turn_are_dropped_and_agreeing_ones_merge():
    ex = build(CallBuilder().basic().ended().thumbs(3, True).thumbs(3, False, rater="csm")
               .thumbs(1, True).thumbs(1, True, rater="judge").call())
    assert [k.turn for k in ex.kto] == [1]
    assert len(ex.kto[0].event_ids) == 2 + 2  # both thumbs, the turn and its tool call
    assert reasons(ex) == ["conflicting_thumbs"] * 2


@pytest.mark.parametrize(("score", "scale", "label"), [(5, 5, True), (8, 10, True), (2, 5, False), (4, 10, False)])
def test_csat_labels_every_assistant_turn(score, scale, label):
    call = CallBuilder().basic().ended().csat(score, scale).call()
    ex = build(call)
    assert [(k.turn, k.label, k.signal) for k in ex.kto] == [(1, label, "csat"), (3, label, "csat")]


def test_csat_in_between_gives_nothing_and_thresholds_are_configurable():
    call = CallBuilder().basic().ended().csat(3, 5).call()
    ex = build(call)
    assert ex.kto == [] and reasons(ex) == ["csat_neutral"]
    assert {k.label for k in build(call, csat_desirable=0.6).kto} == {True}
    assert {k.label for k in build(call, csat_undesirable=0.6, csat_desirable=0.9).kto} == {False}


def test_latest_csat_stands_and_thumbs_override_csat_on_their_turn():
    call = CallBuilder().basic().ended().csat(1, 5).csat(5, 5, source="csm").thumbs(3, False).call()
    ex = build(call)
    assert sorted((k.turn, k.label, k.signal) for k in ex.kto) == [(1, True, "csat"), (3, False, "thumbs")]
    assert reasons(ex) == ["csat_superseded", "overridden_by_thumbs"]


def test_desirable_turn_with_an_invalid_tool_call_is_dropped_undesirable_is_kept():
    b = (CallBuilder().started().user(0, "hi").assistant(1, "Checking.", ("find_slots", args(FIND_SLOTS_BAD)))
         .user(2, "ok?").assistant(3, "Done.").ended())
    good = build(_with(b, "csat", 5))
    assert [k.turn for k in good.kto] == [3]
    assert "invalid_tool_call_desirable" in reasons(good)
    bad = build(_with(b, "csat", 1))
    assert [(k.turn, k.label) for k in bad.kto] == [(1, False), (3, False)]
    thumbs_up = build(_with(b, "thumbs", 1))
    assert thumbs_up.kto == [] and "invalid_tool_call_desirable" in reasons(thumbs_up)


def _with(builder: CallBuilder, kind: str, value: int):
    """A copy of the builder's call with one more feedback event."""
    copy = CallBuilder(builder.call_id)
    copy.envelopes = [json.loads(json.dumps(e)) for e in builder.envelopes]
    copy._n = builder._n
    if kind == "csat":
        copy.csat(value, 5)
    else:
        copy.thumbs(value, True)
    return copy.call()


def test_last_turn_policy_credits_only_the_last_assistant_turn():
    call = CallBuilder().basic().ended().csat(5, 5).call()
    assert [k.turn for k in build(call, csat_policies=("last-turn",)).kto] == [3]


# ---- calls that give nothing ------------------------------------------------------------------------

def test_incomplete_calls_and_calls_without_call_started_give_nothing():
    open_call = CallBuilder("c-open").basic().preference(3, GOOD, PUSHY).csat(5).call()
    headless = CallBuilder("c-headless")
    headless.user(0, "hi").assistant(1, "hello").ended().thumbs(1, True)
    ex = build(open_call, headless.call())
    assert ex.pairs == [] and ex.kto == []
    assert reasons(ex) == ["call_incomplete", "call_started_missing"]
    assert (ex.calls_seen, ex.calls_complete) == (2, 0)


def test_conflicting_turns_drop_examples_that_touch_them():
    b = CallBuilder().basic().ended().thumbs(1, True).thumbs(3, True)
    b.event("call.turn", {"turn": 2, "role": "user", "content": "Actually, Wednesday."})  # same turn, new text
    ex = build(b.call())
    assert [k.turn for k in ex.kto] == [1]  # turn 1's context is before the conflict
    assert reasons(ex) == ["conflicting_turn"]


def test_missing_turns_drop_examples_after_the_hole():
    b = (CallBuilder().started().user(0, "hi").assistant(1, "Hello!").assistant(3, "Still there?")
         .ended().thumbs(1, True).thumbs(3, True))
    ex = build(b.call())
    assert [k.turn for k in ex.kto] == [1] and reasons(ex) == ["turns_missing"]


def test_another_agents_call_is_never_used():
    other = CallBuilder(agent="other-agent").basic().ended().preference(3, GOOD, PUSHY).call()
    ex = build(other)
    assert ex.pairs == [] and reasons(ex) == ["foreign_agent"]


# ---- the shared-prefix CSAT policy ------------------------------------------------------------------

def prefix_calls():
    def call(call_id, answer, score):
        return (CallBuilder(call_id).started().user(0, "Haircut next Tuesday afternoon?")
                .assistant(1, answer).ended().csat(score, 5).call())
    return [call("c1", "I have 2pm or 4pm on Tuesday, which suits you?", 5),
            call("c2", "Tuesday is busy. Want our premium color package?", 1),
            call("c3", "I have 2pm or 4pm on Tuesday, which suits you?", 4)]


def test_shared_prefix_policy_is_off_by_default():
    assert [p for p in build(*prefix_calls()).pairs if p.signal == "csat_prefix"] == []


def test_shared_prefix_pairs_calls_that_answered_one_context_differently():
    ex = build(*prefix_calls(), csat_policies=("all-turns", "shared-prefix"))
    [pair] = [p for p in ex.pairs if p.signal == "csat_prefix"]
    assert (pair.call_id, pair.other_call_id, pair.turn) == ("c1", "c2", 1)
    assert pair.chosen["content"].startswith("I have 2pm") and "premium" in pair.rejected["content"]
    # Below the margin: no pair.
    close = build(*prefix_calls(), csat_policies=("shared-prefix",), csat_margin=0.9)
    assert [p for p in close.pairs if p.signal == "csat_prefix"] == []


def test_shared_prefix_never_pairs_across_split_sides():
    calls = prefix_calls()
    ex = build_examples(calls, TENANT, AGENT, PairingConfig(csat_policies=("shared-prefix",)),
                        side_of=lambda c: "test" if c.call_id == "c2" else "train")
    assert ex.pairs == []


def test_unknown_policy_and_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="unknown CSAT policy"):
        PairingConfig(csat_policies=("vibes",))
    with pytest.raises(ValueError, match="thresholds"):
        PairingConfig(csat_desirable=0.3, csat_undesirable=0.5)
