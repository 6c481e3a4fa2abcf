"""`agent-dpo registry status|promote|rollback|canary|history --agent TENANT/AGENT`: an agent's
versions and rollout state from the NATS KV registry, and the operator's moves of its aliases.
Every move is one compare-and-set write, visible to every router within milliseconds."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
from pathlib import Path

from agent_dpo.cli.common import add_agent_option, add_nats_option, nats_url
from agent_dpo.errors import AgentDpoError, UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("registry", help="versions and rollout state of an agent; promote, rollback")
    sub = p.add_subparsers(dest="registry_cmd", metavar="COMMAND", parser_class=type(p))

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        add_agent_option(c)
        add_nats_option(c)
        c.set_defaults(func=run)
        return c

    c = command("status", "champion, challenger, canary weight and every version's manifest")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c = command("promote", "make the challenger (or --version) champion; the old champion becomes previous")
    c.add_argument("--version", help="promote this version directly (default: the challenger)")
    _add_who(c)
    c = command("rollback", "end a canary, or make the previous version champion again")
    _add_who(c)
    c = command("canary", "let a version into canary at the first step, if its eval passes the gates")
    c.add_argument("--version", required=True)
    c.add_argument("--eval", type=Path, help="eval JSON from `agent-dpo eval --json` (default: the manifest's)")
    c.add_argument("--force", action="store_true", help="skip the eval gates (recorded in the reason)")
    _add_who(c)
    c = command("history", "every recorded change of the rollout document (the audit trail)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_missing)


def _add_who(c: argparse.ArgumentParser) -> None:
    c.add_argument("--reason", default="", help="why; kept in the audit trail")
    c.add_argument("--by", default=None, help="who (default cli:<user>)")


def _missing(_args: argparse.Namespace) -> int:
    raise UsageError("registry needs a COMMAND: status, promote, rollback, canary or history")


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from agent_dpo_adapters.nats_bus import connect
    from agent_dpo_adapters.nats_registry import NatsRegistry

    nc = await connect(nats_url(args), name="agent-dpo-registry")
    try:
        registry = await NatsRegistry.open(nc)
        return await COMMANDS[args.registry_cmd](registry, args)
    finally:
        await nc.close()


def _who(args: argparse.Namespace) -> str:
    if args.by:
        return args.by
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "cli"


async def _status(registry, args) -> int:
    tenant_id, agent_id = args.agent
    doc, revision = await registry.get_rollout(tenant_id, agent_id)
    manifests = await registry.list_manifests(tenant_id, agent_id)
    if args.json:
        print(json.dumps({
            "tenant_id": tenant_id, "agent_id": agent_id, "revision": revision,
            "rollout": doc.model_dump(by_alias=True) if doc else None,
            "versions": [m.model_dump(by_alias=True) for m in manifests]}, indent=2))
        return 0
    if doc is None:
        print(f"{tenant_id}/{agent_id}: no rollout yet (calls use the base model); {len(manifests)} version(s)")
    else:
        canary = (f", challenger {doc.challenger} at {doc.canary_weight:.0%} (step {doc.step})"
                  if doc.state == "canary" else "")
        print(f"{tenant_id}/{agent_id}: champion {doc.champion or 'base model'}{canary}, previous "
              f"{doc.previous or '-'}, state {doc.state} (revision {revision})")
        print(f"  last change: {doc.reason} by {doc.changed_by} at {doc.changed_at}")
    for m in manifests:
        role = ""
        if doc is not None:
            role = {doc.champion: "champion", doc.challenger: "challenger", doc.previous: "previous"}.get(m.version, "")
        ev = m.eval or {}
        scores = ", ".join(f"{k} {ev[k]:.3f}" for k in ("preference_accuracy", "win_rate", "tool_call_validity")
                           if isinstance(ev.get(k), (int, float)))
        print(f"  {m.version:<16} {role:<10} {m.backend:<6} {m.method or '-':<5} {m.created_at}  "
              f"{m.artifact.digest[:19] or '-'}  {scores}")
    return 0


async def _promote(registry, args) -> int:
    from agent_dpo.registry import promote

    tenant_id, agent_id = args.agent
    if args.version and await registry.get_manifest(tenant_id, agent_id, args.version) is None:
        raise AgentDpoError(f"{tenant_id}/{agent_id} has no version {args.version}")
    doc = await registry.change_rollout(tenant_id, agent_id,
                                        lambda d: promote(d, _who(args), args.reason, args.version))
    print(f"{tenant_id}/{agent_id}: champion {doc.champion} (previous {doc.previous or '-'})")
    return 0


async def _rollback(registry, args) -> int:
    from agent_dpo.registry import rollback

    tenant_id, agent_id = args.agent
    doc = await registry.change_rollout(tenant_id, agent_id, lambda d: rollback(d, _who(args), args.reason))
    print(f"{tenant_id}/{agent_id}: champion {doc.champion or 'base model'}, state {doc.state} ({doc.reason})")
    return 0


async def _canary(registry, args) -> int:
    from agent_dpo.canary import CanaryController

    tenant_id, agent_id = args.agent
    manifest = await registry.get_manifest(tenant_id, agent_id, args.version)
    if manifest is None:
        raise AgentDpoError(f"{tenant_id}/{agent_id} has no version {args.version}")
    if args.eval:
        try:
            eval_result = json.loads(args.eval.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read eval JSON {args.eval}: {exc}") from None
    else:
        eval_result = manifest.eval or None
    controller = CanaryController(registry, actor=_who(args))
    d = await controller.start(tenant_id, agent_id, args.version, eval_result, force=args.force)
    if d.action == "refuse":
        raise AgentDpoError(d.reason)
    print(f"{tenant_id}/{agent_id}: {args.version} in canary at {d.weight:.0%}")
    return 0


async def _history(registry, args) -> int:
    tenant_id, agent_id = args.agent
    entries = await registry.history(tenant_id, agent_id)
    if args.json:
        print(json.dumps([{"revision": e.revision, "at": e.created.isoformat() if e.created else None,
                           "rollout": e.doc.model_dump(by_alias=True) if e.doc else None} for e in entries],
                         indent=2))
        return 0
    if not entries:
        print(f"{tenant_id}/{agent_id}: no rollout history")
    for e in entries:
        d = e.doc
        if d is None:
            print(f"{e.revision:>6}  deleted")
            continue
        canary = f" challenger {d.challenger} {d.canary_weight:.0%}" if d.state == "canary" else ""
        print(f"{e.revision:>6}  {d.changed_at}  champion {d.champion or 'base'}{canary}  {d.state:<11} "
              f"{d.changed_by}: {d.reason}")
    return 0


COMMANDS = {"status": _status, "promote": _promote, "rollback": _rollback, "canary": _canary,
            "history": _history}
