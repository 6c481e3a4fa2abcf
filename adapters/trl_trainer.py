"""The `trl` training backend: the recipe's SFT and DPO/KTO phases run on Hugging Face TRL
(SFTTrainer, DPOTrainer, KTOTrainer) with LoRA through PEFT, on CPU in fp32 or on a GPU.

Several GPUs: run the same command under `accelerate launch` (e.g.
`accelerate launch --num_processes 4 -m agent_dpo.cli train --agent T/A --backend trl ...`): every
process trains data-parallel and only the main one writes the run folder (adapters, metrics, plot).
Not exercised in this project's tests, which have no GPU."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from agent_dpo.errors import AgentDpoError
from agent_dpo.training import recipes
from agent_dpo.training.backend import Progress, TrainJob, TrainResult
from agent_dpo.training.config import TrainConfig
from agent_dpo.training.metrics import MetricsLog


class TrlBackend:
    name = "trl"

    def train(self, job: TrainJob, on_progress: Progress) -> TrainResult:
        return recipes.run(job, on_progress, TrlPhases(), backend=self.name)


class TrlPhases:
    """The recipe's phases on TRL trainers. Each phase builds its trainer, trains `max_steps`, saves
    its adapter (safetensors) and hands the model on."""

    def __init__(self) -> None:
        # One process per GPU under `accelerate launch` / torchrun (they set RANK): all train, only
        # rank 0 writes files. Read from the environment so nothing initialises devices this early.
        self.is_main = int(os.environ.get("RANK", "0")) == 0

    def load(self, config: TrainConfig, store_dir: Path) -> tuple[Any, Any]:
        from agent_dpo_adapters.hf_models import load_model, load_tokenizer

        tokenizer = load_tokenizer(config.base_model, store_dir)
        model = load_model(config.base_model, store_dir)
        return model, tokenizer

    def sft(self, model: Any, tokenizer: Any, rows: list[dict], config: TrainConfig, out_dir: Path,
            metrics: MetricsLog) -> tuple[Any, Path, int]:
        from trl import SFTConfig, SFTTrainer

        _seed(config.seed)
        # Prompt/completion rows: TRL masks the prompt, so the loss is on the assistant completion only.
        args = SFTConfig(**_common_args(config, out_dir, config.sft_steps, config.sft_learning_rate),
                         completion_only_loss=True, truncation_mode=config.truncation_mode)
        trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(rows), processing_class=tokenizer,
                             peft_config=_lora(config))
        steps = _train(trainer, "sft", metrics, config.sft_steps)
        trained = trainer.model
        if self.is_main:
            _save(trained, out_dir, config)
        merged = trained.merge_and_unload() if config.lora else trained
        _unpatch(merged)
        return merged, out_dir, steps

    def preference(self, model: Any, tokenizer: Any, rows: list[dict], config: TrainConfig,
                   kto_weights: tuple[float, float] | None, out_dir: Path, metrics: MetricsLog) -> tuple[Path, int]:
        _seed(config.seed)
        # Under LoRA the reference is the adapter-disabled model (the SFT-merged base); a full
        # fine-tune needs its own frozen copy, or TRL would reload the original base by name.
        ref_model = None if config.lora else copy.deepcopy(model).eval()
        if config.method == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**_common_args(config, out_dir, config.max_steps, config.learning_rate),
                             beta=config.beta, **_dpo_losses(config),
                             truncation_mode=config.truncation_mode)
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_dataset(rows),
                                 processing_class=tokenizer, peft_config=_lora(config))
        else:
            from trl import KTOConfig, KTOTrainer

            desirable, undesirable = kto_weights or (1.0, 1.0)
            common = _common_args(config, out_dir, config.max_steps, config.learning_rate)
            # KTO estimates its KL term from the other completions of the batch: it needs at least two.
            common["per_device_train_batch_size"] = max(2, config.batch_size)
            loss_type = config.loss_type if config.loss_type in ("kto", "apo_zero_unpaired") else "kto"
            args = KTOConfig(**common, beta=config.beta, loss_type=loss_type,
                             desirable_weight=desirable, undesirable_weight=undesirable)
            trainer = KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_dataset(rows),
                                 processing_class=tokenizer, peft_config=_lora(config))
        steps = _train(trainer, config.method, metrics, config.max_steps)
        if self.is_main:
            _save(trainer.model, out_dir, config)
        return out_dir, steps


def _common_args(config: TrainConfig, out_dir: Path, max_steps: int, learning_rate: float) -> dict:
    device = config.device or _default_device()
    args = {
        "output_dir": str(out_dir / "trainer"),
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "max_length": config.max_length,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": config.seed,
        "data_seed": config.seed,
        # Small models, short rows: recomputing activations costs more time than it saves memory.
        "gradient_checkpointing": False,
        "warmup_steps": 0,
        "lr_scheduler_type": "linear",
    }
    if device == "cpu":
        args.update(use_cpu=True, bf16=False, fp16=False)  # TRL defaults to bf16; CPU trains in fp32
    if config.precision == "bf16":
        args.update(bf16=True, fp16=False)  # mixed precision, on a CPU too (autocast)
    elif config.precision == "fp32":
        args.update(bf16=False, fp16=False)
    return args


def _dpo_losses(config: TrainConfig) -> dict:
    """The DPO loss, plus TRL's "sft" loss on the chosen tokens when sft_weight (RPO) is set."""
    if not config.sft_weight:
        return {"loss_type": [config.loss_type]}
    return {"loss_type": [config.loss_type, "sft"], "loss_weights": [1.0, config.sft_weight]}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _lora(config: TrainConfig) -> Any:
    if not config.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM")


def _dataset(rows: list[dict]) -> Any:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per phase (ours) is enough
    if not rows:
        raise AgentDpoError("no training rows for this phase (for KTO SFT: no desirable examples)")
    return Dataset.from_list(rows)


def _train(trainer: Any, phase: str, metrics: MetricsLog, max_steps: int) -> int:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # Our own bar and metrics file replace the trainer's printing of every log dict.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_StepMetrics(phase, metrics, max_steps))
    trainer.train()
    return int(trainer.state.global_step)


def _save(model: Any, out_dir: Path, config: TrainConfig) -> None:
    """The adapter (or, for a full fine-tune, the model) as safetensors, nothing else."""
    if out_dir.exists():
        for child in out_dir.iterdir():
            if child.name != "trainer":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card template
    if not config.lora:
        config_file = out_dir / "config.json"
        values = json.loads(config_file.read_text())
        values.pop("quantization_config", None)
        config_file.write_text(json.dumps(values, indent=2))


def _unpatch(model: Any) -> None:
    # TRL patches `forward` on the instance for its fused LM head; the next trainer adds its own.
    model.__dict__.pop("forward", None)


class _StepMetrics(TrainerCallback):
    """Each logged step goes to metrics.jsonl (via MetricsLog) and moves a tqdm bar."""

    def __init__(self, phase: str, metrics: MetricsLog, max_steps: int):
        self.phase, self.metrics, self.max_steps = phase, metrics, max_steps
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if not state.is_world_process_zero:
            return
        self.bar = tqdm(total=self.max_steps, desc=self.phase, unit="step", dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        logs = dict(logs or {})
        if "train_runtime" in logs:  # the end-of-training summary, not a step
            return
        logs.pop("epoch", None)
        row = self.metrics.record(self.phase, state.global_step, logs, max_steps=self.max_steps)
        if self.bar is not None:
            self.bar.update(max(0, state.global_step - self.bar.n))
            shown = {k.split("/")[-1]: f"{row[k]:.3f}" for k in ("loss", "rewards/margins", "rewards/accuracies",
                                                                  "kl") if k in row}
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
