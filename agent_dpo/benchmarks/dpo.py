"""`agent-dpo bench dpo`: DPO training throughput of the prefix-tree engine against TRL's DPOTrainer,
side by side in one run on SmolLM2-135M with the same pairs and the same LoRA settings. TRL runs at its
best settings for a CPU (reference log-probs precomputed, no gradient checkpointing); the reference pass
is timed for both. Data is shaped like the example agents (system prompt + tools ~700 tokens, history
~150, completions ~40, 8 pairs per batch); a short-prompt set checks the engine is never slower."""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = ["appointment", "booking", "salon", "stylist", "colour", "cut", "wash", "blow", "dry", "friday", "monday", "morning", "afternoon", "evening", "price", "quote", "customer", "loyalty", "points", "voucher", "cancel", "reschedule", "confirm", "deposit", "policy", "available", "slot", "minutes", "treatment", "highlights", "balayage", "trim", "beard", "manicure", "pedicure", "facial", "massage", "address", "parking", "phone", "email", "reminder", "note", "allergy", "patch", "test", "senior", "junior", "team", "member", "branch", "opening", "hours", "holiday", "closed", "refund", "card", "cash", "payment", "tip", "review", "rating", "preference", "usual"]

TOOLS = [
    {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": {p: {"type": t, "description": d} for p, t, d in params},
        "required": [params[0][0]]}}}
    for name, desc, params in [
        ("find_slots", "Find free appointment slots for a service at a branch on a given day.",
         [("service", "string", "Service name such as cut, colour or manicure."),
          ("branch", "string", "Branch identifier."), ("date", "string", "Day in YYYY-MM-DD."),
          ("stylist", "string", "Optional stylist name.")]),
        ("book_appointment", "Book an appointment slot for a customer and send a confirmation.",
         [("slot_id", "string", "Slot identifier returned by find_slots."),
          ("customer_id", "string", "Customer identifier."), ("notes", "string", "Free text notes.")]),
        ("cancel_appointment", "Cancel an existing appointment; deposits follow the cancellation policy.",
         [("appointment_id", "string", "Appointment identifier."), ("reason", "string", "Why it is cancelled.")]),
        ("get_customer", "Look up a customer by phone number or email address.",
         [("query", "string", "Phone number or email."), ("include_history", "boolean", "Past visits too.")]),
        ("quote_price", "Quote the price of a service for a stylist level, including offers.",
         [("service", "string", "Service name."), ("level", "string", "junior, senior or director."),
          ("voucher", "string", "Optional voucher code.")]),
        ("send_message", "Send a text or email message to the customer.",
         [("customer_id", "string", "Customer identifier."), ("channel", "string", "sms or email."),
          ("text", "string", "Message body.")]),
    ]
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dpo", help="prefix-tree DPO engine vs TRL DPOTrainer", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one engine step, TRL timed on one micro-batch (under 3 minutes on 2 cores)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per side (default 2, quick 1)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per batch (default 8)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or folder")
    parser.add_argument("--store", default=None, help="store directory holding the provisioned model")
    parser.add_argument("--skip-short", action="store_true", help="skip the short-prompt dataset")
    parser.add_argument("--trl-micro-batch", type=int, default=2,
                        help="pairs per TRL forward, accumulated up to --batch (default 2: 8 does not fit in RAM)")
    parser.add_argument("--seed", type=int, default=0)


# --- data shaped like an agent's preference pairs -------------------------------------------------------


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def _text(rng: random.Random, tokenizer: Any, tokens: int, lo: int = 6, hi: int = 14) -> str:
    """Sentences until the text is `tokens` long (give or take the last sentence)."""
    out: list[str] = []
    while len(tokenizer(" ".join(out), add_special_tokens=False)["input_ids"]) < tokens:
        out.append(_sentence(rng, lo, hi))
    return " ".join(out)


def _tool_call(rng: random.Random) -> dict:
    # One tool with fixed argument keys: rows then survive Arrow's schema unification in TRL unchanged.
    return {"type": "function", "function": {"name": "find_slots", "arguments": {
        "service": rng.choice(WORDS), "date": f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"}}}


def _n_tokens(tokenizer: Any, messages: list[dict], tools: Any = None) -> int:
    return len(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"])


def agent_pairs(tokenizer: Any, n: int, system_tokens: int, history_tokens: int, completion_tokens: int,
                seed: int, tools: bool = True) -> list[dict]:
    """trl-dpo rows: one agent's system prompt (+ tools) shared by all, varied histories (a tool call and
    its result when tools are on), chosen/rejected of about completion_tokens each (text or tool call)."""
    rng = random.Random(seed)
    offered = []
    if tools:
        # as many tool schemas as fit in two thirds of the system budget, the rest is instructions
        for tool in TOOLS:
            if _n_tokens(tokenizer, [{"role": "system", "content": ""}], offered + [tool]) > system_tokens * 2 // 3:
                break
            offered.append(tool)
        offered = offered or TOOLS[:1]
    used = _n_tokens(tokenizer, [{"role": "system", "content": ""}], offered or None)
    system = {"role": "system", "content": _text(rng, tokenizer, max(system_tokens - used, 8))}
    base = _n_tokens(tokenizer, [system], offered or None)
    rows = []
    for i in range(n):
        target = max(int(history_tokens * rng.uniform(0.7, 1.3)), 12)
        history: list[dict] = []
        if tools:
            call = dict(_tool_call(rng), id=f"call_{i}")
            history = [
                {"role": "user", "content": _text(rng, tokenizer, 6, 3, 6)},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call_{i}",
                 "content": json.dumps({"slots": [f"{rng.randint(9, 17)}:00" for _ in range(2)]})},
            ]
        spent = _n_tokens(tokenizer, [system] + history, offered or None) - base
        history.append({"role": "user", "content": _text(rng, tokenizer, max(target - spent - 8, 4), 3, 8)})

        def completion() -> list[dict]:
            if tools and rng.random() < 0.25:
                return [{"role": "assistant", "content": None, "tool_calls": [_tool_call(rng)]}]
            c = max(int(completion_tokens * rng.uniform(0.7, 1.3)) - 3, 3)
            return [{"role": "assistant", "content": _text(rng, tokenizer, c, 3, 6)}]

        row = {"prompt": [system] + history, "chosen": completion(), "rejected": completion()}
        if tools:
            row["tools"] = json.dumps(offered)  # as text: Arrow would otherwise merge the schemas' keys
        rows.append(row)
    return rows


# --- the two sides --------------------------------------------------------------------------------------


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def run_trl(base: Any, tokenizer: Any, rows: list[dict], steps: int, batch: int, workdir: Path,
            micro_batch: int) -> tuple[float, Any]:
    """Wall seconds for tokenization + reference precompute + `steps` training steps in DPOTrainer.
    A batch is `micro_batch` pairs per forward, accumulated: 8 pairs (16 flat rows of ~900 tokens) in one
    forward needs more memory than these machines have, and smaller rows pad less."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(workdir), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=max(batch // micro_batch, 1), max_steps=steps, learning_rate=5e-5,
        beta=0.1, precompute_ref_log_probs=True, precompute_ref_batch_size=micro_batch, gradient_checkpointing=False,
        max_length=None, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, lr_scheduler_type="linear")
    dataset = Dataset.from_list(rows)
    started = time.perf_counter()
    trainer = DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config())
    trainer.train()
    return time.perf_counter() - started, trainer


def run_engine(base: Any, tokenizer: Any, rows: list[dict], steps: int, batch: int) -> tuple[float, Any, Any]:
    """Wall seconds for the same work on the prefix-tree engine (reference pass included)."""
    from peft import get_peft_model

    from agent_dpo.training.refcache import RefCache
    from agent_dpo.training.tree_backend import (
        LoopSettings,
        dpo_batch_loss,
        reference_logps,
        tokenize_preference,
        train_loop,
    )

    model = get_peft_model(copy.deepcopy(base), lora_config())
    started = time.perf_counter()
    examples = [tokenize_preference(tokenizer, row) for row in rows]
    ref = reference_logps(model, examples, RefCache(None, "bench"), batch_size=batch)
    settings = LoopSettings(max_steps=steps, learning_rate=5e-5, batch_size=batch)
    micro = [list(range(i * batch, (i + 1) * batch)) for i in range(steps)]
    train_loop(model, micro, lambda idx: dpo_batch_loss(model, [examples[i] for i in idx], ref[idx], 0.1),
               settings)
    return time.perf_counter() - started, examples, ref


def measure(name: str, base: Any, tokenizer: Any, rows: list[dict], steps: int, batch: int, trl_pairs: int,
            micro_batch: int, parity: bool = False, out=sys.stdout) -> float:
    """Both sides on the same rows; TRL on the first `trl_pairs` of them (its cost per pair does not depend
    on how many pairs share a step: it shares nothing between pairs)."""
    import torch

    from agent_dpo.training.prefix_tree import build_tree, flat_tokens

    trl_batch = min(batch, trl_pairs)
    trl_steps = max(trl_pairs // trl_batch, 1)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = time.process_time()
        engine_s, examples, ref = run_engine(base, tokenizer, rows, steps, batch)
        engine_cpu = time.process_time() - cpu
        gc.collect()  # the engine's model copy goes before TRL makes its own
        cpu = time.process_time()
        trl_s, trainer = run_trl(base, tokenizer, rows[:trl_pairs], trl_steps, trl_batch, Path(tmp),
                                 min(micro_batch, trl_batch))
        trl_cpu = time.process_time() - cpu
    first = examples[:batch]
    tree = build_tree(first)
    # Same token sequences on both sides, and the same reference log-probs (exactness on the real model).
    prepared = trainer.train_dataset
    same_tokens = all(list(prepared[i]["prompt_ids"]) == list(examples[i].prompt_ids)
                      and list(prepared[i]["chosen_ids"]) == list(examples[i].completions[0])
                      and list(prepared[i]["rejected_ids"]) == list(examples[i].completions[1])
                      for i in range(len(prepared)))
    trl_ref = torch.tensor([[prepared[i]["ref_chosen_logps"], prepared[i]["ref_rejected_logps"]]
                            for i in range(len(prepared))])
    ref_diff = (trl_ref - ref[:len(prepared)]).abs().max().item()
    if parity:
        parity_line(trainer, examples[:min(micro_batch, len(prepared))], trl_ref, out)
    trl_rate = trl_steps * trl_batch / trl_s
    engine_rate = steps * batch / engine_s
    ratio = engine_rate / trl_rate
    print(f"{name}: batch of {batch} pairs: flat {flat_tokens(first)} tokens, tree {tree.tree_tokens} tokens, "
          f"ideal token ratio {flat_tokens(first) / tree.tree_tokens:.2f}", file=out)
    print(f"{name}: TRL DPOTrainer {trl_rate:.3f} pairs/s ({trl_steps * trl_batch} pairs in {trl_s:.1f} s), "
          f"prefix-tree engine {engine_rate:.3f} pairs/s ({steps * batch} pairs in {engine_s:.1f} s), "
          f"reference pass included", file=out)
    # CPU seconds per pair (this process only) are steadier than wall time when other jobs share the cores.
    print(f"{name}: CPU time per pair: TRL {trl_cpu / (trl_steps * trl_batch):.1f} s, engine "
          f"{engine_cpu / (steps * batch):.1f} s, ratio {trl_cpu / (trl_steps * trl_batch) / (engine_cpu / (steps * batch)):.2f}",
          file=out)
    print(f"{name}: identical tokens {same_tokens}, reference log-prob max |diff| vs TRL {ref_diff:.2e}",
          file=out)
    return ratio


def parity(trainer: Any, examples: list, trl_ref: Any) -> dict[str, float]:
    """Per-example log-probs, loss and LoRA gradient of the engine against TRL's own compute_loss, on
    TRL's model and its first batch: the exactness check at full size. Returns the three errors."""
    import torch

    from agent_dpo.training.prefix_tree import build_tree, tree_forward
    from agent_dpo.training.tree_backend import dpo_batch_loss

    model = trainer.model
    n = len(examples)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                     fused_lm_head=True, use_cache=False).log_probs.sum(dim=1).view(2, -1).T
        sums, _ = tree_forward(model, build_tree(examples))
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grad = torch.cat([p.grad.flatten() for p in params]).clone()
    model.zero_grad()
    loss, _ = dpo_batch_loss(model, examples, trl_ref[:n], trainer.beta)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in params])
    model.zero_grad()
    return {"logps_max_abs": (sums - flat).abs().max().item(),
            "loss_rel": abs(loss.item() - trl_loss.item()) / abs(trl_loss.item()),
            "grad_rel": ((grad - trl_grad).norm() / trl_grad.norm()).item()}


def parity_line(trainer: Any, examples: list, trl_ref: Any, out=sys.stdout) -> None:
    figures = parity(trainer, examples, trl_ref)
    print(f"parity on SmolLM2 ({len(examples)} pairs): log-prob max |diff| {figures['logps_max_abs']:.2e} "
          f"(bar 1e-4), loss rel diff {figures['loss_rel']:.2e} (bar 1e-5), "
          f"gradient rel err {figures['grad_rel']:.2e} (bar 1e-5)", file=out)


def run(args: argparse.Namespace) -> int:
    import torch

    from agent_dpo.cli.common import DEFAULT_STORE_DIR
    from agent_dpo_adapters.hf_models import load_model, load_tokenizer

    torch.manual_seed(args.seed)
    store = Path(args.store) if args.store else DEFAULT_STORE_DIR
    tokenizer = load_tokenizer(args.model, store)
    base = load_model(args.model, store)
    steps = args.steps or (1 if args.quick else 2)
    pairs = steps * args.batch
    # --quick times TRL on one micro-batch only: at ~6x slower it would otherwise take most of the budget.
    trl_pairs = args.trl_micro_batch if args.quick else pairs
    if not args.skip_short:
        short = agent_pairs(tokenizer, pairs, 24, 24, 40, args.seed + 1, tools=False)
        short_ratio = measure("short prompts", base, tokenizer, short, steps, args.batch, pairs,
                              args.trl_micro_batch)
        print(f"short prompts: ratio {short_ratio:.2f} vs TRL DPOTrainer")
    rows = agent_pairs(tokenizer, pairs, 700, 150, 40, args.seed)
    # The SmolLM2 parity check (loss, log-probs, gradient against TRL's compute_loss) costs ~30 s: full runs only.
    ratio = measure("agent data", base, tokenizer, rows, steps, args.batch, trl_pairs, args.trl_micro_batch,
                    parity=not args.quick)
    print(f"dpo: ratio {ratio:.2f} vs TRL DPOTrainer")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_dpo.benchmarks.dpo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
