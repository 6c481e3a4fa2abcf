"""`agent-dpo train`: train a new version for one agent. Reads a training config (file + flags), takes
the data from `--data` or exports it from the store (export.py), and runs the chosen backend inline,
or enqueues the job for a worker on the bus (`--enqueue`). `agent-dpo train cancel JOB_ID` cancels a
hosted (OpenAI / Azure) fine-tuning job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent_dpo.cli.common import add_agent_option, add_nats_option, add_store_option, nats_url, store_dir
from agent_dpo.errors import AgentDpoError, UsageError

# CLI flag -> TrainConfig field, for flags that override the config file when given.
_OVERRIDES = ("backend", "method", "base_model", "sft_steps", "sft_learning_rate", "beta", "loss_type",
              "learning_rate", "max_steps", "batch_size", "grad_accum", "max_length", "truncation_mode",
              "lora_r", "seed", "device", "precision", "sft_weight")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a new version for one agent",
        description="SFT then DPO/KTO for one agent, with the trl, fast or openai backend. Flags override "
                    "the config file; the data comes from --data or is exported from the store.")
    add_agent_option(p, required=False)
    p.add_argument("--backend", choices=("trl", "fast", "openai"), help="training backend (default fast: the prefix-tree engine)")
    p.add_argument("--config", metavar="FILE", help="training config, TOML or JSON (see training/config.py)")
    p.add_argument("--method", choices=("dpo", "kto"), help="preference method (default dpo)")
    p.add_argument("--base-model", help="model name, safetensors folder or hub id "
                                        "(default smollm2-135m-instruct)")
    p.add_argument("--base-is-sft", action="store_const", const=True, default=None,
                   help="the base is already SFT'd: skip the SFT phase")
    p.add_argument("--full", action="store_const", const=True, default=None,
                   help="full fine-tuning instead of LoRA")
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--sft-learning-rate", type=float)
    p.add_argument("--max-steps", type=int, help="preference-phase optimizer steps")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--beta", type=float)
    p.add_argument("--loss-type")
    p.add_argument("--sft-weight", type=float, help="RPO: weight of the chosen answers' NLL added to the DPO "
                                                    "loss (default 0: plain DPO)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="auto (bf16 on a GPU, fp32 on a CPU), fp32, or bf16 mixed precision")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--truncation-mode", choices=("keep_start", "keep_end"),
                   help="rows over --max-length: cut the completion's end (keep_start, default) or drop the "
                        "oldest context (keep_end)")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--data", metavar="FILE", help="trl-dpo / trl-kto JSONL (default: export from the store)")
    p.add_argument("--openai-data", metavar="FILE", help="openai-dpo JSONL for --backend openai "
                                                         "(default: export from the store)")
    p.add_argument("--out", metavar="DIR", help="run folder (default <store>/runs/TENANT/AGENT/VERSION)")
    p.add_argument("--version", help="version name (default METHOD-UTCSTAMP)")
    p.add_argument("--enqueue", action="store_true", help="put the job on the bus for a worker instead")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_store_option(p)
    add_nats_option(p)
    p.set_defaults(func=run)
    actions = p.add_subparsers(dest="train_action", metavar="ACTION", parser_class=type(p))
    cancel = actions.add_parser("cancel", help="cancel a hosted fine-tuning job",
                                description="Cancel an OpenAI / Azure OpenAI fine-tuning job by its id.")
    cancel.add_argument("job_id", help="the provider's job id (ftjob-...)")
    cancel.set_defaults(func=run_cancel)


def build_config(args: argparse.Namespace) -> Any:
    from agent_dpo.training.config import TrainConfig

    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    flags = {name: getattr(args, name, None) for name in _OVERRIDES}
    flags["base_is_sft"] = args.base_is_sft
    flags["lora"] = False if args.full else None
    return config.override(**flags).validate()


def run(args: argparse.Namespace) -> int:
    from agent_dpo.training.recipes import new_version

    if args.agent is None:
        raise UsageError("the following arguments are required: --agent")
    tenant, agent = args.agent
    config = build_config(args)
    version = args.version or new_version(config.method)
    store = store_dir(args)
    out = Path(args.out) if args.out else store / "runs" / tenant / agent / version
    data, meta, openai_data = _training_data(args, config, store, out, tenant, agent)
    if args.enqueue:
        return _enqueue(args, config, tenant, agent, version, data, meta, openai_data)

    from agent_dpo.logs import get_logger
    from agent_dpo.training.backend import TrainJob, get_backend

    backend = get_backend(config.backend)
    log = get_logger(tenant_id=tenant, agent_id=agent, version=version)
    job = TrainJob(tenant_id=tenant, agent_id=agent, config=config, train_file=data, meta=meta,
                   output_dir=out, store_dir=store, openai_file=openai_data, version=version)
    log.info("train_job_running", backend=config.backend, method=config.method, data=str(data), out=str(out))
    result = backend.train(job, lambda _progress: None)  # the backend shows its own progress bar
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"trained {tenant}/{agent} {result.version} ({result.method}, {result.backend}) "
              f"in {result.wall_s:.0f}s, {result.steps} steps")
        if result.artifact_dir:
            print(f"adapter: {result.artifact_dir}  {result.artifact_digest}")
        if result.serve_name:
            print(f"serve name: {result.serve_name}")
        print(f"metrics: {result.metrics_file}" + (f"  plot: {result.plot_file}" if result.plot_file else ""))
    return 0


def _training_data(args: argparse.Namespace, config: Any, store: Path, out: Path, tenant: str,
                   agent: str) -> tuple[Path, dict, Path | None]:
    """(train file, its meta, openai file): given, or exported from the store into the run folder."""
    fmt = "trl-dpo" if config.method == "dpo" else "trl-kto"
    if args.data:
        data = Path(args.data)
        if not data.is_file():
            raise UsageError(f"--data {data}: no such file")
    else:
        data = _export(store, tenant, agent, fmt, out / "data" / f"train.{fmt}.jsonl")
    openai_data = Path(args.openai_data) if args.openai_data else None
    if config.backend == "openai" and openai_data is None:
        if args.data:
            raise UsageError("--backend openai needs --openai-data FILE (openai-dpo) alongside --data")
        openai_data = _export(store, tenant, agent, "openai-dpo", out / "data" / "train.openai-dpo.jsonl")
    return data, read_meta(data), openai_data


def read_meta(data: Path) -> dict:
    """The export's `<file>.meta.json`, or {} for hand-made data."""
    meta_path = data.with_name(data.name + ".meta.json")
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        raise AgentDpoError(f"{meta_path} is not JSON") from None


def _export(store: Path, tenant: str, agent: str, fmt: str, out: Path) -> Path:
    try:
        from agent_dpo.export import export_dataset
        from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore
    except ModuleNotFoundError as exc:
        raise AgentDpoError(f"exporting training data needs {exc.name}, which is not in this install; "
                            f"pass --data FILE") from None
    db = store / STORE_FILE if store.suffix == "" or store.is_dir() else store
    if not db.exists():
        raise AgentDpoError(f"no store at {db} (run `agent-dpo ingest` first, pass --store, or pass --data)")
    with SqliteStore(store) as events:
        summary = export_dataset(events, tenant, agent, fmt, out, split="train",
                                 include_pairs=(fmt == "trl-kto"))
    if summary.rows == 0:
        raise AgentDpoError(f"no {fmt} training rows for {tenant}/{agent} in {db} "
                            f"(drops: {summary.drops or 'none'})")
    print(f"exported {summary.rows} {fmt} rows to {summary.out}", file=sys.stderr)
    return summary.out


def _enqueue(args: argparse.Namespace, config: Any, tenant: str, agent: str, version: str, data: Path,
             meta: dict, openai_data: Path | None) -> int:
    """Hand the job to a worker (adapters/nats_jobs.py) and print its id; statuses follow on
    agentdpo.train.status.<job_id>."""
    import asyncio

    try:
        from agent_dpo_adapters.nats_bus import connect
        from agent_dpo_adapters.nats_jobs import enqueue_job
    except ModuleNotFoundError as exc:
        raise AgentDpoError(f"--enqueue needs {exc.name}, which is not in this install") from None

    from agent_dpo.config import load_settings

    # `--config` here is the training config, so NATS credentials come from the environment
    # (AGENT_DPO_CONFIG / AGENT_DPO_NATS_*), as for every other verb.
    auth = load_settings().nats

    async def go() -> str:
        nc = await connect(nats_url(args), auth)
        try:
            spec = await enqueue_job(nc.jetstream(), tenant_id=tenant, agent_id=agent, version=version,
                                     config=config.to_dict(), dataset=data, meta=meta,
                                     openai_dataset=openai_data)
        finally:
            await nc.drain()
        return spec.job_id

    job_id = asyncio.run(go())
    print(json.dumps({"job_id": job_id, "version": version}) if args.json
          else f"enqueued {tenant}/{agent} {version} as job {job_id}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    try:
        from agent_dpo_adapters.openai_finetune import cancel
    except ModuleNotFoundError as exc:
        raise AgentDpoError(f"train cancel needs {exc.name}, which is not in this install") from None
    status = cancel(args.job_id)
    print(f"{args.job_id}: {status}")
    return 0
