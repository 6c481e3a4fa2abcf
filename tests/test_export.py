"""Exports from a real SQLite store: the three formats, the rules that hold for every output
(dedupe, split, redaction, agent isolation), the `.meta.json`, length balancing, and that the files
load with `datasets`, render with SmolLM2's tool-aware template and validate as OpenAI rows."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pairing_fixtures import (
    BOOK_OK,
    FIND_SLOTS_BAD,
    FIND_SLOTS_OK,
    CallBuilder,
    args,
    assistant,
    sqlite_store_with,
)
from tiny_model import smollm2_store  # noqa: F401  (pytest fixture)

from agent_dpo.cli import main
from agent_dpo.export import export_dataset, kto_weights
from agent_dpo.lengthbias import balance, length_stats
from agent_dpo.split import split_of

TENANT, AGENT = "acme-salons", "salon-rebook"
GOOD = assistant("I have Tuesday at 2pm or 4pm. Which suits you?")
PUSHY = assistant("You should really buy our premium package too.")
SCHEMA = Path(__file__).resolve().parents[1] / "agent_dpo" / "schemas" / "openai_preference_row.schema.json"


def world(n: int = 30) -> list[CallBuilder]:
    """Calls with every signal; personal data in user turns and tool arguments."""
    builders = []
    for i in range(n):
        b = (CallBuilder(f"call-{i:03d}").started()
             .user(0, f"Hi, this is caller {i}, reach me at caller{i}@example.com or +1415555{i:04d}.")
             .assistant(1, "Checking.", ("find_slots", args({**FIND_SLOTS_BAD, "max_results": 1 + i % 5})))
             .assistant(2, "Checking again.", ("find_slots", args({**FIND_SLOTS_OK, "max_results": 1 + i % 5})),
                        result={"slots": [{"slot_id": "slot-0a1b2c3d", "start": "14:00"}]})
             .user(3, f"2pm works, book it for me. Card {'4111 1111 1111 1111' if i % 2 else 'on file'}.")
             .assistant(4, "Booking now.", ("book_slot", args(BOOK_OK)))
             .ended())
        b.preference(4, assistant(f"Booked, caller {i}! Anything else?", ("book_slot", args(BOOK_OK))),
                     assistant(f"Booked caller {i}. Want a premium color too?"))
        if i % 3 == 0:
            b.thumbs(4, i % 2 == 0)
        b.csat(5 if i % 4 else 1, 5)
        builders.append(b)
    return builders


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    other = CallBuilder("call-secret", agent="other-agent").basic().ended().preference(3, GOOD, PUSHY)
    other.envelopes[1]["data"]["content"] = "SECRET-OTHER-AGENT"
    s = sqlite_store_with(tmp_path_factory.mktemp("store"), *world(), other,
                          CallBuilder("call-open").basic().preference(3, GOOD, PUSHY))
    yield s
    s.close()


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trl_dpo_rows_have_prompt_chosen_rejected_tools_with_object_arguments(store, tmp_path):
    summary = export_dataset(store, TENANT, AGENT, "trl-dpo", tmp_path / "d.jsonl", split="all")
    rows = rows_of(summary.out)
    assert summary.counts_by_signal == {"preference": 30, "schema_retry": 30}
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "tools", "meta"}
        assert row["prompt"][0]["role"] == "system" and len(row["chosen"]) == len(row["rejected"]) == 1
        assert row["meta"]["call_id"].startswith("call-") and row["meta"]["event_ids"]
    retry = next(r for r in rows if r["meta"]["signal"] == "schema_retry")
    assert retry["chosen"][0]["tool_calls"][0]["function"]["arguments"]["date_from"] == "2026-12-08"
    pref = next(r for r in rows if r["meta"]["signal"] == "preference")
    assistant_in_context = next(m for m in pref["prompt"] if m.get("tool_calls"))
    assert isinstance(assistant_in_context["tool_calls"][0]["function"]["arguments"], dict)


def test_unparseable_arguments_stay_raw_text_in_a_rejected_message(tmp_path):
    b = (CallBuilder().started().user(0, "hi").assistant(1, "x", ("find_slots", '{"service": "haircut"'))
         .assistant(2, "y", ("find_slots", args(FIND_SLOTS_OK))).ended())
    with sqlite_store_with(tmp_path / "s", b) as s:
        summary = export_dataset(s, TENANT, AGENT, "trl-dpo", tmp_path / "d.jsonl", split="all")
    [row] = rows_of(summary.out)
    assert row["rejected"][0]["tool_calls"][0]["function"]["arguments"] == '{"service": "haircut"'


def test_openai_rows_validate_against_the_preference_schema(store, tmp_path):
    import jsonschema

    summary = export_dataset(store, TENANT, AGENT, "openai-dpo", tmp_path / "o.jsonl", split="all")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    rows = rows_of(summary.out)
    assert len(rows) == 60
    for row in rows:
        errors = [e.message for e in validator.iter_errors(row)]
        assert not errors, errors[:3]
        for msg in row["input"]["messages"] + row["preferred_output"] + row["non_preferred_output"]:
            for tc in msg.get("tool_calls") or ():
                assert isinstance(tc["function"]["arguments"], str)


def test_trl_kto_holds_thumbs_and_csat_and_include_pairs_adds_both_sides(store, tmp_path):
    plain = export_dataset(store, TENANT, AGENT, "trl-kto", tmp_path / "k.jsonl", split="all")
    assert set(plain.counts_by_signal) == {"thumbs", "csat"}
    for row in rows_of(plain.out):
        assert set(row) == {"prompt", "completion", "label", "tools", "meta"}
        assert isinstance(row["label"], bool) and row["completion"][0]["role"] == "assistant"
    both = export_dataset(store, TENANT, AGENT, "trl-kto", tmp_path / "kp.jsonl", split="all", include_pairs=True)
    added = [r for r in rows_of(both.out) if r["meta"]["signal"] in ("preference", "schema_retry")]
    # 60 pairs make 120 rows; those identical to a thumbs/CSAT row already there are kept once.
    new_duplicates = both.drops.get("duplicate", 0) - plain.drops.get("duplicate", 0)
    assert len(added) == 120 - new_duplicates and 0 < new_duplicates < 60
    assert {r["meta"]["from_pair"] for r in added} == {"chosen", "rejected"}
    assert all(r["label"] == (r["meta"]["from_pair"] == "chosen") for r in added)


def test_kto_weights_follow_trls_ratio_rule(store, tmp_path):
    summary = export_dataset(store, TENANT, AGENT, "trl-kto", tmp_path / "k.jsonl", split="all")
    kto = summary.meta["kto"]
    rows = rows_of(summary.out)
    assert kto["n_desirable"] == sum(r["label"] for r in rows)
    assert kto["n_undesirable"] == sum(not r["label"] for r in rows)
    ratio = kto["desirable_weight"] * kto["n_desirable"] / (kto["undesirable_weight"] * kto["n_undesirable"])
    assert 1.0 <= ratio <= 4 / 3
    for n_d, n_u in [(10, 1000), (1000, 10), (7, 6), (1, 1), (3, 10)]:
        w = kto_weights(n_d, n_u)
        assert 1.0 <= w["desirable_weight"] * n_d / (w["undesirable_weight"] * n_u) <= 4 / 3


def test_identical_examples_are_emitted_once(tmp_path):
    twins = [CallBuilder(f"twin-{i}").basic().ended().preference(3, GOOD, PUSHY) for i in range(3)]
    with sqlite_store_with(tmp_path / "s", *twins) as s:
        summary = export_dataset(s, TENANT, AGENT, "trl-dpo", tmp_path / "d.jsonl", split="all")
    assert summary.rows == 1 and summary.drops == {"duplicate": 2}


def test_one_example_labelled_both_ways_is_dropped_from_kto(tmp_path):
    liked, disliked = CallBuilder("a").basic().ended().csat(5), CallBuilder("b").basic().ended().csat(1)
    with sqlite_store_with(tmp_path / "s", liked, disliked) as s:
        summary = export_dataset(s, TENANT, AGENT, "trl-kto", tmp_path / "k.jsonl", split="all")
    assert summary.rows == 0 and summary.drops == {"conflicting_labels": 4}


def test_calls_split_deterministically_and_train_test_partition_all(store, tmp_path):
    sides = {}
    for split in ("train", "test", "all"):
        summary = export_dataset(store, TENANT, AGENT, "trl-dpo", tmp_path / f"{split}.jsonl", split=split)
        sides[split] = rows_of(summary.out)
    for split in ("train", "test"):
        assert {split_of(TENANT, AGENT, r["meta"]["call_id"]) for r in sides[split]} <= {split}
    assert len(sides["train"]) + len(sides["test"]) == len(sides["all"])
    meta = json.loads((tmp_path / "train.jsonl.meta.json").read_text())
    sizes = meta["split_sizes"]
    assert sizes["train"]["calls"] + sizes["test"]["calls"] == 30
    assert sizes["test"]["pairs"] == len(sides["test"])


def test_exports_redact_by_default_and_no_redact_keeps_the_text(store, tmp_path):
    red = export_dataset(store, TENANT, AGENT, "openai-dpo", tmp_path / "r.jsonl", split="all")
    text = red.out.read_text()
    assert "@example.com" not in text.replace('e.g. +14155550123', '')
    assert "4111 1111 1111 1111" not in text and "[CARD]" in text and "[EMAIL]" in text and "[PHONE]" in text
    # Tool definitions are configuration, not personal data: their descriptions stay as written.
    body = [json.dumps({k: v for k, v in r.items() if k != "input"}) + json.dumps(r["input"]["messages"])
            for r in rows_of(red.out)]
    assert not any("+1415555" in b for b in body)
    assert red.meta["redacted"] is True
    raw = export_dataset(store, TENANT, AGENT, "openai-dpo", tmp_path / "n.jsonl", split="all", redact=False)
    assert "caller7@example.com" in raw.out.read_text() and raw.meta["redacted"] is False


def test_one_agents_data_never_appears_in_anothers(store, tmp_path):
    summary = export_dataset(store, TENANT, AGENT, "trl-dpo", tmp_path / "d.jsonl", split="all")
    assert "SECRET-OTHER-AGENT" not in summary.out.read_text()
    other = export_dataset(store, TENANT, "other-agent", "trl-dpo", tmp_path / "o.jsonl", split="all")
    assert {r["meta"]["call_id"] for r in rows_of(other.out)} == {"call-secret"}


def test_meta_json_describes_the_export(store, tmp_path):
    summary = export_dataset(store, TENANT, AGENT, "trl-dpo", tmp_path / "d.jsonl", split="all")
    meta = json.loads(summary.meta_path.read_text())
    assert summary.meta_path.name == "d.jsonl.meta.json"
    assert meta["sha256"] == hashlib.sha256(summary.out.read_bytes()).hexdigest()
    assert meta["agent"] == f"{TENANT}/{AGENT}" and meta["format"] == "trl-dpo" and meta["split"] == "all"
    assert meta["counts_by_signal"] == {"preference": 30, "schema_retry": 30}
    assert meta["drops"]["call_incomplete"] == 1
    assert meta["calls"] == {"seen": 31, "complete": 30, "events": meta["calls"]["events"]}
    lo, hi = meta["event_range"]["first_seq"], meta["event_range"]["last_seq"]
    assert 1 <= lo < hi and meta["event_range"]["store"][1] >= hi
    length = meta["length"]["written"]
    assert length["pairs"] == 60 and length["ratio"] == pytest.approx(
        length["chosen_mean_chars"] / length["rejected_mean_chars"], rel=1e-3)
    assert {"n_desirable", "n_undesirable", "desirable_weight", "undesirable_weight"} <= set(meta["kto"])
    assert meta["labelled_by"]["preference:csm"] == 30
    assert meta["redacted"] is True


def test_length_balance_brings_the_ratio_into_range_deterministically(tmp_path):
    calls = []
    for i in range(40):
        # 30 pairs of about equal length, 10 whose chosen answer is much longer: the bias.
        times = 1 + (i % 4 if i < 30 else 6)
        chosen = assistant(f"Sure {i}! " + "Tuesday at 2pm or 4pm, which suits you? " * times)
        rejected = assistant(f"No {i}. " + "We are fully booked on Tuesday afternoon. " * (1 + (i + 1) % 4))
        calls.append(CallBuilder(f"c{i:02d}").basic().ended().preference(3, chosen, rejected))
    with sqlite_store_with(tmp_path / "s", *calls) as s:
        plain = export_dataset(s, TENANT, AGENT, "trl-dpo", tmp_path / "p.jsonl", split="all")
        a = export_dataset(s, TENANT, AGENT, "trl-dpo", tmp_path / "a.jsonl", split="all", length_balance=True)
        b = export_dataset(s, TENANT, AGENT, "trl-dpo", tmp_path / "b.jsonl", split="all", length_balance=True)
    assert plain.meta["length"]["written"]["ratio"] > 1.1
    assert 0.9 <= a.meta["length"]["written"]["ratio"] <= 1.1
    assert a.drops["length_balance"] == 40 - a.rows > 0
    assert a.rows >= 30
    assert a.sha256 == b.sha256


def test_balance_drops_the_tail_on_the_heavy_side():
    lengths = [(100, 10), (20, 20), (22, 20), (18, 20), (30, 20)]
    dropped = balance(lengths, [str(i) for i in range(5)])
    assert dropped == {0, 4}
    kept = [x for i, x in enumerate(lengths) if i not in dropped]
    assert 0.9 <= length_stats(kept).ratio <= 1.1
    assert balance([(10, 100), (20, 20)], ["a", "b"]) == {0}


def test_trl_files_load_with_datasets_and_render_with_the_tool_template(store, tmp_path, smollm2_store):  # noqa: F811
    from datasets import load_dataset

    from agent_dpo.chat_template import render
    from agent_dpo_adapters.hf_models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct", smollm2_store)
    dpo = export_dataset(store, TENANT, AGENT, "trl-dpo", tmp_path / "d.jsonl", split="all")
    kto = export_dataset(store, TENANT, AGENT, "trl-kto", tmp_path / "k.jsonl", split="all", include_pairs=True)
    ds = load_dataset("json", data_files=str(dpo.out), split="train")
    assert len(ds) == dpo.rows
    row = next(r for r in ds if r["meta"]["signal"] == "schema_retry")
    prompt = render(tokenizer, row["prompt"], row["tools"], add_generation_prompt=True)
    full = render(tokenizer, row["prompt"] + row["chosen"], row["tools"])
    assert full.startswith(prompt) and "<tool_call>" in full[len(prompt):]
    assert '"name": "find_slots"' in prompt  # the tools reached the text
    kds = load_dataset("json", data_files=str(kto.out), split="train")
    assert len(kds) == kto.rows and set(kds["label"]) == {True, False}
    for r in kds.select(range(5)):
        assert render(tokenizer, r["prompt"] + r["completion"], r["tools"]).count("<|im_start|>assistant") >= 1


def test_caps_keep_a_seeded_subset_of_one_signal_or_rater_and_leave_the_rest(store, tmp_path):
    full = rows_of(export_dataset(store, TENANT, AGENT, "trl-dpo", tmp_path / "all.jsonl", split="all").out)
    by_signal = {sig: [r for r in full if r["meta"]["signal"] == sig] for sig in ("preference", "schema_retry")}
    assert len(by_signal["preference"]) == 30 and len(by_signal["schema_retry"]) == 30

    def capped(name: str, seed: int, caps: dict) -> list[dict]:
        summary = export_dataset(store, TENANT, AGENT, "trl-dpo", tmp_path / name, split="all",
                                 caps=caps, cap_seed=seed)
        assert summary.drops["capped"] == len(full) - summary.rows
        assert summary.meta["caps"] == {"max_rows": caps, "seed": seed}
        return rows_of(summary.out)

    a = capped("a.jsonl", 0, {"signal:preference": 7})
    again = capped("again.jsonl", 0, {"signal:preference": 7})
    other_seed = capped("b.jsonl", 1, {"signal:preference": 7})
    prefs = [r for r in a if r["meta"]["signal"] == "preference"]
    assert len(prefs) == 7 and all(r in by_signal["preference"] for r in prefs)
    assert [r for r in a if r["meta"]["signal"] == "schema_retry"] == by_signal["schema_retry"]
    assert a == again and a != other_seed
    positions = [full.index(r) for r in a]
    assert positions == sorted(positions)  # file order kept

    by_rater = capped("r.jsonl", 0, {"rater:toolcheck": 4, "rater:csm": 0})
    assert len(by_rater) == 4 and {r["meta"]["rater"] for r in by_rater} == {"toolcheck"}


def test_pairs_cli_prints_counts_and_drops(store, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    code = main(["pairs", "--agent", f"{TENANT}/{AGENT}", "--format", "trl-kto", "--out", str(out),
                 "--split", "all", "--store", str(store.path), "--include-pairs", "--csat-desirable", "0.9"])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists() and Path(str(out) + ".meta.json").exists()
    assert "preference" in printed and "call_incomplete" in printed and "desirable_weight" in printed


@pytest.mark.parametrize("argv", [
    ["--format", "csv"],
    ["--format", "trl-dpo", "--include-pairs"],
    ["--format", "trl-dpo", "--csat-desirable", "2"],
    ["--format", "trl-dpo", "--csat-policy", "vibes"],
    ["--format", "trl-dpo", "--cap", "preference=10"],
    ["--format", "trl-dpo", "--cap", "signal:vibes=10"],
    ["--format", "trl-dpo", "--cap", "rater:csm=-1"],
    ["--format", "trl-dpo", "--cap", "rater:csm=1", "--cap", "rater:csm=2"],
])
def test_pairs_cli_refuses_bad_options_with_exit_2(argv, store, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        code = main(["pairs", "--agent", f"{TENANT}/{AGENT}", "--out", str(tmp_path / "x.jsonl"),
                     "--store", str(store.path), *argv])
        raise SystemExit(code)
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_pairs_cli_without_a_store_says_so(tmp_path, capsys):
    code = main(["pairs", "--agent", f"{TENANT}/{AGENT}", "--format", "trl-dpo", "--out", str(tmp_path / "x"),
                 "--store", str(tmp_path / "nothing")])
    assert code == 1 and "no store" in capsys.readouterr().err
