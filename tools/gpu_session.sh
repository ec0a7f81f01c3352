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
# The second session's calls (2026-12-02), on one machine kept warm between them:
#
#   tools/gpu_session.sh 3 OUT   pytest -m gpu while the bench model trains; its traces of the corpus train and
#                                test splits, two predictors trained from them (all six domains; all but
#                                python_docs), `predictor eval` of both on the CPU cores meanwhile, and
#                                ExpertFlow on the GPU: bench offline --predictors none,PRED --ablations at 25%,
#                                none,PRED at 10%, batch 1 and 8
#   tools/gpu_session.sh 4 OUT   the route record on and off (tools/record_cost.py); observing predictors now and
#                                before it (tools/hooks_ab.py); LYNX: resident batch 32/64 and 25% batch 32 plain
#                                and cache-aware, the (alpha, beta) sweep's throughput and perplexity, the held-out
#                                documents, the multiple-choice task, the Pareto plot
#   tools/gpu_session.sh 5 OUT   route-aware scheduling against fcfs: 256 requests, max_num_seqs 256,
#                                max_batch_size 32, at 25% and 10%; then served at 128 streams, fcfs and route-aware
#
# The third session's (2026-12-02), after `tools/gpu_suite.sh tests` in a call of its own:
#
#   tools/gpu_session.sh 6 OUT   train the bench model; LYNX resident at batch 32 and 64 with the torch and the
#                                Triton selector side by side; route-aware scheduling against fcfs at 25%
#                                (256 requests, max_num_seqs 256, max_batch_size 32)
#   tools/gpu_session.sh 7 OUT   on the same machine: serving at 32 streams (100% and 25%; random and text
#                                prompts) with the start-up prefill warm-up; LYNX at 25% batch 32 with the
#                                Triton selector; route-aware against fcfs at 10%
#
# The fourth session's (2026-12-02), after `tools/gpu_suite.sh tests` in a call of its own, on one machine:
#
#   tools/gpu_session.sh 8 OUT   train the bench model; serve it at 32 streams on the text workload (100% and
#                                25%) with the start-up heap frozen and the collector's pauses in /metrics
#   tools/gpu_session.sh 9 OUT   traces of the corpus train split (400 documents a domain, 300,000 tokens) and
#                                test split; predictors trained from them (six domains; five, python_docs held
#                                out); `predictor eval` on the CPU cores meanwhile; ExpertFlow against LRU at 25%
#                                and 10%, batch 1 and 8. (On 2026-12-02 it ran with a 1M-token trace, 16 epochs,
#                                and ran out of a 420 s call before its first result: the trace, router logits
#                                included, is written compressed and read back by both trainings.)
#   tools/gpu_session.sh 10 OUT  route-aware scheduling with the predictive cache: 256 requests,
#                                max_num_seqs 256, max_batch_size 32 at 25%, $CONFIGS (default fcfs with LRU,
#                                route-aware with LRU, route-aware with the part-9 predictor)
#
# The fifth session's (2026-12-02), on one machine:
#
#   tools/gpu_session.sh 11 OUT  train the bench model; the GPU tests of the deferred route listener and of the
#                                predictive cache's exactness under graphs; part 9's traces and predictors; the
#                                correction heard late against heard at once, beside LRU (tools/overlap_ab.py,
#                                25%, batch 1 and 8)
#   tools/gpu_session.sh 10 OUT  as above, on the same machine
#
# The sixth session's (2026-12-05):
#
#   tools/gpu_session.sh 12 OUT  train the bench model (TRAIN_MINUTES, default 4); part 9's traces and predictors;
#                                where a decode step's host time goes, LRU beside the predictive cache at 25%,
#                                batch 1 and 8, with a cProfile of each (tools/host_profile.py)
#   tools/gpu_session.sh 13 OUT  train the bench model; part 9's traces and predictors; tools/host_profile.py on
#                                this tree and on the tree before this session's host-time changes
#                                (.carry/before: `git archive 6da1729 moeflow tools/host_profile.py`, less the
#                                bundled model), one after the other on the same model and predictor
#   tools/gpu_session.sh 14 OUT  on the same machine: bench offline, LRU against ExpertFlow at 25% and 10%, batch 1
#                                and 8; `predictor eval` of both predictors on the CPU cores meanwhile; then the GPU
#                                tests of the predictor, the predictive cache, the copy stream and the listener
#   tools/gpu_session.sh 15 OUT  train the bench model; the GPU tests of the two copy streams; part 9's traces and
#                                predictors; demand misses on a stream of their own against one stream for all
#                                copies, LRU and predictive, 25% and 10%, batch 1 and 8 (tools/demand_stream_ab.py);
#                                the prefetch threshold and lookahead swept against LRU (bench offline)
#   tools/gpu_session.sh 16 OUT  (not run yet) train the bench model; part 9's traces and predictors; slots shared
#                                by value against count quotas beside LRU at 25% and 10%, batch 1 and 8; the GPU
#                                tests of this session's changes; (since session 7) the replay with the gate
#                                ahead's guesses on the CPU cores meanwhile
#
# The seventh session's (written on 2026-12-05 when no GPU was lent; 17, 18 and then 16, keeping 18's model,
# ran in the eighth session; 19 and 20 not yet):
#
#   tools/gpu_session.sh 17 OUT  the GPU tests of this session's changes; tools/kernel_profile.py (random weights:
#                                kernels, GPU busy time and step time, resident, batch 1/32/64, exact and LYNX,
#                                without and with fused ops)
#   tools/gpu_session.sh 18 OUT  train the bench model; bench offline resident at batch 32/64, exact and LYNX,
#                                without and with --fused-ops (and LYNX at (5, 2) and (3, 1) with them)
#   tools/gpu_session.sh 19 OUT  on the same machine: LYNX's perplexity at alpha 3/4/5, beta 1/2 (five domains and
#                                python_docs held out); LRU at 25% batch 1/8 without and with --fused-ops
#   tools/gpu_session.sh 20 OUT  after part 16, on its machine: (since the eighth session, first) rounds by value at
#                                25% and 10%, batch 1 and 8; the prefetch sweep (prefetch_at 0.6, lookahead 4)
#                                that part 15 ran out of time for, and prefetches across the step's end
#                                (cross_step), against LRU at 25%, batch 1 and 8; the model's gate ahead
#                                (--gate-ahead); where in a step the copy engine idles (tools/copy_timeline.py)
#
# The eighth session's (2026-12-05; not run: no machine could be started after the first three calls). For the
# next session, in order: 22, then at once 23 on the same machine (a machine goes back 30 s after a call ends:
# have the next call written before the last one returns), then 16 (RETRAIN=0 keeps 23's model) and 20. Parts
# 16-20 ran with fused ops off by default; since the eighth session they are on by default on CUDA.
#
#   tools/gpu_session.sh 22 OUT  the LYNX binning kernel timed in one program and spread over programs
#                                (tools/lynx_binning_time.py); the GPU tests with fused ops on by default
#                                (transformers' grid, the rotary's rounding, LYNX, the hooks)
#   tools/gpu_session.sh 23 OUT  train the bench model, unless one is kept; LYNX resident at batch 32/64 at the
#                                default ((3, 1), the binning spread over programs of 2 rows), in one program, at
#                                (3, 2) and (2, 1); LYNX's perplexity at alpha 2, 3 and beta 1, 2 on five domains and on
#                                python_docs, and the multiple-choice task at (3, 1) and (2, 1) (its 2026-12-06
#                                run, with the rows timed first: docs/benchmarks/2026-12-06-h200-session9)
#   tools/gpu_session.sh 24 OUT  (after part 23 on its machine, or alone, training first) the multiple-choice task at
#                                (3, 2) when the model was kept; traces of 1,000,000 tokens, the two predictors, the
#                                same with the router lens and with a wider embedding projection, and their recall;
#                                rounds by value against one round and LRU at 25% and 10%, batch 1 and 8
#   tools/gpu_session.sh 25 OUT  (on a machine with the bench model, or training first) every kernel of the trained
#                                model's resident step on text, exact and LYNX at batch 32 and 64: where LYNX's saved
#                                expert reads go at batch 64
#   tools/gpu_session.sh 26 OUT  part 22's tests, then part 25, in one call (about 9 minutes)
#
# The tenth session's (2026-12-06; no machine could be started in the session's 30 minutes of device time). For the
# next session, in order, on one machine: 27, then 25 (keeping 27's model), then 24:
#
#   tools/gpu_session.sh 27 OUT  train the bench model; LYNX resident at batch 32/64, exact and (3, 1), with a step's
#                                outputs built between steps and while the next runs (EngineConfig.overlap_output);
#                                part 26's GPU tests, now with the engine's outputs overlapped
#   tools/gpu_session.sh 25 OUT  (as above) and then tools/host_critical.py on the GPU machine's host, and
#                                tools/moe_tile_time.py (the fused kernel's tiles under LYNX, 16 and 32 rows)
#
# The thirteenth session ran 28, 29 and then, on the same H100, LYNX at 25%, the predictive cache, rounds by value
# and part 30 (docs/benchmarks/2026-12-06-h100-session13); its device time ran out during part 30's route-aware
# serving. For the next session (a warm machine goes back 30 s after a call ends; a fresh one trains the model again):
#
#   tools/gpu_session.sh 31 OUT  (about 8 minutes with the start) LYNX's batch-64 step in the kernel profile,
#                                greedy and sampled as the bench samples, and at (5, 1); the bench at batch 64 with
#                                four batches a cell
#   tools/gpu_session.sh 32 OUT  (on 31's machine, about 8 minutes) a trace and a predictor; where the copy engine
#                                idles at 25% batch 1 (tools/copy_timeline.py) and the prefetch arms meant to fill
#                                it (cross_step, lookahead 4, everything at the step's start) against LRU; the
#                                predictor and planner's host time under cProfile (tools/host_profile.py)
#   tools/gpu_session.sh 33 OUT  (on the same machine, about 6 minutes) held-out recall from a 4,000,000-token
#                                trace (0.560 from 300,000 tokens, 0.634 from 1,000,000: issue 12 asks 0.70); it
#                                replaces part 32's traces and predictors, so it comes after it
#   tools/gpu_session.sh 34 OUT  (on the same machine, about 4 minutes) route-aware served beside fcfs at 128
#                                streams (carry .whl)
#
# The fourteenth session ran 31, 33 and 34 on one H100 (docs/benchmarks/2026-12-06-h100-session14); part 32 had no
# device time left. For the next session:
#
#   tools/gpu_session.sh 35 OUT  (about 9 minutes with the start) route-aware served with new requests held back to
#                                be prefilled together, beside fcfs and beside admission at once (carry .whl)
#   tools/gpu_session.sh 39 OUT  (on 35's machine, about 3 minutes) the GPU tests of this session's changes
#   tools/gpu_session.sh 36 OUT  (on 35's machine, about 7 minutes) LYNX's accuracy at (3, 4, 5; 1), multiple
#                                choice at (5, 1), and the three resident at batch 32 and 64, four batches a cell
#   tools/gpu_session.sh 37 OUT  (on the same machine, about 9 minutes) held-out recall from a 4,000,000-token
#                                trace with 16 epochs at width 1024
#   tools/gpu_session.sh 40 OUT  (on 37's machine, about 3 minutes) `predictor eval` of 37's held-out predictor
#   tools/gpu_session.sh 41 OUT  (on 37's machine, about 4 minutes) route-aware served with the predictor's forecasts
#   tools/gpu_session.sh 38 OUT  (about 4 minutes) LYNX (5, 1) at 25% batch 32, plain and cache-aware
#   tools/gpu_session.sh 32 OUT  (if time is left) as above
#
# The fifteenth session's first five calls got no machine (9 of its 30 minutes), which left 21: enough for
# one issue's remaining run, not for 35-41. Issue 13 misses one target (resident batch 64, 1.20x at (3, 1)); these
# two calls measure whether (4, 1) or (5, 1) meets all of its targets on one model:
#
#   tools/gpu_session.sh 42 OUT  (about 9 minutes with the start) the bench model; LYNX's accuracy at (3, 4, 5; 1)
#                                on five domains and held-out python_docs; multiple choice at (4, 1) and (5, 1)
#   tools/gpu_session.sh 43 OUT  (on 42's machine, about 7 minutes) resident batch 32 and 64, four batches a cell,
#                                exact and the three; 25% batch 32, exact, (4, 1) and (5, 1), and (5, 1) cache-aware
#
# The fifteenth session ran 42, 43, 39 and 35 on one H100 (docs/benchmarks/2026-12-06-h100-session15). For the next
# session, issue 12's held-out recall and route-aware with forecasts (issue 14):
#
#   tools/gpu_session.sh 44 OUT  (about 7 minutes with the start) the bench model; then LYNX's GPU tests on the engine
#                                as the fourteenth session left it (engine/forecast.py, decode waits)
#   tools/gpu_session.sh 37 OUT  (on 44's machine, about 9 minutes) held-out recall from a 4,000,000-token trace with
#                                16 epochs at width 1024
#   tools/gpu_session.sh 40 OUT  (on 37's machine, about 3 minutes) `predictor eval` of 37's held-out predictor
#   tools/gpu_session.sh 41 OUT  (on 37's machine, about 4 minutes) route-aware served with the predictor's forecasts
#   tools/gpu_session.sh 32 OUT  (if time is left) as above
#
# The sixteenth session's order (part 45 takes part 40's eval and part 32's prefetch arms, on 37's predictor):
#
#   tools/gpu_session.sh 44 OUT, then 37 OUT on its machine
#   tools/gpu_session.sh 45 OUT  (on 37's machine, about 7 minutes) `predictor eval` of 37's held-out predictor; the
#                                prefetch arms (cross_step, lookahead 4, both) against LRU at 25%, batch 1 and 8
#
# The sixteenth session ran 44, 37, 40 and part of 45 on one H100 (docs/benchmarks/2026-12-06-h100-session16). For the
# next session, where the predictive step's host time goes at batch 1 (issue 12's speed targets):
#
#   tools/gpu_session.sh 46 OUT  (about 9 minutes with the start) the bench model, a trace and a predictor,
#                                tools/host_profile.py at 25% batch 1
#   tools/gpu_session.sh 47 OUT  (on 46's machine, about 3 minutes) prefetches all at the step's start, and
#                                correction off, beside the default and LRU
#   tools/gpu_session.sh 41 OUT  (on 46's machine, with its predictor) route-aware served with forecasts
#   tools/gpu_session.sh 39 OUT  (about 4 minutes) the GPU tests of the forecast path, which the sixteenth session's
#                                per-phase host timing (engine/forecast.py, 4ac56b6) changed after its GPU calls
#
# The seventeenth session ran 46, 47, 41 and 39 on one H100, then 48 on a fresh one and part 47's correction arm
# typed on the command line (docs/benchmarks/2026-12-06-h100-session17). For the next session:
#
#   tools/gpu_session.sh 39 OUT  (about 5 minutes with the start) the forecast path's GPU tests, on the tree with
#                                the seventeenth session's host-time changes (the compute stream kept; the eviction
#                                search by value, quotas.ValueVictims), which ran on the GPU only in part 48's
#                                timing, not under its tests
#   tools/gpu_session.sh 44 OUT  the engine's and LYNX's GPU tests, for the same changes
#
# The eighteenth session's (the forecast path's and LYNX's tests in one call; then route-aware served with the
# predictor's forecasts, now scored once per sequence state, beside route-aware alone and fcfs):
#
#   tools/gpu_session.sh 49 OUT  (about 7 minutes with the start) parts 39's and 44's GPU tests
#   tools/gpu_session.sh 50 OUT  (about 6 minutes) the bench model, a trace and the predictors
#   SERVE_POLICIES="fcfs route-aware route-aware:predictor" tools/gpu_session.sh 41 OUT  (on 50's machine, about 5
#                                minutes) served at 128 streams
#
# The eighteenth session got a machine at its sixteenth call, with 584 s left: it ran part 39 and part 44's tests
# without the bench model (docs/benchmarks/2026-12-06-h100-session18). For the next session: 50, then the line
# with part 41 above, on the same machine.
#
# The nineteenth session's order, on one machine: 50; then 51 (issue 14's offline target with the predictive
# cache's rounds by value, which moved 0.68x fcfs's bytes at issue 14's shape on moeflow-tiny against route-aware
# alone's 0.82x: docs/benchmarks/2026-12-06-cpu-session19); then the line with part 41 above.
#
#   tools/gpu_session.sh 51 OUT  (on 50's machine, about 5 minutes) 256 requests, max_num_seqs 256, max_batch_size
#                                32, 25%: fcfs, route-aware, route-aware with the predictor, and with its rounds
#                                by value (n = 8)
#
# The nineteenth session ran 50, 51, part 41 (fcfs, route-aware, route-aware:predictor) and part 51's command at
# 10% on one H100 (docs/benchmarks/2026-12-06-h100-session19). For the next session, on one machine: 50, then
#
#   tools/gpu_session.sh 53 OUT  (about 5 minutes) issue 14's offline cell at 25%: fcfs beside route-aware with the
#                                predictor and rounds (n = 8) under wait bounds of 4, 8 and 16 steps past the
#                                round-robin share (moeflow-tiny: 0.68x, 0.63x and 0.59x fcfs's bytes,
#                                docs/benchmarks/2026-12-06-cpu-session19); BUDGET=10% for the same at 10%;
#                                WAITS="8 16" for a shorter call (part 51 ran the default bound)
#   SERVE_POLICIES="fcfs route-aware:predictor route-aware:predictor:rounds=8" tools/gpu_session.sh 41 OUT
#                                (about 5 minutes) served at 128 streams with --expert-rounds 8, which the
#                                nineteenth session added after its calls
#   tools/gpu_session.sh 39 OUT  the forecast path's GPU tests (they include rounds by value under graphs)
#
# The twentieth session ran 50, 53 at 25% (WAITS="8 16") and at 10% (WAITS="16 32"), 41 with the three policies
# above and 39 on one H100 (docs/benchmarks/2026-12-06-h100-session20): 1.34x fcfs at both budgets with the wait
# bound at 16, the copy engine idle a fifth of the time and almost no prefetches. For the next session, on one
# machine: 50, then
#
#   tools/gpu_session.sh 54 OUT  (about 5 minutes) issue 14's cell at 25%, wait bound 16: rounds as in part 53,
#                                beside prefetch_margin 1 (and with prefetch_at 0.5); BUDGET=10% for the same at 10%.
#                                Its results.md now has each run's schedule share and copy engine busy share, and
#                                policy_host_time.txt the route-aware plan's host time on the machine's CPU (after
#                                the twentieth session's cut, 5.2 ms a step at 256 running on this project's CPU)
#   tools/gpu_session.sh 39 OUT  the forecast path's GPU tests, on the tree with that cut (the calibration in float32)
#                                and with --prefetch-margin (its exactness under graphs: test_predictive_tokens.py)
#   SERVE_POLICIES="fcfs route-aware:predictor:rounds=8 route-aware:predictor:rounds=8:margin=1:wait=16" \
#       tools/gpu_session.sh 41 OUT  if part 54's margin wins: served with --prefetch-margin 1 and --max-decode-wait 16
#
# Part 3's pytest -m gpu shares the GPU with training and got through one test in its 240 s on 2026-12-02 (the
# exactness grid with the learned predictor is the slow one): the suite needs a call of its own (`tools/gpu_suite.sh
# tests`, about 5 minutes). Part 5's bench offline needs about 160 s per scheduling policy and budget.
#
# Needs .carry/corpus.tgz (corpus/ and tokenizer/) and, for serving, .whl (fastapi and its needs). Write the commit
# here before each call (`git rev-parse HEAD > COMMIT`, untracked, so it travels with the tree): the device's .git
# is not this checkout's, so a COMMIT written there names a stale commit (as on 2026-12-05).
# .whl, for the device's Python 3.12 (ignored: `echo /.whl/ >> .git/info/exclude`), from the versions the test
# venv resolved: `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux2014_x86_64 -d .whl fastapi==0.165.0 uvicorn==0.55.0 pydantic==2.14.4
# pydantic_core==2.50.5 starlette==1.10.0 annotated-types==0.8.0 typing-inspection==0.4.5
# opentelemetry-api==1.45.3 typing_extensions==4.16.0` (the image has anyio, h11, click and annotated-doc).
# Part 15 ran out of its 600 s on an H100 on 2026-12-05 before its sweep: tests, traces, the A/B and the sweep need
# two calls there (TESTS_TIMEOUT=150 and SWEEP_TIMEOUT as a second call on the same machine).
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
begin() {  # begin NAME: this part's results folder, $p = $w/NAME, with the commit it ran; pack puts it in $OUT/NAME.tgz
    name=$1 p=$w/$1
    mkdir -p "$p"
    cp "$root/COMMIT" "$p/commit.txt" 2>/dev/null || git -C "$root" rev-parse HEAD > "$p/commit.txt"
}
pack() { tar czf "$out/$name.tgz" -C "$w" "$name"; }
session6_tests() {  # session6_tests TIMEOUT: the GPU tests of the sixth session's changes into $p/gpu_tests.log
    timeout "$1" python3 -m pytest -m gpu -q -p no:cacheprovider -k "not transformers" \
        tests/routing/test_learned_predictor.py tests/routing/test_learned_runtime.py tests/experts/test_predictive.py \
        tests/experts/test_predictive_tokens.py tests/engine/test_gpu.py \
        tests/experts/test_deferred_listener.py > "$p/gpu_tests.log" 2>&1
    echo "tests rc $?" >> "$p/gpu_tests.log"
    tail -3 "$p/gpu_tests.log"
}
gpu_tests() {  # gpu_tests TIMEOUT FILE...: pytest -m gpu on the files into $p/gpu_tests.log, its exit status last
    local limit=$1
    shift
    timeout "$limit" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 "$@" > "$p/gpu_tests.log" 2>&1
    echo "tests rc $?" >> "$p/gpu_tests.log"
    tail -2 "$p/gpu_tests.log"
}
# the GPU tests of fused ops on by default, the rotary's rounding and LYNX under graphs (parts 22, 26, 27)
LYNX_GPU_TESTS="tests/engine/test_gpu.py tests/models/test_fused_decode.py tests/routing/test_lynx.py
    tests/routing/test_lynx_engine.py tests/routing/test_lynx_triton.py tests/engine/test_gpu_hooks.py"
offline() {  # offline DIR NAME TIMEOUT ARGS...: bench offline on the bench model's text workload into DIR/NAME
            # (FUSED=1: every configuration with --fused-ops)
    local dir=$1 name=$2 limit=$3
    shift 3
    timeout "$limit" python3 -m moeflow.cli bench offline --model "$BENCH_MODEL" --workload text --data "$w/corpus" \
        --baselines "" ${FUSED:+--fused-ops} "$@" --out "$dir/$name" > "$dir/$name.log" 2>&1
    grep -h "^moeflow" "$dir/$name.log" | cut -c1-120
    rm -f "$dir/$name"/*.png
}

train_bench() {  # train_bench DIR: the bench model into $BENCH_MODEL, its logs into DIR; stop if none was written
    # (a fixed schedule of TRAIN_STEPS, default 420: bounded by wall time alone, the thirteenth and fourteenth
    # sessions' models got 397-444 steps with the machine's speed, and LYNX's batch-64 ratio moved with them;
    # TRAIN_MINUTES stays a hard bound; TRAIN_STEPS=0 lets the time decide, as before)
    local steps=()
    [ "${TRAIN_STEPS:-420}" != 0 ] && steps=(--steps "${TRAIN_STEPS:-420}")
    moeflow train --preset bench --data "$w/corpus" --tokenizer "$w/tokenizer" --out "$BENCH_MODEL" --device cuda \
        --max-minutes "${TRAIN_MINUTES:-4}" "${steps[@]}" --no-progress > "$1/train_log.txt" 2>&1
    tail -2 "$1/train_log.txt"
    [ -f "$BENCH_MODEL/config.json" ] || exit 3
    cp "$BENCH_MODEL"/training_log.json "$1/" 2>/dev/null
}

keep_or_train() {  # keep_or_train DIR: the bench model an earlier part left on this machine, else train_bench DIR
    if [ -f "$BENCH_MODEL/config.json" ] && [ "${RETRAIN:-0}" != 1 ]; then
        echo "bench model kept from an earlier part" > "$1/train_log.txt"
    else
        train_bench "$1"
    fi
}

profile_trained() {  # profile_trained TIMEOUT: the bench model (kept or trained), then every kernel of its resident
                    # step on test-split text, exact and LYNX at batch 32 and 64, fused ops on (part 25)
    keep_or_train "$p"
    pack
    timeout "$1" python3 tools/kernel_profile.py --model "$BENCH_MODEL" --data "$w/corpus" --batch-sizes 32,64 \
        --routing exact,lynx --fused-ops 1 --out "$p/kernel_profile" > "$p/kernel_profile.log" 2>&1
    grep -A8 "^| batch" "$p/kernel_profile/kernel_profile.md"
    pack
}

lynx_sweeps() {  # lynx_sweeps TIMEOUT ALPHAS BETAS: LYNX's perplexity against exact at batch 32 on the five test
                # domains (sweep_test.jsonl) and on held-out python_docs (sweep_python_docs.jsonl), one after the other
    local limit=$1 alphas=$2 betas=$3 five=fortunes,shakespeare,wiki_en,wiki_es,wiki_fr
    timeout "$limit" python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains $five --max-docs 160 \
        --max-tokens-per-doc 128 --batch-size 32 --alpha "$alphas" --beta "$betas" --device cuda \
        > "$p/sweep_test.jsonl" 2> "$p/sweep_test.err"
    timeout "$limit" python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains python_docs \
        --max-docs 102 --max-tokens-per-doc 128 --batch-size 32 --alpha "$alphas" --beta "$betas" --device cuda \
        > "$p/sweep_python_docs.jsonl" 2> "$p/sweep_python_docs.err"
    grep -h '^{' "$p/sweep_test.jsonl" "$p/sweep_python_docs.jsonl" | cut -c1-200
}

lynx_choice() {  # lynx_choice TIMEOUT ALPHA BETA: the multiple-choice task, exact and LYNX at (ALPHA, BETA), batch
                 # 32, into $p/choice_ALPHA_BETA.json
    timeout "$1" python3 -m moeflow.cli eval choice "$BENCH_MODEL" --data "$w/corpus" --routing exact,lynx \
        --lynx-alpha "$2" --lynx-beta "$3" --batch-size 32 --device cuda --json --no-progress \
        > "$p/choice_$2_$3.json" 2> "$p/choice_$2_$3.err"
    cut -c1-300 "$p/choice_$2_$3.json"
}

traces_and_predictors() {  # traces_and_predictors DIR: part 9's traces of the bench model and its two predictors
    # (PRED_ARGS: more `predictor train` arguments for both, e.g. --hidden 1024)
    python3 tools/corpus_sample.py "$w/corpus" train "${TRAIN_DOCS:-400}" > "$w/train_sample.jsonl"
    python3 tools/corpus_sample.py "$w/corpus" test 150 > "$w/test_sample.jsonl"
    moeflow trace "$BENCH_MODEL" --data "$w/train_sample.jsonl" --max-tokens "${TRAIN_TOKENS:-300000}" \
        --max-seq-len "${MAX_SEQ_LEN:-256}" --device cuda --out "$w/train.npz" > "$1/trace.log" 2>&1
    moeflow trace "$BENCH_MODEL" --data "$w/test_sample.jsonl" --max-tokens 80000 --max-seq-len 256 --device cuda \
        --out "$w/test.npz" >> "$1/trace.log" 2>&1
    grep -h '^{' "$1/trace.log"
    mkdir -p "$w/pred"
    moeflow predictor train "$BENCH_MODEL" --traces "$w/train.npz" --out "$w/pred/bench" --device cuda \
        --epochs "${PRED_EPOCHS:-8}" --max-minutes "${PRED_MINUTES:-0.9}" ${PRED_ARGS:-} --no-progress \
        > "$1/pred_train.log" 2>&1 &
    moeflow predictor train "$BENCH_MODEL" --traces "$w/train.npz" --out "$w/pred/bench-no-python_docs" \
        --holdout-domain python_docs --device cuda --epochs "${PRED_EPOCHS:-8}" --max-minutes "${PRED_MINUTES:-0.9}" \
        ${PRED_ARGS:-} --no-progress > "$1/pred_train_ho.log" 2>&1 &
    wait
    tail -qn1 "$1/pred_train.log" "$1/pred_train_ho.log" | cut -c1-300
    cp -r "$w/pred" "$1/pred"
}

heldout_eval() {  # heldout_eval TIMEOUT: `predictor eval` of the held-out predictor (part 37's) on the test split's
                  # python_docs, the baselines beside it and the replay at 25% batch 1, into $p
    timeout "$1" python3 -m moeflow.cli predictor eval "$w/pred/bench-no-python_docs" \
        --model "$BENCH_MODEL" --trace "$w/test.npz" --budgets 25% --batch-sizes 1 --replay-tokens 300 --threads 12 \
        --json --domains python_docs > "$p/eval_bench-no-python_docs.json" 2> "$p/eval_bench-no-python_docs.err"
    cut -c1-200 "$p/eval_bench-no-python_docs.json"
}

serve_policies() {  # serve_policies: moeflow serve at 25%, 128 rows, 32 a step, under each policy in turn, and
                    # bench serve at 128 streams against it (256 text prompts, 64 tokens each) into $p
    # (a policy route-aware:admit=A serves with --max-admit-wait A, one with :predictor with --predictor
    # $w/pred/bench, one with :rounds=N with --expert-rounds N, :margin=X with --prefetch-margin X, :wait=W with
    # --max-decode-wait W; its files are named route-aware-admit-A, route-aware-predictor,
    # route-aware-predictor-rounds-N, and so on)
    local policy server extra n
    for policy in ${SERVE_POLICIES:-fcfs route-aware}; do
        extra=""
        case $policy in *:admit=*) n=${policy##*admit=}; extra="--max-admit-wait ${n%%:*}" ;; esac
        case $policy in *:predictor*) extra="$extra --predictor $w/pred/bench" ;; esac
        case $policy in *:rounds=*) n=${policy##*rounds=}; extra="$extra --expert-rounds ${n%%:*}" ;; esac
        case $policy in *:margin=*) n=${policy##*margin=}; extra="$extra --prefetch-margin ${n%%:*}" ;; esac
        case $policy in *:wait=*) n=${policy##*wait=}; extra="$extra --max-decode-wait ${n%%:*}" ;; esac
        python3 -m moeflow.cli serve "$BENCH_MODEL" --expert-budget 25% --port 8111 --max-num-seqs 128 \
            --max-batch-size 32 --scheduling ${policy%%:*} $extra --log-level warning \
            > "$p/server-${policy//[:=]/-}.log" 2>&1 &
        server=$!
        for _ in $(seq 120); do  # up, or given up as soon as the server has exited
            curl -sf -o /dev/null http://127.0.0.1:8111/health && break
            kill -0 $server 2>/dev/null || { echo "server ($policy) exited:"; tail -3 "$p/server-${policy//[:=]/-}.log"; break; }
            sleep 1
        done
        timeout "${SERVE_TIMEOUT:-100}" python3 -m moeflow.cli bench serve --base-url http://127.0.0.1:8111 \
            --num-prompts 256 --request-rate inf --max-concurrency 128 --dataset text --data "$w/corpus" \
            --output-len 64 --disable-tqdm --result-file "$p/serve-25-${policy//[:=]/-}.json" \
            > "$p/serve-${policy//[:=]/-}.txt" 2>&1
        curl -s http://127.0.0.1:8111/metrics > "$p/metrics-${policy//[:=]/-}.txt" 2>/dev/null
        kill -INT $server 2>/dev/null
        wait $server
        echo "$policy:"
        grep -h "Output token throughput\|Median TTFT\|P99 TPOT\|Median TPOT\|error" "$p/serve-${policy//[:=]/-}.txt"
        grep -h "^moeflow:scheduling_seconds_total\|^moeflow:predictor_seconds_total" "$p/metrics-${policy//[:=]/-}.txt"
        pack
    done
}

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
3)
    begin p3
    (moeflow train --preset bench --data "$w/corpus" --tokenizer "$w/tokenizer" --out "$BENCH_MODEL" --device cuda \
        --max-minutes "${TRAIN_MINUTES:-4}" --no-progress > "$p/train_log.txt" 2>&1; echo "train rc $?" >> "$p/train_log.txt") &
    trainer=$!
    timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 \
        tests/engine/test_gpu_hooks.py tests/engine/test_gpu.py tests/routing tests/experts tests/models \
        tests/test_sampling.py > "$p/gpu_tests.log" 2>&1
    echo "tests rc $?" >> "$p/gpu_tests.log"
    tail -3 "$p/gpu_tests.log"
    wait $trainer
    tail -2 "$p/train_log.txt"
    pack
    [ -f "$BENCH_MODEL/config.json" ] || exit 3
    cp "$BENCH_MODEL"/training_log.json "$p/" 2>/dev/null
    python3 tools/corpus_sample.py "$w/corpus" train 400 > "$w/train_sample.jsonl"
    python3 tools/corpus_sample.py "$w/corpus" test 150 > "$w/test_sample.jsonl"
    moeflow trace "$BENCH_MODEL" --data "$w/train_sample.jsonl" --max-tokens 300000 --max-seq-len 256 --device cuda \
        --out "$w/train.npz" > "$p/trace.log" 2>&1
    moeflow trace "$BENCH_MODEL" --data "$w/test_sample.jsonl" --max-tokens 80000 --max-seq-len 256 --device cuda \
        --out "$w/test.npz" >> "$p/trace.log" 2>&1
    tail -2 "$p/trace.log"
    mkdir -p "$w/pred"
    moeflow predictor train "$BENCH_MODEL" --traces "$w/train.npz" --out "$w/pred/bench" --device cuda \
        --max-minutes 0.9 --no-progress > "$p/pred_train.log" 2>&1 &
    moeflow predictor train "$BENCH_MODEL" --traces "$w/train.npz" --out "$w/pred/bench-no-python_docs" \
        --holdout-domain python_docs --device cuda --max-minutes 0.9 --no-progress > "$p/pred_train_ho.log" 2>&1 &
    wait
    tail -1 "$p/pred_train.log" "$p/pred_train_ho.log"
    cp -r "$w/pred" "$p/pred"
    pack
    ev() { timeout "${EVAL_TIMEOUT:-190}" python3 -m moeflow.cli predictor eval --model "$BENCH_MODEL" \
        --trace "$w/test.npz" --replay-tokens 3000 --threads 2 --json "$@"; }
    ev "$w/pred/bench" --budgets 25% --batch-sizes 1 --ablations > "$p/eval_25_b1.json" 2> "$p/eval_25_b1.err" &
    ev "$w/pred/bench" --budgets 25% --batch-sizes 8 --ablations > "$p/eval_25_b8.json" 2> "$p/eval_25_b8.err" &
    ev "$w/pred/bench" --budgets 10% --batch-sizes 1,8 > "$p/eval_10.json" 2> "$p/eval_10.err" &
    ev "$w/pred/bench-no-python_docs" --domains python_docs --budgets 25% --batch-sizes 1 > "$p/eval_ho.json" \
        2> "$p/eval_ho.err" &
    timeout "${EF_TIMEOUT:-130}" python3 -m moeflow.cli bench offline --model "$BENCH_MODEL" --workload text \
        --data "$w/corpus" --budgets 25% --batch-sizes 1,8 --batches-per-cell 2 --baselines "" \
        --predictors "none,$w/pred/bench" --ablations --out "$p/ef25" > "$p/ef25.log" 2>&1
    grep -h "^moeflow" "$p/ef25.log" | cut -c1-150
    rm -f "$p"/ef*/*.png
    pack
    timeout 60 python3 tools/record_cost.py "$BENCH_MODEL" --corpus "$w/corpus" --out "$p/record_cost.json" \
        --rounds 3 > "$p/record_cost.log" 2>&1
    tail -2 "$p/record_cost.log"
    wait
    pack
    ;;
4)
    [ -f "$BENCH_MODEL/config.json" ] || { echo "no bench model on this machine" >&2; exit 3; }
    begin p4
    timeout 75 python3 -m moeflow.cli bench offline --model "$BENCH_MODEL" --workload text --data "$w/corpus" \
        --budgets 10% --batch-sizes 1,8 --batches-per-cell 2 --baselines "" --predictors "none,$w/pred/bench" \
        --out "$p/ef10" > "$p/ef10.log" 2>&1
    grep -h "^moeflow" "$p/ef10.log" | cut -c1-120
    rm -f "$p"/ef10/*.png
    pack
    sweep="exact,lynx,lynx:kernel=triton,lynx:w=4"
    for ab in 1:2 2:2 3:2 5:2 2:3 3:3 3:1; do sweep="$sweep,lynx:alpha=${ab%:*}:beta=${ab#*:}"; done
    timeout 100 python3 -m moeflow.cli bench offline --model "$BENCH_MODEL" --workload text --data "$w/corpus" \
        --budgets 100% --batch-sizes 32,64 --batches-per-cell 2 --baselines "" --routing "$sweep" \
        --out "$p/lynx100" > "$p/lynx100.log" 2>&1
    timeout 90 python3 -m moeflow.cli bench offline --model "$BENCH_MODEL" --workload text --data "$w/corpus" \
        --budgets 25% --batch-sizes 32 --batches-per-cell 2 --baselines "" \
        --routing exact,lynx,lynx:w=4,lynx:kernel=triton,lynx:w=4:kernel=triton \
        --out "$p/lynx25" > "$p/lynx25.log" 2>&1
    grep -h "^moeflow" "$p/lynx100.log" "$p/lynx25.log" | cut -c1-120
    pack
    # (alpha, beta) is chosen on five domains of the test split; python_docs is the domain held out of the choice
    five=fortunes,shakespeare,wiki_en,wiki_es,wiki_fr
    timeout 90 python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains $five --max-docs 160 \
        --max-tokens-per-doc 128 --batch-size 32 --alpha 1,2,3,5 --beta 2 --device cuda > "$p/sweep_test.jsonl" \
        2> "$p/sweep_test.err"
    timeout 40 python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains $five --max-docs 160 \
        --max-tokens-per-doc 128 --batch-size 32 --alpha 2,3 --beta 3 --device cuda > "$p/sweep_test_b3.jsonl" \
        2>> "$p/sweep_test.err"
    timeout 30 python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains $five --max-docs 160 \
        --max-tokens-per-doc 128 --batch-size 32 --alpha 3 --beta 1 --device cuda > "$p/sweep_test_b1.jsonl" \
        2>> "$p/sweep_test.err"
    grep -h '"alpha": [0-9]' "$p/sweep_test_b3.jsonl" "$p/sweep_test_b1.jsonl" >> "$p/sweep_test.jsonl"
    timeout 40 python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains python_docs --max-docs 102 \
        --max-tokens-per-doc 128 --batch-size 32 --alpha 2,3 --beta 2 --device cuda > "$p/sweep_python_docs.jsonl" \
        2> "$p/sweep_python_docs.err"
    pack
    for ab in "3 2" "2 2"; do
        set -- $ab
        timeout 40 python3 -m moeflow.cli eval choice "$BENCH_MODEL" --data "$w/corpus" --items 200 --routing exact,lynx \
            --lynx-alpha "$1" --lynx-beta "$2" --json > "$p/choice_$1_$2.json" 2> "$p/choice_$1_$2.err"
    done
    python3 tools/lynx_pareto.py --bench "$p/lynx100/results.json" --sweep "$p/sweep_test.jsonl" --budget 100% \
        --batch 32 --out "$p/pareto.png" --md "$p/pareto.md" --title "LYNX on the bench model (H200)"
    pack
    timeout 90 python3 tools/hooks_ab.py "$BENCH_MODEL" --corpus "$w/corpus" --out "$p/hooks-now.json" \
        --label "after" > "$p/hooks-now.log" 2>&1
    tail -1 "$p/hooks-now.log"
    pack
    ;;
5)
    [ -f "$BENCH_MODEL/config.json" ] || { echo "no bench model on this machine" >&2; exit 3; }
    begin p5
    for budget in ${SCHED_BUDGETS:-25% 10%}; do
        timeout "${SCHED_TIMEOUT:-330}" python3 -m moeflow.cli bench offline --model "$BENCH_MODEL" --workload text \
            --data "$w/corpus" --budgets "$budget" --batch-sizes 256 --max-num-seqs 256 --max-batch-size 32 \
            --batches-per-cell 1 --baselines "" --scheduling fcfs,route-aware --out "$p/sched${budget%\%}" \
            > "$p/sched${budget%\%}.log" 2>&1
        grep -h "^moeflow" "$p/sched${budget%\%}.log" | cut -c1-120
        rm -f "$p/sched${budget%\%}"/*.png
        pack
    done
    serve_policies
    if [ -n "${HOOKS_BEFORE:-1}" ]; then
        PYTHONPATH="$root/.carry/before:/tmp/site" timeout "${BEFORE_TIMEOUT:-110}" python3 tools/hooks_ab.py \
            "$BENCH_MODEL" --corpus "$w/corpus" --out "$p/hooks-before.json" --label "before" > "$p/hooks-before.log" 2>&1
        tail -1 "$p/hooks-before.log"
        pack
    fi
    ;;
6)
    begin p6
    train_bench "$p"
    pack
    offline "$p" lynx100 "${LYNX_TIMEOUT:-80}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 2 \
        --routing exact,lynx,lynx:kernel=triton
    pack
    offline "$p" sched25 "${SCHED_TIMEOUT:-330}" --budgets 25% --batch-sizes 256 --max-num-seqs 256 \
        --max-batch-size 32 --batches-per-cell 1 --scheduling fcfs,route-aware
    pack
    ;;
7)
    [ -f "$BENCH_MODEL/config.json" ] || { echo "no bench model on this machine" >&2; exit 3; }
    begin p7
    SERVE_BUDGETS="100% 25%" SERVE_PROMPTS=160 SERVE_TIMEOUT=75 CORPUS_TGZ=.carry/corpus.tgz \
        timeout "${SERVE_ALL_TIMEOUT:-230}" tools/gpu_suite.sh serve "$p/serve" > "$p/serve.log" 2>&1
    grep -h "^== \|Output token throughput\|Median TTFT\|P99 TTFT" "$p/serve.log"
    pack
    offline "$p" lynx25 "${LYNX_TIMEOUT:-70}" --budgets 25% --batch-sizes 32 --batches-per-cell 2 \
        --routing exact,lynx,lynx:kernel=triton,lynx:w=4:kernel=triton
    pack
    offline "$p" sched10 "${SCHED_TIMEOUT:-330}" --budgets 10% --batch-sizes 256 --max-num-seqs 256 \
        --max-batch-size 32 --batches-per-cell 1 --scheduling fcfs,route-aware
    pack
    ;;
8)
    begin p8
    train_bench "$p"
    pack
    SERVE_BUDGETS="100% 25%" SERVE_DATASETS="${SERVE_DATASETS:-text}" SERVE_PROMPTS=160 SERVE_TIMEOUT=75 \
        CORPUS_TGZ=.carry/corpus.tgz timeout "${SERVE_ALL_TIMEOUT:-200}" tools/gpu_suite.sh serve "$p/serve" \
        > "$p/serve.log" 2>&1
    grep -h "^== \|Output token throughput\|Median TTFT\|P99 TTFT\|^server" "$p/serve.log"
    pack
    ;;
9)
    [ -f "$BENCH_MODEL/config.json" ] || { echo "no bench model on this machine" >&2; exit 3; }
    begin p9
    traces_and_predictors "$p"
    pack
    ev() { timeout "${EVAL_TIMEOUT:-250}" python3 -m moeflow.cli predictor eval --model "$BENCH_MODEL" \
        --trace "$w/test.npz" --replay-tokens 3000 --threads 3 --json "$@"; }
    ev "$w/pred/bench" --budgets 25% --batch-sizes 1 > "$p/eval_25_b1.json" 2> "$p/eval_25_b1.err" &
    ev "$w/pred/bench" --budgets 25% --batch-sizes 8 > "$p/eval_25_b8.json" 2> "$p/eval_25_b8.err" &
    ev "$w/pred/bench-no-python_docs" --domains python_docs --budgets 25% --batch-sizes 1 > "$p/eval_ho.json" \
        2> "$p/eval_ho.err" &
    offline "$p" ef25 "${EF_TIMEOUT:-150}" --budgets 25% --batch-sizes 1,8 --batches-per-cell 2 \
        --predictors "none,$w/pred/bench"
    pack
    offline "$p" ef10 "${EF_TIMEOUT:-150}" --budgets 10% --batch-sizes 1,8 --batches-per-cell 2 \
        --predictors "none,$w/pred/bench"
    pack
    wait
    for f in "$p"/eval_*.json; do python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], \
        d['recall'], d['cache'])" "$f" 2>/dev/null | cut -c1-400; done
    pack
    ;;
11)
    begin p11
    train_bench "$p"
    pack
    timeout "${TESTS_TIMEOUT:-110}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/experts/test_deferred_listener.py \
        tests/experts/test_predictive.py tests/experts/test_predictive_tokens.py > "$p/gpu_tests.log" 2>&1
    echo "tests rc $?" >> "$p/gpu_tests.log"
    tail -3 "$p/gpu_tests.log"
    pack
    traces_and_predictors "$p"
    pack
    timeout "${AB_TIMEOUT:-150}" python3 tools/overlap_ab.py "$BENCH_MODEL" --predictor "$w/pred/bench" \
        --corpus "$w/corpus" --budgets 25% --batch-sizes 1,8 --rounds "${AB_ROUNDS:-2}" --out "$p/overlap_ab.json" \
        > "$p/overlap_ab.log" 2>&1
    grep -h '"late_over_now"' "$p/overlap_ab.log" | cut -c1-400
    pack
    ;;
12)  # the sixth session's first call: where a predictive decode step's host time goes
    begin p12
    train_bench "$p"
    pack
    traces_and_predictors "$p"
    pack
    timeout "${PROFILE_TIMEOUT:-200}" python3 tools/host_profile.py "$BENCH_MODEL" --predictor "$w/pred/bench" \
        --corpus "$w/corpus" --budget 25% --batch-sizes 1,8 --out "$p/profile" > "$p/host_profile.log" 2>&1
    cut -c1-600 "$p/host_profile.log"
    pack
    ;;
13)  # the host-time changes against the tree before them (.carry/before), same machine, model and predictor
    begin p13
    train_bench "$p"
    pack
    traces_and_predictors "$p"
    pack
    for tree in before after; do
        src=$root; [ "$tree" = before ] && src=$root/.carry/before
        PYTHONPATH="$src:/tmp/site" timeout "${PROFILE_TIMEOUT:-150}" python3 "$src/tools/host_profile.py" "$BENCH_MODEL" \
            --predictor "$w/pred/bench" --corpus "$w/corpus" --budget 25% --batch-sizes 1,8 --out "$p/profile-$tree" \
            > "$p/host_profile-$tree.log" 2>&1
        echo "$tree"; grep -h '^{' "$p/host_profile-$tree.log" | cut -c1-420
        pack
    done
    ;;
14)  # on the machine part 13 left: ExpertFlow against LRU at 25% and 10% (bench offline), the predictors'
     # recall in domain and held out on the CPU cores meanwhile, then the GPU tests of this session's changes
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor on this machine (part 13 first)" >&2; exit 3; }
    begin p14
    for d in bench bench-no-python_docs; do
        dom=""; [ "$d" = bench-no-python_docs ] && dom="--domains python_docs"
        timeout 400 python3 -m moeflow.cli predictor eval --model "$BENCH_MODEL" --trace "$w/test.npz" \
            --budgets 25% --batch-sizes 1,8 --replay-tokens 1500 --threads 2 --json $dom "$w/pred/$d" \
            > "$p/eval_$d.json" 2> "$p/eval_$d.err" &
    done
    offline "$p" ef "${EF_TIMEOUT:-300}" --budgets 25%,10% --batch-sizes 1,8 --batches-per-cell 2 \
        --predictors "none,$w/pred/bench"
    pack
    session6_tests "${TESTS_TIMEOUT:-200}"
    wait
    for f in "$p"/eval_*.json; do python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], \
        d['recall'], d['cache'])" "$f" 2>/dev/null | cut -c1-400; done
    pack
    ;;
15)  # one call: the GPU tests of the two copy streams, then demand misses on their own stream against one stream
     # (tools/demand_stream_ab.py), and a sweep of the predictive cache's prefetch settings against LRU
    begin p15
    train_bench "$p"
    pack
    session6_tests "${TESTS_TIMEOUT:-100}"
    pack
    traces_and_predictors "$p"
    pack
    timeout "${AB_TIMEOUT:-170}" python3 tools/demand_stream_ab.py "$BENCH_MODEL" --predictor "$w/pred/bench" \
        --corpus "$w/corpus" --budgets 25%,10% --batch-sizes 1,8 --rounds 2 --out "$p/demand_stream_ab.json" \
        > "$p/demand_stream_ab.log" 2>&1
    grep -h '"pred_two_over_one"' "$p/demand_stream_ab.log" | cut -c1-500
    pack
    P=$w/pred/bench
    offline "$p" sweep "${SWEEP_TIMEOUT:-150}" --budgets 25%,10% --batch-sizes 1,8 --batches-per-cell 1 \
        --predictors "none,$P,$P:prefetch_at=0.6,$P:prefetch_at=0.4,$P:prefetch_at=0.6:lookahead=4"
    pack
    ;;
16)  # for the next session (about 8 minutes on an H100, 4 less with a model kept): slots shared by value on the GPU,
     # the cells, then the GPU tests of what changed since the last of them ran (the CPU replay only so far)
    begin p16
    keep_or_train "$p"  # part 18's model, on its machine
    pack
    traces_and_predictors "$p"
    pack
    # on the CPU cores meanwhile: the replay with the gate ahead's guesses (the traces carry them since session 7)
    timeout 400 python3 -m moeflow.cli predictor eval "$w/pred/bench" --model "$BENCH_MODEL" --trace "$w/test.npz" \
        --budgets 25% --batch-sizes 1,8 --replay-tokens 1500 --threads 4 --gate-ahead --json \
        > "$p/eval_gate_ahead.json" 2> "$p/eval_gate_ahead.err" &
    evals=$!
    offline "$p" byvalue "${EF_TIMEOUT:-200}" --budgets 25%,10% --batch-sizes 1,8 --batches-per-cell 1 \
        --predictors "none,$w/pred/bench,$w/pred/bench:by_value=0"
    pack
    session6_tests "${TESTS_TIMEOUT:-150}"
    pack
    wait $evals
    pack
    ;;
17)  # for the next session (about 8 minutes with the start): the fused decode ops (models/fused_decode.py)
     # first on a GPU: their tests, then where a resident step's kernels and time go without and with them
     # (random weights of the bench model's shapes: no training)
    begin p17
    # the fused ops, the decode attention they feed, graphs against eager and transformers (the resident layers'
    # pool slices run there too), then the gate ahead's and cross_step's exactness and the gate ahead read
    # from graphs against eager
    timeout "${TESTS_TIMEOUT:-170}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/models/test_fused_decode.py \
        tests/models/test_decode_attention_triton.py tests/engine/test_gpu.py > "$p/gpu_tests.log" 2>&1
    echo "tests rc $?" >> "$p/gpu_tests.log"
    timeout "${PLANNER_TESTS_TIMEOUT:-100}" python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/experts/test_predictive.py tests/experts/test_predictive_tokens.py -k "gate_ahead or cross_step" >> "$p/gpu_tests.log" 2>&1
    echo "planner tests rc $?" >> "$p/gpu_tests.log"
    grep -h "passed\|failed\|rc " "$p/gpu_tests.log" | tail -6
    pack
    timeout "${PROFILE_TIMEOUT:-200}" python3 tools/kernel_profile.py --out "$p/kernel_profile" > "$p/kernel_profile.log" 2>&1
    grep -A14 "^| batch" "$p/kernel_profile/kernel_profile.md"
    pack
    ;;
18)  # then (about 9 minutes): train the bench model; resident at batch 32 and 64, exact and LYNX, without fused
     # ops and with them, with them also at the more aggressive (alpha, beta) of the 2026-12-02 sweep, (5, 2) and
     # (3, 1) (+0.65% and +0.74% perplexity there): issue 13's resident target
    begin p18
    train_bench "$p"
    pack
    offline "$p" resident-fused0 "${RESIDENT_TIMEOUT:-120}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 2 \
        --routing exact,lynx
    pack
    offline "$p" resident-fused1 "${RESIDENT_TIMEOUT:-160}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 2 \
        --routing exact,lynx,lynx:alpha=5:beta=2,lynx:alpha=3:beta=1 --fused-ops
    pack
    ;;
19)  # on the same machine (about 7 minutes): the accuracy of LYNX at alpha 3, 4, 5 and beta 1, 2 on five domains
     # of the test split and on python_docs held out (issue 13's bound: <= 1% perplexity); LRU at 25%, batch 1
     # and 8, without and with fused ops
    [ -f "$BENCH_MODEL/config.json" ] || { echo "no bench model on this machine (part 18 first)" >&2; exit 3; }
    begin p19
    five=fortunes,shakespeare,wiki_en,wiki_es,wiki_fr
    timeout 150 python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains $five --max-docs 160 \
        --max-tokens-per-doc 128 --batch-size 32 --alpha 3,4,5 --beta 1,2 --device cuda > "$p/sweep_test.jsonl" \
        2> "$p/sweep_test.err"
    timeout 110 python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains python_docs --max-docs 102 \
        --max-tokens-per-doc 128 --batch-size 32 --alpha 3,4,5 --beta 1,2 --device cuda > "$p/sweep_python_docs.jsonl" \
        2> "$p/sweep_python_docs.err"
    tail -n 9 "$p/sweep_test.jsonl" "$p/sweep_python_docs.jsonl" | cut -c1-160
    pack
    for f in 0 1; do
        fused=""; [ "$f" = 1 ] && fused=--fused-ops
        offline "$p" "lru25-fused$f" "${LRU_TIMEOUT:-80}" --budgets 25% --batch-sizes 1,8 --batches-per-cell 2 $fused
        pack
    done
    ;;
20)  # on part 16's machine (about 9 minutes): the prefetch sweep part 15 ran out of time for, at 25%: earlier
     # and deeper prefetches, and prefetches across the step's end (what would keep the copy engine busy through
     # a batch-1 step), against LRU
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor on this machine (part 16 first)" >&2; exit 3; }
    begin p20
    P=$w/pred/bench
    # (since the eighth session) rounds by value: a layer computed in rounds so its own computed experts go first
    # (replay on moeflow-tiny: 1.222x -> 1.137x Belady's bytes at 25% batch 8, 1.391x -> 1.274x at 10% batch 1)
    offline "$p" rounds "${ROUNDS_TIMEOUT:-240}" --budgets 25%,10% --batch-sizes 1,8 --batches-per-cell 2 \
        --predictors "none,$P,$P:rounds=1,$P:rounds=8,$P:rounds=1:reuse_weight=1"
    pack
    # (since the eighth session: at 25% batch 1 the copy engine was busy 70% of the step, and at the bytes moved
    # 1.75x LRU is the ceiling: the deep variant queues every layer's likely experts and issues them all at the
    # step's start, which the correction can then no longer drop)
    offline "$p" sweep "${SWEEP_TIMEOUT:-300}" --budgets 25% --batch-sizes 1,8 --batches-per-cell 2 \
        --predictors "none,$P,$P:cross_step=1,$P:prefetch_at=0.6,$P:lookahead=4,$P:prefetch_at=0.6:lookahead=4,$P:cross_step=1:lookahead=4,$P:lookahead=12:issue_now=512:issue_per_layer=512"
    pack
    # the model's gate ahead for the correction step (its CPU replay: more prefetch hits, more bytes at weight 1)
    offline "$p" gate-ahead "${GATE_TIMEOUT:-150}" --budgets 25% --batch-sizes 1,8 --batches-per-cell 2 \
        --predictors "none,$P,$P:ahead_weight=1" --gate-ahead
    pack
    # where in a step the copy engine waits, LRU against the predictive cache
    timeout 200 python3 tools/copy_timeline.py "$BENCH_MODEL" --predictor "$P" --corpus "$w/corpus" \
        --batch-sizes 1,8 --out "$p/timeline" > "$p/timeline.log" 2>&1
    grep -h '^{' "$p/timeline.log"
    pack
    ;;
22)  # (about 4 minutes with the start) the LYNX binning kernel timed in one program and spread over
     # programs, then the GPU tests with fused ops on by default (transformers' exactness grid, graphs against
     # eager, the rotary's rounding, LYNX under graphs, the hooks)
    begin p22
    timeout 90 python3 tools/lynx_binning_time.py --out "$p/lynx_binning_time.json" > "$p/lynx_binning_time.log" 2>&1
    cut -c1-160 "$p/lynx_binning_time.log"
    gpu_tests "${TESTS_TIMEOUT:-300}" $LYNX_GPU_TESTS
    pack
    ;;
23)  # (about 8 minutes alone): the bench model (kept or trained); LYNX resident at batch 32 and 64 at the default
     # ((3, 1), spread over programs), in one program, at (3, 2) and (2, 1); then LYNX's perplexity and multiple
     # choice (issue 13's resident target and its bounds)
    begin p23
    keep_or_train "$p"
    pack
    # (since the ninth session `lynx` is the measured (3, 1), spread over programs of 2 rows from 32 rows a step)
    offline "$p" resident "${RESIDENT_TIMEOUT:-170}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 2 \
        --routing "exact,lynx,lynx:rows=0,lynx:alpha=3:beta=2,lynx:alpha=2:beta=1"
    pack
    # then one after another (on 2026-12-06 five processes loading the model's experts into pinned host memory at
    # once read about 10 experts a second each, and the call ran out of time): the perplexity sweep on five
    # domains and on python_docs, the multiple-choice task at (3, 1) and (2, 1) (about 90 s on an H200)
    five=fortunes,shakespeare,wiki_en,wiki_es,wiki_fr
    timeout "${SWEEP_TIMEOUT:-90}" python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains $five \
        --max-docs 160 --max-tokens-per-doc 128 --batch-size 32 --alpha 2,3 --beta 1,2 --device cuda \
        > "$p/sweep_test.jsonl" 2> "$p/sweep_test.err"
    timeout "${SWEEP_TIMEOUT:-90}" python3 docs/lynx/sweep.py "$BENCH_MODEL" --data "$w/corpus" --domains python_docs \
        --max-docs 102 --max-tokens-per-doc 128 --batch-size 32 --alpha 2,3 --beta 1,2 --device cuda \
        > "$p/sweep_python_docs.jsonl" 2> "$p/sweep_python_docs.err"
    pack
    lynx_choice 60 3 1
    lynx_choice 60 2 1
    grep -h '^{' "$p/sweep_test.jsonl" "$p/sweep_python_docs.jsonl" | cut -c1-200
    pack
    ;;
24)  # (about 7 minutes after part 23 on its machine; 9 alone, training first): the multiple-choice task at (3, 2)
     # on part 23's model; traces and predictors; rounds by value against one round and LRU
     # at 25% and 10%, batch 1 and 8 (issue 12's bytes and speed)
    begin p24
    kept=0; [ -f "$BENCH_MODEL/config.json" ] && kept=1
    keep_or_train "$p"
    pack
    if [ "$kept" = 1 ]; then  # on part 23's model only: its perplexity sweep is the other half of the accuracy
        lynx_choice 60 3 2
        pack
    fi
    # (since the ninth session) traces of 1,000,000 tokens: recall was 0.739 from 150,000 and 0.779-0.784 from 300,000
    TRAIN_DOCS=1400 TRAIN_TOKENS=1000000 PRED_EPOCHS=12 traces_and_predictors "$p"
    pack
    # (since the ninth session) beside them, on the same traces: the router lens (each router on the token alone),
    # and the token's embedding projected to 256 of its 2048 dimensions instead of 96 (on moeflow-tiny, squeezed as
    # the bench model's is, the lens gave back the recall the squeeze cost)
    for v in "lens --lens-width 64" "wide --cur-width 256"; do  # (not $name: pack's)
        set -- $v; variant=$1; shift
        moeflow predictor train "$BENCH_MODEL" --traces "$w/train.npz" --out "$w/pred/bench-$variant" --device cuda \
            --epochs 12 --max-minutes 0.9 --no-progress "$@" > "$p/pred_train_$variant.log" 2>&1 &
        moeflow predictor train "$BENCH_MODEL" --traces "$w/train.npz" --out "$w/pred/bench-$variant-no-python_docs" \
            --holdout-domain python_docs --device cuda --epochs 12 --max-minutes 0.9 --no-progress "$@" \
            > "$p/pred_train_${variant}_ho.log" 2>&1 &
    done
    wait
    tail -qn1 "$p"/pred_train_*.log | cut -c1-300
    for d in bench bench-lens bench-wide bench-no-python_docs bench-lens-no-python_docs bench-wide-no-python_docs; do
        dom=""; case $d in *no-python_docs) dom="--domains python_docs";; esac
        timeout 120 python3 -m moeflow.cli predictor eval "$w/pred/$d" --model "$BENCH_MODEL" --trace "$w/test.npz" \
            --budgets 25% --batch-sizes 1 --replay-tokens 300 --threads 2 --json $dom \
            > "$p/eval_$d.json" 2> "$p/eval_$d.err" &
    done
    wait  # before the timed run: the predictive cache's host work must not share the CPU with them
    python3 -c "import json,sys; [print(f, json.load(open(f))['recall']) for f in sys.argv[1:]]" "$p"/eval_*.json
    pack
    # one batch a cell when this call trained its own model, so that the run ends inside the call
    bpc=2; [ "$kept" = 1 ] || bpc=1
    P=$w/pred/bench
    offline "$p" rounds "${ROUNDS_TIMEOUT:-280}" --budgets 25%,10% --batch-sizes 1,8 --batches-per-cell $bpc \
        --predictors "none,$P,$P:rounds=1,$P:rounds=8,$P:rounds=1:reuse_weight=1"
    pack
    ;;
25)  # (about 5 minutes on part 23's or 24's machine, 8 alone): where the time LYNX saves at batch 64 goes. (3, 1)
     # runs 43 experts a layer-step against exact's 64 and the step is no faster (2026-12-06): every kernel of a
     # resident step of the trained model on test-split text, exact and LYNX, batch 32 and 64, fused ops on
    begin p25
    profile_trained "${PROFILE_TIMEOUT:-240}"
    # (since the tenth session) the GPU host's time a decode step where the device idles, outputs built between
    # steps and during the next (the bundled model: the host's work is per sequence, not per weight)
    timeout "${HOST_TIMEOUT:-120}" python3 tools/host_critical.py --data "$w/corpus" --device cuda \
        --batch-sizes 8,32,64 --out "$p/host_critical.json" > "$p/host_critical.log" 2>&1
    grep '^{' "$p/host_critical.log"
    pack
    # (since the tenth session) the fused MoE kernel's tiles and time, exact against LYNX (3, 1), 16- and 32-row
    # tiles, at the bench model's expert shape on drawn routings (no model: the batch-64 question in isolation)
    timeout "${TILES_TIMEOUT:-120}" python3 tools/moe_tile_time.py --out "$p/moe_tiles.json" > "$p/moe_tiles.log" 2>&1
    cut -c1-160 "$p/moe_tiles.log" | tail -12
    pack
    ;;
26)  # the next session's first call (about 9 minutes with the start): the GPU tests of what has changed since
     # they last ran on a GPU (part 22's list: the rotary's rounding fix, fused ops on by default, LYNX's kernel
     # spread over programs under graphs; and the router lens's graphed forward), then part 25's kernel profile
     # of the trained model, in one call so that no machine is lost between them
    begin p26
    gpu_tests "${TESTS_TIMEOUT:-200}" $LYNX_GPU_TESTS tests/routing/test_router_lens.py
    pack
    profile_trained "${PROFILE_TIMEOUT:-170}"
    ;;
27)  # the next session's first call (about 10 minutes with the start): the bench model (kept or trained); LYNX
     # resident at batch 32 and 64 with outputs built between steps (overlap=0, the engine before the tenth
     # session), while the next step runs (overlap=1, now the default on CUDA), and with each step launched
     # before the last is settled (async=1, opt-in), exact and (3, 1) side by side (issue 13's resident target);
     # then part 26's GPU tests and those of both, whose engine tests now run overlapped (last: a
     # pytest that runs out of time still leaves the tests it ran in its log; on 2026-12-02 tests sharing the GPU
     # with training crawled, so they run alone)
    begin p27
    keep_or_train "$p"
    pack
    # (since the eleventh session) beside them, steps launched before the last is settled (async=1: the host's
    # work between steps overlaps the device's, not only the outputs)
    offline "$p" resident "${RESIDENT_TIMEOUT:-200}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 2 \
        --routing exact,lynx --scheduling fcfs:overlap=0,fcfs:overlap=1,fcfs:overlap=1:async=1
    pack
    gpu_tests "${TESTS_TIMEOUT:-200}" $LYNX_GPU_TESTS tests/routing/test_router_lens.py \
        tests/engine/test_overlap_output.py tests/engine/test_async_scheduling.py
    pack
    ;;
28)  # the next session's first call (about 9 minutes with the start): what keeps LYNX's resident step at batch 64
     # at 1.21x exact (0.1 ms short of 1.25x): the kernel profile at batch 64 with async scheduling off and on and
     # the device's idle gaps; higher alpha (fewer experts kept) resident at batch 32 and 64, with its accuracy
    begin p28
    keep_or_train "$p"
    pack
    timeout "${PROFILE_TIMEOUT:-80}" python3 tools/kernel_profile.py --model "$BENCH_MODEL" --data "$w/corpus" \
        --batch-sizes 64 --routing exact,lynx --fused-ops 1 --async 0,1 --out "$p/kernel_profile" \
        > "$p/kernel_profile.log" 2>&1
    grep -A6 "^| batch" "$p/kernel_profile/kernel_profile.md"
    pack
    # (3, 1) kept 30 / 43 experts a layer-step at batch 32 / 64 (ninth session); higher alpha, narrower bins, keeps
    # fewer; async scheduling is the engine's default on CUDA since the twelfth session
    offline "$p" resident "${RESIDENT_TIMEOUT:-130}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 2 \
        --routing "exact,lynx,lynx:alpha=4:beta=1,lynx:alpha=5:beta=1"
    pack
    lynx_sweeps "${SWEEP_TIMEOUT:-80}" 3,4,5 1
    pack
    lynx_choice 50 4 1
    pack
    ;;
29)  # on part 28's machine (about 6 minutes): a 300,000-token trace and a predictor; tools/rounds_diag.py on the
     # bench model (the first step and layer where rounds by value leave the tokens at 25% and 10%, batch 1; since
     # c474cba every slot a round reads is marked read: all-null rows confirm the fix, after which the engine may
     # stop refusing rounds on CUDA)
    begin p29
    keep_or_train "$p"
    TRAIN_DOCS=400 TRAIN_TOKENS=300000 PRED_EPOCHS=8 traces_and_predictors "$p"
    pack
    for b in 25% 10%; do
        timeout "${DIAG_TIMEOUT:-90}" python3 tools/rounds_diag.py cuda --model "$BENCH_MODEL" \
            --predictor "$w/pred/bench" --data "$w/corpus" --budget "$b" --rounds 1 --requests 4 \
            --out "$p/rounds_diag_${b%\%}.json" > "$p/rounds_diag_${b%\%}.log" 2>&1
        grep '^{' "$p/rounds_diag_${b%\%}.log" | cut -c1-200
        pack
    done
    # the GPU tests of what changed after the twelfth session's calls: LYNX's kept set in the record's scratch
    # (10ce3f2), a round's reads all marked (c474cba), async scheduling's outputs never dropped (8839c6f)
    gpu_tests "${TESTS_TIMEOUT:-120}" tests/routing/test_lynx_engine.py tests/routing/test_lynx_triton.py \
        tests/engine/test_async_scheduling.py tests/engine/test_overlap_output.py tests/experts/test_predictive.py tests/experts/test_predictive_tokens.py
    pack
    ;;
30)  # the thirteenth session's last call (about 9 minutes with the start): the GPU test of rounds by value under
     # graphs (allowed on CUDA again) beside the training; LYNX's default (3, 1) resident at batch 32 and 64 with
     # three batches a cell (batch 64 read 1.21x and then 1.26x exact in two runs of two); the multiple-choice task
     # at (3, 1); and the served comparison of route-aware and fcfs at 128 streams (needs .whl)
    begin p30
    gpu_tests "${TESTS_TIMEOUT:-150}" -k rounds tests/experts/test_predictive.py tests/experts/test_predictive_tokens.py &
    keep_or_train "$p"
    wait
    pack
    offline "$p" resident "${RESIDENT_TIMEOUT:-110}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 3 \
        --routing exact,lynx
    pack
    lynx_choice 50 3 1
    pack
    serve_policies
    ;;
31)  # the next session's first call (about 8 minutes with the start): why LYNX's resident step at batch 64 is
     # 1.35x exact's in the kernel profile (greedy, 128-token prompts) but 1.17-1.26x in bench offline (sampled at
     # 0.8, top-p 0.95, 64-256-token prompts), and why (5, 1) keeps fewer experts than (3, 1) there and runs
     # slower: the profile greedy and sampled, with each cell's experts a layer-step; (5, 1) profiled; the bench's
     # batch 64 with four batches a cell
    begin p31
    keep_or_train "$p"
    pack
    for cell in "greedy exact,lynx 0 1" "sampled exact,lynx 0.8 0.95" "sampled-5-1 lynx:alpha=5:beta=1 0.8 0.95"; do
        set -- $cell
        timeout "${PROFILE_TIMEOUT:-70}" python3 tools/kernel_profile.py --model "$BENCH_MODEL" --data "$w/corpus" \
            --batch-sizes 64 --routing "$2" --fused-ops 1 --async 1 --temperature "$3" --top-p "$4" \
            --out "$p/kernel_profile_$1" > "$p/kernel_profile_$1.log" 2>&1
        grep -A4 "^| batch" "$p/kernel_profile_$1/kernel_profile.md"
        pack
    done
    offline "$p" resident "${RESIDENT_TIMEOUT:-120}" --budgets 100% --batch-sizes 64 --batches-per-cell 4 \
        --routing "exact,lynx,lynx:alpha=5:beta=1"
    pack
    ;;
34)  # on any part's machine with the bench model (about 4 minutes): route-aware served beside fcfs at 128 streams,
     # which the thirteenth session's device time did not reach (needs .whl)
    [ -f "$BENCH_MODEL/config.json" ] || { echo "no bench model on this machine" >&2; exit 3; }
    begin p34
    serve_policies
    ;;
32)  # on part 31's machine (about 8 minutes): where the copy engine idles at 25% batch 1 (busy about 70% of the
     # step: the predictive cache's bytes would allow about 1.7x LRU if its copies overlapped all else, and it runs
     # 1.25x), and whether the prefetch arms that exist for it fill that idle: across the step's end (cross_step),
     # deeper (lookahead 4), everything at the step's start. Never run on a GPU: parts 15 and 20 had no time left.
    begin p32
    keep_or_train "$p"
    TRAIN_DOCS=400 TRAIN_TOKENS=300000 PRED_EPOCHS=8 traces_and_predictors "$p"
    pack
    P=$w/pred/bench
    timeout "${TIMELINE_TIMEOUT:-150}" python3 tools/copy_timeline.py "$BENCH_MODEL" --predictor "$P" \
        --corpus "$w/corpus" --batch-sizes 1 --out "$p/timeline" \
        --arms "none,PRED,PRED:cross_step=1,PRED:lookahead=12:issue_now=512:issue_per_layer=512" \
        > "$p/timeline.log" 2>&1
    grep -h '^{' "$p/timeline.log" | cut -c1-250
    pack
    # the predictor and planner's host time at batch 1 rose from 2.2 ms a token (2026-12-05, session6, after its
    # fixes) to 3.2-3.5 ms (session8 on, by_value on or off): where it goes now, under cProfile
    timeout "${HOSTPROF_TIMEOUT:-90}" python3 tools/host_profile.py "$BENCH_MODEL" --predictor "$P" \
        --corpus "$w/corpus" --batch-sizes 1 --out "$p/host_profile" > "$p/host_profile.log" 2>&1
    tail -2 "$p/host_profile.log" | cut -c1-250
    pack
    # (and rounds by value at n = 8 a second time: 1.04-1.08x the planner without rounds at batch 8 in the
    # thirteenth session's one run, the candidate for a default)
    offline "$p" prefetch "${SWEEP_TIMEOUT:-270}" --budgets 25% --batch-sizes 1,8 --batches-per-cell 2 \
        --predictors "none,$P,$P:cross_step=1,$P:lookahead=4,$P:cross_step=1:lookahead=4,$P:lookahead=12:issue_now=512:issue_per_layer=512,$P:rounds=8"
    pack
    ;;
33)  # on part 31's or 32's machine (about 6 minutes): held-out recall against the trace's size. Trained on five
     # domains and scored on python_docs, the predictor's recall (training's own measure) rose from 0.560 with a
     # 300,000-token trace to 0.634 with 1,000,000 (`predictor eval`, with online adaptation: 0.646); issue 12 asks
     # 0.70. The corpus's train split holds 4,987,490 tokens at up to 512 a document (4,178,072 without
     # python_docs; its tokenizer, counted on the CPU): 4,000,000 of every document is nearly all of it
    begin p33
    keep_or_train "$p"
    TRAIN_DOCS=14000 TRAIN_TOKENS="${BIG_TOKENS:-4000000}" MAX_SEQ_LEN=512 PRED_EPOCHS=8 PRED_MINUTES=2 \
        traces_and_predictors "$p"
    pack
    for d in bench bench-no-python_docs; do
        dom=""; [ "$d" = bench-no-python_docs ] && dom="--domains python_docs"
        timeout 150 python3 -m moeflow.cli predictor eval "$w/pred/$d" --model "$BENCH_MODEL" --trace "$w/test.npz" \
            --budgets 25% --batch-sizes 1 --replay-tokens 300 --threads 4 --json $dom \
            > "$p/eval_$d.json" 2> "$p/eval_$d.err" &
    done
    wait
    python3 -c "import json,sys; [print(f, json.load(open(f))['recall']) for f in sys.argv[1:]]" "$p"/eval_*.json
    pack
    ;;
35)  # the next session's first call (about 9 minutes with the start): route-aware served with new requests held
     # back to be prefilled together (the default since this part was written) beside fcfs and beside admission at
     # once (--max-admit-wait 0, as the fourteenth session served it: 71 prefills against fcfs's 13, which took
     # back the 1.20x its decode steps gained); needs .whl
    begin p35
    keep_or_train "$p"
    pack
    SERVE_POLICIES="${SERVE_POLICIES:-fcfs route-aware route-aware:admit=0}" serve_policies
    ;;
36)  # on part 35's machine (about 7 minutes): LYNX's (5, 1), the candidate default for the bench model (1.26x exact
     # at batch 64 in the fourteenth session, against (3, 1)'s 1.20x; +0.96% perplexity on five domains in the
     # thirteenth): its accuracy on five domains and held-out python_docs beside (3, 1) and (4, 1), multiple
     # choice at (5, 1), and the three resident at batch 32 and 64, four batches a cell
    begin p36
    keep_or_train "$p"
    lynx_sweeps "${SWEEP_TIMEOUT:-80}" 3,4,5 1
    pack
    lynx_choice 50 5 1
    pack
    offline "$p" resident "${RESIDENT_TIMEOUT:-200}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 4 \
        --routing "exact,lynx,lynx:alpha=4:beta=1,lynx:alpha=5:beta=1"
    pack
    ;;
38)  # on part 36's machine (about 4 minutes), if (5, 1) holds its accuracy: at 25% batch 32, plain and cache-aware
    begin p38
    keep_or_train "$p"
    offline "$p" lynx25 "${LYNX25_TIMEOUT:-200}" --budgets 25% --batch-sizes 32 --batches-per-cell 2 \
        --routing "exact,lynx:alpha=5:beta=1,lynx:alpha=5:beta=1:w=4"
    pack
    ;;
39)  # on any machine (about 3 minutes; no bench model needed): the GPU tests of the fourteenth session's changes:
     # the predictor and planner moved into engine/forecast.py (the learned predictor's exactness grid under
     # graphs, the deferred listener, the hooks), decode features gathered at once (the graphed forward), the decode
     # wait count (async scheduling)
    begin p39
    gpu_tests "${TESTS_TIMEOUT:-240}" tests/experts/test_predictive.py tests/experts/test_predictive_tokens.py tests/experts/test_deferred_listener.py \
        tests/engine/test_gpu_hooks.py tests/routing/test_learned_predictor.py tests/routing/test_learned_runtime.py \
        tests/engine/test_async_scheduling.py
    pack
    ;;
37)  # on part 35's or 36's machine (about 9 minutes: the trace about 5, the two trainings side by side at most 3.5):
     # held-out recall at 4,000,000 trace tokens, trained longer and wider. With 8 epochs at width 512 the
     # fourteenth session reached 0.691 (issue 12 asks 0.70), still rising 0.001-0.002 an epoch; the width is capped
     # at 512 though 2% of the model's bytes would allow far more. Training's own held-out figure (pred_train_ho.log)
     # came within 0.001 of `predictor eval`'s there; part 40 runs the eval
    begin p37
    keep_or_train "$p"
    TRAIN_DOCS=14000 TRAIN_TOKENS="${BIG_TOKENS:-4000000}" MAX_SEQ_LEN=512 PRED_EPOCHS=16 PRED_MINUTES=3.5 \
        PRED_ARGS="--hidden ${PRED_HIDDEN:-1024}" traces_and_predictors "$p"
    pack
    ;;
41)  # on part 37's machine (about 4 minutes): route-aware with its predictor's forecasts served beside route-aware
     # alone (on the CPU's closed loop, tools/closed_loop.py: 0.75x fcfs's bytes against 0.82x)
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor here (part 37 first)" >&2; exit 3; }
    begin p41
    SERVE_POLICIES="${SERVE_POLICIES:-route-aware route-aware:predictor}" serve_policies
    ;;
40)  # on part 37's machine (about 3 minutes): `predictor eval` of its held-out predictor on python_docs (the
     # baselines beside it, and the replay at 25% batch 1)
    [ -f "$w/pred/bench-no-python_docs/config.json" ] || { echo "no predictor here (part 37 first)" >&2; exit 3; }
    begin p40
    heldout_eval "${EVAL_TIMEOUT:-200}"
    pack
    ;;
42)  # the fifteenth session's first call (about 9 minutes with the start): the bench model; LYNX's perplexity at
     # (3, 4, 5; 1) on five domains and on held-out python_docs; the multiple-choice task at (4, 1) and (5, 1), the
     # candidates for the bench model's default (issue 13's last missed target is batch 64 resident, 1.20x at (3, 1))
    begin p42
    keep_or_train "$p"
    pack
    lynx_sweeps "${SWEEP_TIMEOUT:-80}" 3,4,5 1
    pack
    lynx_choice 55 4 1
    lynx_choice 55 5 1
    pack
    ;;
43)  # on part 42's machine (about 7 minutes): the same candidates' speed, resident at batch 32 and 64 (four batches
     # a cell) and at 25% batch 32 (two), beside exact
    begin p43
    keep_or_train "$p"
    offline "$p" resident "${RESIDENT_TIMEOUT:-200}" --budgets 100% --batch-sizes 32,64 --batches-per-cell 4 \
        --routing "exact,lynx,lynx:alpha=4:beta=1,lynx:alpha=5:beta=1"
    pack
    offline "$p" lynx25 "${LYNX25_TIMEOUT:-200}" --budgets 25% --batch-sizes 32 --batches-per-cell 2 \
        --routing "exact,lynx:alpha=4:beta=1,lynx:alpha=5:beta=1,lynx:alpha=5:beta=1:w=4"
    pack
    ;;
44)  # the next session's first call (about 7 minutes with the start): the bench model, then the GPU tests of LYNX
     # (graphs against eager, exact rows untouched) on the engine as the fourteenth session changed it; the fifteenth
     # session's GPU tests covered those changes but not LYNX's files
    begin p44
    keep_or_train "$p"
    pack
    gpu_tests "${TESTS_TIMEOUT:-240}" tests/routing/test_lynx.py tests/routing/test_lynx_engine.py \
        tests/routing/test_lynx_triton.py tests/engine/test_gpu.py
    pack
    ;;
45)  # on part 37's machine (about 7 minutes): `predictor eval` of its held-out predictor (part 40), then whether the
     # prefetch arms meant to fill the copy engine's idle time at batch 1 (busy about 70% of a 25% step: the bytes
     # allow about 1.8x LRU, the cache runs 1.26x) do fill it: across the step's end (cross_step), deeper
     # (lookahead 4), both; 25%, batch 1 and 8, with part 37's predictor (never run on a GPU: part 32 had no time)
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor here (part 37 first)" >&2; exit 3; }
    begin p45
    heldout_eval "${EVAL_TIMEOUT:-170}"
    pack
    P=$w/pred/bench
    offline "$p" prefetch "${SWEEP_TIMEOUT:-330}" --budgets 25% --batch-sizes 1,8 --batches-per-cell 2 \
        --predictors "none,$P,$P:cross_step=1,$P:lookahead=4,$P:cross_step=1:lookahead=4"
    pack
    ;;
49)  # the eighteenth session's first call (about 7 minutes with the start; no bench model needed): part 39's and part
     # 44's GPU tests in one call, on the tree with the seventeenth session's host-time changes (the compute stream
     # kept, quotas.ValueVictims) and the eighteenth's (a decode row scored once per sequence state)
    begin p49
    gpu_tests "${TESTS_TIMEOUT:-480}" tests/experts/test_predictive.py tests/experts/test_predictive_tokens.py tests/experts/test_deferred_listener.py \
        tests/engine/test_gpu_hooks.py tests/routing/test_learned_predictor.py tests/routing/test_learned_runtime.py \
        tests/engine/test_async_scheduling.py \
        tests/routing/test_lynx.py tests/routing/test_lynx_engine.py tests/routing/test_lynx_triton.py \
        tests/engine/test_gpu.py
    pack
    ;;
51)  # on part 50's machine (about 5 minutes): issue 14's offline cell at 25%, route-aware with the predictive
     # cache and its rounds by value beside fcfs and route-aware alone
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor here (part 50 first)" >&2; exit 3; }
    begin p51
    P=$w/pred/bench
    offline "$p" sched25 "${SCHED_TIMEOUT:-540}" --budgets 25% --batch-sizes 256 --max-num-seqs 256 \
        --max-batch-size 32 --batches-per-cell 1 \
        --configurations "none/exact/fcfs,none/exact/route-aware,$P/exact/route-aware,$P:rounds=8/exact/route-aware"
    pack
    ;;
53)  # on part 50's machine (about 5 minutes): issue 14's offline cell at $BUDGET (default 25%), route-aware with the
     # predictive cache and its rounds under looser wait bounds (the issue bounds p99 TPOT at 2x fcfs's, not the
     # wait itself; the default bound, 4 steps past the round-robin share, keeps it at 0.8x)
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor here (part 50 first)" >&2; exit 3; }
    begin p53
    # WAITS: the wait bounds to run beside fcfs (default 4 8 16; 4 is route-aware's default bound)
    P=$w/pred/bench:rounds=8 b=${BUDGET:-25%} configs=none/exact/fcfs
    for W in ${WAITS:-4 8 16}; do configs+=",$P/exact/route-aware:wait=$W"; done
    offline "$p" "sched${b%\%}" "${SCHED_TIMEOUT:-540}" --budgets "$b" --batch-sizes 256 \
        --max-num-seqs 256 --max-batch-size 32 --batches-per-cell 1 --configurations "$configs"
    pack
    ;;
54)  # on part 50's machine (about 5 minutes): issue 14's offline cell at $BUDGET (default 25%), wait bound 16: the
     # predictive cache with rounds (n = 8) as part 53 ran it, beside the same with prefetches that may evict more
     # ($ARMS: planner settings appended to the predictor's, one arm each). In part 53 the copy engine idled a fifth
     # of the decode time, and the cache prefetched 258 of about 194,000 loads: a prefetch may evict only what is
     # worth less than prefetch_margin (0.25) times its chance, and a routed layer's experts are worth more. On
     # moeflow-tiny at this cell prefetch_margin 1 made 25,191 prefetches (73 wasted) for 2.4% more bytes
     # (docs/benchmarks/2026-12-06-cpu-session20)
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor here (part 50 first)" >&2; exit 3; }
    begin p54
    P=$w/pred/bench:rounds=8 b=${BUDGET:-25%} configs="none/exact/fcfs,$w/pred/bench:rounds=8/exact/route-aware:wait=16"
    for arm in ${ARMS:-:prefetch_margin=1 :prefetch_margin=1:prefetch_at=0.5}; do
        configs+=",$P$arm/exact/route-aware:wait=16"
    done
    # the route-aware plan's host time on this machine's CPU (with a predictor's rows, at the bench model's shape)
    python3 tools/policy_host_time.py --running 128,256 --predictor > "$p/policy_host_time.txt" 2>&1
    offline "$p" "prefetch${b%\%}" "${SCHED_TIMEOUT:-540}" --budgets "$b" --batch-sizes 256 \
        --max-num-seqs 256 --max-batch-size 32 --batches-per-cell 1 --configurations "$configs"
    pack
    ;;
50)  # (about 6 minutes with a warm machine) the bench model, a 300,000-token trace and the predictors at the default
     # width: what part 41 serves with
    begin p50
    keep_or_train "$p"
    pack
    TRAIN_DOCS=400 TRAIN_TOKENS=300000 PRED_EPOCHS=8 PRED_MINUTES=1.5 traces_and_predictors "$p"
    pack
    ;;
46)  # the next session's first call (about 9 minutes with the start): where the predictive step's host time goes at
     # batch 1. The sixteenth session measured the predictor and planner at 4.2-7.8 ms of a 12-16 ms step at 25%
     # (34-47% of decode time, against 2.1 ms in the sixth session), with only 21-25% of the step stalled on copies:
     # the bench model, a 300,000-token trace and a predictor at the default width (1024 since that session), then
     # tools/host_profile.py at batch 1 (LRU and the predictive cache timed, then the predictive run under cProfile)
    begin p46
    keep_or_train "$p"
    pack
    TRAIN_DOCS=400 TRAIN_TOKENS=300000 PRED_EPOCHS=8 PRED_MINUTES=1.5 traces_and_predictors "$p"
    pack
    timeout "${HOSTPROF_TIMEOUT:-120}" python3 tools/host_profile.py "$BENCH_MODEL" --predictor "$w/pred/bench" \
        --corpus "$w/corpus" --batch-sizes 1 --out "$p/host_profile" > "$p/host_profile.log" 2>&1
    tail -2 "$p/host_profile.log" | cut -c1-250
    head -40 "$p/host_profile/cprofile-b1.txt"
    pack
    ;;
47)  # on part 46's machine (about 3 minutes): at 25% batch 1, three batches a cell, the predictive cache beside LRU
     # with every prefetch issued at the step's start (less host work after each router) and with correction off
     # (no predictor refine and no re-plan after each router)
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor here (part 46 first)" >&2; exit 3; }
    begin p47
    P=$w/pred/bench
    offline "$p" host "${SWEEP_TIMEOUT:-200}" --budgets 25% --batch-sizes 1 --batches-per-cell 3 \
        --predictors "none,$P,$P:lookahead=12:issue_now=512:issue_per_layer=512,$P:no-correct"
    pack
    ;;
48)  # the seventeenth session's last call (about 8 minutes with the start): the bench model, a trace and a predictor;
     # the host-time changes against the tree before them (.carry/before: `git archive BEFORE moeflow
     # tools/host_profile.py`, less the bundled model), tools/host_profile.py from each tree in turn, twice, on the
     # same model and predictor; between the two rounds, when the copy engine idles at 25% batch 1
     # (tools/copy_timeline.py: before the step's first copy, after its last, between copies) for LRU, the
     # predictive cache, cross_step and correction off
    begin p48
    keep_or_train "$p"
    pack
    TRAIN_DOCS=400 TRAIN_TOKENS=300000 PRED_EPOCHS=8 PRED_MINUTES=1.5 traces_and_predictors "$p"
    pack
    for round in 0 1; do
        for tree in before after; do
            src=$root; [ "$tree" = before ] && src=$root/.carry/before
            PYTHONPATH="$src:/tmp/site" timeout "${PROFILE_TIMEOUT:-60}" python3 "$src/tools/host_profile.py" \
                "$BENCH_MODEL" --predictor "$w/pred/bench" --corpus "$w/corpus" --budget 25% --batch-sizes 1 \
                --out "$p/profile-$tree-$round" > "$p/host_profile-$tree-$round.log" 2>&1
            echo "$tree $round"; grep -h '^{' "$p/host_profile-$tree-$round.log" | cut -c1-700
            pack
        done
        [ "$round" = 1 ] && break
        timeout "${TIMELINE_TIMEOUT:-150}" python3 tools/copy_timeline.py "$BENCH_MODEL" --predictor "$w/pred/bench" \
            --corpus "$w/corpus" --batch-sizes 1 --out "$p/timeline" \
            --arms "none,PRED,PRED:cross_step=1,PRED:no-correct" > "$p/timeline.log" 2>&1
        grep -h '^{' "$p/timeline.log" | cut -c1-300
        pack
    done
    ;;
10)
    if [ "${EVALS:-0}" = 1 ]; then  # part 11's predictors scored on the CPU cores meanwhile (recall, no replay)
        for d in bench bench-no-python_docs; do
            dom=""; [ "$d" = bench-no-python_docs ] && dom="--domains python_docs"
            timeout 300 python3 -m moeflow.cli predictor eval --model "$BENCH_MODEL" --trace "$w/test.npz" \
                --budgets 25% --batch-sizes 8 --replay-tokens 1500 --threads 2 --json $dom "$w/pred/$d" \
                > "$w/eval_$d.json" 2> "$w/eval_$d.err" &
        done
    fi
    [ -f "$w/pred/bench/config.json" ] || { echo "no predictor on this machine (part 9 first)" >&2; exit 3; }
    begin p10
    offline "$p" sched25 "${SCHED_TIMEOUT:-560}" --budgets 25% --batch-sizes 256 --max-num-seqs 256 \
        --max-batch-size 32 --batches-per-cell 1 \
        --configurations "${CONFIGS:-none/exact/fcfs,none/exact/route-aware,$w/pred/bench/exact/route-aware}"
    pack
    wait
    cp "$w"/eval_*.json "$w"/eval_*.err "$p/" 2>/dev/null
    pack
    ;;
esac
