"""Ingest end to end on a real nats-server and a real SQLite file: out-of-order and late events,
duplicates, every malformed class dead-lettered with its reason, a poison message, a locked store,
SIGKILL of the ingest process, a nats-server restart, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent_dpo.events import MAX_PAYLOAD_BYTES, subject_for
from agent_dpo.ingest import CODE_HEADER, REASON_HEADER, SEQ_HEADER, SUBJECT_HEADER
from agent_dpo_adapters.nats_bus import connect
from agent_dpo_adapters.nats_server import EmbeddedNats
from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore

sys.path.insert(0, str(Path(__file__).parent))
from ingest_fixtures import (
    FAST_BUS,
    call_envelopes,
    count_events,
    dlq_messages,
    encode,
    envelope,
    ingest_once,
    init_bus,
    publish,
    publish_many,
    snapshot,
)

pytestmark = pytest.mark.timeout(120)


async def test_out_of_order_and_late_events(nats_url, tmp_path):
    await init_bus(nats_url)
    envs = call_envelopes("call-1")
    feedback = [e for e in envs if e["type"].startswith("feedback.")]
    body = [e for e in envs if not e["type"].startswith("feedback.")]
    random.Random(5).shuffle(body)
    nc = await connect(nats_url)
    js = nc.jetstream()
    await publish_many(js, body)
    await ingest_once(nats_url, tmp_path)
    # feedback arrives days later, after the call was stored complete
    late = envelope("feedback.csat", {"score": 4, "scale_max": 5, "source": "survey"}, call_id="call-1",
                    event_id="call-1-csat", ts="2026-12-08T10:00:00.000Z")
    await publish_many(js, feedback + [late])
    await nc.close()
    stats = await ingest_once(nats_url, tmp_path)
    assert stats.inserted == len(feedback) + 1
    with SqliteStore(tmp_path) as store:
        call = store.call("acme", "salon-rebook", "call-1")
        status = store.status()[0]
    assert call.complete and [t.turn for t in call.ordered_turns()] == list(range(8))
    assert sorted(f.kind for f in call.feedback) == ["csat", "thumbs"]
    assert (status.events, status.calls, status.complete_calls, status.feedback) == \
        (len(envs) + 1, 1, 1, {"thumbs": 1, "csat": 1})


async def test_same_event_twice_with_same_and_different_msg_id(nats_url, tmp_path):
    await init_bus(nats_url)
    env = call_envelopes("call-2")[0]
    nc = await connect(nats_url)
    js = nc.jetstream()
    await publish(js, env)
    await publish(js, env)  # same Nats-Msg-Id: JetStream drops it inside the window
    assert (await js.stream_info(FAST_BUS.stream)).state.messages == 1
    await publish(js, env, msg_id="resent-after-window")  # a copy JetStream cannot recognise
    assert (await js.stream_info(FAST_BUS.stream)).state.messages == 2
    await nc.close()
    stats = await ingest_once(nats_url, tmp_path)
    assert (stats.inserted, stats.duplicates) == (1, 1)
    assert [row[6] for row in snapshot(tmp_path)] == [1]  # the earliest copy (stream seq 1) is the one kept


@pytest.fixture
def big_payload_server(tmp_path):
    """A server that accepts payloads over 1 MiB, so the size rule is ours to enforce."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 4MB\n")
    server = EmbeddedNats(store_dir=tmp_path / "nats-big", extra_args=["-c", str(conf)]).start()
    yield server
    server.stop()


def malformed_messages() -> list[tuple[str, bytes, str]]:
    good = envelope("call.turn", {"turn": 0, "role": "user", "content": "hello"}, event_id="ok-1")
    s = subject_for("acme", "salon-rebook", "call.turn")

    def variant(**changes):
        return encode({**good, **changes})

    return [
        (s, b'{"schema": "agent-dpo.event.v1", ', "invalid_json"),
        (subject_for("acme", "other-agent", "call.turn"), encode(good), "subject_mismatch"),
        (subject_for("acme", "salon-rebook", "call.paused"), variant(type="call.paused"), "unknown_type"),
        (s, variant(schema="agent-dpo.event.v0"), "unknown_schema"),
        (s, encode({k: v for k, v in good.items() if k != "ts"}), "invalid_envelope"),
        (s, variant(data={"turn": 0, "role": "user"}), "invalid_data"),
        (s, variant(data={"turn": 0, "role": "user", "content": "x" * MAX_PAYLOAD_BYTES}), "payload_too_large"),
        (s, encode(good).replace(b"hello", b"hel\xfflo"), "invalid_utf8"),
        (s, encode(good).replace(b'"turn":0', b'"turn":NaN'), "invalid_json"),
        (s, variant(data={"turn": "0", "role": "user", "content": "hi"}), "invalid_data"),
        (s, variant(ts="yesterday"), "invalid_envelope"),
        ("agents.acme.salon-rebook.bad", encode(good), "bad_subject"),
    ]


async def test_each_malformed_class_is_dead_lettered_with_its_reason(big_payload_server, tmp_path):
    url = big_payload_server.url
    await init_bus(url)
    bad = malformed_messages()
    nc = await connect(url)
    js = nc.jetstream()
    for i, (subject, payload, _) in enumerate(bad):
        await publish(js, payload, subject=subject, msg_id=f"bad-{i}")
    good = call_envelopes("call-3")
    await publish_many(js, good)

    stats = await ingest_once(url, tmp_path / "store")
    assert (stats.inserted, stats.dead_letters) == (len(good), len(bad))

    letters = await dlq_messages(js)
    assert len(letters) == len(bad)
    for (subject, payload, code), (seq, letter) in zip(bad, enumerate(letters, 1)):
        assert letter.data == payload, code  # bytes unchanged
        assert letter.headers[CODE_HEADER] == code
        assert letter.headers[REASON_HEADER].startswith(code + ": ")
        assert letter.headers[SUBJECT_HEADER] == subject
        assert letter.headers[SEQ_HEADER] == str(seq)
        expected = "agentdpo.dlq._unknown" if code == "bad_subject" else (
            "agentdpo.dlq.acme.other-agent" if code == "subject_mismatch" else "agentdpo.dlq.acme.salon-rebook")
        assert letter.subject == expected
    with SqliteStore(tmp_path / "store") as store:
        by_agent = {(s.tenant_id, s.agent_id): s.dead_letters for s in store.status()}
        codes = sorted(d.code for d in store.dead_letters())
    assert by_agent == {("acme", "salon-rebook"): len(bad) - 2, ("acme", "other-agent"): 1, ("_unknown", "_unknown"): 1}
    assert codes == sorted(code for _, _, code in bad)

    # A crash-replay (here: the whole stream read again by a second consumer) duplicates nothing.
    replay = replace(FAST_BUS, consumer="replay")
    await init_bus(url, replay)
    stats = await ingest_once(url, tmp_path / "store", replay)
    assert (stats.inserted, stats.duplicates, stats.dead_letters) == (0, len(good), len(bad))
    assert len(await dlq_messages(js)) == len(bad)
    with SqliteStore(tmp_path / "store") as store:
        assert len(store.dead_letters()) == len(bad)
    await nc.close()


class PoisonedStore(SqliteStore):
    """A real SQLite store that always refuses one event, the way a bug or a bad row would."""

    poison = "call-4-03"

    def write_batch(self, events, dead_letters=()):
        if any(s.event.event_id == self.poison for s in events):
            raise sqlite3.IntegrityError(f"refusing {self.poison}")
        return super().write_batch(events, dead_letters)


async def test_a_message_that_always_fails_is_dead_lettered_after_max_deliver(nats_url, tmp_path):
    await init_bus(nats_url)
    envs = call_envelopes("call-4") + call_envelopes("call-5")
    nc = await connect(nats_url)
    js = nc.jetstream()
    await publish_many(js, envs)
    store = PoisonedStore(tmp_path)
    try:
        stats = await ingest_once(nats_url, tmp_path, until_idle=1.0, store=store)
        assert stats.inserted == len(envs) - 1
        assert stats.naks == FAST_BUS.max_deliver - 1
        assert [d.code for d in store.dead_letters()] == ["store_failed"]
        assert store.call("acme", "salon-rebook", "call-5").complete  # the stream kept flowing
    finally:
        store.close()
    letters = await dlq_messages(js)
    assert len(letters) == 1 and letters[0].data == encode(envs[3])
    assert "refusing call-4-03" in letters[0].headers[REASON_HEADER]
    assert f"after {FAST_BUS.max_deliver} deliveries" in letters[0].headers[REASON_HEADER]
    await nc.close()


# 2.5 s: within the in-process retries plus one nak; 4.5 s: outlasts every delivery FAST_BUS allows,
# so the last one must be held until the store is back (a busy disk never dead-letters a valid event).
@pytest.mark.parametrize("locked_s", [2.5, 4.5])
async def test_a_locked_store_holds_the_batch_and_loses_nothing(nats_url, tmp_path, locked_s):
    await init_bus(nats_url)
    envs = [e for c in range(10) for e in call_envelopes(f"call-l{c}")]
    store = SqliteStore(tmp_path, busy_timeout_s=0.05)
    blocker = sqlite3.connect(tmp_path / STORE_FILE, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    release = threading.Timer(locked_s, lambda: blocker.execute("ROLLBACK"))
    release.start()
    nc = await connect(nats_url)
    await publish_many(nc.jetstream(), envs)
    await nc.close()
    try:
        stats = await ingest_once(nats_url, tmp_path, until_idle=1.0, store=store)
        assert stats.store_retries > 0
        assert stats.inserted == len(envs) and stats.dead_letters == 0
        assert store.status()[0].events == len(envs)
    finally:
        release.join()
        blocker.close()
        store.close()


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


# The subprocess reads its bus settings from the environment: short ack wait so a crash is redelivered fast.
FAST_ENV = {"AGENT_DPO_BUS_ACK_WAIT_S": "3", "AGENT_DPO_BUS_BACKOFF_S": "3", "AGENT_DPO_BUS_STORE_RETRY_S": "1",
            "AGENT_DPO_BUS_NAK_DELAY_S": "0.2", "AGENT_DPO_BUS_FETCH_TIMEOUT_S": "0.3"}


async def test_sigkill_of_ingest_mid_stream_then_restart_gives_an_identical_store(nats_url, tmp_path):
    envs = [e for c in range(250) for e in call_envelopes(f"call-k{c:03d}")]
    await init_bus(nats_url)
    nc = await connect(nats_url)
    js = nc.jetstream()
    await publish_many(js, envs)
    for i, (subject, payload, _) in enumerate(malformed_messages()[:3]):
        await publish(js, payload, subject=subject, msg_id=f"bad-{i}")
    await nc.close()

    reference = replace(FAST_BUS, consumer="reference")
    await init_bus(nats_url, reference)
    await ingest_once(nats_url, tmp_path / "reference", reference)

    store = tmp_path / "crashed"
    args = ("ingest", "--nats-url", nats_url, "--store", str(store), "--batch-size", "20")
    proc = cli(*args, env=FAST_ENV)
    deadline = time.monotonic() + 60
    while count_events(store) < 300 and time.monotonic() < deadline and proc.poll() is None:
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = count_events(store)
    assert 0 < killed_at < len(envs), "the kill should land mid-stream"

    proc = cli(*args, "--until-idle", "1", env=FAST_ENV)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-2000:]
    assert snapshot(store) == snapshot(tmp_path / "reference")
    assert len([r for r in snapshot(store) if r[0] != "dead"]) == len(envs)


async def test_ingest_survives_a_nats_server_restart(nats_server, tmp_path):
    url = nats_server.url
    bus = replace(FAST_BUS, batch_size=50)
    await init_bus(url, bus)
    first = [e for c in range(60) for e in call_envelopes(f"call-r{c:02d}")]
    second = [e for c in range(60, 100) for e in call_envelopes(f"call-r{c:02d}")]
    nc = await connect(url)
    await publish_many(nc.jetstream(), first)
    await nc.close()

    ingest = asyncio.create_task(ingest_once(url, tmp_path, bus, until_idle=4.0))
    while count_events(tmp_path) < 100:
        await asyncio.sleep(0.01)
    nats_server.kill()  # SIGKILL mid-ingest; JetStream recovers from its store
    await asyncio.sleep(0.5)
    nats_server.start()
    nc = await connect(url)
    for _ in range(50):  # JetStream may need a moment after a restart
        try:
            await publish_many(nc.jetstream(), second)
            break
        except Exception:  # noqa: BLE001
            await asyncio.sleep(0.2)
    await nc.close()
    stats = await asyncio.wait_for(ingest, 90)
    assert count_events(tmp_path) == len(first) + len(second)
    assert stats.dead_letters == 0


async def test_sigterm_finishes_the_batch_and_exits_cleanly(nats_url, tmp_path):
    await init_bus(nats_url)
    envs = [e for c in range(100) for e in call_envelopes(f"call-t{c:03d}")]
    proc = cli("ingest", "--nats-url", nats_url, "--store", str(tmp_path), "--batch-size", "10", env=FAST_ENV)
    nc = await connect(nats_url)
    await publish_many(nc.jetstream(), envs)
    await nc.close()
    while count_events(tmp_path) < 50 and proc.poll() is None:
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert out.startswith("ingested ")
    stored = count_events(tmp_path)
    # everything it stored was acked: a restart picks up exactly the rest
    stats = await ingest_once(nats_url, tmp_path, replace(FAST_BUS, ack_wait_s=3.0, store_retry_s=1.0))
    assert stats.duplicates == 0
    assert count_events(tmp_path) == len(envs) and stats.inserted == len(envs) - stored


class HangingStore(SqliteStore):
    """Ingest hangs on this event until the process is killed (here: its task cancelled, so it acks
    and naks nothing, as a dead process would)."""

    def __init__(self, path):
        super().__init__(path)
        self.entered, self.release = threading.Event(), threading.Event()

    def write_batch(self, events, dead_letters=()):
        if any(s.event.event_id == "call-6-00" for s in events):
            self.entered.set()
            self.release.wait(10)
            raise RuntimeError("never stored")
        return super().write_batch(events, dead_letters)


async def test_a_message_that_kills_ingest_every_time_is_dead_lettered_after_max_deliver(nats_url, tmp_path):
    bus = replace(FAST_BUS, ack_wait_s=1.5, store_retry_s=0.5, max_deliver=2)
    await init_bus(nats_url, bus)
    nc = await connect(nats_url)
    js = nc.jetstream()
    poison = call_envelopes("call-6")[0]
    await publish(js, poison)
    for _ in range(bus.max_deliver):
        store = HangingStore(tmp_path)
        task = asyncio.create_task(ingest_once(nats_url, tmp_path, bus, until_idle=30, store=store))
        while not store.entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        threading.Timer(0.2, store.release.set).start()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.close()
    # JetStream gives up after max_deliver and says so in an advisory; a healthy ingest dead-letters it.
    await ingest_once(nats_url, tmp_path, bus, until_idle=1.0)
    letters = await dlq_messages(js, bus)
    assert len(letters) == 1 and letters[0].data == encode(poison)
    assert letters[0].headers[CODE_HEADER] == "max_deliveries"
    with SqliteStore(tmp_path) as store:
        assert [d.code for d in store.dead_letters()] == ["max_deliveries"]
    await nc.close()
