#!/usr/bin/env bash
# The GPU calls behind 2026-12-02's figures, each one command that fits a 10-minute call on a warm or cold
# H200 (tools/gpu_suite.sh holds the reusable stages it draws on).
#
#   tools/gpu_session.sh 1 OUT   pytest -m gpu while the bench model trains; then the text-workload grid
#                                (100/50/25/10% x batch 1, 8, 32) beside transformers and accelerate
#   tools/gpu_session.sh 2 OUT   on the same machine (the bench model is kept in $BENCH_MODEL): greedy against
#                                sampled decode at 100%, observing predictors now and before the route record
#                                (tools/hooks_ab.py on this tree and on .carry/before), serving at 32 streams
#
# Needs .carry/corpus.tgz (corpus/ and tokenizer/) and, for serving, .whl (fastapi and its needs).
set -uo pipefail
part=$1 out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
root=$PWD
BENCH_MODEL=${BENCH_MODEL:-/tmp/moeflow-bench-model}
w=/tmp/moeflow-session
mkdir -p "$w"
[ -d "$w/corpus" ] || tar xzf .carry/corpus.tgz -C "$w"
if [ -d .whl ] && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$root:/tmp/site"
moeflow() { python3 -m moeflow.cli "$@"; }

case "$part" in
1)
    (moeflow train --preset bench --data "$w/corpus" --tokenizer "$w/tokenizer" --out "$BENCH_MODEL" --device cuda \
        --max-minutes "${TRAIN_MINUTES:-3.2}" --no-progress > "$out/train_log.txt" 2>&1; echo "train rc $?" >> "$out/train_log.txt") &
    trainer=$!
    timeout "${TESTS_TIMEOUT:-280}" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=20 \
        tests/models tests/experts tests/test_sampling.py tests/routing tests/engine > "$out/gpu_tests.log" 2>&1
    echo "tests rc $?" >> "$out/gpu_tests.log"
    tail -5 "$out/gpu_tests.log"
    wait $trainer
    tail -3 "$out/train_log.txt"
    timeout "${GRID_TIMEOUT:-290}" python3 -m moeflow.cli bench offline --model "$BENCH_MODEL" --workload text \
        --data "$w/corpus" --budgets 100%,50%,25%,10% --batch-sizes 1,8,32 --batches-per-cell 2 --output-len 64 \
        --baselines transformers,accelerate --accelerate-batch-sizes 1,8 --out "$w/grid" > "$w/grid.log" 2>&1
    echo "grid rc $?" >> "$w/grid.log"
    cp "$w/grid.log" "$w/grid/log.txt" 2>/dev/null
    tar czf "$out/grid.tgz" -C "$w" grid grid.log 2>/dev/null
    tail -25 "$w/grid.log"
    ;;
2)
    [ -f "$BENCH_MODEL/config.json" ] || { echo "no bench model on this machine" >&2; exit 3; }
    mkdir -p "$w/p2"
    timeout 100 python3 -m moeflow.cli bench offline --model "$BENCH_MODEL" --workload text --data "$w/corpus" \
        --budgets 100% --batch-sizes 1,32 --batches-per-cell 2 --temperature 0 --baselines "" \
        --out "$w/p2/greedy" > "$w/p2/greedy.log" 2>&1
    tail -4 "$w/p2/greedy.log"
    timeout 120 python3 tools/hooks_ab.py "$BENCH_MODEL" --corpus "$w/corpus" --out "$w/p2/hooks-now.json" \
        --label "after" > "$w/p2/hooks-now.log" 2>&1
    PYTHONPATH="$root/.carry/before:/tmp/site" timeout 150 python3 tools/hooks_ab.py "$BENCH_MODEL" \
        --corpus "$w/corpus" --out "$w/p2/hooks-before.json" --label "before" > "$w/p2/hooks-before.log" 2>&1
    tail -2 "$w/p2/hooks-now.log" "$w/p2/hooks-before.log"
    SERVE_BUDGETS="${SERVE_BUDGETS:-100% 25%}" SERVE_PROMPTS=160 SERVE_TIMEOUT=70 CORPUS_TGZ=.carry/corpus.tgz \
        timeout 200 tools/gpu_suite.sh serve "$w/p2/serve" > "$w/p2/serve.log" 2>&1
    tar czf "$out/part2.tgz" -C "$w" p2
    grep -h "TTFT\|tokens/s" "$w/p2/serve.log" | head -20
    ;;
esac
