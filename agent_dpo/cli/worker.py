"""`agent-dpo worker`: a training worker for GPU (or CPU) machines. It pulls training jobs from the
bus, trains, stores the adapter in the object store and reports status; the listener runs elsewhere.
Several workers share one durable consumer, so each job goes to exactly one of them."""

from __future__ import annotations

import argparse
import asyncio
import shlex

from agent_dpo.cli.common import (
    add_config_option,
    add_nats_option,
    add_store_option,
    nats_url,
    settings,
    store_dir,
)
from agent_dpo.cli.ingest import positive_int, run_with_stop


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="pull training jobs from the bus and run them",
                       description="Pull training jobs from the JetStream work queue one at a time, train, "
                                   "store the adapter in the NATS object store and publish statuses on "
                                   "agentdpo.train.status.<job_id>. SIGTERM finishes the job in hand, then exits.")
    add_nats_option(p)
    add_store_option(p)
    add_config_option(p)
    p.add_argument("--max-jobs", type=positive_int, default=None,
                   help="exit after this many jobs (default: run until SIGTERM)")
    p.add_argument("--name", default=None, help="worker name in statuses (default host-pid)")
    p.add_argument("--launcher", metavar="COMMAND",
                   help="train each job in a child process started by this command, e.g. "
                        "\"accelerate launch --num_processes 4\" for several GPUs (it is followed by "
                        "`-m agent_dpo.cli train ...`, so the command must accept -m MODULE like python does)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent_dpo_adapters.nats_bus import connect
    from agent_dpo_adapters.nats_jobs import run_worker

    conf = settings(args)
    root = store_dir(args)

    async def main(stop: asyncio.Event) -> int:
        nc = await connect(nats_url(args), conf.nats, name="agent-dpo worker")
        try:
            handled = await run_worker(nc.jetstream(), root, stop=stop, max_jobs=args.max_jobs, name=args.name,
                                       launcher=shlex.split(args.launcher) if args.launcher else None)
        finally:
            await nc.drain()
        print(f"worker: {handled} job(s) handled", flush=True)
        return 0

    return run_with_stop(main)
