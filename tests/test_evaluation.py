"""Evaluation: a trained tiny version against its SFT base gives the report promotion gates read, the
same numbers for the same seed; the judge sees both orders; a judge that labelled the data is refused."""

# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_training import TOOLS, pair_rows, write_jsonl
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

from agent_dpo.errors import AgentDpoError
from agent_dpo.evaluation import (
    EvalSettings,
    Policy,
    bootstrap_ci,
    evaluate,
    judge_outcomes,
    tool_call_report,
    win_report,
)

REPORT_KEYS = {"version", "baseline", "n", "preference_accuracy", "win_rate", "win_rate_ci",
               "tool_call_validity", "baseline_tool_call_validity"}


class LongerAnswerJudge:
    """A deterministic judge for tests: the answer with more text wins; equal length ties."""

    name = "longer-answer"

    def compare(self, prompt, tools, a, b):
        la, lb = len(a.get("content") or ""), len(b.get("content") or "")
        return "tie" if la == lb else ("a" if la > lb else "b")


class FirstPositionJudge:
    """A judge with pure position bias: whatever is shown first wins."""

    name = "first-position"

    def compare(self, prompt, tools, a, b):
        return "a"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, smollm2_store):
    """A tiny SFT -> DPO run written where `agent-dpo train` writes runs."""
    tmp = tmp_path_factory.mktemp("eval")
    store = tmp / "store"
    data = write_jsonl(tmp / "train.jsonl", pair_rows(8))
    proc = subprocess.run(
        [sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", "train", "--agent", "acme/salon",
         "--data", str(data), "--base-model", str(tiny_model_dir), "--sft-steps", "1", "--max-steps", "1",
         "--batch-size", "2", "--learning-rate", "1e-3", "--version", "v1", "--store", str(store), "--json"],
        check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    held_out = write_jsonl(tmp / "test.jsonl", pair_rows(5)[2:])
    (tmp / "test.jsonl.meta.json").write_text(json.dumps({"labelled_by": {"simulator-rubric": 3}}))
    return json.loads(proc.stdout), store, held_out


def test_report_has_the_gate_keys_and_is_reproducible(trained, tiny_model_dir):
    result, store, held_out = trained
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    candidate = Policy("v1", str(tiny_model_dir), Path(result["artifact_dir"]))
    baseline = Policy("v1:sft", str(tiny_model_dir), Path(result["sft_artifact_dir"]))
    settings = EvalSettings(seed=7, max_new_tokens=10)
    first = evaluate(rows, candidate, baseline, LongerAnswerJudge(), store, settings)
    second = evaluate(rows, candidate, baseline, LongerAnswerJudge(), store, settings)
    assert REPORT_KEYS <= set(first)
    first.pop("wall_s"), second.pop("wall_s")
    assert first == second
    assert (first["version"], first["baseline"], first["n"]) == ("v1", "v1:sft", 3)
    assert 0.0 <= first["preference_accuracy"] <= 1.0
    low, high = first["win_rate_ci"]
    assert low <= first["win_rate"] <= high
    assert first["wins"] + first["ties"] + first["losses"] == first["n_prompts"] == 3


def test_version_against_itself_has_no_preference_and_only_ties(trained, tiny_model_dir):
    result, store, held_out = trained
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    same = Policy("v1", str(tiny_model_dir), Path(result["artifact_dir"]))
    # with a training window (keep_end) too: the oldest context is dropped the same way for both
    report = evaluate(rows, same, same, LongerAnswerJudge(), store, EvalSettings(max_new_tokens=8, max_length=40))
    assert report["preference_accuracy"] == 0.0  # identical rewards never prefer chosen
    assert report["win_rate"] == 0.5 and report["ties"] == report["n_prompts"]


def test_eval_cli_prints_the_report_as_json(trained):
    _, store, held_out = trained
    proc = subprocess.run(
        [sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", "eval", "--agent", "acme/salon",
         "--data", str(held_out), "--judge", "rubric", "--max-new-tokens", "8", "--store", str(store),
         "--json"], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert REPORT_KEYS <= set(report)
    assert (report["version"], report["baseline"], report["judge"]) == ("v1", "v1:sft", "rubric")
    assert json.loads((store / "runs" / "acme" / "salon" / "v1" / "eval.json").read_text()) == report
    # what the win rate is made of: both answers per judged prompt, with the outcome
    answers = [json.loads(line) for line in
               (store / "runs" / "acme" / "salon" / "v1" / "eval.answers.jsonl").read_text().splitlines()]
    assert len(answers) == report["n_prompts"]
    assert sum(a["outcome"] for a in answers) / len(answers) == pytest.approx(report["win_rate"], abs=1e-4)
    assert all(a["candidate"]["role"] == a["baseline"]["role"] == "assistant" for a in answers)


def test_judge_that_labelled_the_data_is_refused(trained, tiny_model_dir):
    result, store, held_out = trained
    labeller = FirstPositionJudge()
    labeller.name = "simulator-rubric"
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    policy = Policy("v1", str(tiny_model_dir), Path(result["artifact_dir"]))
    with pytest.raises(AgentDpoError, match="labelled this data"):
        evaluate(rows, policy, policy, labeller, store, meta={"labelled_by": {"simulator-rubric": 4}})
    with pytest.raises(AgentDpoError, match="labelled this data"):
        evaluate(rows, policy, policy, labeller, store, meta={"labelled_by": "simulator-rubric"})


def test_position_swap_cancels_position_bias():
    prompts = [{"prompt": [{"role": "user", "content": "hi"}], "tools": None}] * 5
    cand = [{"role": "assistant", "content": "long answer", "tool_calls": []}] * 5
    base = [{"role": "assistant", "content": "short", "tool_calls": []}] * 5
    assert judge_outcomes(FirstPositionJudge(), prompts, cand, base) == [0.5] * 5
    assert judge_outcomes(LongerAnswerJudge(), prompts, cand, base) == [1.0] * 5
    assert judge_outcomes(LongerAnswerJudge(), prompts, base, cand) == [0.0] * 5


def test_win_rate_interval_is_seeded_and_brackets_the_rate():
    outcomes = [1.0] * 14 + [0.5] * 3 + [0.0] * 3
    report = win_report(outcomes, seed=3)
    assert report["win_rate"] == 0.775 and (report["wins"], report["ties"], report["losses"]) == (14, 3, 3)
    low, high = report["win_rate_ci"]
    assert low < 0.775 < high and high - low < 0.5
    assert bootstrap_ci(outcomes, 3) == report["win_rate_ci"]


def test_tool_call_validity_counts_schema_passes():
    prompts = [{"prompt": [], "tools": TOOLS}] * 2
    good = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "book", "arguments": '{"day": "Monday"}'}}]}
    bad = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "b", "type": "function", "function": {"name": "book", "arguments": '{"when": "Monday"}'}},
        {"id": "c", "type": "function", "function": {"name": "book", "arguments": '{"day": '}}]}
    words = {"role": "assistant", "content": "Sure.", "tool_calls": []}
    report = tool_call_report(prompts, [good, bad], [words, words])
    assert report["tool_call_validity"] == pytest.approx(1 / 3, abs=1e-3) and report["tool_calls"] == 3
    assert report["baseline_tool_call_validity"] is None and report["baseline_tool_calls"] == 0


def test_a_call_cut_off_by_the_token_limit_is_counted_apart_not_as_invalid():
    from agent_dpo.chat_template import cut_off_in_a_call, parse_assistant_output

    prompts = [{"prompt": [], "tools": TOOLS}] * 3
    texts = ['<tool_call>\n{"name": "book", "arguments": {"day": "Monday"}}\n</tool_call><|im_end|>',
             'One moment.\n<tool_call>\n{"name": "book", "arguments": {"da',  # the limit struck mid-call
             '<tool_call>\n{"name": "book", "arguments": {"da</tool_call><|im_end|>']  # the model broke it
    assert [cut_off_in_a_call(t) for t in texts] == [False, True, False]
    assert not cut_off_in_a_call("Let me check that for you, one")  # cut off, but not inside a call
    answers = [parse_assistant_output(t) for t in texts]
    assert all(len(a["tool_calls"]) == 1 for a in answers)
    report = tool_call_report(prompts, answers, answers, [cut_off_in_a_call(t) for t in texts], None)
    assert (report["tool_calls"], report["tool_calls_truncated"], report["tool_call_validity"]) == (2, 1, 0.5)
    # Without knowing where generation stopped, the cut call can only count as an invalid one.
    assert (report["baseline_tool_calls"], report["baseline_tool_calls_truncated"]) == (3, 0)
    assert report["baseline_tool_call_validity"] == pytest.approx(1 / 3, abs=1e-3)


def test_shared_prefix_generation_gives_the_same_answers(trained, tiny_model_dir, monkeypatch):
    """Generation computes the agent's shared system prompt and tools once per batch; the answers are
    exactly those of a plain left-padded batch."""
    import torch

    from agent_dpo import evaluation
    from agent_dpo_adapters.hf_models import SMOLLM2, load_tokenizer

    result, store, held_out = trained
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    tokenizer = load_tokenizer(SMOLLM2, store)
    model = evaluation.load_policy(Policy("v1", str(tiny_model_dir), Path(result["artifact_dir"])), store)
    settings = EvalSettings(max_new_tokens=12, batch_size=3)
    # histories of different lengths, so rows carry padding between the shared prefix and their own tokens
    rows[0] = {**rows[0], "prompt": rows[0]["prompt"] + [
        {"role": "assistant", "content": "Which service would you like, and at which branch?"},
        {"role": "user", "content": "A cut and a colour at the high street branch, in the afternoon please."}]}
    monkeypatch.setattr(evaluation, "SHARED_PREFIX_MIN", 8)
    encoded = [list(tokenizer.apply_chat_template(r["prompt"], tools=r["tools"], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    batch = evaluation._shared_prefix_batch(model, encoded, tokenizer.pad_token_id, "cpu")
    assert batch is not None and (batch["attention_mask"] == 0).any(), [len(e) for e in encoded]
    cache_key = next(k for k in batch if k not in ("input_ids", "attention_mask"))
    cache, mask = batch[cache_key], batch["attention_mask"]
    p = cache.get_seq_length()
    with torch.no_grad():  # what generate's first step runs: the uncached tokens, positions from the mask
        next_logits = model(input_ids=batch["input_ids"][:, p:], attention_mask=mask, **{cache_key: cache},
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, p:]).logits[:, -1]
        for i, ids in enumerate(encoded):  # each row alone, no padding, no shared cache
            alone = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(next_logits[i], alone, atol=1e-4), i
    shared = evaluation.generate_answers(model, tokenizer, rows, settings, "cpu")
    monkeypatch.setattr(evaluation, "SHARED_PREFIX_MIN", 10**9)
    plain = evaluation.generate_answers(model, tokenizer, rows, settings, "cpu")
    assert shared == plain


def test_samples_share_one_pass_per_prompt_and_keep_prompt_order(trained, tiny_model_dir, monkeypatch):
    """`samples` answers per prompt: each prompt's context runs once and its samples continue from the same
    keys/values; greedy samples equal the one greedy answer, sampled ones are seeded, and answers come back
    in prompt order although batches run shortest prompt first."""
    import torch

    from agent_dpo import evaluation
    from agent_dpo_adapters.hf_models import SMOLLM2, load_tokenizer

    result, store, held_out = trained
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    rows[0] = {**rows[0], "prompt": rows[0]["prompt"] + [  # the first prompt is the longest
        {"role": "assistant", "content": "Which service would you like, and at which branch?"},
        {"role": "user", "content": "A cut and a colour at the high street branch, in the afternoon please."}]}
    tokenizer = load_tokenizer(SMOLLM2, store)
    model = evaluation.load_policy(Policy("v1", str(tiny_model_dir), Path(result["artifact_dir"])), store)
    monkeypatch.setattr(evaluation, "SHARED_PREFIX_MIN", 8)
    encoded = [list(tokenizer.apply_chat_template(r["prompt"], tools=r["tools"], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    batch = evaluation._shared_prefix_batch(model, encoded, tokenizer.pad_token_id, "cpu", samples=2)
    cache_key = next(k for k in batch if k not in ("input_ids", "attention_mask"))
    cache, mask = batch[cache_key], batch["attention_mask"]
    assert batch["input_ids"].shape[0] == 2 * len(rows)
    assert cache.get_seq_length() == batch["input_ids"].shape[1] - 1  # only the last token is left to run
    with torch.no_grad():
        next_logits = model(input_ids=batch["input_ids"][:, -1:], attention_mask=mask, **{cache_key: cache},
                            position_ids=(mask.cumsum(-1) - 1)[:, -1:]).logits[:, -1]
        for i, ids in enumerate(encoded):
            alone = model(input_ids=torch.tensor([ids])).logits[0, -1]
            for k in (2 * i, 2 * i + 1):
                assert torch.allclose(next_logits[k], alone, atol=1e-4), (i, k)

    settings = EvalSettings(max_new_tokens=8, batch_size=4, seed=3)
    greedy = evaluation.generate_answers(model, tokenizer, rows, settings, "cpu")
    twice = evaluation.generate_answers(model, tokenizer, rows, settings, "cpu", samples=2)
    assert twice == [a for a in greedy for _ in range(2)]
    sampled = evaluation.generate_answers(model, tokenizer, rows, settings, "cpu", samples=2, temperature=1.5)
    again = evaluation.generate_answers(model, tokenizer, rows, settings, "cpu", samples=2, temperature=1.5)
    assert sampled == again and len(sampled) == 2 * len(rows)
    assert sampled != twice  # a hot tiny model does not land on its greedy answers every time


def test_sample_cli_writes_candidates_of_the_sft_stage(trained, tmp_path):
    _, store, held_out = trained
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    data = write_jsonl(tmp_path / "prompts.jsonl",
                       [{**r, "meta": {"call_id": f"c{i}", "turn": 1}} for i, r in enumerate(rows)])
    out = tmp_path / "cand.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", "sample", "--agent", "acme/salon",
         "--version", "v1", "--stage", "sft", "--data", str(data), "--out", str(out), "--samples", "3",
         "--max-new-tokens", "6", "--precision", "fp32", "--store", str(store), "--json"],
        check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary == {"version": "v1:sft", "prompts": len(rows), "samples": 3, "candidates": 3 * len(rows),
                       "out": str(out)}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["meta"] for r in records] == [{"call_id": f"c{i}", "turn": 1} for i in range(len(rows))]
    assert all(r["prompt"] == row["prompt"] and len(r["candidates"]) == 3 and r["version"] == "v1:sft"
               for r, row in zip(records, rows))
    assert all(c["role"] == "assistant" for r in records for c in r["candidates"])

    bad = subprocess.run([sys.executable, "-m", "agent_dpo.cli", "sample", "--agent", "acme/salon", "--version", "v1",
                          "--data", str(held_out), "--out", str(out), "--store", str(store)],
                         check=False, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "meta.call_id" in bad.stderr and "Traceback" not in bad.stderr


def test_next_round_trains_from_a_versions_sft_stage(trained, tmp_path):
    """`train --base-model RUN/sft --base-is-sft`: the SFT adapter is merged into its base and is the
    declared SFT'd base (no second SFT); eval's `--baseline sft` is then that merged model."""
    result, store, held_out = trained
    sft = result["sft_artifact_dir"]
    data = write_jsonl(tmp_path / "round2.jsonl", pair_rows(4))
    proc = subprocess.run(
        [sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", "train", "--agent", "acme/salon",
         "--data", str(data), "--base-model", sft, "--base-is-sft", "--max-steps", "1", "--batch-size", "2",
         "--version", "v2", "--store", str(store), "--json"],
        check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    round2 = json.loads(proc.stdout)
    assert round2["base_model"] == sft and not round2.get("sft_artifact_dir")
    assert list((store / "models" / "merged").glob("*/model.safetensors"))
    report = subprocess.run(
        [sys.executable, "-m", "agent_dpo.cli", "eval", "--agent", "acme/salon", "--version", "v2", "--baseline",
         "sft", "--judge", "none", "--data", str(held_out), "--max-new-tokens", "4", "--store", str(store), "--json"],
        check=False, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-2000:]
    assert json.loads(report.stdout)["version"] == "v2"
    # the baseline given as the SFT adapter's absolute path (a folder, although it sits under runs/)
    by_path = subprocess.run(
        [sys.executable, "-m", "agent_dpo.cli", "eval", "--agent", "acme/salon", "--version", "v2", "--baseline",
         str(Path(sft).resolve()), "--judge", "none", "--data", str(held_out), "--max-new-tokens", "4",
         "--store", str(store), "--json"], check=False, capture_output=True, text=True, timeout=600)
    assert by_path.returncode == 0, by_path.stderr[-2000:]
    assert json.loads(by_path.stdout)["baseline"] == Path(sft).name
