#!/usr/bin/env bash
# Two DPO rounds on the example salon world, after `make demo`: an SFT'd SmolLM2, one side-by-side round on
# its own sampled answers, then a short pass over every pair; each version is evaluated against the SFT stage.
#
#   bash examples/salon_rounds.sh            # the full recipe: about 2 h on 2 CPU cores
#   QUICK=1 bash examples/salon_rounds.sh    # the same steps at toy sizes (minutes), to check the wiring
#   MIX=1 bash examples/salon_rounds.sh      # also m1: one round from the SFT stage on the campaign, every
#                                            # schema retry and a capped draw of historic pairs (about 1 h more)
#
# Every step is skipped when its output exists, so a stopped run resumes where it stopped. Outputs go under
# $WORK (default .agent-dpo/rounds): the store with its runs, candidates, exports, and one eval JSON per version.
set -euo pipefail

AGENT=acme-salons/salon-rebook
DEMO=${DEMO:-.agent-dpo/demo}
WORK=${WORK:-.agent-dpo/rounds}
BIN=${BIN:-$( [ -x .venv/bin/agent-dpo ] && echo .venv/bin || dirname "$(command -v agent-dpo)" )}
DATA=$DEMO/data/acme-salons--salon-rebook
STORE=$WORK/store

if [ "${QUICK:-0}" = 1 ]; then
  SFT_STEPS=1; PROMPTS=4; SAMPLES=2; NEW_TOKENS=24; ROUND_STEPS=1; P2_STEPS=1
  EVAL=(--max-prompts 2 --max-pairs 4 --max-new-tokens 24)
else
  SFT_STEPS=72; PROMPTS=360; SAMPLES=3; NEW_TOKENS=176; ROUND_STEPS=epoch; P2_STEPS=16
  EVAL=()
fi
COMMON=(--batch-size 8 --sft-weight 1.0 --precision bf16 --max-length 4096 --store "$STORE" --json)

for f in "$DATA.train.trl-dpo.jsonl" "$DATA.test.trl-dpo.jsonl" "$DEMO/events/events.sqlite3"; do
  [ -f "$f" ] || { echo "salon_rounds: $f is missing; run \`make demo\` first" >&2; exit 1; }
done
mkdir -p "$STORE"
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$WORK/wall_s.txt"; }

# The demo's events (historic calls and feedback) in a store of this run's own; its model cache is shared.
[ -f "$STORE/events.sqlite3" ] || cp "$DEMO/events/events.sqlite3" "$STORE/events.sqlite3"
[ -e "$STORE/models" ] || { [ -d "$DEMO/models" ] && ln -s "$(cd "$DEMO/models" && pwd)" "$STORE/models"; } || true

# 1. SFT on the historic chosen answers (g1's DPO stage is not used: one step keeps it short).
if [ ! -d "$STORE/runs/$AGENT/g1/sft" ]; then
  step "SFT stage ($SFT_STEPS steps)"
  timed sft "$BIN/agent-dpo" train --agent $AGENT --data "$DATA.train.trl-dpo.jsonl" --version g1 \
    --sft-steps $SFT_STEPS --sft-learning-rate 5e-4 --max-steps 1 --learning-rate 2e-4 "${COMMON[@]}" > "$WORK/g1.json"
fi

# 2. The SFT'd model answers training prompts several times.
if [ ! -f "$WORK/candidates.jsonl" ]; then
  step "sampling $PROMPTS prompts x $SAMPLES"
  timed sample "$BIN/agent-dpo" sample --agent $AGENT --version g1 --stage sft --data "$DATA.train.trl-dpo.jsonl" \
    --out "$WORK/candidates.jsonl.part" --samples $SAMPLES --max-prompts $PROMPTS --max-new-tokens $NEW_TOKENS \
    --batch-size 24 --store "$STORE"
  mv "$WORK/candidates.jsonl.part" "$WORK/candidates.jsonl"
fi

# 3. Raters pick between them; the picks travel as feedback.preference through a real JetStream server.
if [ ! -f "$WORK/ingested" ]; then
  step "side-by-side picks -> NATS -> ingest"
  NATS=$("$BIN/python" -c 'from agent_dpo_adapters.nats_server import nats_server_binary; print(nats_server_binary())')
  PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  rm -rf "$WORK/jetstream"
  "$NATS" -js -sd "$WORK/jetstream" -a 127.0.0.1 -p "$PORT" > "$WORK/nats.log" 2>&1 &
  NATS_PID=$!
  trap 'kill $NATS_PID 2>/dev/null || true' EXIT
  sleep 1
  "$BIN/python" examples/side_by_side.py --candidates "$WORK/candidates.jsonl" --agent $AGENT \
    --nats-url "nats://127.0.0.1:$PORT" --init-bus
  "$BIN/agent-dpo" ingest --nats-url "nats://127.0.0.1:$PORT" --store "$STORE" --until-idle 2
  kill $NATS_PID; wait $NATS_PID 2>/dev/null || true; trap - EXIT
  touch "$WORK/ingested"
fi

# One DPO round: VERSION (skipped when its adapter exists) trains from BASE (an SFT'd or tuned adapter folder)
# on the pairs `agent-dpo pairs PAIRS_ARGS...` exports; STEPS "epoch" means one pass over those pairs.
dpo_round() {
  local version=$1 base=$2 steps=$3 lr=$4; shift 4
  [ -d "$STORE/runs/$AGENT/$version/adapter" ] && return 0
  local data="$WORK/$version.trl-dpo.jsonl"
  "$BIN/agent-dpo" pairs --agent $AGENT --format trl-dpo --split train --labelled-by simulator-rubric \
    --out "$data" --store "$STORE" "$@"
  local rows; rows=$(wc -l < "$data")
  [ "$steps" = epoch ] && steps=$(( (rows + 7) / 8 ))
  step "$version: $steps steps on $rows pairs from $(basename "$(dirname "$base")")"
  timed "$version" "$BIN/agent-dpo" train --agent $AGENT --data "$data" --version "$version" \
    --base-model "$base" --base-is-sft --max-steps "$steps" --learning-rate "$lr" "${COMMON[@]}" > "$WORK/$version.json"
}
RUNS=$STORE/runs/$AGENT

# 4. Round 1 (p1): DPO from the SFT stage on the campaign's pairs and every schema retry.
dpo_round p1 "$RUNS/g1/sft" "$ROUND_STEPS" 2e-4 --rater sbs-panel --signal schema_retry
# 5. Round 2 (p2): a short, gentler pass from p1 over every pair the store holds (historic and campaign).
dpo_round p2 "$RUNS/p1/adapter" "$P2_STEPS" 1e-4
VERSIONS=(p1 p2)
# 5b. (MIX=1) m1: the same two lessons in one round from the SFT stage, the mix weighted toward the campaign.
if [ "${MIX:-0}" = 1 ]; then
  dpo_round m1 "$RUNS/g1/sft" "$ROUND_STEPS" 2e-4 --cap rater:csm=120 --cap rater:qa-reviewer=30
  VERSIONS+=(m1)
fi

# 6. Each version against the SFT stage on the held-out split: preference accuracy, rubric win rate, validity.
for v in "${VERSIONS[@]}"; do
  [ -f "$WORK/$v.eval.json" ] && continue
  step "eval $v"
  timed "eval_$v" "$BIN/agent-dpo" eval --agent $AGENT --version $v --baseline "$(cd "$RUNS" && pwd)/g1/sft" \
    --judge rubric --data "$DATA.test.trl-dpo.jsonl" --store "$STORE" "${EVAL[@]}" --json > "$WORK/$v.eval.json.part"
  mv "$WORK/$v.eval.json.part" "$WORK/$v.eval.json"
done

"$BIN/python" - "$WORK" "${VERSIONS[@]}" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
print(f"{'version':8} {'pref_acc':>8} {'win_rate':>8} {'95% CI':>15} {'W/T/L':>9} {'validity':>17}")
for v in sys.argv[2:]:
    r = json.loads((work / f"{v}.eval.json").read_text())
    ci = "[{:.3f}, {:.3f}]".format(*r["win_rate_ci"])
    wtl = f"{r['wins']}/{r['ties']}/{r['losses']}"
    print(f"{v:8} {r['preference_accuracy']:8.3f} {r['win_rate']:8.3f} {ci:>15} {wtl:>9} "
          f"{r['tool_call_validity']!s:>7} vs {r['baseline_tool_call_validity']!s:<7}")
print("wall seconds:", (work / "wall_s.txt").read_text().replace("\n", "  "))
EOF
