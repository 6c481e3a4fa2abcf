"""`agent-dpo serve`: the long-running service. A set of owned asyncio tasks (agent_dpo/service.py)
sharing one NATS connection and one stop event: ingest, the training trigger, job results (eval,
manifest, canary start), the canary, optionally a training worker, and the OpenAI-compatible gateway.
With no NATS URL given and nothing listening at the default, it starts an embedded nats-server."""

from __future__ import annotations

import argparse
import asyncio
import os
from urllib.parse import urlparse

from agent_dpo.cli.common import (
    DEFAULT_NATS_URL,
    add_config_option,
    add_nats_option,
    add_store_option,
    settings,
    store_dir,
)
from agent_dpo.cli.ingest import positive_int, positive_seconds, run_with_stop
from agent_dpo.logs import get_logger
from agent_dpo.service import (  # noqa: F401  (ServiceContext, ingest_task: this module's public names)
    ServiceContext,
    ServicePolicy,
    ServiceTask,
    ingest_task,
    open_context,
    service_tasks,
)

log = get_logger(component="serve")


def port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} must be 0 (off) or 1-65535")
    return port


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="run the service: ingest, train when enough new pairs, evaluate, roll out, gateway",
        description="Run agent-dpo as a service until SIGTERM: ingest events; when an agent has gained "
                    "enough new DPO pairs, export and enqueue a training job; evaluate each trained version "
                    "on the held-out split, register it and let the eval gates start its canary; run canaries "
                    "on the calls ingest stores; serve an OpenAI-compatible gateway. With no --nats-url (and no "
                    "AGENT_DPO_NATS_URL) and nothing listening at the default URL, an embedded nats-server "
                    "with JetStream is started under the store.")
    add_nats_option(p)
    add_store_option(p)
    add_config_option(p)
    p.add_argument("--policy", metavar="FILE", default=os.environ.get("AGENT_DPO_POLICY"),
                   help="TOML with [serve], [train], [eval], [gates], [canary] tables (env AGENT_DPO_POLICY); "
                        "see agent_dpo/service.py")
    p.add_argument("--train-after-pairs", type=positive_int, metavar="N",
                   default=os.environ.get("AGENT_DPO_TRAIN_AFTER_PAIRS"),
                   help="enqueue a training job when an agent has N new DPO pairs since its last job "
                        "(default 500; env AGENT_DPO_TRAIN_AFTER_PAIRS)")
    p.add_argument("--check-interval", type=positive_seconds, metavar="SECONDS",
                   help="how often the training trigger looks (default 30)")
    p.add_argument("--judge", help="eval judge: auto (rubric for the example agents, default), rubric, "
                                   "openai:MODEL, azure:DEPLOYMENT or none")
    p.add_argument("--canary-interval", type=positive_seconds, metavar="SECONDS",
                   help="seconds between canary decisions (default 5)")
    p.add_argument("--settle", type=float, metavar="SECONDS",
                   help="an ended call without CSAT counts for the canary after this long (default 60)")
    p.add_argument("--worker", action="store_true", default=None,
                   help="also run a training worker in this process (single-machine setups)")
    p.add_argument("--gateway-port", type=port_number, metavar="PORT",
                   help="OpenAI-compatible gateway port (default 8080; 0 turns it off)")
    p.add_argument("--gateway-host", metavar="HOST", help="gateway listen address (default 127.0.0.1)")
    p.set_defaults(func=run)


def build_policy(args: argparse.Namespace) -> ServicePolicy:
    train_after = args.train_after_pairs
    if isinstance(train_after, str):  # from the environment
        train_after = positive_int(train_after)
    return ServicePolicy.from_file(
        args.policy, train_after_pairs=train_after, check_interval_s=args.check_interval, judge=args.judge,
        canary_interval_s=args.canary_interval, settle_s=args.settle, worker=args.worker,
        gateway_port=args.gateway_port, gateway_host=args.gateway_host,
        gateway_port_given=True if args.gateway_port is not None else None)


def run(args: argparse.Namespace) -> int:
    from agent_dpo_adapters.nats_bus import connect, ensure_bus
    from agent_dpo_adapters.nats_jobs import ensure_job_streams
    from agent_dpo_adapters.nats_server import EmbeddedNats, port_open

    conf = settings(args)
    policy = build_policy(args)
    root = store_dir(args)
    embedded = None
    url = args.nats_url
    if url is None:
        default = urlparse(DEFAULT_NATS_URL)
        if port_open(default.hostname, default.port):
            url = DEFAULT_NATS_URL
        else:
            embedded = EmbeddedNats(store_dir=root / "nats").start()
            url = embedded.url
            log.info("embedded_nats_started", nats_url=url, store=str(embedded.store_dir), pid=embedded.process.pid)
            print(f"embedded nats-server at {url} (JetStream store {embedded.store_dir})", flush=True)

    async def main(stop: asyncio.Event) -> int:
        nc = await connect(url, conf.nats, name="agent-dpo serve")
        try:
            js = nc.jetstream()
            await ensure_bus(js, conf.bus, update=False)
            await ensure_job_streams(js)
            ctx = await open_context(nc, url, conf, root, stop, policy)
            tasks = service_tasks(policy)
            log.info("serve_started", nats_url=url, store=str(root), tasks=list(tasks),
                     train_after_pairs=policy.train_after_pairs)
            print(f"serving: nats {url}, store {root}; tasks {', '.join(tasks)}; SIGTERM to stop", flush=True)
            await run_tasks(ctx, tasks)
        finally:
            await nc.close()
        log.info("serve_stopped")
        return 0

    try:
        return run_with_stop(main)
    finally:
        if embedded is not None:
            embedded.stop()


async def run_tasks(ctx: ServiceContext, tasks: dict[str, ServiceTask]) -> None:
    """Run every task until stop; if one fails, stop the others (they finish their current work) and
    re-raise. A task that returns early without stop is logged and the rest keep running."""
    running = {asyncio.create_task(factory(ctx), name=name): name for name, factory in tasks.items()}
    failure: BaseException | None = None
    try:
        pending = set(running)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    continue
                if task.exception() is not None and failure is None:
                    failure = task.exception()
                    log.error("service_task_failed", task=running[task], error=str(failure)[:300])
                    ctx.stop.set()
                elif not ctx.stop.is_set():
                    log.warning("service_task_returned", task=running[task])
    finally:
        for task in running:
            if not task.done():
                task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    if failure is not None:
        raise failure
