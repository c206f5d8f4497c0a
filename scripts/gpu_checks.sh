#!/usr/bin/env bash
# The GPU checks of the issues, run as one script on a lent GPU machine (see README "Benchmarks").
# Expects /tmp/keep to hold: wheels/ (jiwer, soundfile, soxr, ...), speech/ (FLAC clips + manifest.csv),
# w1..w3.safetensors (whisper-base, fp16, split to fit the transfer limit) and model-base/ (its other files).
# Writes every result under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
K=/tmp/keep
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $K/wheels/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/machine.txt
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a $OUT/machine.txt
# whisper-base from its three parts
python3 - <<'PY'
import os, shutil
from safetensors.torch import load_file, save_file
k = "/tmp/keep"; dst = "/tmp/whisper-base"
if not os.path.exists(f"{dst}/model.safetensors"):
    shutil.copytree(f"{k}/model-base", dst, dirs_exist_ok=True)
    sd = {}
    for n in (1, 2, 3):
        sd.update(load_file(f"{k}/w{n}.safetensors"))
    save_file(sd, f"{dst}/model.safetensors", metadata={"format": "pt"})
print("whisper-base ready")
PY
run() { local name=$1; shift; echo "=== $name: $*"; timeout "${T:-240}" "$@" 2>&1 | tail -n 60 | tee "$OUT/$name.log"; }
T=150 run asr python3 scripts/bench_asr.py --device cuda --model /tmp/whisper-base --manifest $K/speech/manifest.csv \
  --systems batchcap batchcap-full batchcap-fp32 hf-pipeline --batch-size 32 --json $OUT/asr.json
T=90 run images python3 scripts/bench_images.py --device cuda --images 64 --rounds 2 --url-images 128 \
  --batch-size 16 64 --json $OUT/images.json
T=110 run train_audio python3 scripts/finetune_whisper_real.py --model /tmp/whisper-base --language en \
  --train $K/speech/train.csv --test $K/speech/test.csv --out /tmp/ft-audio --device cuda --max-steps 80 \
  --batch-size 16
cp /tmp/ft-audio/report.json $OUT/train_audio_report.json 2>/dev/null
T=35 run train_images python3 -m batchcap.cli train images samples/images/manifest.csv -o /tmp/ft-images \
  --model "$HOME/.cache/batchcap-dev/bench-vit-gpt2" --epochs 2 --batch-size 3 --val-fraction 0 --device cuda
T=25 run caption_after_train python3 -m batchcap.cli images samples/images -o /tmp/ft-caps.parquet \
  --model /tmp/ft-images --device cuda
echo done
