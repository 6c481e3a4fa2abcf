"""`agent-dpo bus init`: create or update, idempotently, the JetStream resources ingest relies on:
the event stream, the dead-letter stream and the durable pull consumer (adapters/nats_bus.py)."""

from __future__ import annotations

import argparse
import asyncio

from agent_dpo.cli.common import add_config_option, add_nats_option, nats_url, settings
from agent_dpo.cli.ingest import positive_seconds
from agent_dpo.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bus", help="manage the NATS JetStream resources agent-dpo uses")
    sub = p.add_subparsers(dest="bus_command", metavar="COMMAND", parser_class=type(p))
    init = sub.add_parser("init", help="create or update streams and consumers (idempotent)",
                          description="Create or update the event stream, the dead-letter stream and the "
                                      "durable ingest consumer. Running it again applies changed settings.")
    add_nats_option(init)
    add_config_option(init)
    init.add_argument("--duplicate-window", type=positive_seconds, metavar="SECONDS",
                      help="JetStream de-duplication window on Nats-Msg-Id (default 1200, at least 600)")
    init.set_defaults(func=run_init)
    p.set_defaults(func=run_missing)


def run_missing(_args: argparse.Namespace) -> int:
    raise UsageError("bus needs a command: init")


# The other components' JetStream resources, each made ready by its adapter's idempotent function:
# (label, module, function taking `js`).
OTHER_RESOURCES = (
    ("registry KV bucket", "agent_dpo_adapters.nats_registry", "open_registry_bucket"),
    ("artifact object store", "agent_dpo_adapters.nats_artifacts", "open_artifact_store"),
    ("training job streams", "agent_dpo_adapters.nats_jobs", "ensure_job_streams"),
)


async def ensure_other_resources(js) -> dict[str, str]:
    import importlib

    done = {}
    for label, module_name, function in OTHER_RESOURCES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue  # that component is not part of this install
        await getattr(module, function)(js)
        done[label] = "ready"
    return done


def run_init(args: argparse.Namespace) -> int:
    import nats.errors
    import nats.js.errors

    from agent_dpo.errors import AgentDpoError
    from agent_dpo_adapters.nats_bus import connect, ensure_bus

    conf = settings(args, duplicate_window_s=args.duplicate_window)
    url = nats_url(args)

    async def main() -> dict[str, str]:
        nc = await connect(url, conf.nats, name="agent-dpo bus init")
        try:
            js = nc.jetstream()
            result = await ensure_bus(js, conf.bus)
            try:
                result.update(await ensure_other_resources(js))
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                raise AgentDpoError(f"bus init failed: {exc}") from None
            return result
        finally:
            await nc.close()

    for resource, what in asyncio.run(main()).items():
        print(f"{resource}: {what}")
    return 0
