#!/usr/bin/env bash
# The GPU work behind docs/benchmarks/, in stages that each fit one call of a short-lived GPU machine.
#
#   tools/gpu_suite.sh STAGE OUT_DIR
#
#   tests    pytest -m gpu, every GPU test of the suite (kernels, copy engine, sampler, selectors, engine
#            exactness on CUDA), on a GPU of its own: beside training it gets through a handful
#   qwen3    moeflow bench offline on a random model of Qwen3-30B-A3B's expert shape (8 layers), with
#            transformers and transformers+accelerate baselines on the same checkpoint
#   tiny     train the bundled `tiny` model on the GPU (larger batches than on a CPU), with its model card
#            (needs CORPUS_TGZ); the checkpoint is sharded so each file comes back from the GPU machine, and it
#            replaces moeflow/assets/moeflow-tiny in this checkout so that a later `tests` stage uses it
#   bench    train the `bench` reference model and write its model card, then moeflow bench offline on the text
#            workload (corpus test-split prompts of 64-256 tokens, sampling, a seed per request) at budgets
#            100/50/25/10% x batch 1, 8, 32, beside transformers and transformers+accelerate on the same prompts
#            (needs CORPUS_TGZ: a tarball holding corpus/ and tokenizer/ from `moeflow data build|tokenizer`)
#   text     moeflow bench offline on the text workload comparing engine configurations side by side: the axes
#            in $TEXT_AXES (default `--predictors none,frequency,previous`; also --routing, --scheduling,
#            --max-num-seqs, --max-batch-size) at $TEXT_BUDGETS (default 25%) x $TEXT_BATCH_SIZES (default
#            1,8,32), no baselines; on the bench model the bench stage left in $BENCH_MODEL on this machine,
#            else trained first (needs CORPUS_TGZ either way, for the prompts)
#   serve    moeflow serve on the bench model (left in $BENCH_MODEL by the bench stage on the same machine, else
#            trained first, which needs CORPUS_TGZ) at each of $SERVE_BUDGETS (default 25% and 100%), loaded by
#            moeflow bench serve with random prompts and with the text workload (the corpus test split when
#            CORPUS_TGZ is given, else the committed held-out documents; $SERVE_DATASETS picks either)
#            (needs fastapi, uvicorn, pydantic and opentelemetry-api importable)
#   mixtral  moeflow bench offline on a random model of Mixtral-8x7B's shape (about 94 GB in bfloat16)
#
# moeflow runs from this checkout (PYTHONPATH), on the machine's own torch and transformers. Each stage packs
# its results into OUT_DIR/STAGE.tgz as soon as it ends, so a later stage that runs out of time loses only itself.
set -uo pipefail
stage=$1 out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
moeflow() { python3 -m moeflow.cli "$@"; }
work=$(mktemp -d)
BENCH_MODEL=${BENCH_MODEL:-/tmp/moeflow-bench-model}

pack() {  # pack DIR: results of this stage into OUT_DIR/STAGE.tgz
    tar czf "$out/$stage.tgz" -C "$1" .
}

train_bench() {  # train_bench LOG_DIR [ARGS...]: the bench model into $BENCH_MODEL (needs the corpus in $work)
    local log=$1
    shift
    moeflow train --preset bench --data "$work/corpus" --tokenizer "$work/tokenizer" --out "$BENCH_MODEL" \
        --device cuda --max-minutes "${TRAIN_MINUTES:-4}" --no-progress "$@" 2>&1 | tee "$log/train_log.txt"
}

corpus() {  # unpack CORPUS_TGZ into $work (corpus/ and tokenizer/)
    tar xzf "${CORPUS_TGZ:?set CORPUS_TGZ}" -C "$work"
}

case "$stage" in
tests)
    mkdir -p "$work/r"
    timeout "${TESTS_TIMEOUT:-500}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --durations=25 \
        tests/models tests/experts tests/test_sampling.py tests/routing tests/engine tests/train ${TESTS_ARGS:-} 2>&1 \
        | tee "$work/r/gpu_tests.log"
    echo "tests rc ${PIPESTATUS[0]}" | tee -a "$work/r/gpu_tests.log"
    git rev-parse HEAD >> "$work/r/gpu_tests.log" 2>/dev/null
    pack "$work/r"
    ;;
qwen3)
    moeflow bench offline --synthetic qwen3-30b-a3b-8l --synthetic-dir "$work/model" \
        --budgets 100%,50%,25%,10% --batch-sizes 1,8,16,32,64 --output-len 64 --batches-per-cell 1 \
        --baselines transformers,accelerate --accelerate-batch-sizes 1,16 --out "$work/r" 2>&1 | tee "$work/log"
    cp "$work/log" "$work/r/log.txt"
    pack "$work/r"
    ;;
tiny)
    tar xzf "${CORPUS_TGZ:?set CORPUS_TGZ}" -C "$work"
    moeflow train --preset tiny --data "$work/corpus" --tokenizer "$work/tokenizer" --out "$work/moeflow-tiny" \
        --device cuda --max-minutes "${TINY_MINUTES:-4}" --override micro_batch=32 --override max_shard_size=12MB \
        --card --no-progress 2>&1 | tee "$work/train_log.txt"
    # shards one file each (a file coming back is at most 16 MiB), the rest in one archive
    cp "$work/moeflow-tiny"/*.safetensors "$out/"
    tar czf "$out/tiny-files.tgz" -C "$work" train_log.txt -C "$work/moeflow-tiny" --exclude='*.safetensors' .
    # later stages of this call (the GPU tests) use the new model
    rm -rf moeflow/assets/moeflow-tiny && cp -r "$work/moeflow-tiny" moeflow/assets/moeflow-tiny
    ;;
bench)
    corpus
    mkdir -p "$work/r/model"
    train_bench "$work/r" --card --card-max-tokens 32768
    cp "$BENCH_MODEL"/{README.md,routing_stats.json,expert_usage.png,training_log.json} "$work/r/model/"
    moeflow bench offline --model "$BENCH_MODEL" --workload text --data "$work/corpus" \
        --budgets 100%,50%,25%,10% --batch-sizes 1,8,32 --batches-per-cell "${BATCHES_PER_CELL:-3}" \
        --output-len 64 --baselines transformers,accelerate --accelerate-batch-sizes 1,8 --out "$work/r" 2>&1 \
        | tee "$work/log"
    cp "$work/log" "$work/r/log.txt"
    pack "$work/r"
    cat "$work/r/summary.md"
    ;;
text)
    corpus
    mkdir -p "$work/r"
    if [ ! -f "$BENCH_MODEL/config.json" ]; then  # a fresh machine: train the bench model first (no card)
        train_bench "$work/r"
    fi
    read -ra axes <<< "${TEXT_AXES:---predictors none,frequency,previous}"
    moeflow bench offline --model "$BENCH_MODEL" --workload text --data "$work/corpus" \
        --budgets "${TEXT_BUDGETS:-25%}" --batch-sizes "${TEXT_BATCH_SIZES:-1,8,32}" \
        --batches-per-cell "${BATCHES_PER_CELL:-3}" --output-len 64 --baselines "" "${axes[@]}" --out "$work/r" 2>&1 \
        | tee "$work/log"
    cp "$work/log" "$work/r/log.txt"
    pack "$work/r"
    cat "$work/r/summary.md"
    ;;
serve)
    mkdir -p "$work/r"
    data=tests/data/heldout
    if [ -n "${CORPUS_TGZ:-}" ]; then corpus; data="$work/corpus"; fi
    if [ ! -f "$BENCH_MODEL/config.json" ]; then  # a fresh machine: train the bench model first (no card)
        [ -d "$work/corpus" ] || corpus
        train_bench "$work/r"
    fi
    for budget in ${SERVE_BUDGETS:-25% 100%}; do
        tag=${budget%\%}
        python3 -m moeflow.cli serve "$BENCH_MODEL" --expert-budget "$budget" --port 8111 --max-num-seqs 32 \
            --log-level warning &
        server=$!
        python3 - <<'PY'
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen("http://127.0.0.1:8111/health", timeout=1)
        break
    except OSError:
        time.sleep(0.5)
PY
        for dataset in ${SERVE_DATASETS:-random text}; do
            if [ $dataset = random ]; then set -- --dataset random --input-len 128; else
                set -- --dataset text --data "$data"; fi
            echo "== budget $budget, dataset $dataset" | tee -a "$work/r/serve.txt"
            timeout "${SERVE_TIMEOUT:-150}" python3 -m moeflow.cli bench serve --base-url http://127.0.0.1:8111 \
                --num-prompts "${SERVE_PROMPTS:-256}" --request-rate inf --max-concurrency 32 "$@" \
                --output-len 64 --disable-tqdm --result-file "$work/r/serve-$tag-$dataset.json" 2>&1 \
                | tee -a "$work/r/serve.txt"
            pack "$work/r"
        done
        kill -INT $server
        wait $server
    done
    ;;
mixtral)
    moeflow bench offline --synthetic mixtral-8x7b --budgets 100%,50%,25%,10% --batch-sizes 1,8 --output-len 16 \
        --batches-per-cell 1 \
        --baselines "" --out "$work/r" 2>&1 | tee "$work/log"
    cp "$work/log" "$work/r/log.txt"
    pack "$work/r"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
