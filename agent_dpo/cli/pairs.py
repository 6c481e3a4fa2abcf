"""`agent-dpo pairs`: export one agent's training data from the store (export.py) and print what went
in by signal and what was left out by reason."""

from __future__ import annotations

import argparse
import sys

from agent_dpo.cli.common import add_agent_option, add_store_option, store_dir
from agent_dpo.errors import AgentDpoError, UsageError
from agent_dpo.split import DEFAULT_TEST_FRACTION


def register(subparsers: argparse._SubParsersAction) -> None:
    from agent_dpo.export import FORMATS, SPLITS
    from agent_dpo.pairing import CSAT_POLICIES, KTO_SIGNALS, PAIR_SIGNALS

    p = subparsers.add_parser(
        "pairs", help="export DPO pairs / KTO examples of one agent",
        description="Export training data from the store as spec/events-v1.md defines, with a "
                    "<out>.meta.json beside it; prints counts by signal and drops by reason.")
    add_agent_option(p)
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--out", required=True, help="output JSON Lines file")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="which side of the per-call split (default train)")
    p.add_argument("--test-fraction", type=_fraction, default=DEFAULT_TEST_FRACTION,
                   help=f"share of calls held out for test (default {DEFAULT_TEST_FRACTION})")
    p.add_argument("--no-redact", action="store_true",
                   help="keep e-mails, phone and card numbers (redacted by default)")
    p.add_argument("--length-balance", action="store_true",
                   help="drop the length-bias tail until mean chosen/rejected length is within [0.9, 1.1]")
    p.add_argument("--include-pairs", action="store_true",
                   help="trl-kto: add each DPO pair as one desirable and one undesirable example")
    p.add_argument("--csat-desirable", type=_fraction, default=0.8,
                   help="CSAT score/scale_max at or above which turns are desirable (default 0.8)")
    p.add_argument("--csat-undesirable", type=_fraction, default=0.4,
                   help="CSAT score/scale_max at or below which turns are undesirable (default 0.4)")
    p.add_argument("--csat-policy", action="append", choices=CSAT_POLICIES, default=None,
                   help="how CSAT credits turns; repeatable (default all-turns). shared-prefix adds pairs "
                        "from calls that share a context but answered differently")
    p.add_argument("--csat-margin", type=_fraction, default=0.4,
                   help="shared-prefix: least CSAT gap, as a share of the scale (default 0.4)")
    p.add_argument("--signal", action="append", default=[], choices=PAIR_SIGNALS + KTO_SIGNALS,
                   help="only examples of this signal; "
                        "repeatable; adds up with --rater: an example is kept when either matches")
    p.add_argument("--rater", action="append", default=[], metavar="RATER",
                   help="only examples labelled by this rater (as the feedback event names it), e.g. one "
                        "side-by-side campaign; repeatable")
    p.add_argument("--cap", action="append", default=[], type=_cap, metavar="KIND:NAME=N",
                   help="keep at most N rows of one signal (signal:correction=150) or rater "
                        "(rater:csm=100), a seeded draw; repeatable. Weights a mix toward one campaign")
    p.add_argument("--seed", type=int, default=0, help="which rows --cap keeps (default 0)")
    p.add_argument("--labelled-by", metavar="WHO",
                   help="who labelled the data, recorded in the meta (default: the raters seen in the events)")
    add_store_option(p)
    p.set_defaults(func=run)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]")
    return value


def _cap(text: str) -> tuple[str, int]:
    from agent_dpo.export import parse_cap

    try:
        return parse_cap(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from agent_dpo.export import export_dataset
    from agent_dpo.pairing import PairingConfig
    from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore

    tenant, agent = args.agent
    if args.include_pairs and args.fmt != "trl-kto":
        raise UsageError("--include-pairs applies to --format trl-kto only")
    try:
        config = PairingConfig(csat_desirable=args.csat_desirable, csat_undesirable=args.csat_undesirable,
                               csat_policies=tuple(dict.fromkeys(args.csat_policy or ["all-turns"])),
                               csat_margin=args.csat_margin)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    path = store_dir(args)
    db = path / STORE_FILE if path.suffix == "" or path.is_dir() else path
    if not db.exists():
        raise AgentDpoError(f"no store at {db} (run `agent-dpo ingest` first, or pass --store)")
    with SqliteStore(path) as store:
        if store.event_range(tenant, agent) is None:
            raise AgentDpoError(f"no events for {tenant}/{agent} in {db}")
        summary = export_dataset(store, tenant, agent, args.fmt, args.out, split=args.split,
                                 redact=not args.no_redact, length_balance=args.length_balance,
                                 include_pairs=args.include_pairs, test_fraction=args.test_fraction,
                                 config=config, labelled_by=args.labelled_by,
                                 signals=set(args.signal), raters=set(args.rater),
                                 caps=_caps(args.cap), cap_seed=args.seed)
    meta = summary.meta
    out = sys.stdout
    print(f"wrote {summary.rows} rows ({summary.format}, split {summary.split}, "
          f"{'redacted' if meta['redacted'] else 'NOT redacted'}) to {summary.out}", file=out)
    print(f"meta: {summary.meta_path}  sha256 {summary.sha256[:16]}  "
          f"calls {meta['calls']['complete']}/{meta['calls']['seen']} complete", file=out)
    _table("signal", "rows", summary.counts_by_signal, out)
    _table("drop reason", "count", summary.drops, out)
    length = meta["length"]["written"]
    if length["pairs"]:
        print(f"length: chosen {length['chosen_mean_chars']} / rejected {length['rejected_mean_chars']} "
              f"mean chars, ratio {length['ratio']}", file=out)
    kto = meta["kto"]
    if summary.format == "trl-kto":
        print(f"kto: {kto['n_desirable']} desirable, {kto['n_undesirable']} undesirable; "
              f"desirable_weight {kto['desirable_weight']}, undesirable_weight {kto['undesirable_weight']}; "
              f"completion mean chars {kto['completion_mean_chars']['desirable']} desirable / "
              f"{kto['completion_mean_chars']['undesirable']} undesirable", file=out)
    return 0


def _caps(pairs: list[tuple[str, int]]) -> dict[str, int]:
    caps: dict[str, int] = {}
    for key, n in pairs:
        if key in caps and caps[key] != n:
            raise UsageError(f"--cap {key} given twice ({caps[key]} and {n})")
        caps[key] = n
    return caps


def _table(head: str, unit: str, counts: dict[str, int], out) -> None:
    if not counts:
        print(f"{head}: none", file=out)
        return
    width = max(len(head), *(len(k) for k in counts))
    print(f"{head:<{width}}  {unit:>7}", file=out)
    for key, n in counts.items():
        print(f"{key:<{width}}  {n:>7}", file=out)
