#!/usr/bin/env bash
# Put what benchmarks/gpu/session.sh needs into .gpu/ (ignored by git) so that one `run` call can carry it:
# the default model's config and tokenizer (the benchmarks use random weights: same speed, 3.5 MB instead of
# 257 MB) and GSM8K train/test. About 9 MB, well under the 64 MiB a call carries.
#   bash benchmarks/gpu/pack.sh [model folder] [data folder]
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-$HOME/.cache/sftkey/models/SmolLM2-135M-Instruct}
data=${2:-../shared/data/gsm8k}
for f in "$model/config.json" "$model/tokenizer.json" "$data/train.jsonl" "$data/test.jsonl"; do
    [[ -f $f ]] || { echo "pack.sh: $f is missing (give the model folder and the GSM8K folder)" >&2; exit 2; }
done
rm -rf .gpu && mkdir -p .gpu/model .gpu/gsm8k
cp "$model"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/model/
cp "$model"/chat_template.jinja .gpu/model/ 2>/dev/null || true
cp "$data"/{train,test}.jsonl .gpu/gsm8k/
mkdir -p .git/info && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; }
du -sh .gpu
echo 'next: run(command="bash benchmarks/gpu/session.sh train", carry=[".gpu"]), then at once "... generate"'
