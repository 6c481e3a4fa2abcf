"""`agent-dpo worker`: a training worker for GPU (or CPU) machines. It pulls training jobs from the
bus, trains, stores the adapter in the object store and reports status; the listener runs elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import signal

from agent_dpo.cli.common import add_nats_option, add_store_option, nats_url, store_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="pull training jobs from the bus and run them")
    add_nats_option(p)
    add_store_option(p)
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs (default: run until SIGTERM)")
    p.add_argument("--name", default=None, help="worker name in statuses (default host-pid)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from agent_dpo_adapters.nats_bus import connect
    from agent_dpo_adapters.nats_jobs import run_worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await connect(nats_url(args))
    try:
        handled = await run_worker(nc.jetstream(), store_dir(args), stop=stop, max_jobs=args.max_jobs,
                                   name=args.name)
    finally:
        await nc.drain()
    print(f"worker: {handled} job(s) handled")
    return 0
