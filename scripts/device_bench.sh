#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run: the CUDA-only tests, `make bench` sized for a
# GPU box with the CPU and GPU data paths side by side (efficientnet_b0 at 256 px in 16-mixed and
# bf16-mixed, efficientnet_b5 at 456 px in 16-mixed), and `make demo` with the B5 settings.
#
# Usage: scripts/device_bench.sh [OUTPUT_DIR] [STEPS...]
#   STEPS: any of tests b0 b0bf16 b5 demo (default: all, in that order)
#   SCALE=tiny: CPU-sized figures, to rehearse the whole script on a machine without a GPU.
# Wheels in .whl/ (made by scripts/gpu_wheels.sh; carry it) are installed first on a machine
# without albumentations/omegaconf (and matplotlib/tensorboard where missing); `make` then runs
# on the machine's python3 (VENV trick).
set -uo pipefail
out=${1:-runs/device}
shift || true
steps=${*:-tests b0 b0bf16 b5 demo}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD

install_missing() {  # wheels of a group, only when its module does not import
  local module=$1; shift
  python3 -c "import $module" 2>/dev/null && return 0
  local files=()
  for prefix in "$@"; do files+=(.whl/"$prefix"-*.whl); done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "${files[@]}" || return 1
}
if ls .whl/*.whl >/dev/null 2>&1; then
  export PYTHONPATH=$PWD:/tmp/site
  install_missing albumentations albumentations albucore pydantic pydantic_core annotated_types \
    typing_inspection typing_extensions simsimd stringzilla
  install_missing omegaconf omegaconf antlr4_python3_runtime
  install_missing matplotlib matplotlib contourpy cycler fonttools kiwisolver pyparsing
  install_missing tensorboard tensorboard tensorboard_data_server markdown werkzeug absl_py grpcio protobuf
fi
# `make` on this python: a VENV whose bin/python execs python3 (keeping its site-packages)
venv=/tmp/devvenv
mkdir -p $venv/bin
printf '#!/bin/sh\nexec python3 "$@"\n' > $venv/bin/python
chmod +x $venv/bin/python
touch "$venv/.installed-$(printf '%s' none | cksum | cut -d' ' -f1)"  # the stamp of TORCH=none

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi") \
  | tee "$out/gpu.txt"
python3 -c "import torch, torchvision, timm, pytorch_lightning as pl, albumentations as A, os; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'lightning', pl.__version__, 'albumentations', A.__version__, 'cpus', os.cpu_count(), 'commit', os.popen('git rev-parse --short HEAD').read().strip())" 2>&1 | tee -a "$out/gpu.txt"

if [ "${SCALE:-}" = tiny ]; then
  b0="bench.jpeg_size=256 bench.crop_size=128 bench.n_images=192 bench.batch_size=16 bench.train_steps=6 bench.warmup_steps=2 bench.num_workers=2 infer.batch_size=32"
  b5="bench.backbone=test_efficientnet bench.jpeg_size=256 bench.image_size=160 bench.crop_size=128 bench.n_images=96 bench.batch_size=8 bench.train_steps=5 bench.warmup_steps=2 bench.num_workers=2 infer.batch_size=16"
  demo="model.backbone=test_efficientnet synthetic.image_size=160 data.image_size=160 data.crop_size=128 synthetic.n_patients=12 synthetic.n_test_patients=4 synthetic.n_external_lesions=8 data.num_workers=2"
  p16=32-true pbf=32-true  # no fp16 on a CPU: autocast to float16 there is very slow
  limit=600
else
  p16=16-mixed pbf=bf16-mixed
  b0="bench.jpeg_size=512 bench.crop_size=256 bench.n_images=4096 bench.batch_size=128 bench.train_steps=30 bench.warmup_steps=8 bench.num_workers=14 infer.batch_size=256"
  b5="bench.backbone=efficientnet_b5 bench.jpeg_size=512 bench.image_size=512 bench.crop_size=456 bench.n_images=768 bench.batch_size=24 bench.train_steps=24 bench.warmup_steps=6 bench.num_workers=14 infer.batch_size=64"
  demo="model.backbone=efficientnet_b5 synthetic.image_size=512 data.image_size=512 data.crop_size=456 data.batch_size=24 infer.batch_size=64 data.num_workers=12 synthetic.n_jobs=16"
  limit=240
fi

bench() {  # name, timeout, overrides...
  local name=$1 seconds=$2; shift 2
  rm -f /tmp/bench/bench.json
  timeout "$seconds" python3 scripts/bench.py bench.work_dir=/tmp/bench "$@" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s" > "$out/bench_$name.log"
  echo "== bench $name: exit ${PIPESTATUS[0]}"; grep -A45 "benchmark (" "$out/bench_$name.log" | head -50
  cp /tmp/bench/bench.json "$out/bench_$name.json" 2>/dev/null
  cp /tmp/bench/profile_*.txt "$out/" 2>/dev/null; rm -f /tmp/bench/profile_*.txt
}

for step in $steps; do
  case $step in
    tests)
      timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_gpu.py \
        > "$out/gpu_tests.log" 2>&1
      echo "== gpu tests: exit $?"; tail -5 "$out/gpu_tests.log" ;;
    b0) bench b0_fp16 "$((limit + 40))" $b0 train.precision=$p16 bench.repeats=2 bench.profile=true ;;
    b0bf16) bench b0_bf16 "$((limit - 60))" $b0 train.precision=$pbf bench.repeats=1 ;;
    b5) bench b5_fp16 "$((limit - 40))" $b5 train.precision=$p16 bench.repeats=1 ;;
    demo)
      start=$(date +%s)
      timeout "$((limit + 60))" make demo VENV=$venv TORCH=none ARGS="$demo data.decode=auto train.precision=$p16 train.epochs=2" > "$out/demo.log" 2>&1
      echo "== make demo (B5 settings): exit $? in $(( $(date +%s) - start )) s"
      tr '\r' '\n' < "$out/demo.log" | grep -v "it/s" | grep -E "AUC|wrote|ERROR|Error|rror:" | tail -15 ;;
    *) echo "unknown step $step" ;;
  esac
done
