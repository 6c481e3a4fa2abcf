"""The `agent-dpo` command: builds the parser from one module per verb in this package and runs
the chosen verb. Every failure becomes one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from agent_dpo.errors import AgentDpoError

# Each module defines `register(subparsers)`, adding its verb with `set_defaults(func=run)`,
# where `run(args) -> int`. Heavy imports (torch, transformers) stay inside `run`.
VERB_MODULES = (
    "demo", "serve", "bus", "ingest", "status", "tools", "pairs",
    "train", "worker", "eval", "sample", "registry", "bench",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints a usage block on error; operators and scripts want one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="agent-dpo", description="Tune production agents on their own users' feedback.")
    parser.add_argument("--log-format", choices=["console", "json"], default=None,
                        help="log line format (default: console on a terminal, json otherwise; "
                             "also AGENT_DPO_LOG_FORMAT)")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error (default info)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=OneLineParser)
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f"agent_dpo.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"agent_dpo.cli.{name}":
                continue  # verb not built in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    from agent_dpo.logs import configure_logging

    configure_logging(fmt=args.log_format, level=args.log_level)
    try:
        return int(args.func(args) or 0)
    except AgentDpoError as exc:
        print(f"agent-dpo {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"agent-dpo {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `agent-dpo ... | head`: the reader left; not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001  an unexpected failure: one line for the operator, the trace in the log
        from agent_dpo.logs import get_logger

        get_logger(verb=args.verb).debug("unexpected_error", exc_info=True)  # --log-level debug shows it
        print(f"agent-dpo {args.verb}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
