"""A bounded loopback soak (`make test-faults`): the simulator publishes at a steady rate to a real
nats-server while `agent-dpo ingest` runs as its own process. Per window it records the publish and
store rates and the ingest process's RSS; ingest must keep up in every window, lose nothing, and its
RSS must stay flat. Runs AGENT_DPO_SOAK_S seconds (default 60), at AGENT_DPO_SOAK_RATE events/s
(default 400); prints the figures."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from agent_dpo.events import subject_for
from agent_dpo.world.simulator import simulate
from agent_dpo_adapters.nats_bus import connect
from agent_dpo_adapters.sqlite_store import STORE_FILE

sys.path.insert(0, str(Path(__file__).parent))
from fault_fixtures import FAST_ENV, cli, rss_kib
from ingest_fixtures import count_events, encode, init_bus

SOAK_S = float(os.environ.get("AGENT_DPO_SOAK_S", "60"))
RATE = int(os.environ.get("AGENT_DPO_SOAK_RATE", "400"))
WINDOW_S = float(os.environ.get("AGENT_DPO_SOAK_WINDOW_S", "10"))
RSS_GROWTH_LIMIT_KIB = 30 * 1024

pytestmark = [pytest.mark.faults, pytest.mark.timeout(int(SOAK_S) + 240)]


async def test_soak_steady_rate_throughput_holds_and_rss_stays_flat(nats_url, tmp_path):
    await init_bus(nats_url)
    store = tmp_path / "store"
    proc = cli("ingest", "--nats-url", nats_url, "--store", str(store), env=FAST_ENV)
    nc = await connect(nats_url)
    js = nc.jetstream()
    events = simulate(10**7, seed=99)  # lazily: as many calls as the duration needs
    published: set[tuple[str, str]] = set()
    windows: list[dict] = []
    tick = 0.1
    try:
        up_deadline = time.monotonic() + 60
        while not (store / STORE_FILE).exists():  # ingest is up once it has opened its store
            assert proc.poll() is None and time.monotonic() < up_deadline, "ingest did not start"
            await asyncio.sleep(0.1)
        start = time.monotonic()
        next_window = start + WINDOW_S
        stored_before, sent_in_window = count_events(store), 0
        while (now := time.monotonic()) - start < SOAK_S:
            batch = [next(events) for _ in range(max(1, int(RATE * tick)))]
            await asyncio.gather(*(js.publish(subject_for(e["tenant_id"], e["agent_id"], e["type"]), encode(e),
                                              headers={"Nats-Msg-Id": e["event_id"]}, timeout=10) for e in batch))
            published.update((e["tenant_id"], e["event_id"]) for e in batch)
            sent_in_window += len(batch)
            if now >= next_window:
                stored = count_events(store)
                windows.append({"t_s": round(now - start), "published_per_s": round(sent_in_window / WINDOW_S),
                                "stored_per_s": round((stored - stored_before) / WINDOW_S),
                                "lag": len(published) - stored, "rss_mib": round(rss_kib(proc.pid) / 1024, 1)})
                print("soak window", windows[-1], flush=True)
                stored_before, sent_in_window, next_window = stored, 0, next_window + WINDOW_S
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - now)))
        drain_deadline = time.monotonic() + 60
        while count_events(store) < len(published) and time.monotonic() < drain_deadline:
            await asyncio.sleep(0.1)
        final_rss = rss_kib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
    finally:
        await nc.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    lost = len(published) - count_events(store)
    rss = [w["rss_mib"] for w in windows]
    growth_kib = (max(rss[1:] + [final_rss / 1024]) - rss[0]) * 1024 if len(rss) > 1 else 0
    print(f"soak: {SOAK_S:.0f} s at {RATE}/s, {len(published)} events, lost {lost}; "
          f"stored/s per window {[w['stored_per_s'] for w in windows]}; "
          f"RSS {rss[0]} -> {max(rss)} MiB (growth after the first window {growth_kib / 1024:.1f} MiB)")
    assert lost == 0
    assert len(windows) >= 2, "the soak should span several windows"
    for w in windows[1:]:  # the first window includes start-up
        assert w["stored_per_s"] >= 0.8 * w["published_per_s"], f"ingest fell behind: {w}"
        assert w["lag"] <= 2 * RATE, f"backlog grew: {w}"
    assert growth_kib < RSS_GROWTH_LIMIT_KIB, f"ingest RSS grew {growth_kib / 1024:.1f} MiB"
