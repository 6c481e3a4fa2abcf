"""The `fast` training backend: SFT, DPO and KTO on the prefix-tree engine (prefix_tree.py) instead of
TRL's flat rows. Rows are tokenized exactly as TRL tokenizes them, reference log-probs come from the
on-disk cache (refcache.py) or one no-grad tree pass, and a training step is forward, loss, backward,
optimizer step, written out below in plain PyTorch."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent_dpo.training import losses
from agent_dpo.training.prefix_tree import TreeExample, build_tree, tree_forward
from agent_dpo.training.refcache import RefCache, branch_key

# --- tokenization: the same split into prompt and completion tokens as TRL 1.16 ----------------------


def _chat_ids(tokenizer: Any, messages: list[dict], tools: Any, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tools(row: dict) -> Any:
    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) else (tools or None)


def _window(prompt_ids: list[int], completions: list[list[int]], max_length: int | None,
            truncation_mode: str) -> TreeExample | None:
    """Fit one prompt and its completions into max_length tokens per branch.
    keep_start (TRL's default): completions are cut at their end; None when the prompt alone fills the window
    (TRL drops those). keep_end: the oldest prompt tokens go, by the same count for every completion of the
    prompt, so chosen and rejected are scored under the same context (TRL cuts each sequence on its own,
    which gives the longer completion less context) and still share their history in the tree. At least one
    prompt token stays; a completion longer than the window keeps its start."""
    n = len(prompt_ids)
    if max_length is None:
        return TreeExample(prompt_ids, completions)
    if truncation_mode == "keep_end":
        completions = [c[:max_length - 1] for c in completions]
        keep = max(max_length - max(len(c) for c in completions), 1)
        return TreeExample(prompt_ids[max(n - keep, 0):], completions)
    if n >= max_length:
        return None
    return TreeExample(prompt_ids, [c[:max_length - n] for c in completions])


def tokenize_preference(tokenizer: Any, row: dict, max_length: int | None = None,
                        truncation_mode: str = "keep_start") -> TreeExample | None:
    """A trl-dpo row -> prompt ids and [chosen ids, rejected ids], fitted to max_length (see _window)."""
    tools = _tools(row)
    prompt_ids = _chat_ids(tokenizer, row["prompt"], tools, True)
    chosen = _chat_ids(tokenizer, row["prompt"] + row["chosen"], tools, False)
    rejected = _chat_ids(tokenizer, row["prompt"] + row["rejected"], tools, False)
    # The completion starts where prompt and prompt+completion diverge (templates may render the
    # generation prompt differently from a finished turn).
    n = min(_common_prefix_length(prompt_ids, chosen), _common_prefix_length(prompt_ids, rejected))
    return _window(prompt_ids[:n], [chosen[n:], rejected[n:]], max_length, truncation_mode)


def tokenize_unpaired(tokenizer: Any, row: dict, max_length: int | None = None,
                      truncation_mode: str = "keep_start") -> TreeExample | None:
    """A trl-kto row -> prompt ids and [completion ids], fitted to max_length (see _window)."""
    tools = _tools(row)
    prompt_ids = _chat_ids(tokenizer, row["prompt"], tools, True)
    full = _chat_ids(tokenizer, row["prompt"] + row["completion"], tools, False)
    n = _common_prefix_length(prompt_ids, full)
    return _window(prompt_ids[:n], [full[n:]], max_length, truncation_mode)


def with_kl_completions(batch: Sequence[TreeExample], max_length: int | None = None) -> list[TreeExample]:
    """KTO's KL branches as TRL builds them: within a batch, example i also scores the completion of
    example i-1 (the last one's wraps to the first), a mismatched pair that estimates the KL term."""
    completions = [ex.completions[0] for ex in batch]
    shifted = completions[-1:] + completions[:-1]
    out = []
    for ex, kl in zip(batch, shifted):
        keep = None if max_length is None else max(max_length - len(ex.prompt_ids), 0)
        out.append(TreeExample(ex.prompt_ids, [ex.completions[0], list(kl)[:keep]]))
    return out


def sft_examples(examples: Sequence[TreeExample]) -> list[TreeExample]:
    """SFT trains on the first branch only (chosen for DPO rows, the completion for KTO rows)."""
    return [TreeExample(ex.prompt_ids, [ex.completions[0]]) for ex in examples]


# --- reference log-probs -------------------------------------------------------------------------------

REFERENCE_BATCH = 16  # examples per no-grad reference pass (one shared-prefix computation each)


def reference_context(model: Any):
    """The reference is the model with its LoRA adapter switched off; a plain model is its own reference
    (full fine-tuning computes every reference before the first step)."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def reference_logps(model: Any, examples: Sequence[TreeExample], cache: RefCache, batch_size: int = 8,
                    on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Reference log-prob of every branch, (n, max_branches): read from the cache, the missing ones
    computed with the tree (no grad, adapter off) in batches of `batch_size` examples and stored."""
    width = max(len(ex.completions) for ex in examples)
    keys = [[branch_key(ex.prompt_ids, c) for c in ex.completions] for ex in examples]
    missing, seen = [], set()
    for i, row in enumerate(keys):
        if any(k not in cache for k in row) and tuple(row) not in seen:  # epochs repeat examples
            seen.add(tuple(row))
            missing.append(i)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference_context(model):
            for start in range(0, len(missing), batch_size):
                idx = missing[start:start + batch_size]
                sums, _ = tree_forward(model, build_tree([examples[i] for i in idx]))
                sums = sums.float().cpu()
                cache.put_many((keys[i][b], sums[j, b].item())
                               for j, i in enumerate(idx) for b in range(len(keys[i])))
                if on_batch:
                    on_batch(len(idx))
    finally:
        model.train(was_training)
    out = torch.zeros(len(examples), width)
    for i, row in enumerate(keys):
        for b, k in enumerate(row):
            out[i, b] = cache.get(k)
    return out


# --- one training step's loss, per method ---------------------------------------------------------------


def dpo_batch_loss(model: Any, batch: Sequence[TreeExample], ref: torch.Tensor, beta: float,
                   loss_type: str = "sigmoid", sft_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO on one tree: policy log-probs of [chosen, rejected] per example against their reference. With
    `sft_weight`, the chosen tokens' negative log-likelihood is added with that weight (RPO; TRL's
    loss_type [..., "sft"] with loss_weights [1, sft_weight])."""
    tree = build_tree(batch)
    sums, per_token = tree_forward(model, tree)
    ref = ref.to(sums.device, sums.dtype)
    lengths = tree.branch_lengths.to(sums.device)
    loss, chosen_r, rejected_r = losses.dpo_loss(loss_type, sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], beta,
                                                 lengths[:, 0], lengths[:, 1])
    extra = {}
    if sft_weight:
        chosen_tokens = (tree.score_branch.to(per_token.device) % tree.max_branches) == 0
        nll = losses.sft_loss(per_token[chosen_tokens])
        loss = loss + sft_weight * nll
        extra["nll/chosen"] = nll.item()
    metrics = {
        "loss": loss.item(),
        **extra,
        "rewards/chosen": chosen_r.mean().item(),
        "rewards/rejected": rejected_r.mean().item(),
        "rewards/margins": (chosen_r - rejected_r).mean().item(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
        "logps/chosen": sums[:, 0].detach().mean().item(),
        "logps/rejected": sums[:, 1].detach().mean().item(),
    }
    return loss, metrics


def kto_batch_loss(model: Any, batch: Sequence[TreeExample], ref: torch.Tensor, desirable: torch.Tensor,
                   beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                   loss_type: str = "kto") -> tuple[torch.Tensor, dict[str, float]]:
    """KTO on one tree whose examples carry [completion, KL completion] (see with_kl_completions);
    `apo_zero_unpaired` needs no KL branch."""
    tree = build_tree(batch)
    sums, _ = tree_forward(model, tree)
    ref = ref.to(sums.device, sums.dtype)
    desirable = desirable.to(sums.device).bool()
    if loss_type == "apo_zero_unpaired":
        loss, rewards = losses.apo_zero_unpaired_loss(sums[:, 0], ref[:, 0], desirable, beta, desirable_weight,
                                                      undesirable_weight)
        metrics = {"loss": loss.item()}
    else:
        kl = losses.kto_kl(sums[:, 1], ref[:, 1])
        loss, rewards = losses.kto_loss(sums[:, 0], ref[:, 0], desirable, kl, beta, desirable_weight,
                                        undesirable_weight)
        metrics = {"loss": loss.item(), "kl": kl.item()}
    if desirable.any():
        metrics["rewards/chosen"] = rewards[desirable].mean().item()
        metrics["logps/chosen"] = sums[desirable, 0].detach().mean().item()
    if (~desirable).any():
        metrics["rewards/rejected"] = rewards[~desirable].mean().item()
        metrics["logps/rejected"] = sums[~desirable, 0].detach().mean().item()
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


def sft_batch_loss(model: Any, batch: Sequence[TreeExample]) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked cross-entropy on the completion tokens, through the same tree (prompts computed once)."""
    _, per_token = tree_forward(model, build_tree(batch))
    loss = losses.sft_loss(per_token)
    return loss, {"loss": loss.item()}


# --- the loop -------------------------------------------------------------------------------------------


@dataclass
class LoopSettings:
    max_steps: int
    learning_rate: float
    batch_size: int
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    shuffle: bool = True


def batches(n: int, settings: LoopSettings) -> list[list[int]]:
    """Index batches for `max_steps * grad_accum` micro-batches, reshuffled every epoch with the seed."""
    rng = random.Random(settings.seed)
    order: list[int] = []
    out = []
    need = settings.max_steps * settings.grad_accum
    while len(out) < need:
        if not order:
            order = list(range(n))
            if settings.shuffle:
                rng.shuffle(order)
        take, order = order[:settings.batch_size], order[settings.batch_size:]
        out.append(take)
    return out


def train_loop(model: Any, micro_batches: Sequence[Any], loss_fn: Callable[[Any], tuple[torch.Tensor, dict]],
               settings: LoopSettings, on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict]:
    """AdamW with linear decay to zero (TRL's defaults), gradient clipping, gradient accumulation."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(settings.max_steps, 1)))
    model.train()
    history = []
    for step in range(settings.max_steps):
        started = time.monotonic()
        totals: dict[str, float] = {}
        for micro in micro_batches[step * settings.grad_accum:(step + 1) * settings.grad_accum]:
            loss, metrics = loss_fn(micro)
            (loss / settings.grad_accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / settings.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        totals["grad_norm"] = float(grad_norm)
        totals["learning_rate"] = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        totals["step"] = step + 1
        totals["step_s"] = round(time.monotonic() - started, 3)
        history.append(totals)
        if on_step:
            on_step(step + 1, totals)
    return history




# --- the backend: the recipe's phases on the engine ----------------------------------------------------


class TreeBackend:
    """`backend = "fast"`: the same recipe, artifacts, metrics and progress as the TRL backend."""

    name = "fast"

    def train(self, job: Any, on_progress: Callable[[dict], None]) -> Any:
        from agent_dpo.training import recipes

        return recipes.run(job, on_progress, TreePhases(), backend=self.name)


class TreePhases:
    """load / sft / preference for agent_dpo.training.recipes, each a plain loop over tree batches."""

    is_main = True

    def __init__(self) -> None:
        self.store_dir: Path | None = None

    def load(self, config: Any, store_dir: Path) -> tuple[Any, Any]:
        import os

        from agent_dpo_adapters.hf_models import load_model, load_tokenizer

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise _error("the fast backend trains on one device; under `accelerate launch` with several "
                         "processes use backend trl (every process would otherwise train the same run)")
        self.store_dir = Path(store_dir)
        device = _device(config)
        # auto: bf16 weights on a GPU, fp32 on a CPU; bf16 (mixed) keeps fp32 weights and autocasts (_mixed).
        dtype = "bfloat16" if config.precision == "auto" and device.startswith("cuda") else "float32"
        return load_model(config.base_model, store_dir, dtype=dtype, device=device), \
            load_tokenizer(config.base_model, store_dir)

    def sft(self, model: Any, tokenizer: Any, rows: list[dict], config: Any, out_dir: Path,
            metrics: Any) -> tuple[Any, Path, int]:
        torch.manual_seed(config.seed)
        examples = _tokenized(rows, lambda r: tokenize_unpaired(tokenizer, r, config.max_length,
                                                                config.truncation_mode), config)
        model = _with_lora(model, config)
        settings = LoopSettings(max_steps=config.sft_steps, learning_rate=config.sft_learning_rate,
                                batch_size=config.batch_size, grad_accum=config.grad_accum, seed=config.seed)
        micro = [[examples[i] for i in idx] for idx in batches(len(examples), settings)]
        with _progress("sft", metrics, config.sft_steps) as on_step:
            train_loop(model, micro, _mixed(config, lambda b: sft_batch_loss(model, b)), settings, on_step)
        _save(model, out_dir, config)
        merged = model.merge_and_unload() if config.lora else model
        return merged, out_dir, config.sft_steps

    def preference(self, model: Any, tokenizer: Any, rows: list[dict], config: Any,
                   kto_weights: tuple[float, float] | None, out_dir: Path, metrics: Any) -> tuple[Path, int]:
        from agent_dpo.training.refcache import weights_digest

        torch.manual_seed(config.seed)
        # The reference is the model as it is now (SFT merged); its digest names the cache file.
        digest = weights_digest(model) + ("-bf16" if config.precision == "bf16" else "")
        cache = RefCache(self.store_dir / "refcache" if self.store_dir else None, digest)
        model = _with_lora(model, config)
        if config.method == "dpo":
            examples = _tokenized(rows, lambda r: tokenize_preference(tokenizer, r, config.max_length,
                                                                      config.truncation_mode), config)
            settings = LoopSettings(max_steps=config.max_steps, learning_rate=config.learning_rate,
                                    batch_size=config.batch_size, grad_accum=config.grad_accum, seed=config.seed)
            micro = [[examples[i] for i in idx] for idx in batches(len(examples), settings)]

            def loss_fn(batch: list[TreeExample]) -> tuple[torch.Tensor, dict]:
                return dpo_batch_loss(model, batch, reference_logps(model, batch, cache), config.beta,
                                      config.loss_type if config.loss_type in losses.DPO_LOSSES else "sigmoid",
                                      config.sft_weight)
        else:
            kept = [(r, tokenize_unpaired(tokenizer, r, config.max_length, config.truncation_mode)) for r in rows]
            kept = [(r, ex) for r, ex in kept if ex is not None]
            if not kept:
                raise _error("no KTO rows fit max_length")
            loss_type = config.loss_type if config.loss_type in ("kto", "apo_zero_unpaired") else "kto"
            desirable_weight, undesirable_weight = kto_weights or (1.0, 1.0)
            # Like TRL: sequential batches of at least two, each example's KL branch is its neighbour's completion.
            size = max(2, config.batch_size)
            settings = LoopSettings(max_steps=config.max_steps, learning_rate=config.learning_rate,
                                    batch_size=size, grad_accum=config.grad_accum, seed=config.seed, shuffle=False)
            micro = []
            for idx in batches(len(kept), settings):
                chunk = [kept[i][1] for i in idx]
                if loss_type == "kto":
                    chunk = with_kl_completions(chunk, config.max_length)
                micro.append((chunk, torch.tensor([bool(kept[i][0]["label"]) for i in idx])))

            def loss_fn(batch: tuple) -> tuple[torch.Tensor, dict]:
                examples, labels = batch
                return kto_batch_loss(model, examples, reference_logps(model, examples, cache), labels, config.beta,
                                      desirable_weight, undesirable_weight, loss_type)

        # Every reference log-prob up front, in full batches: the cache then answers each step for free,
        # and under full fine-tuning the model is still the reference at this point.
        from tqdm.auto import tqdm

        needed = [ex for m in micro for ex in (m[0] if isinstance(m, tuple) else m)]
        with tqdm(desc="reference", unit="example", dynamic_ncols=True) as bar, _autocast(config):
            # No gradient here, so batches can be wider than training's: the shared prefix runs once per 16.
            reference_logps(model, needed, cache, batch_size=max(config.batch_size, REFERENCE_BATCH),
                            on_batch=bar.update)
        with _progress(config.method, metrics, config.max_steps) as on_step:
            train_loop(model, micro, _mixed(config, loss_fn), settings, on_step)
        _save(model, out_dir, config)
        return out_dir, config.max_steps


def _device(config: Any) -> str:
    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(config: Any) -> contextlib.AbstractContextManager:
    """bf16 autocast when the config asks for mixed precision; nothing otherwise."""
    if config.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(_device(config).split(":")[0], dtype=torch.bfloat16)


def _mixed(config: Any, loss_fn: Callable[[Any], tuple[torch.Tensor, dict]]) -> Callable[[Any], tuple[torch.Tensor, dict]]:
    """The loss function with its forward under `_autocast` (backward runs outside, as autocast wants)."""
    def run(batch: Any) -> tuple[torch.Tensor, dict]:
        with _autocast(config):
            return loss_fn(batch)
    return run


def _error(message: str) -> Exception:
    from agent_dpo.errors import AgentDpoError

    return AgentDpoError(message)


def _tokenized(rows: list[dict], tokenize: Callable[[dict], TreeExample | None], config: Any) -> list[TreeExample]:
    examples = [ex for ex in map(tokenize, rows) if ex is not None]
    if not examples:
        raise _error(f"no training rows fit max_length {config.max_length}")
    return examples


def _with_lora(model: Any, config: Any) -> Any:
    if not config.lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM"))


@contextlib.contextmanager
def _progress(phase: str, metrics: Any, max_steps: int):
    """A tqdm bar for the phase; each step's metrics go to metrics.jsonl and the job's progress callback."""
    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, desc=phase, unit="step", dynamic_ncols=True)

    def on_step(step: int, values: dict[str, float]) -> None:
        row = metrics.record(phase, step, {k: v for k, v in values.items() if k != "step"}, max_steps=max_steps)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3f}" for k in ("loss", "rewards/margins",
                                                                    "rewards/accuracies", "kl") if k in row},
                        refresh=False)

    try:
        yield on_step
    finally:
        bar.close()


def _save(model: Any, out_dir: Path, config: Any) -> None:
    """The adapter (or the full model) as safetensors, nothing else, like the TRL backend writes it."""
    import shutil

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)
    if not config.lora:
        config_file = out_dir / "config.json"
        values = json.loads(config_file.read_text())
        values.pop("quantization_config", None)
        config_file.write_text(json.dumps(values, indent=2))
