"""The SQLite event store: one transaction per batch, idempotent on (tenant, event_id) with the
earliest stream sequence winning, calls streamed per agent, status counts, dead letters."""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

import pytest

from agent_dpo.calls import StoredEvent
from agent_dpo.events import Event, parse_event, subject_for
from agent_dpo.store import DeadLetter
from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore, is_transient

sys.path.insert(0, str(Path(__file__).parent))
from ingest_fixtures import call_envelopes, encode, envelope


def stored(env, seq: int) -> StoredEvent:
    event = parse_event(subject_for(env["tenant_id"], env["agent_id"], env["type"]), encode(env))
    assert isinstance(event, Event), event
    return StoredEvent(event, seq)


def dead(seq: int, tenant="acme", agent="salon-rebook") -> DeadLetter:
    return DeadLetter(subject=f"agents.{tenant}.{agent}.call.turn", dlq_subject=f"agentdpo.dlq.{tenant}.{agent}",
                      reason="invalid_json: x", code="invalid_json", stream_seq=seq, tenant_id=tenant,
                      agent_id=agent, payload_size=3)


@pytest.fixture
def store(tmp_path):
    with SqliteStore(tmp_path / "store") as s:
        yield s


def test_write_and_read_back_calls_in_call_id_order(store):
    seq = 0
    batch = []
    for call_id in ("call-b", "call-a", "call-c"):
        for env in call_envelopes(call_id):
            seq += 1
            batch.append(stored(env, seq))
    result = store.write_batch(batch)
    assert (result.inserted, result.duplicates) == (len(batch), 0)
    calls = list(store.calls("acme", "salon-rebook"))
    assert [c.call_id for c in calls] == ["call-a", "call-b", "call-c"]
    assert all(c.complete and len(c.turns) == 8 for c in calls)
    assert store.call("acme", "salon-rebook", "call-a").call_id == "call-a"
    assert store.call("acme", "salon-rebook", "nope") is None
    assert store.agents() == [("acme", "salon-rebook")]
    assert store.event_range("acme", "salon-rebook") == (1, seq)
    assert store.event_range("acme", "other") is None


def test_replaying_a_batch_changes_nothing(store, tmp_path):
    batch = [stored(e, i + 1) for i, e in enumerate(call_envelopes("call-1"))]
    store.write_batch(batch, [dead(50)])
    again = store.write_batch(batch, [dead(50)])
    assert (again.inserted, again.duplicates, again.dead_letters) == (0, len(batch), 0)
    assert store.status()[0].events == len(batch)
    assert store.status()[0].dead_letters == 1


def test_earliest_stream_sequence_wins_whatever_the_arrival_order(tmp_path):
    early = envelope("call.turn", {"turn": 0, "role": "user", "content": "first copy"}, event_id="e1")
    late = envelope("call.turn", {"turn": 0, "role": "user", "content": "re-sent copy"}, event_id="e1")
    contents = []
    for name, order in (("a", [(early, 5), (late, 9)]), ("b", [(late, 9), (early, 5)])):
        with SqliteStore(tmp_path / name) as s:
            for env, seq in order:
                s.write_batch([stored(env, seq)])
            call = s.call("acme", "salon-rebook", "call-1")
            contents.append((call.turns[0].content, call.first_seq))
    assert contents == [("first copy", 5), ("first copy", 5)]


def test_status_counts_per_agent(store):
    batch = [stored(e, i + 1) for i, e in enumerate(call_envelopes("call-1") + call_envelopes("call-2"))]
    partial = [e for e in call_envelopes("call-3") if e["type"] != "call.ended"]
    batch += [stored(e, 100 + i) for i, e in enumerate(partial)]
    other = envelope("feedback.preference", {
        "turn": 1, "chosen": {"role": "assistant", "content": "A"}, "rejected": {"role": "assistant", "content": "B"},
        "rater": "csm"}, agent="front-desk", event_id="p1")
    batch.append(stored(other, 200))
    store.write_batch(batch, [dead(300), dead(301, "acme", "front-desk"),
                              DeadLetter("junk", "agentdpo.dlq._unknown", "bad_subject: x", "bad_subject", 302,
                                         None, None, 1)])
    by_agent = {(s.tenant_id, s.agent_id): s for s in store.status()}
    salon = by_agent[("acme", "salon-rebook")]
    assert (salon.calls, salon.complete_calls, salon.dead_letters) == (3, 2, 1)
    assert salon.feedback == {"thumbs": 3}
    assert salon.events == len(batch) - 1
    desk = by_agent[("acme", "front-desk")]
    assert (desk.events, desk.calls, desk.complete_calls, desk.feedback, desk.dead_letters) == \
        (1, 1, 0, {"preference": 1}, 1)
    assert by_agent[("_unknown", "_unknown")].dead_letters == 1
    assert [c.call_id for c in store.calls("acme", "salon-rebook", complete_only=True)] == ["call-1", "call-2"]


def test_a_locked_database_is_a_transient_error(tmp_path):
    with SqliteStore(tmp_path / "s", busy_timeout_s=0.1) as s:
        blocker = sqlite3.connect(tmp_path / "s" / STORE_FILE, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlite3.OperationalError) as err:
                s.write_batch([stored(call_envelopes("c")[0], 1)])
            assert is_transient(err.value)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert s.write_batch([stored(call_envelopes("c")[0], 1)]).inserted == 1  # nothing half-written


def test_many_calls_stream_from_one_query(tmp_path):
    """20k events (1667 calls) of one agent, written out of order, stream back in call_id order."""
    import random

    from agent_dpo.benchmarks.ingest import synthetic_envelopes

    rows = synthetic_envelopes(20_000, tenant="acme", agent="salon-rebook")
    rng = random.Random(1)
    batch = []
    for seq, (subject, payload, _) in enumerate(rows, 1):
        batch.append(StoredEvent(parse_event(subject, payload), seq))
    rng.shuffle(batch)
    with SqliteStore(tmp_path / "big") as s:
        for i in range(0, len(batch), 2000):
            s.write_batch(batch[i:i + 2000])
        started = time.perf_counter()
        ids = [c.call_id for c in s.calls("acme", "salon-rebook")]
        elapsed = time.perf_counter() - started
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 1667
    assert elapsed < 15, elapsed
