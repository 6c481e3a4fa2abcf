"""Held-out evaluation of a trained version against a baseline (by default its SFT base): what the
promotion gates read. Three measures on the agent's held-out split:

1. Preference accuracy: the share of held-out pairs where the candidate's implicit DPO reward,
   beta * (log p_candidate - log p_baseline), is higher for the chosen answer than for the rejected one.
2. Judge win rate: candidate and baseline each answer every held-out prompt (greedy, through the
   tool-aware template, parsed back to a Message); the judge compares the two answers in both orders
   (position swap). A prompt is a win when the candidate wins both orders, a loss when it loses both,
   a tie otherwise; win_rate = (wins + ties / 2) / n. Its 95% interval is a seeded percentile bootstrap
   over prompts (2000 resamples): ties make the outcome three-valued, which Wilson's interval does not
   cover, and resampling prompts keeps the interval honest about which prompts happened to be held out.
3. Tool-call validity: the share of generated tool calls that pass their tool's JSON Schema
   (toolcheck.check_redacted_call: held-out prompts are redacted, so a `[PHONE]` copied into a call stands
   for the removed number), candidate and baseline; null when a side made no complete tool call. A call
   that `max_new_tokens` cut off mid-way is counted apart (`tool_calls_truncated`), not as invalid: the
   limit, not the model, ended it.

A judge that labelled the data would grade its own homework, so one whose name matches the export's
`labelled_by` is refused. Everything is seeded: the same data, models and seed give the same numbers."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger

Verdict = Literal["a", "b", "tie"]
BOOTSTRAP_RESAMPLES = 2000


class Judge(Protocol):
    name: str

    def compare(self, prompt: list[dict], tools: list[dict], a: dict, b: dict) -> Verdict: ...


@dataclass(frozen=True)
class Policy:
    """A model to evaluate: a base model plus, optionally, an adapter (or a full fine-tuned folder)."""

    label: str  # what the report calls it: a version name, "sft", "base"
    base_model: str
    adapter_dir: Path | None = None


@dataclass(frozen=True)
class EvalSettings:
    beta: float = 0.1
    seed: int = 0
    max_new_tokens: int = 256  # a tool call with its arguments runs past 100 tokens; answers stop at <|im_end|>
    max_prompts: int | None = None  # judge at most this many held-out prompts (seeded sample)
    max_pairs: int | None = None  # score at most this many held-out pairs (seeded sample)
    batch_size: int = 8
    device: str | None = None
    # The training window when the version trained with truncation_mode keep_end: the oldest context
    # is dropped so the model is scored and generates on what it was trained to see.
    max_length: int | None = None


def check_judge_allowed(judge: Judge, meta: dict) -> None:
    """Refuse a judge that is (one of) the labeller(s) recorded in the export's meta."""
    labelled_by = (meta or {}).get("labelled_by")
    if isinstance(labelled_by, dict | list | tuple | set):
        labellers = {str(k) for k in labelled_by}
    elif labelled_by:
        labellers = {str(labelled_by)}
    else:
        labellers = set()
    if judge.name in labellers:
        raise AgentDpoError(f"judge {judge.name!r} labelled this data (meta labelled_by); "
                            f"evaluate with a different judge")


def evaluate(rows: list[dict], candidate: Policy, baseline: Policy, judge: Judge | None, store_dir: Path,
             settings: EvalSettings = EvalSettings(), meta: dict | None = None,
             answers_file: Path | None = None) -> dict[str, Any]:
    """The report for `candidate` vs `baseline` on held-out trl-dpo rows (see the module docstring).
    With `answers_file`, every judged prompt's two answers and the judge's outcome go there as JSON lines,
    so a reader can see what the win rate is made of."""
    import torch

    if judge is not None:
        check_judge_allowed(judge, meta or {})
    if not rows:
        raise AgentDpoError("no held-out rows to evaluate on")
    started = time.monotonic()
    log = get_logger(component="eval", candidate=candidate.label, baseline=baseline.label)
    torch.manual_seed(settings.seed)
    pairs = _sample(rows, settings.max_pairs, settings.seed)
    prompts = _sample(_unique_prompts(rows), settings.max_prompts, settings.seed + 1)

    from agent_dpo_adapters.hf_models import load_tokenizer

    tokenizer = load_tokenizer(candidate.base_model, store_dir)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cand_model = load_policy(candidate, store_dir, device)
    base_model = load_policy(baseline, store_dir, device)

    cand_margins = sequence_logps(cand_model, tokenizer, pairs, settings.max_length)
    base_margins = sequence_logps(base_model, tokenizer, pairs, settings.max_length)
    rewards = [settings.beta * ((c_ch - b_ch) - (c_rj - b_rj))
               for (c_ch, c_rj), (b_ch, b_rj) in zip(cand_margins, base_margins)]
    preference_accuracy = sum(r > 0 for r in rewards) / len(rewards)
    log.info("preference_scored", pairs=len(pairs), accuracy=round(preference_accuracy, 4))

    from agent_dpo.chat_template import cut_off_in_a_call, parse_assistant_output

    cand_texts = generate_texts(cand_model, tokenizer, prompts, settings, device, f"answers {candidate.label}")
    base_texts = generate_texts(base_model, tokenizer, prompts, settings, device, f"answers {baseline.label}")
    cand_answers = [parse_assistant_output(t) for t in cand_texts]
    base_answers = [parse_assistant_output(t) for t in base_texts]
    report: dict[str, Any] = {
        "version": candidate.label,
        "baseline": baseline.label,
        "n": len(pairs),
        "preference_accuracy": round(preference_accuracy, 4),
        "preference_margin_mean": round(sum(rewards) / len(rewards), 4),
        "n_prompts": len(prompts),
    }
    report.update(tool_call_report(prompts, cand_answers, base_answers,
                                   [cut_off_in_a_call(t) for t in cand_texts], [cut_off_in_a_call(t) for t in base_texts]))
    if judge is not None:
        outcomes = judge_outcomes(judge, prompts, cand_answers, base_answers)
        report.update(win_report(outcomes, settings.seed))
        report["judge"] = judge.name
    else:
        outcomes = [None] * len(prompts)
        report.update({"win_rate": None, "win_rate_ci": None, "judge": None})
    if answers_file is not None:
        write_answers(Path(answers_file), prompts, cand_answers, base_answers, outcomes)
    report["seed"] = settings.seed
    report["beta"] = settings.beta
    report["wall_s"] = round(time.monotonic() - started, 2)
    log.info("eval_finished", **{k: report[k] for k in ("n", "preference_accuracy", "win_rate",
                                                        "tool_call_validity", "wall_s")})
    return report


# ------------------------------------------------------------------------------------------------
# Models


def load_policy(policy: Policy, store_dir: Path, device: str = "cpu") -> Any:
    """The policy as one plain model in eval mode (an adapter is merged into its base)."""
    from agent_dpo_adapters.hf_models import load_model

    adapter = Path(policy.adapter_dir) if policy.adapter_dir else None
    if adapter is not None and (adapter / "config.json").is_file() and not (adapter / "adapter_config.json").is_file():
        model = load_model(adapter, store_dir)  # a full fine-tune
    else:
        model = load_model(policy.base_model, store_dir)
        if adapter is not None:
            from peft import PeftModel

            if not (adapter / "adapter_model.safetensors").is_file():
                raise AgentDpoError(f"{adapter} holds no adapter_model.safetensors")
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(device).eval()


def sequence_logps(model: Any, tokenizer: Any, pairs: list[dict], max_length: int | None = None,
                   batch_size: int = 16) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) per pair, summed over completion tokens, scored
    on the prefix-tree engine as training scores them (the agent's shared system prompt and tools run once
    per batch); with max_length, on the same keep_end window per pair the fast backend trains on."""
    import torch

    from agent_dpo.training.prefix_tree import build_tree, tree_forward
    from agent_dpo.training.recipes import dpo_rows
    from agent_dpo.training.tree_backend import tokenize_preference

    mode = "keep_end" if max_length is not None else "keep_start"
    examples = [tokenize_preference(tokenizer, row, max_length, mode) for row in dpo_rows(pairs)]
    out: list[tuple[float, float]] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            sums, _ = tree_forward(model, build_tree(examples[start:start + batch_size]))
            out.extend((float(c), float(r)) for c, r in sums.float().cpu().tolist())
    return out


def generate_answers(model: Any, tokenizer: Any, prompts: list[dict], settings: EvalSettings,
                     device: str, label: str = "answers", *, samples: int = 1,
                     temperature: float | None = None, top_p: float = 1.0) -> list[dict]:
    """`generate_texts`, each parsed back to an assistant Message (content and OpenAI tool_calls)."""
    from agent_dpo.chat_template import parse_assistant_output

    return [parse_assistant_output(text) for text in generate_texts(
        model, tokenizer, prompts, settings, device, label, samples=samples, temperature=temperature, top_p=top_p)]


def generate_texts(model: Any, tokenizer: Any, prompts: list[dict], settings: EvalSettings,
                   device: str, label: str = "answers", *, samples: int = 1,
                   temperature: float | None = None, top_p: float = 1.0) -> list[str]:
    """The generated text of each answer (special tokens kept), with a progress bar: greedy, or sampled at
    `temperature` with `samples` answers per prompt (prompt i's answers at i*samples ... i*samples+samples-1).

    Prompts run in batches of similar length (order restored after), so little of a batch is padding;
    a batch's shared prefix (system prompt and tools) and each prompt's own context are computed once,
    however many samples are drawn from it."""
    import torch
    from tqdm.auto import tqdm

    from agent_dpo.training.recipes import template_messages

    window = None if settings.max_length is None else max(1, settings.max_length - settings.max_new_tokens)
    encoded = []
    for p in prompts:
        ids = list(tokenizer.apply_chat_template(template_messages(p["prompt"]), tools=_tool_list(p.get("tools")),
                                                 add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
        encoded.append(ids[-window:] if window else ids)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str | None] = [None] * (len(prompts) * samples)
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature
                else {"do_sample": False})
    per_batch = max(1, settings.batch_size // samples)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    bar = tqdm(total=len(prompts), desc=label, unit="prompt", dynamic_ncols=True)
    try:
        for start in range(0, len(order), per_batch):
            chunk = order[start:start + per_batch]
            rows = [encoded[i] for i in chunk]
            with torch.no_grad():
                batch = _shared_prefix_batch(model, rows, tokenizer.pad_token_id, device, samples)
                if batch is None:
                    batch = tokenizer.pad([{"input_ids": r} for r in rows for _ in range(samples)],
                                          return_tensors="pt").to(device)
                torch.manual_seed(settings.seed + start)
                generated = model.generate(**batch, max_new_tokens=settings.max_new_tokens, **sampling,
                                           pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
            for j, row in enumerate(generated[:, batch["input_ids"].shape[1]:]):
                i, k = chunk[j // samples], j % samples
                answers[i * samples + k] = tokenizer.decode(row, skip_special_tokens=False)
            bar.update(len(chunk))
    finally:
        bar.close()
        tokenizer.padding_side = side
    return answers  # type: ignore[return-value]


SHARED_PREFIX_MIN = 64  # tokens a batch's prompts must share before one prefix pass pays off


def _shared_prefix_batch(model: Any, rows: list[list[int]], pad_id: int, device: str,
                         samples: int = 1) -> dict | None:
    """Generation inputs whose shared prefix (an agent's system prompt and tools) is computed once: its
    keys/values go in as the cache for every row, each row's own tokens follow after padding in the
    middle (masked; positions come from the mask, so each row sees the positions it has alone). With
    `samples` > 1 each row's own context also runs once (all but its last token), and its samples
    share those keys/values. None when the prompts share too little for this to pay off."""
    import torch
    from transformers import DynamicCache

    from agent_dpo.training.prefix_tree import cache_kwargs, common_prefix, repeat_cache

    p = min(common_prefix(rows), min(len(r) for r in rows) - 1)
    if p < SHARED_PREFIX_MIN or len(rows) * samples < 2:
        return None
    one = DynamicCache(config=model.config)
    width = max(len(r) - p for r in rows)
    ids = torch.tensor([r[:p] + [pad_id] * (width - (len(r) - p)) + r[p:] for r in rows], device=device)
    mask = torch.tensor([[1] * p + [0] * (width - (len(r) - p)) + [1] * (len(r) - p) for r in rows], device=device)
    with torch.no_grad():
        model(input_ids=ids[:1, :p], use_cache=True, logits_to_keep=1, **cache_kwargs(model, one))
        cache = repeat_cache(one, len(rows), model.config)
        if samples > 1:
            if width > 1:  # every row ends in a real token; everything before it is cached here, once per row
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                model(input_ids=ids[:, p:-1], attention_mask=mask[:, :-1], position_ids=positions[:, p:-1],
                      use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            cache = interleave_cache(cache, samples, model.config)
            ids, mask = ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)
    return {"input_ids": ids, "attention_mask": mask, **cache_kwargs(model, cache)}


def interleave_cache(cache: Any, samples: int, config: Any) -> Any:
    """Each row of `cache` repeated `samples` times in place (row r becomes rows r*samples ...)."""
    from transformers import DynamicCache

    out = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.repeat_interleave(samples, 0), layer.values.repeat_interleave(samples, 0), i)
    return out


# ------------------------------------------------------------------------------------------------
# Judging and tool calls


def judge_outcomes(judge: Judge, prompts: list[dict], cand: list[dict], base: list[dict]) -> list[float]:
    """Per prompt: 1 (candidate wins both orders), 0 (loses both), 0.5 (anything else)."""
    outcomes = []
    for p, c, b in zip(prompts, cand, base):
        tools = _tool_list(p.get("tools")) or []
        first = judge.compare(p["prompt"], tools, c, b)  # candidate shown as a
        second = judge.compare(p["prompt"], tools, b, c)  # candidate shown as b
        points = (first == "a") + (second == "b")
        against = (first == "b") + (second == "a")
        outcomes.append(1.0 if points == 2 else 0.0 if against == 2 else 0.5)
    return outcomes


def write_answers(path: Path, prompts: list[dict], cand: list[dict], base: list[dict],
                  outcomes: list[float | None]) -> None:
    """One JSON line per judged prompt: its last user turn, both answers, the outcome for the candidate
    (1 win, 0.5 tie, 0 loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for p, c, b, outcome in zip(prompts, cand, base, outcomes):
            last_user = next((m.get("content") for m in reversed(p["prompt"]) if m.get("role") == "user"), None)
            out.write(json.dumps({"last_user": last_user, "candidate": c, "baseline": b,
                                  "outcome": outcome}, ensure_ascii=False) + "\n")


def win_report(outcomes: list[float], seed: int) -> dict[str, Any]:
    n = len(outcomes)
    wins, losses = outcomes.count(1.0), outcomes.count(0.0)
    rate = sum(outcomes) / n if n else 0.0
    return {"win_rate": round(rate, 4), "win_rate_ci": bootstrap_ci(outcomes, seed),
            "wins": wins, "ties": n - wins - losses, "losses": losses}


def bootstrap_ci(outcomes: list[float], seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> list[float]:
    """95% percentile bootstrap interval of the mean, over prompts, seeded."""
    if not outcomes:
        return [0.0, 0.0]
    rng = random.Random(seed)
    n = len(outcomes)
    means = sorted(sum(rng.choice(outcomes) for _ in range(n)) / n for _ in range(resamples))
    return [round(means[int(0.025 * resamples)], 4), round(means[int(0.975 * resamples) - 1], 4)]


def tool_call_report(prompts: list[dict], cand: list[dict], base: list[dict],
                     cand_cut: list[bool] | None = None, base_cut: list[bool] | None = None) -> dict[str, Any]:
    """Validity of each side's complete tool calls; `*_cut[i]` says answer i ended inside a call at the
    token limit, so its last call is counted as truncated instead."""
    cand_ok, cand_n, cand_trunc = _validity(prompts, cand, cand_cut)
    base_ok, base_n, base_trunc = _validity(prompts, base, base_cut)
    return {"tool_call_validity": round(cand_ok / cand_n, 4) if cand_n else None,
            "baseline_tool_call_validity": round(base_ok / base_n, 4) if base_n else None,
            "tool_calls": cand_n, "baseline_tool_calls": base_n,
            "tool_calls_truncated": cand_trunc, "baseline_tool_calls_truncated": base_trunc}


def _validity(prompts: list[dict], answers: list[dict], cut: list[bool] | None) -> tuple[int, int, int]:
    from agent_dpo.toolcheck import check_redacted_call

    ok = total = truncated = 0
    for i, (p, answer) in enumerate(zip(prompts, answers)):
        tools = _tool_list(p.get("tools")) or []
        calls = list(answer.get("tool_calls") or [])
        if cut is not None and cut[i] and calls:
            calls.pop()
            truncated += 1
        for call in calls:
            fn = call.get("function", {})
            total += 1
            ok += bool(check_redacted_call(tools, fn.get("name", ""), fn.get("arguments", "")).ok)
    return ok, total, truncated


# ------------------------------------------------------------------------------------------------
# Data


def _tool_list(tools: Any) -> list[dict] | None:
    import json

    if isinstance(tools, str):
        tools = json.loads(tools)
    return tools or None


def _unique_prompts(rows: list[dict]) -> list[dict]:
    import json

    seen, out = set(), []
    for r in rows:
        key = json.dumps([r["prompt"], r.get("tools")], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({"prompt": r["prompt"], "tools": r.get("tools")})
    return out


def _sample(items: list, limit: int | None, seed: int) -> list:
    if limit is None or len(items) <= limit:
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]
