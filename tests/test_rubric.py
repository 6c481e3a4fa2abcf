"""The hidden rubric and its judge: polite concrete slots beat pushing, upselling, vagueness and invented
times; a settled conflict beats deferral; valid tool calls beat invalid ones. The judge, reading only
text, agrees with the simulator's labels on held-out generated pairs, and the pairs don't give the
label away by length or by stock phrases."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict

import pytest

from agent_dpo.calls import StoredEvent, assemble_call
from agent_dpo.context import CallContexts, message_dict
from agent_dpo.events import Event, parse_event, subject_for
from agent_dpo.world.agents import load_tools
from agent_dpo.world.rubric import (
    LABELLER,
    RubricJudge,
    csat_from_scores,
    score_answer,
    thumbs_from_score,
)
from agent_dpo.world.simulator import simulate

SALON_TOOLS = load_tools("salon-rebook")
RESOLVER_TOOLS = load_tools("appointment-resolver")


def _pairs(seed: int, n_calls: int, **options) -> list[tuple[str, list, list, dict, dict]]:
    """(agent, context, tools, chosen, rejected) for every side-by-side label of a simulated world."""
    by_call = defaultdict(list)
    for seq, env in enumerate(simulate(n_calls, seed, **options), start=1):
        event = parse_event(subject_for(env["tenant_id"], env["agent_id"], env["type"]),
                            json.dumps(env).encode())
        assert isinstance(event, Event)
        by_call[(event.tenant_id, event.call_id)].append(StoredEvent(event, seq))
    out = []
    for events in by_call.values():
        call = assemble_call(events)
        contexts = CallContexts(call)
        for f in call.feedback_of("preference"):
            out.append((call.agent_id, contexts.context(f.data.turn), call.tools,
                        message_dict(f.data.chosen), message_dict(f.data.rejected)))
    return out


@pytest.fixture(scope="module")
def clean_pairs():
    return _pairs(seed=9001, n_calls=1500, label_noise=False)  # a seed no other test trains or tunes on


def _salon_context(slots=(("2026-12-08", "14:30", "Maya"), ("2026-12-09", "10:00", "Kai"))) -> list[dict]:
    result = {"slots": [{"slot_id": f"slot-0000000{i}", "date": d, "start": t, "end": "23:59",
                         "stylist": {"id": "sty-011", "name": who}} for i, (d, t, who) in enumerate(slots)]}
    return [
        {"role": "system", "content": "You are the phone booking assistant for Acme Salons Downtown."},
        {"role": "assistant", "content": "Thanks for calling, how can I help?"},
        {"role": "user", "content": "I need a haircut next week."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "find_slots", "arguments": json.dumps({
                "service": "haircut", "date_from": "2026-12-07", "date_to": None, "time_of_day": "any",
                "stylist_id": None, "location_id": "loc-downtown", "max_results": 5})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result, separators=(",", ":"))},
    ]


GOOD = ("Thanks for waiting. I have Tuesday, December 8 at 2:30 pm with Maya, or Wednesday the 9th at "
        "10 am. Would either of those work for you?")
PUSHY = "I have Tuesday at 2:30 pm. You need to book it now, these go fast. Yes or no?"
UPSELL = ("Of course. I have Tuesday at 2:30 pm. While you're here, would you like to add a deep "
          "conditioning treatment for just $25?")
VAGUE = "We have some openings later in the week, it depends on the stylist. What works for you?"
INVENTED = "Thanks for waiting. I have Tuesday at 4:45 pm or Thursday at 11:15 am. Would either work for you?"


@pytest.mark.parametrize("worse", [PUSHY, UPSELL, VAGUE, INVENTED])
def test_salon_polite_concrete_slots_beat_pushing_upselling_vagueness_and_invented_times(worse):
    ctx = _salon_context()
    assert score_answer("salon-rebook", ctx, SALON_TOOLS, GOOD) >= 0.9
    assert score_answer("salon-rebook", ctx, SALON_TOOLS, worse) < 0.7
    judge = RubricJudge()
    assert judge.compare(ctx, SALON_TOOLS, GOOD, worse) == "a"
    assert judge.compare(ctx, SALON_TOOLS, worse, GOOD) == "b"  # position does not matter


def test_times_are_read_in_every_usual_spelling():
    ctx = _salon_context()
    for spelling in ("2:30 pm", "2:30pm", "2:30 PM", "2:30 p.m.", "14:30", "2.30 pm"):
        answer = f"Happy to help. I have Tuesday the 8th at {spelling}. Would that work for you?"
        assert score_answer("salon-rebook", ctx, SALON_TOOLS, answer) >= 0.9, spelling
    assert score_answer("salon-rebook", ctx, SALON_TOOLS, "Happy to help. I have 10 am on Wednesday. "
                        "Does that work?") >= 0.9


def test_tool_calls_valid_and_grounded_beat_invalid():
    ctx = _salon_context()

    def book(args) -> dict:
        return {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "book_slot", "arguments": args}}]}

    args = {"slot_id": "slot-00000000", "service": "haircut",
            "customer": {"name": "Ana Silva", "phone": "+14155550100", "email": None, "returning": True},
            "notes": None, "send_confirmation": "sms"}
    valid = book(json.dumps(args))
    as_object = book(args)  # trl-style exports carry arguments as objects
    wrong_enum = book(json.dumps({**args, "service": "hair_cut"}))
    broken_json = book(json.dumps(args)[:-3])
    ungrounded = book(json.dumps({**args, "slot_id": "slot-abcdef12"}))
    s = {name: score_answer("salon-rebook", ctx, SALON_TOOLS, m) for name, m in
         [("valid", valid), ("object", as_object), ("enum", wrong_enum), ("json", broken_json),
          ("ungrounded", ungrounded)]}
    assert s["valid"] == s["object"] > s["ungrounded"] > s["enum"] == s["json"]
    assert s["enum"] < 0.1


def _resolver_context(slots: list[dict]) -> list[dict]:
    lookup = {"patient": {"mrn": "MRN-0048213", "name": "Ana Silva"},
              "appointments": [{"appointment_id": "appt-20481736", "date": "2026-12-08", "start_time": "10:00",
                                "provider": {"id": "prv-1000", "name": "Dr. Raman"}, "specialty": "cardiology"},
                               {"appointment_id": "appt-20481737", "date": "2026-12-08", "start_time": "10:15",
                                "visit": "lab draw"}],
              "conflicts": [{"type": "double_booking", "appointment_ids": ["appt-20481736", "appt-20481737"]}]}
    return [
        {"role": "system", "content": "You are the scheduling assistant of Northside Health."},
        {"role": "user", "content": "I think I'm booked twice on Tuesday."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "lookup_patient_appointments", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(lookup)},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_2", "type": "function", "function": {
            "name": "find_provider_availability", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": json.dumps({"slots": slots})},
    ]


def test_resolver_settles_the_conflict_with_a_concrete_alternative_or_flags_it():
    ctx = _resolver_context([{"provider_id": "prv-1000", "provider_name": "Dr. Raman", "date": "2026-12-09",
                              "start_time": "13:30", "duration_minutes": 30}])
    good = ("I see your cardiology visit at 10:00 am overlaps your lab draw at 10:15 am on Tuesday. "
            "Dr. Raman has Wednesday the 9th at 1:30 pm. Would that work for you?")
    ignore = "You're all set for Tuesday at 10:00 am with Dr. Raman. Anything else?"
    defer = "Sorry about that. I'll make a note and someone will get back to you."
    judge = RubricJudge("northside-health/appointment-resolver")
    assert score_answer("appointment-resolver", ctx, RESOLVER_TOOLS, good) >= 0.9
    assert judge.compare(ctx, RESOLVER_TOOLS, good, ignore) == "a"
    assert judge.compare(ctx, RESOLVER_TOOLS, defer, good) == "b"

    empty = _resolver_context([])
    flag_args = {"patient_mrn": "MRN-0048213", "appointment_id": "appt-20481736",
                 "category": "unresolvable_conflict", "urgency": "routine",
                 "details": "Double booking; no cardiology slot this month.", "suggested_actions": ["call back"]}
    flag = {"role": "assistant", "content": "I'm sorry, the two visits overlap and nothing is open before the "
            "20th. I've flagged this for our scheduling team.",
            "tool_calls": [{"id": "c", "type": "function",
                            "function": {"name": "flag_for_staff", "arguments": json.dumps(flag_args)}}]}
    assert judge.compare(empty, RESOLVER_TOOLS, flag, defer) == "a"
    assert score_answer("appointment-resolver", empty, RESOLVER_TOOLS, flag) >= 0.8


def test_judge_is_deterministic_symmetric_and_ties_equal_answers():
    ctx = _salon_context()
    judge = RubricJudge()
    assert judge.name == "rubric" and judge.name != LABELLER
    assert judge.compare(ctx, SALON_TOOLS, GOOD, GOOD) == "tie"
    assert [score_answer(None, ctx, SALON_TOOLS, GOOD) for _ in range(3)] == [score_answer(
        "salon-rebook", ctx, SALON_TOOLS, {"role": "assistant", "content": GOOD})] * 3
    for answer in (GOOD, PUSHY, "", "🙂" * 50, "at 99:99 pm on Febtember 45th"):
        assert 0.0 <= score_answer("salon-rebook", ctx, SALON_TOOLS, answer) <= 1.0


def test_judge_agrees_with_the_simulators_labels_on_held_out_pairs(clean_pairs):
    judge = RubricJudge()
    by_agent: dict[str, Counter] = defaultdict(Counter)
    for agent, ctx, tools, chosen, rejected in clean_pairs:
        by_agent[agent][judge.compare(ctx, tools, chosen, rejected)] += 1
    for agent, verdicts in by_agent.items():
        total = sum(verdicts.values())
        assert total > 50, agent
        assert verdicts["a"] / total > 0.95, (agent, verdicts)


def test_noisy_labels_are_mostly_but_not_always_what_the_rubric_says():
    pairs = _pairs(seed=9002, n_calls=600)
    judge = RubricJudge()
    agree = sum(judge.compare(ctx, tools, c, r) == "a" for _, ctx, tools, c, r in pairs) / len(pairs)
    assert 0.85 < agree < 0.995


def test_pairs_do_not_give_the_label_away_by_length_or_stock_phrases(clean_pairs):
    chosen = [m["content"] or "" for *_, m, _ in clean_pairs]
    rejected = [m["content"] or "" for *_, m in clean_pairs]
    ratio = (sum(map(len, chosen)) / len(chosen)) / (sum(map(len, rejected)) / len(rejected))
    assert 0.8 < ratio < 1.25
    # Within each side answers vary: no answer text repeats much.
    assert len(set(chosen)) > 0.9 * len(chosen) and len(set(rejected)) > 0.8 * len(rejected)

    def sentences(texts):
        return Counter(s for t in texts for s in set(re.split(r"(?<=[.?!])\s+", t)) if s)

    in_chosen, in_rejected = sentences(chosen), sentences(rejected)
    # A stock sentence that is frequent in chosen answers also shows up in rejected ones (at a rate not
    # far below, add-one smoothed), unless it is the rubric's own content (handing the case to staff).
    tells = [s for s, n in in_chosen.items()
             if n >= 0.03 * len(chosen) and (in_rejected[s] + 1) / len(rejected) < n / len(chosen) / 15
             and not re.search(r"flag|schedul|staff", s, re.IGNORECASE)]
    assert not tells, tells


def test_csat_and_thumbs_follow_scores_with_noise():
    rng = random.Random(0)
    high = [csat_from_scores([0.95, 0.9], rng) for _ in range(300)]
    low = [csat_from_scores([0.2, 0.9], rng) for _ in range(300)]
    assert all(1 <= s <= 5 for s in high + low)
    assert sum(high) / 300 > 4.3 and sum(low) / 300 < 3.2
    assert len(set(high)) > 1  # noise, like real surveys
    ten = [csat_from_scores([0.95], rng, scale_max=10) for _ in range(100)]
    assert all(0 <= s <= 10 for s in ten) and sum(ten) / 100 > 8
    assert csat_from_scores([0.9], random.Random(1), outcome="abandoned") < csat_from_scores(
        [0.9], random.Random(1))
    ups = [thumbs_from_score(0.9, rng) for _ in range(400)]
    assert 0.9 < sum(ups) / 400 < 1.0
    assert sum(thumbs_from_score(0.2, rng) for _ in range(400)) / 400 < 0.1


def test_every_stock_phrase_carries_the_feature_the_simulator_labels_it_with():
    from agent_dpo.world import answers as A
    from agent_dpo.world import rubric as R

    def fill(text: str) -> str:
        return text.format(list="Tuesday at 2:30 pm", who="Maya", svc="haircut", site="Downtown", dur="45",
                           day_word="Friday", slot="Tuesday at 2:30 pm", spec="cardiology", dr="Dr. Raman",
                           dr2="Dr. Raman", t1="10:00 am", t2="10:15 am", other="MRI", day="Tuesday",
                           until="20th", urgency="routine")

    marked = {
        R._PUSHY: A.PUSH + A.PUSH_NO_SLOT + A.R_PUSH + A.CONFIRM_PUSH,
        R._UPSELL_SALON: A.UPSELL + A.CONFIRM_UPSELL,
        R._UPSELL_RESOLVER: A.R_UPSELL,
        R._VAGUE: A.VAGUE + A.CONFIRM_VAGUE + A.R_VAGUE + A.R_CONFIRM_VAGUE,
        R._ACKNOWLEDGE: tuple(s for bank in A.ACK.values() for s in bank),
        R._POLITE: A.INTRO_POLITE + A.Q_POLITE + A.TAIL_POLITE + A.CLOSE_POLITE + A.SORRY + A.R_Q_POLITE,
        R._FLAG: A.FLAG_TEXT,
    }
    for pattern, bank in marked.items():
        missing = [s for s in bank if not pattern.search(fill(s))]
        assert not missing, (pattern.pattern[:40], missing)
    neutral = (A.INTRO_NEUTRAL + A.Q_PLAIN + A.TAIL_NEUTRAL + A.SLOT_LEADS + A.CONFIRM_LEADS
               + A.CONFIRM_NOTICE
               + A.ALT_LEADS + A.R_Q_PLAIN + A.R_CONFIRM + A.R_NOTICE + A.R_IGNORE + A.R_IGNORE_MORE)
    for pattern in (R._PUSHY, R._UPSELL_SALON, R._VAGUE, R._ACKNOWLEDGE):
        hits = [s for s in neutral if pattern.search(fill(s))]
        assert not hits, (pattern.pattern[:40], hits)


def test_the_judge_reads_back_the_features_the_simulator_wrote():
    from datetime import date

    from agent_dpo.world import answers as A
    from agent_dpo.world.rubric import extract_features

    ctx = _salon_context((("2026-12-08", "14:30", "Maya"), ("2026-12-09", "10:00", "Kai")))
    slots = [A.Slot("slot-00000000", date(2026, 12, 8), 14, 30, "Maya", "sty-011"),
             A.Slot("slot-00000001", date(2026, 12, 9), 10, 0, "Kai", "sty-012")]
    rng = random.Random(11)
    keys = ("grounded", "invented", "pushy", "upsell", "vague", "confirms")
    for style in ("good", "pushy", "upsell", "vague", "invented"):
        for _ in range(150):
            text, written = A.salon_offer(rng, style, slots, svc="haircut", site="Downtown", dur=45,
                                          avoid={(14, 30), (10, 0), (23, 59)})
            read, _ = extract_features("salon-rebook", ctx, SALON_TOOLS, text)
            assert [getattr(read, k) for k in keys] == [getattr(written, k) for k in keys], (style, text)
            assert (read.polite > 0) == (written.polite > 0), (style, text)
