"""`agent-dpo eval`: evaluate a trained version on the agent's held-out split against a baseline (its
SFT base by default) and print the report promotion gates read (evaluation.py). Versions are the run
folders `agent-dpo train` writes under <store>/runs/TENANT/AGENT/, or adapter folders given by path."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent_dpo.cli.common import add_agent_option, add_store_option, store_dir
from agent_dpo.errors import AgentDpoError, UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a version on the agent's held-out set",
        description="Preference accuracy, judge win rate (position-swapped, 95%% bootstrap interval) and "
                    "tool-call validity of a version against a baseline, on the held-out split.")
    add_agent_option(p)
    p.add_argument("--version", help="version (run folder name) or adapter folder (default: the latest run)")
    p.add_argument("--baseline", default="sft",
                   help="sft (the version's SFT base, default), base (the untrained base model), "
                        "another version, or an adapter folder")
    p.add_argument("--data", metavar="FILE", help="held-out trl-dpo JSONL (default: export the test split)")
    p.add_argument("--judge", default="rubric",
                   help="rubric (the example world's offline judge), openai:MODEL, azure:DEPLOYMENT, "
                        "or none (default rubric)")
    p.add_argument("--beta", type=float, help="beta of the implicit reward (default: the version's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompts", type=int, help="judge at most this many held-out prompts")
    p.add_argument("--max-pairs", type=int, help="score at most this many held-out pairs")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation limit per answer (default 256: tool calls with many arguments need >100)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--max-length", type=int,
                   help="score and generate on the last N tokens (default: the version's training window "
                        "when it trained with truncation_mode keep_end, else the whole context)")
    p.add_argument("--out", metavar="FILE", help="also write the report here (default: the run's eval.json)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_store_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent_dpo.evaluation import EvalSettings, Policy, check_judge_allowed, evaluate
    from agent_dpo.training.recipes import read_rows

    tenant, agent = args.agent
    store = store_dir(args)
    version = resolve_version(store, tenant, agent, args.version)
    candidate = Policy(label=version["version"], base_model=version["base_model"],
                       adapter_dir=version["adapter_dir"])
    baseline = resolve_baseline(store, tenant, agent, version, args.baseline)
    judge = make_judge(args.judge, agent)
    if args.data:
        data = Path(args.data)
        if not data.is_file():
            raise UsageError(f"--data {data}: no such file")
    else:
        data = _export_test_split(store, tenant, agent, version)
    meta = _read_meta(data)
    if judge is not None:
        check_judge_allowed(judge, meta)  # before loading any model
    settings = EvalSettings(beta=args.beta if args.beta is not None else version.get("beta", 0.1),
                            seed=args.seed, max_new_tokens=args.max_new_tokens, max_prompts=args.max_prompts,
                            max_pairs=args.max_pairs, device=args.device,
                            max_length=args.max_length or version.get("window"))
    rows = [r for r in read_rows(data) if "chosen" in r and "rejected" in r]
    if not rows:
        raise AgentDpoError(f"{data} holds no trl-dpo pairs to evaluate on")
    out = Path(args.out) if args.out else (version["run_dir"] / "eval.json" if version.get("run_dir") else None)
    answers = out.with_name(out.stem + ".answers.jsonl") if out else None
    report = evaluate(rows, candidate, baseline, judge, store, settings, meta, answers_file=answers)
    report["data"] = str(data)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        ci = report["win_rate_ci"]
        print(f"{tenant}/{agent} {report['version']} vs {report['baseline']} on {report['n']} held-out pairs")
        print(f"preference accuracy {report['preference_accuracy']:.3f}")
        if report["win_rate"] is not None:
            print(f"win rate {report['win_rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                  f"({report['wins']} wins, {report['ties']} ties, {report['losses']} losses; judge {report['judge']})")
        print(f"tool-call validity {_share(report['tool_call_validity'], report.get('tool_calls_truncated'))} "
              f"(baseline {_share(report['baseline_tool_call_validity'], report.get('baseline_tool_calls_truncated'))})")
    return 0


def _share(value: float | None, truncated: int | None = 0) -> str:
    text = "n/a (no complete tool calls)" if value is None else f"{value:.3f}"
    return text + (f"; {truncated} cut off by --max-new-tokens" if truncated else "")


def runs_dir(store: Path, tenant: str, agent: str) -> Path:
    return store / "runs" / tenant / agent


def resolve_version(store: Path, tenant: str, agent: str, name: str | None) -> dict[str, Any]:
    """{"version", "base_model", "adapter_dir", "sft_dir", "beta", "run_dir"} for a run or a folder."""
    # A folder path (anything with a separator: an absolute path joins to itself) is a folder, not a run name.
    if name and Path(name).is_dir() and (Path(name).name != name or not (runs_dir(store, tenant, agent) / name).is_dir()):
        return _from_folder(Path(name))
    if name is None:
        results = sorted(runs_dir(store, tenant, agent).glob("*/result.json"), key=lambda p: p.stat().st_mtime)
        if not results:
            raise AgentDpoError(f"no trained version of {tenant}/{agent} under {runs_dir(store, tenant, agent)} "
                                f"(run `agent-dpo train` first, or pass --version)")
        result_file = results[-1]
    else:
        result_file = runs_dir(store, tenant, agent) / name / "result.json"
        if not result_file.is_file():
            raise AgentDpoError(f"no version {name!r} of {tenant}/{agent} (no {result_file})")
    record = json.loads(result_file.read_text(encoding="utf-8"))
    if not record.get("artifact_dir"):
        raise AgentDpoError(f"version {record['version']} has no local weights (backend "
                            f"{record.get('backend')}); evaluate it through its serving endpoint")
    return {"version": record["version"], "base_model": record["base_model"],
            "adapter_dir": Path(record["artifact_dir"]),
            "sft_dir": Path(record["sft_artifact_dir"]) if record.get("sft_artifact_dir") else None,
            "beta": (record.get("config") or {}).get("beta", 0.1), "run_dir": result_file.parent,
            "window": _window(record.get("config") or {}),
            "base_is_sft": (record.get("config") or {}).get("base_is_sft", False)}


def _window(config: dict) -> int | None:
    return config.get("max_length") if config.get("truncation_mode") == "keep_end" else None


def _from_folder(folder: Path) -> dict[str, Any]:
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
        if not base:
            raise AgentDpoError(f"{config_file} names no base model")
        return {"version": folder.name, "base_model": base, "adapter_dir": folder, "sft_dir": None,
                "beta": 0.1, "run_dir": None}
    if (folder / "config.json").is_file():
        return {"version": folder.name, "base_model": str(folder), "adapter_dir": None, "sft_dir": None,
                "beta": 0.1, "run_dir": None}
    raise AgentDpoError(f"{folder} is neither an adapter nor a model folder")


def resolve_baseline(store: Path, tenant: str, agent: str, version: dict[str, Any], name: str) -> Any:
    from agent_dpo.evaluation import Policy

    if name == "base":
        return Policy(label="base", base_model=version["base_model"])
    if name == "sft":
        if version.get("sft_dir"):
            return Policy(label=f"{version['version']}:sft", base_model=version["base_model"],
                          adapter_dir=version["sft_dir"])
        # No SFT phase ran (the base was declared SFT'd): the base is the SFT model.
        return Policy(label="base", base_model=version["base_model"])
    other = resolve_version(store, tenant, agent, name)
    return Policy(label=other["version"], base_model=other["base_model"], adapter_dir=other["adapter_dir"])


def make_judge(spec: str, agent_id: str) -> Any:
    if spec == "none":
        return None
    if spec == "rubric":
        try:
            from agent_dpo.world.rubric import RubricJudge
        except ModuleNotFoundError:
            raise AgentDpoError("the rubric judge comes with the example world (agent_dpo.world), "
                                "which is not in this install") from None
        return RubricJudge(agent_id=agent_id)
    if spec.partition(":")[0] in ("openai", "azure"):
        try:
            from agent_dpo_adapters.openai_judge import OpenAIJudge
        except ModuleNotFoundError as exc:
            raise AgentDpoError(f"judge {spec} needs {exc.name}, which is not installed") from None
        return OpenAIJudge.from_spec(spec)
    raise UsageError(f"--judge must be rubric, openai:MODEL, azure:DEPLOYMENT or none, not {spec!r}")


def _read_meta(data: Path) -> dict:
    from agent_dpo.cli.train import read_meta

    return read_meta(data)


def _export_test_split(store: Path, tenant: str, agent: str, version: dict[str, Any]) -> Path:
    try:
        from agent_dpo.export import export_dataset
        from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore
    except ModuleNotFoundError as exc:
        raise AgentDpoError(f"exporting the held-out split needs {exc.name}; pass --data FILE") from None
    db = store / STORE_FILE if store.suffix == "" or store.is_dir() else store
    if not db.exists():
        raise AgentDpoError(f"no store at {db} (pass --store or --data)")
    where = (version.get("run_dir") or store / "eval") / "data" / "test.trl-dpo.jsonl"
    with SqliteStore(store) as events:
        summary = export_dataset(events, tenant, agent, "trl-dpo", where, split="test")
    if summary.rows == 0:
        raise AgentDpoError(f"no held-out trl-dpo pairs for {tenant}/{agent} in {db}")
    print(f"exported {summary.rows} held-out pairs to {summary.out}", file=sys.stderr)
    return summary.out
