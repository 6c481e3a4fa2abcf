"""`agent-dpo sample`: a trained version (or its SFT stage) answers each prompt of an export several times,
for a side-by-side rater; the picks come back as `feedback.preference` events (sampling.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent_dpo.cli.common import add_agent_option, add_store_option, store_dir
from agent_dpo.errors import AgentDpoError, UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="sample a version's answers to exported prompts, for side-by-side rating",
        description="Each distinct prompt of --data (trl-dpo or trl-kto JSONL from `agent-dpo pairs`) is answered "
                    "--samples times by the version (sampled at --temperature). Writes one JSON line per prompt: "
                    "prompt, tools, meta (call_id, turn), version, candidates. Raters pick one candidate over "
                    "another and the platform publishes that as feedback.preference for that call and turn.")
    add_agent_option(p)
    p.add_argument("--version", help="version (run folder name) or adapter folder (default: the latest run)")
    p.add_argument("--stage", choices=("final", "sft"), default="final",
                   help="final: the version itself (default); sft: its SFT stage (its base when none ran)")
    p.add_argument("--data", required=True, metavar="FILE", help="exported JSONL whose prompts to answer")
    p.add_argument("--out", required=True, metavar="FILE", help="candidates JSONL to write")
    p.add_argument("--samples", type=int, default=2, help="answers per prompt (default 2)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--max-prompts", type=int, help="answer a seeded sample of this many prompts")
    p.add_argument("--batch-size", type=int, default=16, help="generated rows per batch (default 16)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="weights for generation (default bf16: about 2.5x faster decoding on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    add_store_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent_dpo.cli.eval import resolve_baseline, resolve_version
    from agent_dpo.evaluation import Policy
    from agent_dpo.sampling import SampleSettings, candidate_prompts, sample_candidates, write_candidates
    from agent_dpo.training.recipes import read_rows

    tenant, agent = args.agent
    store = store_dir(args)
    settings = SampleSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              max_prompts=args.max_prompts, seed=args.seed, precision=args.precision,
                              device=args.device)
    data = Path(args.data)
    if not data.is_file():
        raise UsageError(f"--data {data}: no such file")
    version = resolve_version(store, tenant, agent, args.version)
    if args.stage == "sft":
        policy = resolve_baseline(store, tenant, agent, version, "sft")
    else:
        policy = Policy(label=version["version"], base_model=version["base_model"], adapter_dir=version["adapter_dir"])
    prompts = candidate_prompts(read_rows(data))
    if not prompts:
        raise AgentDpoError(f"{data} holds no prompts")
    records = sample_candidates(prompts, policy, store, settings)
    out = Path(args.out)
    write_candidates(out, records)
    summary = {"version": policy.label, "prompts": len(records), "samples": settings.samples,
               "candidates": sum(len(r["candidates"]) for r in records), "out": str(out)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['candidates']} candidates from {policy.label} for {summary['prompts']} prompts -> {out}")
    return 0
