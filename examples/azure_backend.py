"""Training a version on Azure OpenAI fine-tuning: the same backend as OpenAI's, pointed at an Azure
resource by its endpoint and api-version; the base model is the Azure model name.

The config file (`agent-dpo train --agent acme-salons/salon-rebook --backend openai --config azure.toml`):

    [train]
    backend = "openai"
    openai_provider = "azure"
    azure_endpoint = "https://my-resource.openai.azure.com"   # or env AZURE_OPENAI_ENDPOINT
    azure_api_version = "2025-04-01-preview"                  # or env OPENAI_API_VERSION
    openai_model = "gpt-4.1-mini-2025-04-14"
    beta = 0.1
    openai_n_epochs = 2

Credentials come from the environment only: AZURE_OPENAI_API_KEY (or AZURE_OPENAI_AD_TOKEN).
The result's serve name is the fine-tuned model id Azure reports; serving it takes a deployment of that
model on the resource (Azure's deployments API or portal), whose name is what clients then call.

An Azure deployment also serves as eval judge (it must not be the model that labelled the data):

    from agent_dpo_adapters.openai_judge import OpenAIJudge
    judge = OpenAIJudge("my-judge-deployment", provider="azure",
                        azure_endpoint="https://my-resource.openai.azure.com", api_version="2025-04-01-preview")
    judge.compare(prompt_messages, tools, answer_a, answer_b)   # "a" | "b" | "tie"

Run this file against an openai-dpo export:

    python examples/azure_backend.py --export pairs.jsonl --endpoint https://my-resource.openai.azure.com
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
    parser.add_argument("--endpoint", required=True, help="https://<resource>.openai.azure.com")
    parser.add_argument("--api-version", default="2025-04-01-preview")
    parser.add_argument("--agent", default="acme-salons/salon-rebook", help="TENANT/AGENT")
    parser.add_argument("--model", default="gpt-4.1-mini-2025-04-14")
    parser.add_argument("--out", type=Path, default=Path(".agent-dpo/azure-run"))
    args = parser.parse_args()
    configure_logging()  # job events to stderr, progress lines to stdout

    tenant_id, agent_id = args.agent.split("/")
    config = TrainConfig(backend="openai", method="dpo", openai_provider="azure", azure_endpoint=args.endpoint,
                         azure_api_version=args.api_version, openai_model=args.model, beta=0.1)
    meta_file = args.export.with_name(args.export.name + ".meta.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    job = TrainJob(tenant_id=tenant_id, agent_id=agent_id, config=config, train_file=args.export, meta=meta,
                   output_dir=args.out, store_dir=args.out.parent, openai_file=args.export)
    result = OpenAIBackend().train(job, lambda p: print(json.dumps(p)))
    print(f"fine-tuned model: {result.serve_name}  (deploy it on the resource to serve it)")


if __name__ == "__main__":
    main()
