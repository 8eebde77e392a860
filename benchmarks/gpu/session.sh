#!/usr/bin/env bash
# Issue 12's GPU measurements as one prepared script, in two parts that each fit one `run` call (600 s):
#   bash benchmarks/gpu/session.sh train      # SmolLM2-135M eager and compiled, a 1B-class shape (~7 min)
#   bash benchmarks/gpu/session.sh generate   # the 1,319 GSM8K test questions, cap 256, every GPU backend (~4 min)
# Needs .gpu/ from benchmarks/gpu/pack.sh (carried along), torch and transformers; each step has its own time
# limit, so one that hangs costs only itself. Everything printed also lands in $OUT (the device tool brings it
# back), one file per step. Goals: >= 30% MFU (SmolLM2), >= 45% (1B class), generation <= 5 s.
set -uo pipefail
cd "$(dirname "$0")/../.."
part=${1:-}
[[ $part == train || $part == generate ]] || { echo "session.sh: give train or generate, not '$part'" >&2; exit 2; }
py=${PYTHON:-python3}
out=${OUT:-/tmp/sftkey-gpu-out}
mkdir -p "$out"
model=.gpu/model data=.gpu/gsm8k
[[ -f $model/config.json && -f $data/train.jsonl ]] || { echo "no .gpu/: run benchmarks/gpu/pack.sh and carry .gpu" >&2; exit 2; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS COMMAND...: run one measurement under its own limit, keep its output
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

{ nvidia-smi -L; $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
    2>&1 | tee "$out/machine.txt"
train="$py benchmarks/train_throughput.py --model $model --random-weights --data $data/train.jsonl --arms sft_tag"
case $part in
train)
    step smollm2-eager 120 $train --batch-size 32 --steps 10 --warmup 3
    step smollm2-compiled 240 $train --batch-size 32 --steps 10 --warmup 3 --compile regional
    step llama1b-eager 180 $train --shape llama-1b --batch-size 16 --steps 6 --warmup 2
    ;;
generate)
    step generate-gsm8k 330 $py benchmarks/generate_speed.py --model $model --random-weights --data $data/test.jsonl \
        --batch-size 448 --max-new-tokens 256 --dtype bfloat16 --impl gpu --gguf none
    ;;
esac
