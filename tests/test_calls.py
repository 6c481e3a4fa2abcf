"""Call assembly: however a call's events arrive (any order, late, twice), the same `Call` comes out."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from agent_dpo.calls import StoredEvent, assemble_call
from agent_dpo.events import Event, parse_event, subject_for

sys.path.insert(0, str(Path(__file__).parent))
from ingest_fixtures import call_envelopes, encode, envelope


def stored(envs, start_seq: int = 1) -> list[StoredEvent]:
    out = []
    for i, env in enumerate(envs):
        event = parse_event(subject_for(env["tenant_id"], env["agent_id"], env["type"]), encode(env))
        assert isinstance(event, Event), event
        out.append(StoredEvent(event, start_seq + i))
    return out


def shape(call) -> tuple:
    """What pairing reads from a call, minus bus sequence numbers."""
    return (call.call_id, call.started, call.ended, tuple(call.ordered_turns()),
            tuple((t.turn, t.tool_call_id, t.name, t.arguments, t.event_id) for t in call.tool_calls),
            tuple((f.kind, f.event_id) for f in call.feedback), sorted(call.event_ids),
            tuple(sorted(call.conflicting_turns)), call.complete)


def test_any_order_gives_the_same_call():
    events = stored(call_envelopes("call-7"))
    reference = shape(assemble_call(events))
    rng = random.Random(3)
    for _ in range(25):
        shuffled = events[:]
        rng.shuffle(shuffled)
        # arrival order also changes the bus sequence numbers
        reseq = [StoredEvent(s.event, i + 100) for i, s in enumerate(shuffled)]
        assert shape(assemble_call(reseq)) == reference


def test_late_feedback_after_call_ended_counts():
    envs = call_envelopes("call-8")
    late = envelope("feedback.csat", {"score": 2, "scale_max": 5, "source": "survey"}, call_id="call-8",
                    event_id="call-8-late", ts="2026-12-09T08:00:00.000Z")  # five days later
    call = assemble_call(stored(envs + [late]))
    assert call.complete
    assert [f.kind for f in call.feedback][-1] == "csat"
    assert call.feedback_of("csat")[0].data.score == 2


def test_duplicates_change_nothing():
    events = stored(call_envelopes("call-9"))
    twice = events + [StoredEvent(s.event, s.seq + 1000) for s in events[:5]]
    assert shape(assemble_call(twice)) == shape(assemble_call(events))
    assert len(assemble_call(twice).event_ids) == len(events)


def test_conflicting_turns_are_flagged_and_earliest_kept():
    first = envelope("call.turn", {"turn": 1, "role": "assistant", "content": "Tuesday works."},
                     call_id="c", event_id="e1", ts="2026-12-04T19:00:01.000Z")
    second = envelope("call.turn", {"turn": 1, "role": "assistant", "content": "Wednesday works."},
                      call_id="c", event_id="e2", ts="2026-12-04T19:00:02.000Z")
    for order in ([first, second], [second, first]):
        call = assemble_call(stored(order))
        assert call.conflicting_turns == {1}
        assert call.turns[1].content == "Tuesday works."


def test_an_incomplete_call_is_not_complete_until_call_ended():
    envs = [e for e in call_envelopes("call-10") if e["type"] != "call.ended"]
    call = assemble_call(stored(envs))
    assert not call.complete and call.started is not None
