"""`agent-dpo serve`: the long-running service. A set of owned asyncio tasks sharing one NATS connection
and one stop event: today ingest; later issues add their loops to `service_tasks` (training, rollout).
With no NATS URL given and nothing listening at the default, it starts an embedded nats-server."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from agent_dpo.cli.common import (
    DEFAULT_NATS_URL,
    add_config_option,
    add_nats_option,
    add_store_option,
    settings,
    store_dir,
)
from agent_dpo.cli.ingest import run_with_stop
from agent_dpo.config import Settings
from agent_dpo.logs import get_logger

log = get_logger(component="serve")


@dataclass
class ServiceContext:
    """What every service task gets. A task runs until `stop` is set, then returns promptly."""

    nc: object  # nats.aio.client.Client
    nats_url: str
    settings: Settings
    store_dir: Path
    stop: asyncio.Event


ServiceTask = Callable[[ServiceContext], Awaitable[None]]


async def ingest_task(ctx: ServiceContext) -> None:
    from agent_dpo_adapters.nats_bus import Ingestor
    from agent_dpo_adapters.sqlite_store import SqliteStore, is_transient

    store = SqliteStore(ctx.store_dir)
    try:
        await Ingestor(ctx.nc, store, ctx.settings.bus, is_transient=is_transient, stop=ctx.stop).run()
    finally:
        store.close()


def service_tasks() -> dict[str, ServiceTask]:
    """The tasks `serve` owns, by name. Add training and rollout loops here."""
    return {"ingest": ingest_task}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the service: ingest (and later train, evaluate, roll out)",
                              description="Run agent-dpo as a service until SIGTERM. With no --nats-url (and no "
                                          "AGENT_DPO_NATS_URL) and nothing listening at the default URL, an "
                                          "embedded nats-server with JetStream is started under the store.")
    add_nats_option(p)
    add_store_option(p)
    add_config_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent_dpo_adapters.nats_bus import connect, ensure_bus
    from agent_dpo_adapters.nats_server import EmbeddedNats, port_open

    conf = settings(args)
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
            await ensure_bus(nc.jetstream(), conf.bus, update=False)
            ctx = ServiceContext(nc=nc, nats_url=url, settings=conf, store_dir=root, stop=stop)
            log.info("serve_started", nats_url=url, store=str(root), tasks=list(service_tasks()))
            print(f"serving: nats {url}, store {root}; SIGTERM to stop", flush=True)
            await run_tasks(ctx, service_tasks())
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


