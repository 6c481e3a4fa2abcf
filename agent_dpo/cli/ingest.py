"""`agent-dpo ingest [--until-idle SECONDS]`: consume events from JetStream into the store.
Also home of `run_with_stop`, the SIGTERM/SIGINT handling that every long-running verb shares."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable

from agent_dpo.cli.common import (
    add_config_option,
    add_nats_option,
    add_store_option,
    nats_url,
    settings,
    store_dir,
)
from agent_dpo.logs import get_logger


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds < 1e9:
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number of seconds")
    return seconds


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ingest", help="consume events from NATS JetStream into the store",
                              description="Consume agent events into the store: validate, dead-letter what "
                                          "breaks the contract, store the rest, then acknowledge.")
    add_nats_option(p)
    add_store_option(p)
    add_config_option(p)
    p.add_argument("--until-idle", type=positive_seconds, metavar="SECONDS",
                   help="exit 0 once no event has arrived for this long (default: run until SIGTERM)")
    p.add_argument("--batch-size", type=positive_int, help="messages per fetch (default from config: 1000)")
    p.add_argument("--no-init", action="store_true",
                   help="do not create/update the stream and consumer first (for credentials without "
                        "JetStream admin rights)")
    p.set_defaults(func=run)


def run_with_stop(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run `main(stop)`; the first SIGTERM/SIGINT sets `stop` (finish the batch, exit cleanly),
    a second one cancels."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal(signame: str) -> None:
            if stop.is_set():
                task.cancel()
                return
            get_logger().info("stopping", signal=signame)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            return await main(stop)
        except asyncio.CancelledError:
            return 130
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    return asyncio.run(runner())


def run(args: argparse.Namespace) -> int:
    from agent_dpo_adapters.nats_bus import Ingestor, connect, ensure_bus
    from agent_dpo_adapters.sqlite_store import SqliteStore, is_transient

    conf = settings(args, batch_size=args.batch_size)
    url = nats_url(args)
    log = get_logger(component="ingest")

    async def main(stop: asyncio.Event) -> int:
        nc = await connect(url, conf.nats, name="agent-dpo ingest")
        store = SqliteStore(store_dir(args))
        started = time.monotonic()
        try:
            if not args.no_init:
                await ensure_bus(nc.jetstream(), conf.bus, update=False)
            log.info("ingest_started", nats_url=url, store=str(store.path), stream=conf.bus.stream,
                     consumer=conf.bus.consumer, until_idle=args.until_idle)
            ingestor = Ingestor(nc, store, conf.bus, is_transient=is_transient, stop=stop)
            stats = await ingestor.run(until_idle=args.until_idle)
        finally:
            store.close()
            await nc.close()
        elapsed = time.monotonic() - started
        log.info("ingest_stopped", seconds=round(elapsed, 2), **stats.as_dict())
        print(f"ingested {stats.messages} messages: {stats.inserted} new events, {stats.duplicates} duplicates, "
              f"{stats.dead_letters} dead-lettered ({elapsed:.1f}s)", file=sys.stdout, flush=True)
        return 0

    return run_with_stop(main)
