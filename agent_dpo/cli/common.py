"""Options and argument parsing shared by the verbs: NATS URL, store path, TENANT/AGENT.
Defaults come from the environment so a service manager can configure every verb at once."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_STORE_DIR = Path(".agent-dpo")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def add_nats_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", default=os.environ.get("AGENT_DPO_NATS_URL"),
                        help=f"NATS server URL (default {DEFAULT_NATS_URL}; env AGENT_DPO_NATS_URL)")


def nats_url(args: argparse.Namespace) -> str:
    return args.nats_url or DEFAULT_NATS_URL


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=os.environ.get("AGENT_DPO_STORE"),
                        help="store directory (default ./.agent-dpo; env AGENT_DPO_STORE)")


def store_dir(args: argparse.Namespace) -> Path:
    return Path(args.store) if args.store else DEFAULT_STORE_DIR


def add_agent_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--agent", required=required, type=parse_agent, metavar="TENANT/AGENT",
                        help="the agent, as tenant_id/agent_id")


def parse_agent(value: str) -> tuple[str, str]:
    """`acme/salon-rebook` -> ("acme", "salon-rebook"); anything else is a usage error."""
    parts = value.split("/")
    if len(parts) != 2 or not all(_ID.match(p) for p in parts):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not TENANT/AGENT (each 1-64 characters of A-Z a-z 0-9 _ -)")
    return parts[0], parts[1]


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML settings file with [bus] and [nats] tables (env AGENT_DPO_CONFIG); "
                             "see agent_dpo/config.py")


def settings(args: argparse.Namespace, **bus_overrides):
    """Bus and NATS auth settings: defaults < --config/AGENT_DPO_CONFIG file < env < flags."""
    from agent_dpo.config import load_settings

    return load_settings(getattr(args, "config", None), **bus_overrides)
