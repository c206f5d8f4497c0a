#!/usr/bin/env bash
# The GPU checks of the issues, as one run on a lent GPU machine (see README "Benchmarks").
#
# The machine is bare and offline: everything it needs beyond its own PyTorch/transformers travels in
# .gpu/ (scripts/gpu_bundle.py: whisper-tiny.en packed to fit the transfer, FLAC clips, wheels).
#   device run: carry [".gpu"], command "bash scripts/gpu_checks.sh", timeout_s 600 (each check has its own
#   limit; on an H200 checks 1-3 and 5-6 took about 290 s, check 4 alone 140 s: use ONLY= to split)
# Dry run on a CPU: DEVICE=cpu QUICK=1 OUT=/tmp/gpu-out bash scripts/gpu_checks.sh
# Every result lands under $OUT: asr.json and one .log per check (8 files, the most that come back);
# the machine's name and versions are printed first.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-out}
B=${BUNDLE:-.gpu}
export QUICK=${QUICK:-0}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$B"/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  export PYTHONPATH=$PWD
fi
python3 -c "import os, torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cpus', os.cpu_count())"

MODEL=/tmp/gpu-model  # whisper-tiny.en as the bundle carries it (or another packed checkpoint)
[ -f $MODEL/model.safetensors ] || python3 scripts/gpu_bundle.py --unpack "$B/model" $MODEL || exit 1
if [ "$QUICK" = 1 ]; then LIMIT=(--limit 12); BS=8; REP=1; IMG=(--images 8 --rounds 1 --url-images 16); FEW=12;
else LIMIT=(); BS=${BS:-64}; REP=3; IMG=(--images 64 --rounds 2 --url-images 128); FEW=0; fi
# the same clips listed four times (a longer run: the first batch's CUDA warm-up weighs less), and long
# recordings of about 150 s joined from them
python3 scripts/gpu_bundle.py --limit $FEW --repeat "$B/speech/manifest.csv" /tmp/gpu-speech-x4.csv 4 || exit 1
python3 scripts/gpu_bundle.py --limit $FEW --join "$B/speech/manifest.csv" /tmp/gpu-long $([ "$QUICK" = 1 ] && echo 20 || echo 150) \
  || exit 1

ONLY=${ONLY:-}  # e.g. ONLY="long cli": only those checks
run() {
  local name=$1 limit=$2; shift 2
  [ -z "$ONLY" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?" >> "$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
}

# 1. whisper-tiny.en on the clips: batchcap (default and full window) against the transformers pipeline
run asr 130 python3 scripts/bench_asr.py --device "$DEVICE" --model $MODEL --manifest "$B/speech/manifest.csv" \
  "${LIMIT[@]}" --systems batchcap hf-pipeline batchcap-full --batch-size $BS --repeat $REP --json "$OUT/asr.json"
# 2. four times the audio
run asr_x4 100 python3 scripts/bench_asr.py --device "$DEVICE" --model $MODEL --manifest /tmp/gpu-speech-x4.csv \
  --systems batchcap hf-pipeline --batch-size $BS --repeat 2
# 3. captions: random ViT-base + GPT-2 (built there), fp16 batch 64 against the pipeline; URLs vs local files
run images 110 python3 scripts/bench_images.py --device "$DEVICE" "${IMG[@]}" --batch-size $BS \
  --systems pipeline-b8 batchcap url
# 4. long recordings (#10): batched long-form against sequential and against the same speech as clips,
#    then all of them joined (repeated) into one recording of about an hour
run long 130 python3 scripts/bench_long.py --manifest /tmp/gpu-long/manifest.csv --model $MODEL --batch-size $BS \
  --systems batchcap batchcap-sequential batchcap-clips $([ "$QUICK" = 1 ] || echo --hour)
# 5. the CLI end to end, imports and model load included
run cli 50 bash -c "TIMEFORMAT='wall %R s'; time python3 -m batchcap.cli audio /tmp/gpu-speech-x4.csv \
  -o /tmp/gpu-cli.parquet --overwrite --model $MODEL --device $DEVICE --batch-size $BS"
# 6. where the time goes on this device (torch.profiler over one warm pass)
run profile 50 python3 scripts/profile_asr.py --device "$DEVICE" --model $MODEL --manifest "$B/speech/manifest.csv" \
  "${LIMIT[@]}" --batch-size $BS --rows 30
# 7. what the first pass of a fresh process pays once (compare with 6)
run profile_first 50 python3 scripts/profile_asr.py --device "$DEVICE" --model $MODEL \
  --manifest "$B/speech/manifest.csv" "${LIMIT[@]}" --batch-size $BS --rows 30 --first
echo done
