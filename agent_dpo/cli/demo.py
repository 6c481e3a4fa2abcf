"""`agent-dpo demo`: the whole loop on embedded defaults, on one machine with no GPU and no network.
Starts its own NATS server, replays the example agents' calls, trains, evaluates, rolls out, reports."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop on embedded defaults and write a report")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes on 2 cores)")
    p.add_argument("--calls", type=int, default=None, help="simulated calls to publish")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backend", choices=["fast", "trl"], default=None, help="local training engine")
    p.add_argument("--store", default=".agent-dpo", help="store directory (the demo works under DIR/demo)")
    p.add_argument("--report", default="report", help="where report/index.html goes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent_dpo.demo import DemoSettings, run_demo
    from agent_dpo.errors import UsageError

    overrides = {k: v for k, v in {"calls": args.calls, "seed": args.seed, "backend": args.backend}.items()
                 if v is not None}
    if "calls" in overrides and overrides["calls"] < 100:
        raise UsageError("--calls must be at least 100 (the canary needs live and held-out data)")
    paths = {"store_dir": Path(args.store) / "demo", "report_dir": Path(args.report)}
    settings = (DemoSettings.quick_run(**overrides, **paths) if args.quick
                else DemoSettings(**overrides, **paths))
    run_demo(settings)
    return 0
