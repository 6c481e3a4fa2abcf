# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
"""Parity of the prefix-tree engine with what TRL 1.16's DPOTrainer and KTOTrainer compute, on a tiny
Llama with SmolLM2's tokenizer and the project's tool-aware chat template, in fp32: same token
sequences, per-example log-probs within 1e-4, loss within 1e-5 relative, parameter gradient relative
error at most 1e-5. Batches mix histories of different lengths, tool calls and tool results."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (fixtures)

from agent_dpo.training.prefix_tree import TreeExample, build_tree, flat_tokens, tree_forward
from agent_dpo.training.refcache import RefCache
from agent_dpo.training.tree_backend import (
    dpo_batch_loss,
    kto_batch_loss,
    reference_logps,
    tokenize_preference,
    tokenize_unpaired,
    with_kl_completions,
)

TOOLS = [{"type": "function", "function": {
    "name": "find_slots", "description": "Free appointment slots for a service on a day.",
    "parameters": {"type": "object", "properties": {"service": {"type": "string"}, "date": {"type": "string"}},
                   "required": ["service"]}}}]
SYSTEM = ("You are the booking assistant of a hair salon. Be brief, confirm details before booking, and use "
          "the tools to look up free slots. Never invent prices.")


def _call(service: str, date: str, call_id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": "find_slots",
                                             "arguments": {"service": service, "date": date}}}
    if call_id:
        call["id"] = call_id
    return call


def _rows() -> list[dict]:
    """Five trl-dpo rows of one agent: histories from one turn to a tool round trip and several turns."""
    system = {"role": "system", "content": SYSTEM}
    histories = [
        [{"role": "user", "content": "Hi, can I get a cut on Friday?"}],
        [{"role": "user", "content": "Do you have anything for colour next week?"},
         {"role": "assistant", "content": None, "tool_calls": [_call("colour", "2026-03-10", "call_1")]},
         {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"slots": ["10:00", "14:30"]})},
         {"role": "assistant", "content": "I have 10:00 or 14:30 on Tuesday."},
         {"role": "user", "content": "14:30 please, and my name is Sam."}],
        [{"role": "user", "content": "How much is a beard trim?"},
         {"role": "assistant", "content": "Which branch would you like to visit?"},
         {"role": "user", "content": "The one on the high street."}],
        [{"role": "user", "content": "Book me a manicure tomorrow morning."},
         {"role": "assistant", "content": None, "tool_calls": [_call("manicure", "2026-03-05", "call_7")]},
         {"role": "tool", "tool_call_id": "call_7", "content": json.dumps({"slots": []})},
         {"role": "user", "content": "Nothing? What about the afternoon then?"}],
        [{"role": "user", "content": "Cancel my appointment."}],
    ]
    completions = [
        ([{"role": "assistant", "content": None, "tool_calls": [_call("cut", "2026-03-06")]}],
         [{"role": "assistant", "content": "Sure, you are booked for Friday."}]),
        ([{"role": "assistant", "content": "Booked: colour on Tuesday at 14:30 for Sam. See you then!"}],
         [{"role": "assistant", "content": "Which day?"}]),
        ([{"role": "assistant", "content": "A beard trim on the high street costs 15 pounds."}],
         [{"role": "assistant", "content": None, "tool_calls": [_call("beard trim", "2026-03-06")]}]),
        ([{"role": "assistant", "content": None, "tool_calls": [_call("manicure", "2026-03-05")]}],
         [{"role": "assistant", "content": "Sorry, we are fully booked forever."}]),
        ([{"role": "assistant", "content": "Which appointment would you like to cancel?"}],
         [{"role": "assistant", "content": "Done."}]),
    ]
    return [{"prompt": [system] + h, "chosen": c, "rejected": r, "tools": json.dumps(TOOLS)}
            for h, (c, r) in zip(histories, completions)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, smollm2_store):
    """(policy, reference, tokenizer): the tiny Llama and a perturbed copy, so log-ratios are not zero."""
    from transformers import AutoModelForCausalLM

    from agent_dpo_adapters.hf_models import SMOLLM2, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2, smollm2_store)
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return policy, reference, tokenizer


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _trainer(kind, policy, reference, tokenizer, rows, batch_size, tmp_path, **config):
    from datasets import Dataset

    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=batch_size, precompute_ref_log_probs=True,
                  max_length=None, report_to=[], use_cpu=True, disable_tqdm=True, beta=0.1, bf16=False, **config)
    if kind == "dpo":
        args = trl.DPOConfig(**common)
        return trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(rows))
    args = trl.KTOConfig(**common)
    return trl.KTOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(rows))


def _flat_logps(model, batch) -> torch.Tensor:
    """TRL's own concatenated forward: per-row summed completion log-probs through its fused LM head."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(dim=1)


@pytest.mark.parametrize("indices", [[0, 1, 2, 3, 4], [1]], ids=["mixed-batch", "batch-of-one"])
def test_dpo_matches_trl(tiny, tmp_path, indices):
    policy, reference, tokenizer = tiny
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    rows = _rows()
    trainer = _trainer("dpo", policy, reference, tokenizer, rows, len(indices), tmp_path)
    prepared = trainer.train_dataset

    # 1. identical token sequences
    examples = [tokenize_preference(tokenizer, row) for row in rows]
    for i, ex in enumerate(examples):
        assert list(prepared[i]["prompt_ids"]) == list(ex.prompt_ids)
        assert list(prepared[i]["chosen_ids"]) == list(ex.completions[0])
        assert list(prepared[i]["rejected_ids"]) == list(ex.completions[1])
    assert any("<tool_call>" in tokenizer.decode(ex.completions[0]) for ex in examples)
    assert any("<tool_response" in tokenizer.decode(ex.prompt_ids) for ex in examples)

    # 2. reference log-probs: the tree's against TRL's precomputed ones
    ours_ref = reference_logps(reference, examples, RefCache(None, "test"), batch_size=len(indices))
    trl_ref = torch.tensor([[prepared[i]["ref_chosen_logps"], prepared[i]["ref_rejected_logps"]]
                            for i in range(len(rows))])
    assert (ours_ref - trl_ref).abs().max().item() < 1e-4

    # 3. policy log-probs, loss and gradient on one batch
    batch = trainer.data_collator([prepared[i] for i in indices])
    flat = _flat_logps(trainer.model, batch).view(2, -1).T  # TRL stacks [chosen..., rejected...]
    sums, _ = tree_forward(policy, build_tree([examples[i] for i in indices]))
    assert (sums.detach() - flat).abs().max().item() < 1e-4

    # The loss type only changes the function of the log-probs: one trainer serves all four.
    for loss_type in ("sigmoid", "ipo", "hinge", "sigmoid_norm"):
        trainer.loss_types = [loss_type]
        policy.zero_grad()
        trl_loss = trainer.compute_loss(trainer.model, batch)
        trl_loss.backward()
        trl_grad = _grads(policy).clone()
        policy.zero_grad()
        loss, metrics = dpo_batch_loss(policy, [examples[i] for i in indices], trl_ref[indices], 0.1, loss_type)
        loss.backward()
        grad = _grads(policy)
        assert abs(loss.item() - trl_loss.item()) <= 1e-5 * abs(trl_loss.item()), loss_type
        assert ((grad - trl_grad).norm() / trl_grad.norm()).item() <= 1e-5, loss_type
        assert metrics["loss"] == pytest.approx(loss.item())

    # RPO: TRL's "sft" loss beside sigmoid, weighted, is the engine's sft_weight.
    trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 0.5]
    policy.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grad = _grads(policy).clone()
    policy.zero_grad()
    plain, _ = dpo_batch_loss(policy, [examples[i] for i in indices], trl_ref[indices], 0.1, "sigmoid")
    loss, metrics = dpo_batch_loss(policy, [examples[i] for i in indices], trl_ref[indices], 0.1, "sigmoid",
                                   sft_weight=0.5)
    loss.backward()
    grad = _grads(policy)
    assert abs(loss.item() - trl_loss.item()) <= 1e-5 * abs(trl_loss.item())
    assert ((grad - trl_grad).norm() / trl_grad.norm()).item() <= 1e-5
    assert loss.item() == pytest.approx(plain.item() + 0.5 * metrics["nll/chosen"], rel=1e-6)
    assert metrics["nll/chosen"] > 0


def test_kto_matches_trl(tiny, tmp_path):
    policy, reference, tokenizer = tiny
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    pairs = _rows()
    # Unpaired rows as a trl-kto export holds them; the mismatched KL pairs follow the batch order.
    rows = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen", "tools": p["tools"]}
            for p, key in zip(pairs + pairs[:1], ["chosen", "rejected", "chosen", "rejected", "rejected", "chosen"])]
    n = len(rows)
    trainer = _trainer("kto", policy, reference, tokenizer, rows, n, tmp_path)
    prepared = trainer.train_dataset
    examples = [tokenize_unpaired(tokenizer, row) for row in rows]
    for i, ex in enumerate(examples):
        assert list(prepared[i]["prompt_ids"]) == list(ex.prompt_ids)
        assert list(prepared[i]["completion_ids"]) == list(ex.completions[0])
    tree_examples = with_kl_completions(examples)
    for i, ex in enumerate(tree_examples):
        assert list(prepared[i]["KL_completion_ids"]) == list(ex.completions[1])

    ours_ref = reference_logps(reference, tree_examples, RefCache(None, "test"), batch_size=n)
    trl_ref = torch.tensor([[prepared[i]["ref_logps"], prepared[i]["ref_KL_logps"]] for i in range(n)])
    assert (ours_ref - trl_ref).abs().max().item() < 1e-4

    batch = trainer.data_collator([prepared[i] for i in range(n)])
    flat = _flat_logps(trainer.model, batch)
    sums, _ = tree_forward(policy, build_tree(tree_examples))
    assert (sums[:, 0].detach() - flat).abs().max().item() < 1e-4

    policy.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grad = _grads(policy).clone()
    policy.zero_grad()
    labels = torch.tensor([row["label"] for row in rows])
    loss, metrics = kto_batch_loss(policy, tree_examples, trl_ref, labels, 0.1,
                                   trainer.desirable_weight, trainer.undesirable_weight)
    loss.backward()
    grad = _grads(policy)
    assert abs(loss.item() - trl_loss.item()) <= 1e-5 * abs(trl_loss.item())
    assert ((grad - trl_grad).norm() / trl_grad.norm()).item() <= 1e-5
    assert metrics["kl"] >= 0


def test_tree_runs_the_shared_prefix_once():
    """The tree's token count is the prefix once, each history once and each completion once."""
    prefix = list(range(100, 400))
    examples = [TreeExample(prefix + [1000 + i] * (5 + i), [[1] * 4, [2] * 6]) for i in range(8)]
    tree = build_tree(examples)
    assert tree.prefix_ids.shape[1] == 300
    assert tree.tree_tokens == 300 + sum(5 + i + 10 for i in range(8))
    assert flat_tokens(examples) == sum(2 * (305 + i) + 10 for i in range(8))
    # Examples with the same prompt share one row of the tree.
    shared = build_tree([TreeExample(prefix, [[1, 2]]), TreeExample(prefix, [[3]])])
    assert shared.row_ids.shape[0] == 1


def test_examples_without_a_shared_prefix_score_like_flat_rows():
    """Prompts that share nothing (p = 0) or share everything (one distinct prompt) still give the flat
    log-probs and gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 300, (n,), generator=g).tolist()

    for examples in ([TreeExample(ids(4 + 3 * i), [ids(3 + i), ids(5)]) for i in range(3)],
                     [TreeExample(ids(9), [ids(4), ids(2)])]):
        model.zero_grad()
        sums, _ = tree_forward(model, build_tree(examples))
        sums.sum().backward()
        tree_grad = _grads(model).clone()
        model.zero_grad()
        flat = []
        for ex in examples:
            for c in ex.completions:
                row = torch.tensor([list(ex.prompt_ids) + list(c)])
                logps = model(row).logits[0, len(ex.prompt_ids) - 1:-1].log_softmax(-1)
                flat.append(logps.gather(1, torch.tensor(c).unsqueeze(1)).sum())
        flat = torch.stack(flat)
        flat.sum().backward()
        assert (sums.detach().flatten() - flat.detach()).abs().max().item() < 1e-4
        assert ((tree_grad - _grads(model)).norm() / _grads(model).norm()).item() <= 1e-5


@pytest.mark.slow
def test_dpo_matches_trl_on_smollm2(smollm2_store, tmp_path):
    """The bars hold on the real 30-layer SmolLM2 too (fp32, LoRA, 40-token completions), where fp32 rounding
    over a 49k vocabulary is large enough to break them if log-probs are computed carelessly."""
    from datasets import Dataset

    from agent_dpo.benchmarks.dpo import agent_pairs, lora_config, parity
    from agent_dpo_adapters.hf_models import SMOLLM2, load_model, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2, smollm2_store)
    rows = agent_pairs(tokenizer, 2, 300, 60, 40, seed=3)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, precompute_ref_log_probs=True,
                         max_length=None, report_to=[], use_cpu=True, disable_tqdm=True, beta=0.1, bf16=False)
    trainer = trl.DPOTrainer(model=load_model(SMOLLM2, smollm2_store), args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows), peft_config=lora_config())
    prepared = trainer.train_dataset
    examples = [tokenize_preference(tokenizer, row) for row in rows]
    assert all(list(prepared[i]["chosen_ids"]) == list(examples[i].completions[0]) for i in range(2))
    # LoRA's B starts at zero; a step of noise makes the policy differ from its reference.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
    trl_ref = torch.tensor([[prepared[i]["ref_chosen_logps"], prepared[i]["ref_rejected_logps"]] for i in range(2)])
    figures = parity(trainer, examples, trl_ref)
    assert figures["logps_max_abs"] < 1e-4, figures
    assert figures["loss_rel"] <= 1e-5, figures
    assert figures["grad_rel"] <= 1e-5, figures
