#!/usr/bin/env bash
# The wheels scripts/device_bench.sh installs on a bare GPU box (python 3.12, which has torch,
# timm, Lightning, OpenCV, pandas and scikit-learn but not these), into .whl/ (git-ignored; pass
# it to the device tool as `carry`). Usage: scripts/gpu_wheels.sh [PYTHON]
set -euo pipefail
python=${1:-.venv/bin/python}
mkdir -p .whl
"$python" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl albumentations==2.0.8 albucore==0.0.24 "omegaconf>=2.4.0.dev0,<2.5" \
  antlr4-python3-runtime==4.11.1 pydantic pydantic-core annotated-types typing-inspection \
  typing-extensions simsimd stringzilla matplotlib contourpy cycler fonttools kiwisolver pyparsing \
  tensorboard tensorboard-data-server markdown werkzeug absl-py grpcio protobuf
du -sh .whl
