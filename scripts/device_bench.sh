#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run: `make bench` sized for a GPU box, plus the
# CUDA-only tests. Usage: scripts/device_bench.sh [OUTPUT_DIR]   (wheels in .whl/ are installed
# first when present, for a machine without albumentations/omegaconf)
set -uo pipefail
out=${1:-runs/device}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm, pytorch_lightning as pl, albumentations as A; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', pl.__version__, 'albumentations', A.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/gpu.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_gpu.py > "$out/gpu_tests.log" 2>&1; tail -3 "$out/gpu_tests.log"
timeout 300 python3 scripts/bench.py bench.backbone=efficientnet_b0 bench.jpeg_size=512 \
  bench.crop_size=256 bench.n_images=6144 bench.batch_size=128 bench.train_steps=40 \
  bench.warmup_steps=8 bench.num_workers=14 bench.repeats=2 infer.batch_size=256 \
  bench.work_dir=/tmp/bench 2>&1 | grep -v "it/s" | tee "$out/bench.log"
cp /tmp/bench/bench.json "$out/bench.json" 2>/dev/null
timeout 240 python3 scripts/bench.py train.precision=bf16-mixed bench.backbone=efficientnet_b0 \
  bench.jpeg_size=512 bench.crop_size=256 bench.n_images=6144 bench.batch_size=128 \
  bench.train_steps=40 bench.warmup_steps=8 bench.num_workers=14 bench.repeats=2 \
  infer.batch_size=256 bench.work_dir=/tmp/bench 2>&1 | grep -v "it/s" | tee "$out/bench_bf16.log"
cp /tmp/bench/bench.json "$out/bench_bf16.json" 2>/dev/null
