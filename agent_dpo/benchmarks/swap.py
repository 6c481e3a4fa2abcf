"""`agent-dpo bench swap`: the hot-swap path on a real nats-server. Router.resolve latency beside a
plain dict lookup (the floor it is built on), then the time a rollout change written to the KV
bucket takes to be live in several routers, while hundreds of simulated calls re-resolve every few
milliseconds and count any switch of model mid-call. Last line: the three figures."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("swap", help="router resolve latency and KV rollout propagation",
                              description=__doc__)
    p.add_argument("--calls", type=int, default=200_000, help="resolves to time (default 200000)")
    p.add_argument("--routers", type=int, default=4, help="routers watching the KV (default 4)")
    p.add_argument("--changes", type=int, default=40, help="rollout changes to propagate (default 40)")
    p.add_argument("--concurrent", type=int, default=300, help="simulated calls in flight (default 300)")
    p.add_argument("--nats-url", default=None, help="use this NATS server (default: start an embedded one)")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent_dpo.logs import configure_logging

    if getattr(args, "log_level", None) is None:
        configure_logging(fmt=getattr(args, "log_format", None), level="warning")  # one line per change is noise here
    if args.nats_url:
        return asyncio.run(_bench(args, args.nats_url))
    from agent_dpo_adapters.nats_server import EmbeddedNats

    with (tempfile.TemporaryDirectory(prefix="agent-dpo-bench-swap-") as tmp,
          EmbeddedNats(store_dir=Path(tmp) / "nats") as server):
        return asyncio.run(_bench(args, server.url))


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _bench(args: argparse.Namespace, url: str) -> int:
    import nats

    from agent_dpo.registry import (
        VersionManifest,
        advance_canary,
        call_bucket,
        promote,
        rollback,
        start_canary,
    )
    from agent_dpo.router import Router
    from agent_dpo_adapters.nats_registry import NatsRegistry

    t, a = "bench", "swap-agent"
    nc = await nats.connect(url)
    registry = await NatsRegistry.open(nc)
    for v in ("v1", "v2", "v3"):
        await registry.put_manifest(VersionManifest(tenant_id=t, agent_id=a, version=v,
                                                    base_model="smollm2-135m-instruct", method="dpo"))
    await registry.change_rollout(t, a, lambda d: promote(d, "bench", version="v1"))
    await registry.change_rollout(t, a, lambda d: start_canary(d, "v2", 0.25, "bench"))
    routers = [await Router.connect(url) for _ in range(args.routers)]
    seen: list[dict[int, float]] = [{} for _ in routers]
    for i, r in enumerate(routers):
        r.add_listener(lambda _t, _a, rev, _doc, i=i: seen[i].__setitem__(rev, time.perf_counter()))
    _, rev = await registry.get_rollout(t, a)
    while min(r.revision(t, a) for r in routers) < rev:
        await asyncio.sleep(0.005)

    # ---- 1. resolve latency beside a plain dict lookup, same keys, same timer ----
    router = routers[0]
    call_ids = [f"call-{i}" for i in range(args.calls)]
    plain = {(t, a, c): c for c in call_ids[: args.calls // 2]}
    keys = [(t, a, c) for c in call_ids]
    clock = time.perf_counter_ns
    resolve_ns, dict_ns = [], []
    for c, k in zip(call_ids, keys):
        t0 = clock()
        plain.get(k)
        t1 = clock()
        router.resolve(t, a, c)
        t2 = clock()
        dict_ns.append(t1 - t0)
        resolve_ns.append(t2 - t1)
    for c in call_ids:
        router.release(c, t, a)
    r50, r99 = pct(resolve_ns, 0.5) / 1000, pct(resolve_ns, 0.99) / 1000
    d50, d99 = pct(dict_ns, 0.5) / 1000, pct(dict_ns, 0.99) / 1000
    print(f"resolve: p50 {r50:.2f} us, p99 {r99:.2f} us over {args.calls} new calls "
          f"(plain dict lookup: p50 {d50:.2f} us, p99 {d99:.2f} us)")

    # ---- 2. propagation of KV changes to every router, with calls in flight ----
    rng = random.Random(args.seed)
    switches = 0
    wrong_after = 0
    finished = 0
    stop = asyncio.Event()

    async def call(n: int) -> None:
        nonlocal switches, finished
        r = routers[n % len(routers)]
        cid = f"live-{n}"
        first = r.resolve(t, a, cid)
        for _ in range(rng.randint(3, 10)):
            await asyncio.sleep(rng.uniform(0.002, 0.03))
            if r.resolve(t, a, cid) is not first:
                switches += 1
        r.release(cid, t, a)
        finished += 1

    async def traffic() -> None:
        n, tasks = 0, set()
        while not stop.is_set():
            while len(tasks) < args.concurrent:
                n += 1
                task = asyncio.create_task(call(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)

    traffic_task = asyncio.create_task(traffic())
    await asyncio.sleep(0.1)
    def next_change(d, k: int):
        """A canary's life, over and over: enter, widen, then promote or roll back (alternately)."""
        if d.state != "canary":
            return start_canary(d, next(v for v in ("v1", "v2", "v3") if v != d.champion), 0.05, "bench")
        if d.canary_weight < 0.5:
            return advance_canary(d, d.step + 1, 0.5 if d.canary_weight >= 0.25 else 0.25, "bench", "step")
        return promote(d, "bench") if k % 2 else rollback(d, "bench", "flip")

    latencies_ms: list[float] = []
    for k in range(args.changes):
        await asyncio.sleep(rng.uniform(0.01, 0.03))
        started = time.perf_counter()
        doc = await registry.change_rollout(t, a, lambda d, k=k: next_change(d, k))
        _, rev = await registry.get_rollout(t, a)
        while any(rev not in s for s in seen):
            await asyncio.sleep(0.0005)
        latencies_ms += [(s[rev] - started) * 1000 for s in seen]
        # Calls that start now, on any router, must get the new document's assignment.
        for j in range(50):
            cid = f"after-{k}-{j}"
            for r in routers:
                ref = r.resolve(t, a, cid)
                expected = doc.champion
                if doc.state == "canary" and call_bucket(t, a, cid) < doc.canary_weight:
                    expected = doc.challenger
                wrong_after += ref.version != expected
                r.release(cid, t, a)
    stop.set()
    await traffic_task
    p50, p99 = pct(latencies_ms, 0.5), pct(latencies_ms, 0.99)
    print(f"propagation to {len(routers)} routers over {args.changes} changes: p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms, max {max(latencies_ms):.2f} ms, mean {statistics.fmean(latencies_ms):.2f} ms")
    print(f"calls: {finished} simulated ({args.concurrent} in flight), mid-call switches {switches}, "
          f"new calls on the wrong version after a change {wrong_after}")
    print(f"ratio: resolve p99 / dict lookup p99 = {r99 / d99 if d99 else float('inf'):.1f}x")
    for r in routers:
        await r.stop()
    await nc.close()
    print(f"swap: resolve p99 {r99:.1f} us, propagation p99 {p99:.1f} ms, mid-call switches {switches}")
    return 0 if switches == 0 and wrong_after == 0 else 1
