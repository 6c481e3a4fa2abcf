"""The short fault tests (run by `make test`): a nats-server SIGKILLed under a running `agent-dpo ingest`
and restarted from its store, a slow store and a store locked for a while. Each run's exports (every
agent, every format) must be byte-identical to an uninterrupted run over the same published events.
The long ones are in test_faults.py; the poison message and a router killed mid-canary are covered in
test_ingest.py and test_router.py."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent_dpo_adapters.nats_bus import connect
from agent_dpo_adapters.nats_server import EmbeddedNats
from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore

sys.path.insert(0, str(Path(__file__).parent))
from fault_fixtures import (
    FAST_ENV,
    agents_of,
    assert_same_exports,
    cli,
    export_all,
    finish,
    locked_store,
    publish_envs,
    reference_exports,
    rss_kib,
    sigkill,
    world,
)
from ingest_fixtures import FAST_BUS, count_events, ingest_once, init_bus

pytestmark = pytest.mark.timeout(120)


async def _wait_for(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def distinct_events(envs: list[dict]) -> int:
    return len({(e["tenant_id"], e["event_id"]) for e in envs})


async def test_nats_server_sigkill_mid_ingest_then_restart_from_its_store(tmp_path):
    server = EmbeddedNats(store_dir=tmp_path / "nats").start()
    proc = None
    try:
        envs = world(150, seed=3)
        await init_bus(server.url)
        await publish_envs(server.url, envs)
        want = await reference_exports(server.url, tmp_path, agents_of(envs))

        store = tmp_path / "store"
        proc = cli("ingest", "--nats-url", server.url, "--store", str(store), "--batch-size", "50", env=FAST_ENV)
        await _wait_for(lambda: count_events(store) >= 600, 60, "the first events", proc)
        server.kill()  # as a crash would; JetStream recovers from -sd on the next start
        killed_at = count_events(store)
        await asyncio.sleep(0.5)
        server.start()  # same port, same store dir
        await _wait_for(lambda: count_events(store) >= distinct_events(envs), 60, "every event", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        assert killed_at < distinct_events(envs), "the kill should land mid-stream"
        assert count_events(store) == distinct_events(envs), "an event was stored twice"
        assert_same_exports(export_all(store, tmp_path / "out", agents_of(envs)), want)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.stop()


async def test_ingest_sigkilled_while_its_write_is_stalled_loses_nothing(nats_url, tmp_path):
    """The kill lands while the batch in hand waits on a locked store: fetched, not yet stored, so it must
    not have been acked either; the next run stores it. (Nothing is acked before it is stored.)"""
    envs = world(60, seed=4)
    await init_bus(nats_url)
    await publish_envs(nats_url, envs)
    store = tmp_path / "store"
    args = ("ingest", "--nats-url", nats_url, "--store", str(store), "--batch-size", "100")
    proc = cli(*args, env=FAST_ENV)
    try:
        await _wait_for(lambda: count_events(store) >= 100, 60, "the first batch", proc)
        with locked_store(store):
            await asyncio.sleep(1.0)  # the next batch is fetched and its write is stuck on the lock
            stalled_at = count_events(store)
            sigkill(proc)
    finally:
        if proc.poll() is None:
            sigkill(proc)
    assert stalled_at < distinct_events(envs)
    proc = cli(*args, "--until-idle", "1", env=FAST_ENV)
    _, err = finish(proc, 90)
    assert proc.returncode == 0, err[-2000:]
    assert count_events(store) == distinct_events(envs), "events acked before they were stored were lost"
    want = await reference_exports(nats_url, tmp_path, agents_of(envs))
    assert_same_exports(export_all(store, tmp_path / "out", agents_of(envs)), want)


class SlowStore(SqliteStore):
    """A real SQLite store on a slow disk: every batch write takes `delay_s` longer."""

    delay_s = 0.12

    def write_batch(self, events, dead_letters=()):
        time.sleep(self.delay_s)
        return super().write_batch(events, dead_letters)


async def _sample_ack_pending(url: str, consumer: str, stop: asyncio.Event, seen: list[int]) -> None:
    nc = await connect(url)
    try:
        js = nc.jetstream()
        while not stop.is_set():
            info = await js.consumer_info(FAST_BUS.stream, consumer)
            seen.append(info.num_ack_pending)
            await asyncio.sleep(0.03)
    finally:
        await nc.close()


async def test_a_slow_then_locked_store_applies_backpressure_and_loses_nothing(nats_url, tmp_path):
    """Ingest never holds more than the batch it writes plus the one it fetched next, however far the
    store falls behind; a lock longer than the in-process retry (so batches are nak'ed) loses nothing."""
    bus = replace(FAST_BUS, batch_size=100, max_ack_pending=10000)
    envs = world(100, seed=5)
    await init_bus(nats_url, bus)
    await publish_envs(nats_url, envs)
    want = await reference_exports(nats_url, tmp_path, agents_of(envs), bus)

    store = SlowStore(tmp_path / "store", busy_timeout_s=0.05)
    blocker = sqlite3.connect(tmp_path / "store" / STORE_FILE, isolation_level=None, check_same_thread=False)
    stop, seen = asyncio.Event(), []
    sampler = asyncio.create_task(_sample_ack_pending(nats_url, bus.consumer, stop, seen))
    ingest = asyncio.create_task(ingest_once(nats_url, tmp_path / "store", bus, until_idle=1.5, store=store))
    try:
        await _wait_for(lambda: count_events(tmp_path / "store") >= 300, 60, "the first batches")
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock for 2.5 s (> store_retry_s)
        threading.Timer(2.5, lambda: blocker.execute("ROLLBACK")).start()
        stats = await asyncio.wait_for(ingest, 90)
    finally:
        stop.set()
        await sampler
        store.close()
        blocker.close()
    assert stats.store_retries > 0 and stats.dead_letters == 0
    # Two batches in hand (one being written, one fetched); a nak'ed batch's redelivery can overlap the
    # sample by a few messages on a loaded machine. Without backpressure this reaches well over 1,000.
    assert max(seen) <= 3 * bus.batch_size, f"fetched beyond what can be written: {max(seen)} unacked"
    assert_same_exports(export_all(tmp_path / "store", tmp_path / "out", agents_of(envs)), want)


async def test_a_locked_store_under_the_ingest_process_keeps_memory_and_unacked_bounded(nats_url, tmp_path):
    """`agent-dpo ingest` against a store another process locks for 6 s, with ten thousand events
    waiting: unacked messages stay within two batches and RSS does not grow while it waits."""
    envs = world(600, seed=9)
    await init_bus(nats_url)
    await publish_envs(nats_url, envs)
    store = tmp_path / "store"
    batch = 200
    proc = cli("ingest", "--nats-url", nats_url, "--store", str(store), "--batch-size", str(batch), env=FAST_ENV)
    blocker = None
    try:
        await _wait_for(lambda: count_events(store) >= 1000, 60, "the first batches", proc)
        blocker = sqlite3.connect(store / STORE_FILE, isolation_level=None, timeout=30)
        blocker.execute("BEGIN IMMEDIATE")
        locked_at = count_events(store)
        nc = await connect(nats_url)
        js = nc.jetstream()
        rss, unacked = [], []
        for _ in range(30):  # 6 s
            rss.append(rss_kib(proc.pid))
            unacked.append((await js.consumer_info(FAST_BUS.stream, FAST_BUS.consumer)).num_ack_pending)
            await asyncio.sleep(0.2)
        await nc.close()
        blocker.execute("ROLLBACK")
        blocker.close()
        blocker = None
        await _wait_for(lambda: count_events(store) >= distinct_events(envs), 90, "every event", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if blocker is not None:
            blocker.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert locked_at < distinct_events(envs) - 2 * batch, "the lock should land with most events waiting"
    assert max(unacked) <= 2 * batch, f"fetched beyond what can be written: {max(unacked)} unacked"
    growth = max(rss) - rss[0]
    print(f"locked store: rss {rss[0]} -> max {max(rss)} KiB, unacked max {max(unacked)}")
    assert growth < 20 * 1024, f"RSS grew {growth} KiB while the store was locked"
    with SqliteStore(store) as s:
        assert sum(a.events for a in s.status()) == distinct_events(envs)
