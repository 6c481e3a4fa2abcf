"""The `fast` training backend: SFT, DPO and KTO on the prefix-tree engine (prefix_tree.py) instead of
TRL's flat rows. Rows are tokenized exactly as TRL tokenizes them, reference log-probs come from the
on-disk cache (refcache.py) or one no-grad tree pass, and a training step is forward, loss, backward,
optimizer step, written out below in plain PyTorch."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def tokenize_preference(tokenizer: Any, row: dict, max_length: int | None = None) -> TreeExample | None:
    """A trl-dpo row -> prompt ids and [chosen ids, rejected ids]; None when the prompt alone fills
    max_length (TRL drops those). Completions are cut at max_length like TRL's keep_start truncation."""
    tools = _tools(row)
    prompt_ids = _chat_ids(tokenizer, row["prompt"], tools, True)
    chosen = _chat_ids(tokenizer, row["prompt"] + row["chosen"], tools, False)
    rejected = _chat_ids(tokenizer, row["prompt"] + row["rejected"], tools, False)
    # The completion starts where prompt and prompt+completion diverge (templates may render the
    # generation prompt differently from a finished turn).
    n = min(_common_prefix_length(prompt_ids, chosen), _common_prefix_length(prompt_ids, rejected))
    if max_length is not None and n >= max_length:
        return None
    keep = None if max_length is None else max_length - n
    return TreeExample(prompt_ids[:n], [chosen[n:][:keep], rejected[n:][:keep]])


def tokenize_unpaired(tokenizer: Any, row: dict, max_length: int | None = None) -> TreeExample | None:
    """A trl-kto row -> prompt ids and [completion ids]."""
    tools = _tools(row)
    prompt_ids = _chat_ids(tokenizer, row["prompt"], tools, True)
    full = _chat_ids(tokenizer, row["prompt"] + row["completion"], tools, False)
    n = _common_prefix_length(prompt_ids, full)
    if max_length is not None and n >= max_length:
        return None
    keep = None if max_length is None else max_length - n
    return TreeExample(prompt_ids[:n], [full[n:][:keep]])


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
    missing = [i for i, row in enumerate(keys) if any(k not in cache for k in row)]
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
                   loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict[str, float]]:
    """DPO on one tree: policy log-probs of [chosen, rejected] per example against their reference."""
    tree = build_tree(batch)
    sums, _ = tree_forward(model, tree)
    ref = ref.to(sums.device, sums.dtype)
    lengths = tree.branch_lengths.to(sums.device)
    loss, chosen_r, rejected_r = losses.dpo_loss(loss_type, sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], beta,
                                                 lengths[:, 0], lengths[:, 1])
    metrics = {
        "loss": loss.item(),
        "rewards/chosen": chosen_r.mean().item(),
        "rewards/rejected": rejected_r.mean().item(),
        "rewards/margins": (chosen_r - rejected_r).mean().item(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
        "logps/chosen": sums[:, 0].detach().mean().item(),
        "logps/rejected": sums[:, 1].detach().mean().item(),
    }
    return loss, metrics


def kto_batch_loss(model: Any, batch: Sequence[TreeExample], ref: torch.Tensor, desirable: torch.Tensor,
                   beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO on one tree whose examples carry [completion, KL completion] (see with_kl_completions)."""
    tree = build_tree(batch)
    sums, _ = tree_forward(model, tree)
    ref = ref.to(sums.device, sums.dtype)
    desirable = desirable.to(sums.device).bool()
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


def is_finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
