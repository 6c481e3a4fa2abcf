"""Training a version on OpenAI fine-tuning: the config an operator writes, and the same run from Python.

The config file (`agent-dpo train --agent acme-salons/salon-rebook --backend openai --config train.toml`):

    [train]
    backend = "openai"
    method = "dpo"                         # OpenAI fine-tunes dpo only (no kto)
    openai_model = "gpt-4.1-mini-2025-04-14"
    beta = 0.1
    openai_n_epochs = 2                    # unset hyperparameters are left to the API ("auto")
    # openai_batch_size = 8
    # openai_learning_rate_multiplier = 0.5
    supervised_first = false               # true: a supervised job on the preferred answers, then DPO on it
    # openai_suffix = "salon-rebook"       # default: the agent id
    # allow_unredacted_upload = false      # only a --no-redact export needs this, and it says so

Credentials come from the environment only: OPENAI_API_KEY (and OPENAI_BASE_URL for another
OpenAI-compatible endpoint). Ctrl-C cancels the job; `agent-dpo train cancel JOB_ID` does from elsewhere.

Run this file against an openai-dpo export (`agent-dpo pairs --format openai-dpo --out pairs.jsonl`):

    python examples/openai_backend.py --export pairs.jsonl --agent acme-salons/salon-rebook
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent_dpo.logs import configure_logging
from agent_dpo.training.backend import TrainJob
from agent_dpo.training.config import TrainConfig
from agent_dpo_adapters.openai_finetune import OpenAIBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="openai-dpo JSONL (its .meta.json beside it)")
    parser.add_argument("--agent", default="acme-salons/salon-rebook", help="TENANT/AGENT")
    parser.add_argument("--model", default="gpt-4.1-mini-2025-04-14")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--supervised-first", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(".agent-dpo/openai-run"))
    args = parser.parse_args()
    configure_logging()  # job events to stderr, progress lines to stdout

    tenant_id, agent_id = args.agent.split("/")
    config = TrainConfig(backend="openai", method="dpo", openai_model=args.model, beta=0.1,
                         openai_n_epochs=args.epochs, supervised_first=args.supervised_first)
    meta_file = args.export.with_name(args.export.name + ".meta.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    job = TrainJob(tenant_id=tenant_id, agent_id=agent_id, config=config, train_file=args.export, meta=meta,
                   output_dir=args.out, store_dir=args.out.parent, openai_file=args.export)
    result = OpenAIBackend().train(job, lambda p: print(json.dumps(p)))
    print(f"serve name: {result.serve_name}  steps: {result.steps}  metrics: {result.metrics_file}")


if __name__ == "__main__":
    main()
