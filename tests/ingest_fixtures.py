"""Helpers for the ingest tests: envelopes, raw publishing (so malformed bytes can be sent), an
in-process ingest run, and a store snapshot to compare runs. Real nats-server and SQLite only."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from agent_dpo.benchmarks.ingest import synthetic_call
from agent_dpo.config import BusConfig
from agent_dpo.events import build_envelope, subject_for
from agent_dpo_adapters.nats_bus import Ingestor, connect, ensure_bus
from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore, is_transient

TENANT, AGENT = "acme", "salon-rebook"

# Short timers so redelivery paths finish in seconds. JetStream needs backoff[0] >= ack_wait.
FAST_BUS = BusConfig(ack_wait_s=4.0, backoff_s=(), max_deliver=3, nak_delay_s=0.2, store_retry_s=1.0,
                     fetch_timeout_s=0.3, batch_size=200)


def envelope(event_type: str, data: dict[str, Any], *, call_id: str = "call-1", event_id: str | None = None,
             ts: str = "2026-12-04T19:00:00.000Z", tenant: str = TENANT, agent: str = AGENT) -> dict[str, Any]:
    return build_envelope(event_id=event_id or f"{call_id}-{event_type}-{abs(hash(json.dumps(data, sort_keys=True)))}",
                          event_type=event_type, tenant_id=tenant, agent_id=agent, call_id=call_id,
                          data=data, ts=ts)


def call_envelopes(call_id: str, tenant: str = TENANT, agent: str = AGENT) -> list[dict[str, Any]]:
    """A realistic complete call, event ids `<call_id>-NN`, timestamps in order."""
    import random

    return [build_envelope(event_id=f"{call_id}-{i:02d}", event_type=t, tenant_id=tenant, agent_id=agent,
                           call_id=call_id, data=d, ts=f"2026-12-04T19:00:{i:02d}.000Z")
            for i, (t, d) in enumerate(synthetic_call(call_id, random.Random(call_id)))]


def encode(env: dict[str, Any]) -> bytes:
    return json.dumps(env, separators=(",", ":")).encode()


async def publish(js, env_or_bytes, *, subject: str | None = None, msg_id: str | None = None,
                  prefix: str = "agents") -> None:
    if isinstance(env_or_bytes, dict):
        env = env_or_bytes
        subject = subject or subject_for(env["tenant_id"], env["agent_id"], env["type"], prefix)
        payload = encode(env)
        msg_id = msg_id or env["event_id"]
    else:
        payload = env_or_bytes
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await js.publish(subject, payload, headers=headers, timeout=10)


async def publish_many(js, envs: list[dict[str, Any]]) -> None:
    futures = [await js.publish_async(subject_for(e["tenant_id"], e["agent_id"], e["type"]), encode(e),
                                      headers={"Nats-Msg-Id": e["event_id"]}) for e in envs]
    await asyncio.gather(*futures)


async def init_bus(url: str, bus: BusConfig = FAST_BUS) -> None:
    nc = await connect(url)
    try:
        await ensure_bus(nc.jetstream(), bus)
    finally:
        await nc.close()


async def ingest_once(url: str, store_dir: Path, bus: BusConfig = FAST_BUS, until_idle: float = 0.8,
                      store: SqliteStore | None = None):
    """Run ingest in this process until idle; returns its stats."""
    nc = await connect(url)
    own = store is None
    store = store or SqliteStore(store_dir)
    try:
        await ensure_bus(nc.jetstream(), bus, update=False)
        return await Ingestor(nc, store, bus, is_transient=is_transient).run(until_idle=until_idle)
    finally:
        if own:
            store.close()
        await nc.close()


def snapshot(store_dir: Path) -> list[tuple]:
    """Everything a store holds that matters, in a stable order."""
    db = sqlite3.connect(Path(store_dir) / STORE_FILE)
    try:
        events = db.execute("SELECT tenant_id, event_id, agent_id, call_id, type, ts, seq, payload FROM events"
                            " ORDER BY tenant_id, event_id").fetchall()
        dead = db.execute("SELECT stream_seq, subject, dlq_subject, code, reason FROM dead_letters"
                          " ORDER BY stream_seq").fetchall()
    finally:
        db.close()
    return events + [("dead",) + d for d in dead]


def count_events(store_dir: Path) -> int:
    path = Path(store_dir) / STORE_FILE
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=5)
    try:
        return db.execute("SELECT count(*) FROM events").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


async def dlq_messages(js, bus: BusConfig = FAST_BUS) -> list:
    """Every message in the dead-letter stream, in order."""
    info = await js.stream_info(bus.dlq_stream)
    return [await js.get_msg(bus.dlq_stream, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)
            if info.state.messages]
